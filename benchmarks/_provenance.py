"""What a benchmark result records about where it ran (shared by the benchmark scripts).

Every result file a benchmark writes carries a ``"provenance"`` block (:func:`provenance`): the
commit, the exact command line, the device, the versions and the time. Scripts write JSON through
:func:`write_json`, text through :func:`write_text` (one ``# provenance: {...}`` header line), so
no script has its own copy of this.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: distributions whose versions a result records (absent ones are recorded as ``None``)
VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "vllm",
    "minference-kernels",
    "minference-patterns",
    "minference-hf",
    "minference-vllm",
)

#: what :func:`provenance` says of result files written before provenance was recorded
PRE_PROVENANCE = "unknown, pre-dates provenance"


def commit() -> str:
    """The short commit hash; ``MINFERENCE_COMMIT`` wins (a copied tree whose ``.git`` is stale,
    as on the device machine); ``"unknown"`` without git."""
    if os.environ.get("MINFERENCE_COMMIT"):
        return os.environ["MINFERENCE_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dirty() -> bool | None:
    """Whether tracked files differ from the commit (``None`` without git or when
    ``MINFERENCE_COMMIT`` names the commit: the copy's ``.git`` says nothing then)."""
    if os.environ.get("MINFERENCE_COMMIT"):
        return None
    try:
        out = subprocess.check_output(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            text=True,
            stderr=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
    """The CPU model, and the CUDA device's name when torch sees one (without importing torch
    when the script has not: a CPU-only script stays CPU-only)."""
    out: dict[str, Any] = {"cpu": _cpu_model(), "gpu": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_count"] = torch.cuda.device_count()
        out["cuda"] = torch.version.cuda
    return out


def versions() -> dict[str, str | None]:
    """Python and the installed versions of :data:`VERSIONED`."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:  # the running build (a local or CUDA build may differ from metadata)
        out["torch"] = torch.__version__
    return out


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a result was made: ``commit``, ``dirty``, ``argv`` (the script and its exact
    arguments, ``sys.argv`` by default), ``device``, ``versions`` and ``utc`` time."""
    return {
        "commit": commit(),
        "dirty": dirty(),
        "argv": list(sys.argv if argv is None else argv),
        "device": device(),
        "versions": versions(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json(path: str | os.PathLike, result: dict, **dump_kwargs: Any) -> None:
    """Write ``result`` as JSON to ``path`` with a fresh ``"provenance"`` block (added to the
    dict, replacing an earlier one: scripts that save partial results call this repeatedly)."""
    result["provenance"] = provenance()
    dump_kwargs.setdefault("indent", 1)
    Path(path).write_text(json.dumps(result, **dump_kwargs))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text result with one ``# provenance: {json}`` line in front."""
    Path(path).write_text(f"# provenance: {json.dumps(provenance())}\n{text}")


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
