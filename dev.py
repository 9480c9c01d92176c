#!/usr/bin/env python3
"""One entry point for a fresh machine: installs nox if needed, then runs nox sessions.

    python3 dev.py demo     # the main job (sparse pre-fill on an embedded tiny model)
    python3 dev.py test     # every test session CI runs (nox -t ci)

Anything else is passed to nox as-is, e.g. ``python3 dev.py -s bench``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BOOT = ROOT / ".nox" / "_bootstrap"
# The CI sessions' virtual environments take ~29 GiB together (torch in each, vLLM in one; the
# CUDA builds of torch 2.10 and 2.14.1 in deps_oldest and deps_newest: 7.3 and 5.8 GiB).
TEST_DISK_GIB = 30


def _check_disk(need_gib: float) -> None:
    """Say so up front when the disk cannot hold the sessions' environments: pip's late
    'No space left on device' in the middle of an install is easy to misread as a test failure."""
    free = shutil.disk_usage(ROOT).free / 2**30
    if free < need_gib:
        print(
            f"[dev] warning: {free:.1f} GiB free under {ROOT}; the test sessions need about "
            f"{need_gib} GiB for their virtual environments (.nox/). Installs may fail with "
            "'No space left on device'.",
            file=sys.stderr,
            flush=True,
        )


def _nox_python() -> str:
    try:
        import nox  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    py = BOOT / "bin" / "python"
    if not py.exists():
        print(f"[dev] creating {BOOT} with nox", flush=True)
        venv.EnvBuilder(with_pip=True).create(BOOT)
    if subprocess.call([str(py), "-c", "import nox"], stderr=subprocess.DEVNULL) != 0:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "nox>=2024.4"])
    return str(py)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    if argv[0] == "test":
        args = ["-t", "ci", *argv[1:]]
        _check_disk(TEST_DISK_GIB)
    elif argv[0] == "demo":
        args = ["-s", "demo", *(["--", *argv[1:]] if argv[1:] else [])]
    else:
        args = argv
    cmd = [_nox_python(), "-m", "nox", "-f", str(ROOT / "noxfile.py"), *args]
    print("[dev] " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=os.environ.copy())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
