"""The declared table of which result file feeds which report or headline (``sources.json``).

Reports read result files only through :func:`paths` / :func:`load`, never by a name of their own;
``benchmarks/run.py SUITE --promote`` repoints a key at a new run's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _provenance import PRE_PROVENANCE, read_provenance

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SOURCES = BENCH / "sources.json"


def table() -> dict[str, dict[str, Any]]:
    """Every key of ``sources.json`` (``_doc`` left out)."""
    return {k: v for k, v in json.loads(SOURCES.read_text()).items() if not k.startswith("_")}


def paths(key: str) -> list[Path]:
    """The result files of ``key``, in declared order; a declared file that is missing is an
    error (a report must not silently drop a source)."""
    entry = table().get(key)
    if entry is None:
        raise KeyError(f"benchmarks/sources.json has no key {key!r}")
    out = [RESULTS / f for f in entry["files"]]
    missing = [str(p.relative_to(BENCH.parent)) for p in out if not p.exists()]
    if missing:
        raise FileNotFoundError(f"sources.json key {key!r} names missing files: {missing}")
    return out


def load(key: str) -> list[dict[str, Any]]:
    """The parsed JSON of each file of ``key``."""
    return [json.loads(p.read_text()) for p in paths(key)]


def label(key: str, path: Path) -> str:
    """The declared label of one file of ``key`` (``labels`` in sources.json), or ``""``."""
    return table()[key].get("labels", {}).get(path.name, "")


def cite(path: Path, result: dict[str, Any]) -> str:
    """``benchmarks/results/<file>`` with its commit, device and date, for beside a figure."""
    prov = read_provenance(result)
    dev = prov["device"]
    if isinstance(dev, dict):
        dev = dev.get("gpu") or dev.get("cpu")
    parts = [str(dev)]
    if prov["utc"] != PRE_PROVENANCE:
        parts.append(str(prov["utc"])[:10])
    com = prov["commit"]
    parts.append(f"commit {com}" if com != PRE_PROVENANCE else "no commit recorded")
    return f"`{path.relative_to(BENCH.parent)}` ({', '.join(parts)})"
