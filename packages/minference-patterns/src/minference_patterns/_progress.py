"""A progress bar: tqdm when installed, else a plain line on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    it: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
) -> Iterable[T]:
    """Wrap ``it`` in a progress display on stderr (nothing if ``enabled`` is False)."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(it, total, desc, unit)
    return tqdm(it, total=total, desc=desc, unit=unit, file=sys.stderr)


def _plain(it: Iterable[T], total: int | None, desc: str, unit: str) -> Iterator[T]:
    start = time.monotonic()
    i = 0
    for i, x in enumerate(it, 1):
        yield x
        of = f"/{total}" if total else ""
        sys.stderr.write(f"\r{desc}: {i}{of} {unit}s ({time.monotonic() - start:.1f} s)")
        sys.stderr.flush()
    if i:
        sys.stderr.write("\n")
        sys.stderr.flush()
