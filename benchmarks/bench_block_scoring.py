"""GPU cost of the block scorings: block-sparse estimation of one Llama-3-8B-shaped layer (32 query /
8 KV heads, head dim 128, bf16) on structured heads, ``scoring="pooled"`` against ``"sampled"``,
with the Triton selection, beside cuDNN's dense attention of the same layer (timed interleaved).
Also checks that the Triton and PyTorch selections pick the same blocks from sampled scores.

    PYTHONPATH=packages/minference-kernels/src python benchmarks/bench_block_scoring.py \
        --out benchmarks/results/bench_block_scoring_h200.json [--ns 32768,131072]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
from _provenance import write_json
from minference_kernels.ops.block_select import block_topk
from minference_kernels.synthetic import structured_qkv


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="32768,131072")
    ap.add_argument("--frac", type=float, default=0.08)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for n in (int(x) for x in a.ns.split(",")):
        q, k, v = structured_qkv(1, 32, 8, n, 128, dtype=torch.bfloat16, device="cuda", seed=0)
        top_k = max(1, int(a.frac * n / 64))

        def dense():
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )

        def est(scoring):
            return lambda: block_topk(q, k, top_k, 64, backend="triton", scoring=scoring)

        same = torch.equal(
            block_topk(q, k, top_k, 64, backend="triton", scoring="sampled"),
            block_topk(q, k, top_k, 64, backend="torch", scoring="sampled"),
        )
        res = {"n": n, "top_k": top_k, "triton_equals_torch_sampled": same}
        for fn in (dense, est("pooled"), est("sampled")):  # warm-up: Triton compiles
            fn()
        torch.cuda.synchronize()
        ratios = {"pooled": [], "sampled": []}
        times = {"dense": [], "pooled": [], "sampled": []}
        for _ in range(5):
            d = triton.testing.do_bench(dense, warmup=3, rep=20)
            times["dense"].append(d)
            for s in ("pooled", "sampled"):
                t = triton.testing.do_bench(est(s), warmup=3, rep=20)
                times[s].append(t)
                ratios[s].append(t / d)
        for s in times:
            res[f"{s}_ms"] = statistics.median(times[s])
        for s in ratios:
            res[f"{s}_share_of_dense"] = statistics.median(ratios[s])
        rows.append(res)
        print(json.dumps(res), flush=True)
    write_json(a.out, {"benchmark": "bench_block_scoring", "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "triton": triton.__version__, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
