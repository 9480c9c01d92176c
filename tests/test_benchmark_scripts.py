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


def test_density_by_profile_measures_captured_layers_at_their_scale(tmp_path: Path) -> None:
    """``density_by_profile.py --captured`` on real-head files: the layer's own ``scale`` is used
    (a file holding ``q`` with scale ``s`` and one holding ``q * s * sqrt(D)`` with the default
    scale give the same index and recall), and the named pairs lie inside the computed ones."""
    import torch
    from minference_kernels.synthetic import structured_qkv

    n, d = 8192, 32
    q, k, _ = structured_qkv(1, 2, 1, n, d, dtype=torch.float32, seed=1, kind="vertical_slash")
    s = 0.6  # sharper than 1/sqrt(d): the index keeps all of the attention, not only most
    torch.save({"q": q.half(), "k": k.half(), "scale": s}, tmp_path / "a.pt")
    torch.save(
        {"q": (q.half().float() * s * d**0.5).half(), "k": k.half(), "scale": d**-0.5},
        tmp_path / "b.pt",
    )
    torch.save({"q": q.half(), "k": k.half(), "scale": d**-0.5}, tmp_path / "c.pt")
    out = tmp_path / "dbp.json"
    caps = ",".join(f"m-L{i}={tmp_path / f'{x}.pt'}" for i, x in enumerate("abc"))
    _run(["benchmarks/density_by_profile.py", "--ns", str(n), "--profiles", "",
          "--captured", caps, "--out", str(out)])  # fmt: skip
    res = json.loads(out.read_text())["results"]
    a, b, c = (res[f"m-L{i}@{n}"]["llama3.1-config"] for i in range(3))
    assert res[f"m-L0@{n}"]["heads"].startswith("captured, a.pt (2 query / 1 KV heads")
    assert abs(a["recall"] - b["recall"]) < 2e-3 and abs(a["density"] - b["density"]) < 2e-3
    assert abs(a["recall"] - c["recall"]) > 1e-2  # the scale matters on these heads
    for m in (a, b, c):
        assert 0 < m["named_density"] <= m["tile_density"] <= 1
        assert m["named_recall"] <= m["recall"] + 1e-6 <= m["oracle_recall"] + 2e-6


def test_block_oracle_orders_its_bounds(tmp_path: Path) -> None:
    """``block_oracle.py`` on a captured-layer file: every curve grows with the budget, the tile
    oracle needs no more of the config's pairs than pooled or sampled scoring (same tiles per
    block, the best ones), the key oracle no more than the tile oracle or the key estimators, and
    on heads whose attention sits in columns ``vertical_block`` and the keys chosen per block need
    fewer pairs than pooled tiles alone."""
    import torch
    from minference_kernels.synthetic import structured_qkv

    n, d = 8192, 64
    q, k, _ = structured_qkv(1, 4, 2, n, d, dtype=torch.float32, seed=3, kind="vertical_slash")
    # scale 0.3: sharp heads, most of each row's mass in a few columns and diagonals
    torch.save({"q": q.half(), "k": k.half(), "scale": 0.3}, tmp_path / "vs.pt")
    out = tmp_path / "bo.json"
    _run(["benchmarks/block_oracle.py", "--captured", f"vs-L0={tmp_path / 'vs.pt'}",
          "--blocks", "8", "--columns", "128", "--out", str(out)])  # fmt: skip
    r = json.loads(out.read_text())["results"]["vs-L0"]
    assert r["n"] == n and r["blocks"] == 8 and 0 < r["config"]["density"] <= 1
    for curve in r["curves"].values():
        dens, rec = zip(*curve)
        assert list(dens) == sorted(dens) and list(rec) == sorted(rec) and rec[-1] <= 1 + 1e-6
    share = {name: (v if v is not None else float("inf")) for name, v in r["need_share"].items()}
    assert share["oracle block tiles"] <= min(share["pooled"], share["sampled"]) + 1e-9
    assert share["oracle block keys"] <= share["oracle block tiles"] + 1e-3
    assert share["vertical_block"] < share["pooled"] - 0.03
    # keys chosen per block by pooled queries: never better than the key oracle, and on these
    # heads (columns and diagonals) far fewer pairs than the same budget spent on pooled tiles
    for name in ("pooled-query keys", "4-pooled-query keys"):
        assert share["oracle block keys"] <= share[name] + 1e-3
        assert share[name] < share["pooled"] - 0.1


def test_block_keys_cost_times_the_blockkeys_choice(monkeypatch) -> None:
    """The estimate ``block_keys_cost.py`` times picks, for every whole query block, the keys that
    ``minference eval``'s ``blockkeys:D:G`` measuring device gives it (float32, G = 1 and 4)."""
    import math

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from block_keys_cost import pooled_topk
    from minference_hf.evaluate import block_keys_mask

    n, hq, hkv, d, density = 640, 4, 2, 16, 0.3
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g)
    for groups in (1, 4):
        picked = pooled_topk(q, k, density, groups, 3, True, scale=d**-0.5)
        keep = block_keys_mask(q, k.repeat_interleave(hq // hkv, 1), 0, density, groups, d**-0.5)
        assert sum(c.shape[2] for c in picked) == n // 64
        m = 0
        for c in picked:
            for j in range(c.shape[2]):
                early = min(64 * m, math.ceil(density * 64 * (m + 1)) - 64)
                want = keep[0, :, 64 * m, : 64 * m]  # [H, earlier keys]
                for h in range(hq):
                    got = set(c[0, h, j, : max(early, 0)].tolist())
                    assert got == set(want[h].nonzero().flatten().tolist()), (groups, m, h)
                m += 1


def test_block_keys_cost_probe_agrees_with_float64() -> None:
    """``block_keys_cost.py``'s per-block probe kernel (the shipped kernel with its column pass
    reading each block's own key list) against float64 attention over the probe's mask, under the
    Triton interpreter, at an odd length with a partial last block; and its check fails when the
    mask leaves the listed keys out (so it compares the keys the probe attends)."""
    code = (
        "import torch, block_keys_cost as b\n"
        "from minference_kernels.ops.attention import index_mask\n"
        "p = b.probe_kernel()\n"
        "r = b.check_probe(p, 4, 2, 333, 32, 'cpu', torch.float32, 1e-4)\n"
        "assert all(x['listed'] > 500 for x in r.values()), r\n"
        "b.per_block_mask = lambda tiles, cols, count: index_mask(tiles)\n"
        "try:\n"
        "    b.check_probe(p, 4, 2, 333, 32, 'cpu', torch.float32, 1e-4)\n"
        "except AssertionError:\n"
        "    print('missing keys caught')\n"
    )
    proc = _run(["-c", code], TRITON_INTERPRET="1")
    assert "missing keys caught" in proc.stdout
