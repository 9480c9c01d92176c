#!/usr/bin/env python3
"""GPU check of the search and the measured cost model (one device call):

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src \
        python packages/minference-patterns/scripts/gpu_search_check.py --out $OUT

1. times the kernels (``measure_kernel_costs``) and saves the fitted cost file;
2. searches one layer of structured synthetic heads (32 query / 8 KV heads, head dim 128, bf16)
   with the analytic and the measured cost model, and reports time, kinds and recall.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from minference_kernels.synthetic import structured_qkv
from minference_patterns import AnalyticCostModel, HeadPattern
from minference_patterns.cost import measure_kernel_costs, relative_cost
from minference_patterns.search import default_candidates, search_layer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--lens", default="8192,16384,32768")
    ap.add_argument("--search-len", type=int, default=32768)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict = {"device": torch.cuda.get_device_name()}
    print(log["device"], flush=True)

    t0 = time.perf_counter()
    lens = tuple(int(x) for x in args.lens.split(","))
    model = measure_kernel_costs(lens, device="cuda", repeats=5, warmup=2)
    model.to_json(out / "measured_costs.json")
    log["measure_s"] = time.perf_counter() - t0
    log["coefficients_ms"] = {k: list(v) for k, v in model.coefficients.items()}
    print(f"measured in {log['measure_s']:.1f} s", flush=True)
    for r in model.records:
        n = r.seq_len
        dens = r.kept_pairs / r.num_heads / (n * (n + 1) / 2)
        fit = model.cost(r.pattern, n, kept_pairs=r.kept_pairs / r.num_heads) * r.num_heads
        print(
            f"  {n:6d} {r.pattern.describe():34s} density {100 * dens:6.2f}%  "
            f"{r.time_ms:8.3f} ms (fit {fit:8.3f})",
            flush=True,
        )
    for n in lens:
        for p in (HeadPattern.vertical_slash(1000, 6096), HeadPattern.vertical_slash(100, 800)):
            a = relative_cost(AnalyticCostModel(), p, n)
            m = relative_cost(model, p, n)
            print(f"  relative cost {p.describe()} at {n}: analytic {a:.3f}, measured {m:.3f}")

    n = args.search_len
    q, k, v = structured_qkv(
        1, 32, 8, n, 128, kind="mixed", dtype=torch.bfloat16, device="cuda", seed=0
    )
    log["search"] = {}
    for name, cm in (("analytic", AnalyticCostModel()), ("measured", model)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = search_layer(q, k, v, budget=0.1, cost_model=cm, num_rows=256)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        kinds = Counter(r.pattern.describe() for r in res)
        mean_rec = sum(r.recall for r in res) / len(res)
        mean_cost = sum(r.cost for r in res) / len(res)
        log["search"][name] = {
            "seconds": dt,
            "patterns": dict(kinds),
            "mean_recall": mean_rec,
            "mean_cost": mean_cost,
            "candidates": len(res[0].candidates),
        }
        print(
            f"search ({name}) N={n}: {dt:.1f} s for 32 heads x {len(res[0].candidates)} "
            f"candidates; mean recall {mean_rec:.4f}, mean cost {mean_cost:.3f}",
            flush=True,
        )
        for p, c in kinds.most_common():
            print(f"    {c:2d} x {p}")
    (out / "gpu_search_check.json").write_text(json.dumps(log, indent=1))
    print("candidates:", [c.describe() for c in default_candidates(n)])


if __name__ == "__main__":
    main()
