"""Where a result file written by the ``minference`` CLI was made (its ``"provenance"`` block).

The same fields as the benchmark scripts record (``benchmarks/_provenance.py``, which this package
does not import): ``commit`` and ``dirty`` (only when the running code is a git checkout of this
project, else ``None``), ``argv``, ``device``, ``versions`` and ``utc``.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: distributions whose versions are recorded (absent ones as ``None``)
VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "minference-kernels",
    "minference-patterns",
    "minference-hf",
    "minference-vllm",
)

#: this file's place in a checkout of the project (``<root>/packages/minference-hf/src/...``)
_IN_CHECKOUT = ("packages", "minference-hf", "src", "minference_hf")


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.check_output(
            ["git", "-C", str(root), *args], text=True, stderr=subprocess.DEVNULL, timeout=10
        ).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def checkout_root(here: Path | None = None) -> Path | None:
    """The project checkout ``here`` (this package's folder by default) lives in, or ``None``
    (an installed wheel: no commit to record)."""
    pkg = (here or Path(__file__)).resolve().parent
    if pkg.parts[-len(_IN_CHECKOUT) :] != _IN_CHECKOUT:
        return None
    root = pkg.parents[len(_IN_CHECKOUT) - 1]
    top = _git(root, "rev-parse", "--show-toplevel")
    return root if top is not None and Path(top).resolve() == root else None


def commit(here: Path | None = None) -> str | None:
    """The short commit of the running code: ``MINFERENCE_COMMIT`` when set (a copied tree whose
    ``.git`` is stale), else the checkout's ``HEAD``, else ``None``."""
    if os.environ.get("MINFERENCE_COMMIT"):
        return os.environ["MINFERENCE_COMMIT"]
    root = checkout_root(here)
    return None if root is None else _git(root, "rev-parse", "--short", "HEAD")


def dirty(here: Path | None = None) -> bool | None:
    """Whether the checkout's tracked files differ from its commit (``None``: unknown)."""
    if os.environ.get("MINFERENCE_COMMIT"):
        return None
    root = checkout_root(here)
    out = None if root is None else _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def device() -> dict[str, Any]:
    """The CPU model and, when torch sees one, the CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "gpu": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_count"] = torch.cuda.device_count()
        out["cuda"] = torch.version.cuda
    return out


def versions() -> dict[str, str | None]:
    """Python's version and those of :data:`VERSIONED` (torch: the running build)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
    return out


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """``commit``, ``dirty``, ``argv`` (``sys.argv`` by default: the process's command line),
    ``device``, ``versions`` and ``utc``."""
    return {
        "commit": commit(),
        "dirty": dirty(),
        "argv": list(sys.argv if argv is None else argv),
        "device": device(),
        "versions": versions(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
