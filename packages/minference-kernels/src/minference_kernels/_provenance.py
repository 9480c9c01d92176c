"""Where a result was made: the ``"provenance"`` block that ``minference eval`` (minference-hf) and
the benchmark scripts (``benchmarks/_provenance.py``) write into their result files. Private: one
reader of the commit, device and versions for both, so the two blocks cannot drift apart.

A block holds ``commit`` and ``dirty`` (of the git checkout the running code lives in; ``None``
where there is none), ``argv``, ``device``, ``versions`` and ``utc``.
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

#: distributions whose versions a block records (absent ones as ``None``)
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


def git(root: Path, *args: str) -> str | None:
    """``git -C root ARGS``'s stripped output, or ``None`` (no git, not a repository, an error)."""
    try:
        return subprocess.check_output(
            ["git", "-C", str(root), *args], text=True, stderr=subprocess.DEVNULL, timeout=10
        ).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def commit(root: Path | None) -> str | None:
    """The short commit of the checkout at ``root``: ``MINFERENCE_COMMIT`` when set (a copied tree
    whose ``.git`` is stale, as on a device machine), else ``HEAD``, else ``None``."""
    if os.environ.get("MINFERENCE_COMMIT"):
        return os.environ["MINFERENCE_COMMIT"]
    return None if root is None else git(root, "rev-parse", "--short", "HEAD")


def dirty(root: Path | None, ignore: tuple[Path, ...] = ()) -> bool | None:
    """Whether the checkout's tracked files differ from its commit (``None``: unknown, or
    ``MINFERENCE_COMMIT`` names the commit and the copy's ``.git`` says nothing). ``ignore``: files
    not counted, such as the result file being written (a script that saves partial results into
    a tracked file would otherwise call itself dirty from its second save on)."""
    if os.environ.get("MINFERENCE_COMMIT") or root is None:
        return None
    spec = []
    top = git(root, "rev-parse", "--show-toplevel") if ignore else None
    for p in ignore:
        try:
            rel = Path(p).resolve().relative_to(Path(top or root).resolve())
        except ValueError:  # outside the checkout: not one of its files
            continue
        spec.append(f":(top,exclude){rel}")
    # the whole checkout (":/"), whichever folder of it ``root`` is, less the ignored files
    out = git(
        root,
        "status",
        "--porcelain",
        "--untracked-files=no",
        *(["--", ":/", *spec] if spec else []),
    )
    return None if out is None else bool(out)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
    """The CPU model and, when torch is loaded and sees one, the CUDA device."""
    out: dict[str, Any] = {"cpu": _cpu_model(), "gpu": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_count"] = torch.cuda.device_count()
        out["cuda"] = torch.version.cuda
    return out


def versions() -> dict[str, str | None]:
    """Python's version and those of :data:`VERSIONED` (torch: the running build, which may differ
    from its metadata for a local or CUDA build)."""
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


def block(
    root: Path | None, argv: list[str] | None = None, ignore: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """The provenance block of a result made by code in the checkout at ``root`` (``None``: not a
    checkout): ``commit``, ``dirty`` (``ignore``: as :func:`dirty`'s), ``argv`` (``sys.argv`` by
    default), ``device``, ``versions`` and ``utc``."""
    return {
        "commit": commit(root),
        "dirty": dirty(root, ignore),
        "argv": list(sys.argv if argv is None else argv),
        "device": device(),
        "versions": versions(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
