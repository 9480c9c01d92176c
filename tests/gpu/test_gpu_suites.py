"""The GPU correctness suites as pytest tests: ``pytest -m gpu tests/gpu`` (or
``python benchmarks/run.py gpu``) on a CUDA machine; skipped, with the reason, without one, and
deselected in CI's CPU sessions (``-m "not gpu"``).

Each test runs its script (``benchmarks/gpu_check.py``: the grid against float64 attention plus
the timing table; ``benchmarks/gpu_properties.py``: the property suite at long N) in a fresh
process, keeps the JSON summary the script writes (with its provenance block) and fails on any
failed case. Where the JSON goes: ``MINFERENCE_GPU_RESULTS`` (set by ``benchmarks/run.py gpu`` to
``benchmarks/results``), else pytest's temporary folder; the file is named
``<suite>_<MINFERENCE_GPU_TAG>.json`` (default tag ``pytest``). ``MINFERENCE_GPU_QUICK=1`` runs
``gpu_check.py --quick`` (every 5th grid case, no timings).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False)",
    ),
]


def _run(script: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = [
        str(ROOT / "packages" / p / "src") for p in ("minference-kernels", "minference-patterns")
    ]
    env["PYTHONPATH"] = os.pathsep.join([*src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(tmp), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    return proc


def _keep(produced: Path, suite: str, tmp: Path) -> Path:
    """Copy the script's JSON to the results folder under the run's tag; its new path."""
    dest_dir = Path(os.environ.get("MINFERENCE_GPU_RESULTS") or tmp)
    dest = dest_dir / f"{suite}_{os.environ.get('MINFERENCE_GPU_TAG', 'pytest')}.json"
    if produced != dest:
        shutil.copyfile(produced, dest)
    return dest


def test_gpu_check_grid(tmp_path: Path) -> None:
    args = ("--quick",) if os.environ.get("MINFERENCE_GPU_QUICK") == "1" else ()
    proc = _run("gpu_check.py", tmp_path, *args)
    produced = tmp_path / "gpu_check.json"
    assert produced.exists(), f"gpu_check.py wrote no JSON (exit {proc.returncode})"
    log = json.loads(produced.read_text())
    _keep(produced, "gpu_check", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "provenance" in log
    assert log["grid_passed"] > 0
    assert log["failures"] == [], log["failures"][:10]


def test_gpu_properties(tmp_path: Path) -> None:
    proc = _run("gpu_properties.py", tmp_path)
    produced = tmp_path / "gpu_properties.json"
    assert produced.exists(), f"gpu_properties.py wrote no JSON (exit {proc.returncode})"
    log = json.loads(produced.read_text())
    _keep(produced, "gpu_properties", tmp_path)
    assert "provenance" in log
    assert log["total_cases"] > 0
    failed = {k: v["failures"][:3] for k, v in log["checks"].items() if v["failed"]}
    assert log["total_failed"] == 0, failed
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernel_tests_on_the_gpu() -> None:
    """The kernels' own Triton tests that honour ``MINFERENCE_TEST_DEVICE`` run compiled on the
    GPU instead of under the interpreter: the varlen API (each sequence alone, float64 masks,
    full budget equals dense), the semantics tests (Triton estimators against PyTorch, block
    selection and head ranking against a stable sort, tensor descriptors against pointer loads,
    the shared-memory step-down) and the estimation promises (coverage, the sink block, the
    allocation floor)."""
    env = dict(os.environ, MINFERENCE_TEST_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)
    src = [str(ROOT / "packages" / p / "src") for p in ("minference-kernels",)]
    env["PYTHONPATH"] = os.pathsep.join([*src, env.get("PYTHONPATH", "")])
    tests = ROOT / "packages" / "minference-kernels" / "tests"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "triton",
            "-p",
            "no:cacheprovider",
            str(tests / "test_varlen.py"),
            str(tests / "test_semantics.py"),
            str(tests / "test_estimation_promises.py"),
        ],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
