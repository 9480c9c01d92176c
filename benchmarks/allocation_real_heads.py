"""Block allocations on real heads (issue 20's promise): does ``block_allocation="head"`` or
``"layer"`` ever serve a head more than 0.05 below ``"query_block"`` at the same block count?

For each captured layer (``*.pt`` files with ``q [1, Hq, N, D]``, ``k [1, Hkv, N, D]`` and
``scale``, as written by ``benchmarks/real_heads.py --save-qk``), every head gets
``HeadPattern.block_sparse(top_k)`` under each allocation; recall is the attention mass inside the
pairs ``sparse_prefill`` computes (``sparse_prefill_mask``) on stratified query rows. Writes one
JSON with per-head recalls and the worst loss against ``"query_block"``.

    python benchmarks/allocation_real_heads.py --heads DIR --out benchmarks/results/allocation_smollm2_8k.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import minference_kernels as mk
import torch
from _provenance import commit, write_json

ALLOCATIONS = ("query_block", "head", "layer")


def main(argv: list[str] | None = None) -> int:
    from minference_patterns.search import _sample_rows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", required=True)
    ap.add_argument("--top-ks", default="4,8,16")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    top_ks = [int(x) for x in args.top_ks.split(",")]
    res: dict = {
        "benchmark": "allocation_real_heads",
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "argv": sys.argv[1:] if argv is None else argv,
        "versions": {"torch": torch.__version__},
        "layers": [],
    }
    for path in sorted(Path(args.heads).glob("*.pt")):
        d = torch.load(path)
        q, k, scale = d["q"].float(), d["k"].float(), float(d["scale"])
        hq, n = q.shape[1], q.shape[2]
        g = hq // k.shape[1]
        rows = _sample_rows(n, args.rows, 0, 0)
        causal = torch.arange(n)[None, :] <= rows[:, None]
        p = torch.stack(
            [
                torch.softmax(
                    (q[0, h, rows] @ k[0, h // g].T * scale).masked_fill(~causal, -math.inf), -1
                )
                for h in range(hq)
            ]
        )
        layer = {"file": path.name, "recall": {}}
        for t in top_ks:
            heads = [mk.HeadPattern.block_sparse(t)] * hq
            for alloc in ALLOCATIONS:
                m = mk.sparse_prefill_mask(
                    q, k, heads, scale=scale, query_rows=rows, block_allocation=alloc
                )[0]
                layer["recall"][f"{alloc}@{t}"] = (p * m).sum(-1).mean(-1).tolist()
        res["layers"].append(layer)
        print(f"{path.name}: done", flush=True)
    summary = {}
    for t in top_ks:
        base = [r for layer in res["layers"] for r in layer["recall"][f"query_block@{t}"]]
        for alloc in ALLOCATIONS[1:]:
            got = [r for layer in res["layers"] for r in layer["recall"][f"{alloc}@{t}"]]
            loss = [b - x for b, x in zip(base, got, strict=True)]
            summary[f"{alloc}@{t}"] = {
                "mean_recall": sum(got) / len(got),
                "query_block_mean_recall": sum(base) / len(base),
                "worst_loss": max(loss),
                "heads_below_0.05": sum(x > 0.05 for x in loss),
                "heads": len(loss),
            }
            print(f"top_k {t:3d} {alloc:6s}: {summary[f'{alloc}@{t}']}", flush=True)
    res["summary"] = summary
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
