"""Time launch variants of the sparse attention kernel on one GPU (issue 3 tuning).

Per N: cuDNN's dense causal rate, then every variant on three indices built from the benchmark's
structured layer (32 q heads, 8 KV heads, D = 128, bf16): the dense index (the kernel's ceiling),
the shipped Llama-3.1 config's VS(512, 2048) and block-sparse at 2% and 10% of the key blocks. Each variant is
checked before it is timed: on the dense index against cuDNN's output, on the others against the
first variant's (relative error).

PYTHONPATH=packages/minference-kernels/src:benchmarks python benchmarks/tune_attn.py --out DIR
"""

from __future__ import annotations

import argparse
import math

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from bench_layer import structured_layer
from minference_kernels._validate import check_qkv
from minference_kernels.api import _dense_index
from minference_kernels.ops import attention_triton

# launch variants of the shipped kernel (the first is the reference for the error column); kernel
# rewrites are compared by running the previous kernel beside them (NOTES v0.2.0-e did so)
VARIANTS = {
    "w4 s3": dict(num_warps=4, num_stages=3),
    "w4 s2": dict(num_warps=4, num_stages=2),
    "w4 s4": dict(num_warps=4, num_stages=4),
    "w8 s3": dict(num_warps=8, num_stages=3),
    "w4 s3 unsplit": dict(num_warps=4, num_stages=3, split_mask=False),
    "w4 s3 pointers": dict(num_warps=4, num_stages=3, tma=False),  # the v0.2.0-e kernel
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--ns", default="32768,131072")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--indices", default="dense;VS(512,2048);block 2%;block 10%", help="separated by ;"
    )
    a = ap.parse_args()
    names = a.variants.split(",")
    res = []

    def t(fn):
        return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median")

    for n in [int(x) for x in a.ns.split(",")]:
        hq, d = 32, 128
        q, k, v = structured_layer(n)
        fl = 4 * n * n / 2 * d * hq
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, enable_gqa=True
        )
        t_cudnn = t(sdpa)
        print(f"N={n} cuDNN {t_cudnn:.2f} ms {fl / t_cudnn / 1e9:.0f} TF/s", flush=True)
        idxs = {
            "dense": _dense_index(check_qkv(q, k, v, check_values=False), q.device),
            "VS(512,2048)": mk.build_index(
                q, k, [mk.HeadPattern.vertical_slash(512, 2048)] * hq, validate=False
            ),
            "block 2%": mk.build_index(
                q, k, [mk.HeadPattern.block_sparse(math.ceil(0.02 * n / 64))] * hq, validate=False
            ),
            "block 10%": mk.build_index(
                q, k, [mk.HeadPattern.block_sparse(math.ceil(0.10 * n / 64))] * hq, validate=False
            ),
        }
        idxs = {k_: v_ for k_, v_ in idxs.items() if k_ in a.indices.split(";")}
        for iname, idx in idxs.items():
            blocks = list(range(0, idx.num_blocks, max(1, idx.num_blocks // 256)))
            dens = mk.index_density(idx, blocks).mean().item()
            base = sdpa().float() if iname == "dense" else None  # dense: error against cuDNN
            for name in names:
                cfg = VARIANTS[name]
                try:
                    o = attention_triton.attend(q, k, v, idx, d**-0.5, **cfg)
                    if base is None:
                        base = o.float()
                    err = ((o.float() - base).norm() / base.norm()).item()
                    ms = t(lambda: attention_triton.attend(q, k, v, idx, d**-0.5, **cfg))
                except Exception as e:  # noqa: BLE001
                    print(f"  {iname:13s} {name:20s} failed {repr(e)[:300]}", flush=True)
                    continue
                kept = fl * dens / ms / 1e9
                row = dict(
                    n=n,
                    index=iname,
                    variant=name,
                    **cfg,
                    ms=ms,
                    density=dens,
                    kept_tflops=kept,
                    cudnn_ms=t_cudnn,
                    cudnn_tflops=fl / t_cudnn / 1e9,
                    err_vs_base=err,
                )
                res.append(row)
                print(
                    f"  {iname:13s} {name:20s} {ms:8.2f} ms  density {dens:.4f}  kept {kept:4.0f} "
                    f"TF/s ({kept / (fl / t_cudnn / 1e9):.2f} of cuDNN)  err {err:.1e}",
                    flush=True,
                )
        q = k = v = idxs = None  # free before the next length
        torch.cuda.empty_cache()
    write_json(f"{a.out}/tune_attn.json", res)


if __name__ == "__main__":
    main()
