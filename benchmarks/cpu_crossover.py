"""Where (if anywhere) the CPU sparse path beats dense attention: one attention layer, CPU.

Times, per prompt length, dense causal attention (``minference_kernels.dense_attention``: PyTorch's
SDPA in query chunks, the path every dense CPU call takes) against ``sparse_prefill`` (estimation +
index + the PyTorch sparse kernel) for a few patterns, on structured synthetic heads of a given
shape (default: SmolLM2-135M's, 9 query / 3 KV heads, head dim 64), float32, B=1. Each sparse
time is a median of ``--reps`` runs interleaved with dense runs (ratio per pair, then the median).

    python benchmarks/cpu_crossover.py --out benchmarks/results/cpu_crossover.json

The crossover (the shortest length from which every measured pattern is faster than dense, or
none) sets ``minference_hf.plan.CPU_MIN_SPARSE_LEN``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import minference_kernels as mk
import torch
from _provenance import commit, write_json
from minference_kernels.synthetic import structured_qkv

PATTERNS = {
    "vs(64,512)": mk.HeadPattern.vertical_slash(64, 512),
    "vs(256,1024)": mk.HeadPattern.vertical_slash(256, 1024),
    "block(8)": mk.HeadPattern.block_sparse(8),
    "ashape(64,512)": mk.HeadPattern.a_shape(64, 512),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="2048,4096,8192,16384,32768")
    ap.add_argument("--heads", default="9,3,64", help="Hq,Hkv,D")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        q, k, v = structured_qkv(1, hq, hkv, n, d, dtype=torch.float32, seed=0)
        mk.dense_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256])  # warm-up
        for name, pat in PATTERNS.items():
            heads = [pat] * hq
            ratios, dense_t, sparse_t = [], [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                mk.dense_attention(q, k, v)
                t1 = time.perf_counter()
                mk.sparse_prefill(q, k, v, heads)
                t2 = time.perf_counter()
                dense_t.append(t1 - t0)
                sparse_t.append(t2 - t1)
                ratios.append((t1 - t0) / (t2 - t1))
            idx = mk.build_index(q, k, heads)
            dens = float(mk.index_density(idx).mean())
            row = {
                "n": n,
                "pattern": name,
                "dense_s": statistics.median(dense_t),
                "sparse_s": statistics.median(sparse_t),
                "speedup": statistics.median(ratios),
                "density": dens,
            }
            rows.append(row)
            print(
                f"N={n:>6} {name:>14}: dense {row['dense_s']:.3f} s, sparse {row['sparse_s']:.3f} s"
                f" -> {row['speedup']:.2f}x (density {dens:.3f})",
                flush=True,
            )
    by_n: dict[int, list[float]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r["speedup"])
    crossover = next((n for n in sorted(by_n) if min(by_n[n]) > 1.0), None)
    result = {
        "benchmark": "cpu_crossover",
        "commit": commit(),
        "args": vars(args),
        "date": datetime.date.today().isoformat(),
        "device": platform.processor() or platform.machine(),
        "cpu_threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "shape": {"hq": hq, "hkv": hkv, "d": d},
        "rows": rows,
        "crossover": crossover,
    }
    write_json(args.out, result)
    print(f"crossover: {crossover if crossover else 'none up to ' + str(max(by_n))} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
