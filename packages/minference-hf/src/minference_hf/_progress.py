"""Minimal progress reporting on stderr (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Throttled ``label: done/total (elapsed)`` lines on a stream.

    On a terminal the line is rewritten in place; otherwise one line is printed at most every
    ``quiet_interval`` seconds. :meth:`close` always prints the final state.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float = 0.25,
        quiet_interval: float = 5.0,
    ) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else quiet_interval
        self.start = time.perf_counter()
        self._last = 0.0
        self._closed = False

    def _line(self, note: str) -> str:
        pct = 100.0 * self.done / self.total
        el = time.perf_counter() - self.start
        extra = f" {note}" if note else ""
        return f"{self.label}: {self.done}/{self.total} ({pct:3.0f}%, {el:6.1f} s){extra}"

    def update(self, n: int = 1, note: str = "") -> None:
        """Advance by ``n`` and maybe print."""
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval or self.done == self.total:
            self._last = now
            end = "" if self.tty else "\n"
            prefix = "\r" if self.tty else ""
            self.stream.write(prefix + self._line(note) + end)
            self.stream.flush()

    def close(self, note: str = "") -> None:
        """Print the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            prefix = "\r" if self.tty else ""
            self.stream.write(prefix + self._line(note) + "\n")
            self.stream.flush()
