"""128-row pair programs against the 64-row kernel (issue 3, kernel rate), one GPU call.

Why: counting the K/V tile loads of the 64-row kernel at 128K (32 heads, D = 128, bf16) gives
~7.6-7.8 TB/s of tile traffic on the dense index (500 TF/s) and on block_sparse(10%) (483 TF/s):
with 64 query rows a 32 KiB K/V tile feeds 64 FLOP per byte, and both indices stop at the same
bandwidth. A program of two 64-row blocks over the union of their tiles
(``_triton._sparse_attn_pair_fwd``) loads a tile both blocks need once for 128 rows.

1. correctness on the card: the pair kernel against the 64-row kernel (same pairs, same order) and
   against float64 over the exact mask, odd shapes, bf16/fp16, GQA, Nq < Nk;
2. timing at N (default 128K) on the structured layer: the shipped Llama-3.1 config, VS(1000,
   6096), block-sparse 9% and 10%, and the dense index: 64-row and pair kernels alternated in
   rounds (same clocks for both), plus the pair regrouping's own cost.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \\
        python benchmarks/tune_pair.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import minference_kernels as mk
import torch
import triton
from bench_layer import CONFIG_ID, HQ, structured_layer
from minference_kernels import _triton
from minference_kernels._validate import check_qkv
from minference_kernels.api import _dense_index
from minference_kernels.index import pair_index


def check(log) -> None:
    g = torch.Generator(device="cpu").manual_seed(7)
    worst = 0.0
    worst_ref = 0.0
    # bf16, D = 128: the timed shape's compiled kernels (odd shapes of every kind, dtype and head
    # dim run under the interpreter in the test suite)
    cases = [(2, 8, 2, 333, 333, 128, torch.bfloat16), (1, 16, 4, 4100, 4100, 128, torch.bfloat16)]
    for b, hq, hkv, n, nk, d, dt in cases:
        q = torch.randn(b, hq, n, d, generator=g).to("cuda", dt)
        k = torch.randn(b, hkv, nk, d, generator=g).to("cuda", dt)
        v = torch.randn(b, hkv, nk, d, generator=g).to("cuda", dt)
        heads = [
            mk.HeadPattern.vertical_slash(30, 200),
            mk.HeadPattern.block_sparse(3),
            mk.HeadPattern.a_shape(16, 130),
            mk.HeadPattern.dense(),
        ] * (hq // 4)
        idx = mk.build_index(q, k, heads)
        o64 = _triton.attend(q, k, v, idx, d**-0.5).float()
        o2 = _triton.attend(q, k, v, idx, d**-0.5, pair=True).float()
        e = ((o2 - o64).norm() / o64.norm()).item()
        m = mk.sparse_prefill_mask(q, k, heads)  # [B, Hq, Nq, Nk]
        s = (q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * d**-0.5
        pr = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
        ref = pr @ v.double().repeat_interleave(hq // hkv, 1)
        er = ((o2.double() - ref).norm() / ref.norm()).item()
        worst, worst_ref = max(worst, e), max(worst_ref, er)
        print(
            f"  check {b, hq, hkv, n, nk, d, str(dt)}: pair vs 64-row {e:.1e}, vs float64 {er:.1e}"
        )
        log["checks"].append(dict(case=str((b, hq, hkv, n, nk, d, dt)), vs_64=e, vs_f64=er))
    ok = worst < 1e-2 and worst_ref < 1e-2
    log["check_ok"] = ok
    print(
        f"checks {'PASS' if ok else 'FAIL'}: worst pair vs 64-row {worst:.1e}, vs float64 {worst_ref:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    log = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, checks=[], rows=[])  # fmt: skip
    check(log)
    import minference_patterns as mp

    n = a.n
    q, k, v = structured_layer(n)
    fl = 4 * n * (n + 1) / 2 * q.shape[-1] * HQ
    d = q.shape[-1]
    idxs = {
        "llama3.1-config": mk.build_index(
            q, k, list(mp.load(CONFIG_ID).heads_for_layer(0, n)), validate=False
        ),
        "vs(1000,6096)": mk.build_index(
            q, k, [mk.HeadPattern.vertical_slash(1000, 6096)] * HQ, validate=False
        ),
        "block 9%": mk.build_index(
            q, k, [mk.HeadPattern.block_sparse(math.ceil(0.09 * n / 64))] * HQ, validate=False
        ),
        "block 10%": mk.build_index(
            q, k, [mk.HeadPattern.block_sparse(math.ceil(0.10 * n / 64))] * HQ, validate=False
        ),
        "dense": _dense_index(check_qkv(q, k, v, check_values=False), q.device),
    }
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")  # noqa: E731
    for name, idx in idxs.items():
        blocks = list(range(0, idx.num_blocks, max(1, idx.num_blocks // 256)))
        dens = mk.index_density(idx, blocks).mean().item()
        o64 = _triton.attend(q, k, v, idx, d**-0.5).float()
        o2 = _triton.attend(q, k, v, idx, d**-0.5, pair=True).float()
        err = ((o2 - o64).norm() / o64.norm()).item()
        t64, t2 = [], []
        for _ in range(a.rounds):
            t64.append(bench(lambda: _triton.attend(q, k, v, idx, d**-0.5)))
            t2.append(bench(lambda: _triton.attend(q, k, v, idx, d**-0.5, pair=True)))
        t_pi = bench(lambda: pair_index(idx))
        pi = pair_index(idx)
        tiles64 = int((idx.rel_end.long().sum() + idx.abs_count.long().sum()).item())
        tiles2 = int((pi.rel_end.long().sum() + pi.abs_count.long().sum()).item())
        m64, m2 = statistics.median(t64), statistics.median(t2)
        row = dict(index=name, n=n, density=dens, ms_64=m64, ms_pair=m2, runs_64=t64,
                   runs_pair=t2, pair_index_ms=t_pi, err=err, tile_loads_64=tiles64,
                   tile_loads_pair=tiles2, tflops_64=fl * dens / m64 / 1e9,
                   tflops_pair=fl * dens / m2 / 1e9)  # fmt: skip
        log["rows"].append(row)
        print(
            f"{name:16s} density {dens:.3f}  64-row {m64:7.2f} ms ({row['tflops_64']:4.0f} TF/s)  "
            f"pair {m2:7.2f} ms ({row['tflops_pair']:4.0f} TF/s, regroup {t_pi:.2f} ms)  "
            f"x{m64 / m2:.2f}  tile loads {tiles2 / tiles64:.2f} of 64-row  err {err:.1e}",
            flush=True,
        )
        json.dump(log, open(f"{a.out}/tune_pair.json", "w"), indent=1)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=True
    )
    t_c = bench(sdpa)
    log["cudnn_ms"] = t_c
    print(f"cuDNN (SDPA default) {t_c:.2f} ms, {fl / t_c / 1e9:.0f} TF/s")
    json.dump(log, open(f"{a.out}/tune_pair.json", "w"), indent=1)


if __name__ == "__main__":
    main()
