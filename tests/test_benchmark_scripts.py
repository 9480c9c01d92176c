"""The benchmark scripts that have no CPU result of their own still run: each one once on CPU with
tiny shapes, in a fresh process (a rename in a package once broke ``bench_paged_gather.py`` without
any test noticing). Timings are meaningless here; the scripts' own correctness checks are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = [
    ROOT / "packages" / p / "src"
    for p in ("minference-kernels", "minference-patterns", "minference-vllm")
]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    e["PYTHONPATH"] = os.pathsep.join(
        [*map(str, SRC), str(ROOT / "benchmarks"), e.get("PYTHONPATH", "")]
    )
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_bench_paged_gather_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "paged.json"
    _run(
        ["benchmarks/bench_paged_gather.py", "--device", "cpu", "--dtype", "float32",
         "--backend", "torch", "--contexts", "256", "--chunk", "64", "--heads", "2",
         "--kv-heads", "1", "--head-dim", "16", "--vertical", "8", "--slash", "16",
         "--layers", "1", "--repeats", "1", "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["cached_tokens"] for r in rows] == [256]
    assert all(r["chunk_ms"] > 0 and r["gather_bytes"] > 0 for r in rows)


def test_bench_varlen_runs_on_cpu(tmp_path: Path) -> None:
    _run(
        ["benchmarks/bench_varlen.py", "--out", str(tmp_path), "--lengths", "130,70",
         "--reps", "1", "--warmup", "0", "--heads", "2,1,16"],
        TRITON_INTERPRET="1",
    )  # fmt: skip
    log = json.loads((tmp_path / "bench_varlen.json").read_text())
    assert max(log["rel_err_varlen_vs_loop"]) < 1e-5  # varlen equals the per-sequence loop
    assert set(log["rows"]) == {"total", "attention", "attention_causal_order"}


def test_tile_floor_probes_walk_the_kernels_tiles() -> None:
    """``tile_floor.py``'s load-only and math-only probes visit exactly the tiles and column steps
    of the sparse kernel on the same index (its ``--check``, under the interpreter)."""
    proc = _run(["benchmarks/tile_floor.py", "--check"], TRITON_INTERPRET="1")
    assert "the probes visit the kernel's tiles and column steps" in proc.stdout
