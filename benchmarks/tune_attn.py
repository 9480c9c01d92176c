"""Time launch variants of the sparse attention kernel on one GPU (issue 3 tuning).

PYTHONPATH=packages/minference-kernels/src python benchmarks/tune_attn.py
"""

from __future__ import annotations

import itertools
import json
import sys

import minference_kernels as mk
import torch
import triton
from minference_kernels import _triton
from minference_kernels._validate import check_qkv
from minference_kernels.api import _dense_index
from minference_kernels.synthetic import structured_qkv


def main(out_dir: str) -> None:
    res = []
    t = lambda fn: triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")
    for n in (32768, 131072):
        hq, hkv, d = 32, 8, 128
        q, k, v = structured_qkv(1, hq, hkv, n, d, dtype=torch.bfloat16, device="cuda", seed=3)
        dense_idx = _dense_index(check_qkv(q, k, v, check_values=False), q.device)
        vs_idx = mk.build_index(
            q, k, [mk.HeadPattern.vertical_slash(512, 2048)] * hq, validate=False
        )
        ref_d = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        t_cudnn = t(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
        )
        fl = 4 * n * n / 2 * d * hq
        print(f"N={n} cudnn {t_cudnn:.2f} ms {fl / t_cudnn / 1e9:.0f} TFLOP/s", flush=True)
        blocks = list(range(0, vs_idx.num_blocks, max(1, vs_idx.num_blocks // 64)))
        dens = mk.index_density(vs_idx, blocks).mean().item()
        base = None
        for w, st, sm in itertools.product((4, 8), (2, 3, 4), (False, True)):
            cfg = dict(num_warps=w, num_stages=st, split_mask=sm)
            try:
                od = _triton.attend(q, k, v, dense_idx, d**-0.5, **cfg)
                err = ((od.float() - ref_d.float()).norm() / ref_d.float().norm()).item()
                ov = _triton.attend(q, k, v, vs_idx, d**-0.5, **cfg)
                if base is None:
                    base = ov
                err_v = ((ov.float() - base.float()).norm() / base.float().norm()).item()
                td = t(lambda: _triton.attend(q, k, v, dense_idx, d**-0.5, **cfg))
                tv = t(lambda: _triton.attend(q, k, v, vs_idx, d**-0.5, **cfg))
            except Exception as e:  # noqa: BLE001
                print(cfg, "failed", repr(e)[:200], flush=True)
                continue
            row = dict(
                n=n,
                **cfg,
                dense_ms=td,
                dense_tflops=fl / td / 1e9,
                vs_ms=tv,
                vs_kept_tflops=fl * dens / tv / 1e9,
                err_dense=err,
                err_vs_vs_base=err_v,
            )
            res.append(row)
            print(
                f"  w{w} s{st} split={int(sm)}: dense {td:7.2f} ms {fl / td / 1e9:5.0f} TF/s | VS(512,2048) {tv:7.2f} ms "
                f"kept {fl * dens / tv / 1e9:5.0f} TF/s (density {dens:.3f}) err {err:.1e}/{err_v:.1e}",
                flush=True,
            )
    json.dump(res, open(f"{out_dir}/tune_attn.json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
