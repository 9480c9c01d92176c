"""What a benchmark result records about where it ran (shared by the benchmark scripts).

Every result file a benchmark writes carries a ``"provenance"`` block (:func:`provenance`): the
commit, the exact command line, the device, the versions and the time. Scripts write JSON through
:func:`write_json`, text through :func:`write_text` (one ``# provenance: {...}`` header line), so
no script has its own copy of this. The block itself comes from ``minference_kernels``'s private
provenance reader, the one ``minference eval`` uses too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from minference_kernels import _provenance as _core

ROOT = Path(__file__).resolve().parents[1]

#: distributions whose versions a result records (absent ones are recorded as ``None``)
VERSIONED = _core.VERSIONED

#: what :func:`provenance` says of result files written before provenance was recorded
PRE_PROVENANCE = "unknown, pre-dates provenance"

#: the CPU and CUDA device, and the versions, as ``minference eval`` records them
device = _core.device
versions = _core.versions


def commit() -> str:
    """The short commit hash; ``MINFERENCE_COMMIT`` wins (a copied tree whose ``.git`` is stale,
    as on the device machine); ``"unknown"`` without git."""
    return _core.commit(ROOT) or "unknown"


def dirty() -> bool | None:
    """Whether tracked files differ from the commit (``None`` without git or when
    ``MINFERENCE_COMMIT`` names the commit: the copy's ``.git`` says nothing then)."""
    return _core.dirty(ROOT)


def provenance(
    argv: list[str] | None = None, result: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Where and how a result was made: ``commit``, ``dirty`` (not counting ``result``, the file
    being written), ``argv`` (the script and its exact arguments, ``sys.argv`` by default),
    ``device``, ``versions`` and ``utc`` time."""
    out = _core.block(ROOT, argv, () if result is None else (Path(result),))
    out["commit"] = out["commit"] or "unknown"
    return out


def write_json(path: str | os.PathLike, result: dict, **dump_kwargs: Any) -> None:
    """Write ``result`` as JSON to ``path`` with a fresh ``"provenance"`` block (added to the
    dict, replacing an earlier one: scripts that save partial results call this repeatedly)."""
    result["provenance"] = provenance(result=path)
    dump_kwargs.setdefault("indent", 1)
    Path(path).write_text(json.dumps(result, **dump_kwargs))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text result with one ``# provenance: {json}`` line in front."""
    Path(path).write_text(f"# provenance: {json.dumps(provenance(result=path))}\n{text}")


def read_provenance(result: dict) -> dict[str, Any]:
    """A result's provenance, or what is known of it: older files carry at most ``commit``,
    ``device``, ``date`` and versions at top level; the rest is :data:`PRE_PROVENANCE`."""
    if isinstance(result.get("provenance"), dict):
        return result["provenance"]
    dev = result.get("device")
    return {
        "commit": result.get("commit") or PRE_PROVENANCE,
        "argv": result.get("argv") or PRE_PROVENANCE,
        "device": dev if dev is not None else PRE_PROVENANCE,
        "versions": {k: result[k] for k in ("torch", "triton", "transformers") if k in result}
        or PRE_PROVENANCE,
        "utc": result.get("date") or PRE_PROVENANCE,
    }
