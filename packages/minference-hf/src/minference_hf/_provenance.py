"""Where a result file written by the ``minference`` CLI was made (its ``"provenance"`` block).

The block is the one the benchmark scripts write (both come from ``minference_kernels``'s private
provenance reader): ``commit`` and ``dirty`` only when the running code is a git checkout of this
project (else ``None``), ``argv``, ``device``, ``versions`` and ``utc``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minference_kernels import _provenance as _core

#: this file's place in a checkout of the project (``<root>/packages/minference-hf/src/...``)
_IN_CHECKOUT = ("packages", "minference-hf", "src", "minference_hf")


def checkout_root(here: Path | None = None) -> Path | None:
    """The project checkout ``here`` (this package's folder by default) lives in, or ``None``
    (an installed wheel: no commit to record)."""
    pkg = (here or Path(__file__)).resolve().parent
    if pkg.parts[-len(_IN_CHECKOUT) :] != _IN_CHECKOUT:
        return None
    root = pkg.parents[len(_IN_CHECKOUT) - 1]
    top = _core.git(root, "rev-parse", "--show-toplevel")
    return root if top is not None and Path(top).resolve() == root else None


def commit(here: Path | None = None) -> str | None:
    """The short commit of the running code (``MINFERENCE_COMMIT`` wins), or ``None``."""
    return _core.commit(checkout_root(here))


def dirty(here: Path | None = None) -> bool | None:
    """Whether the checkout's tracked files differ from its commit (``None``: unknown)."""
    return _core.dirty(checkout_root(here))


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """``commit``, ``dirty``, ``argv`` (``sys.argv`` by default: the process's command line),
    ``device``, ``versions`` and ``utc``."""
    return _core.block(checkout_root(), argv)
