"""Count first for keys chosen per query block (issue 20): their attention and a plain estimate, 128K.

``block_oracle.py`` finds that keys chosen per 64-row query block by its pooled queries keep the
Llama-3.1 config's recall with far fewer computed pairs on real heads than any choice of 64-key
tiles. No kernel runs such an index yet. This measures, on a GPU, the two costs that decide whether
one would pay, at the Llama-3.1-8B layer shape:

* **attention over gathered keys**: the shipped kernel's column pass. Heads are
  ``vertical_slash(V, 64)`` on random ``q``/``k``, whose last-64 column scores pick keys all over
  the prompt, so query block ``m`` attends to about ``V * (m + 1) / MB`` gathered keys plus its
  diagonal tile: the per-block count of a per-block key index of density ``V / N``. Beside it,
  ``block_sparse`` heads (contiguous 64-key tiles) at similar densities. Each timed interleaved
  with cuDNN (the kernel alone, ``attention_triton.attend`` on a built index, and the whole
  ``sparse_prefill``); achieved TFLOP/s on the kept pairs next to cuDNN's on the causal pairs.
* **the estimate**: per query block, ``G`` pooled queries (``G`` groups of rows, each group's mean)
  against every earlier key, one GEMM per chunk of query blocks (``G > 1``: softmax per group,
  summed), then ``torch.topk`` of the block's key budget, at ``G = 1`` and ``4``; the GEMM alone and
  with the selection. A fused selection would cost less; this is the plain upper line.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \\
        python benchmarks/block_keys_cost.py --out DIR [--n 131072] [--rounds 3]

Writes DIR/block_keys_cost.json.
"""

from __future__ import annotations

import argparse
import math
import statistics

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from bench_layer import HKV, HQ, D
from minference_kernels.index import BLOCK
from minference_kernels.ops import attention_triton


def pooled_topk(
    q, k, density: float, groups: int, chunk: int, select: bool, scale: float | None = None
) -> list:
    """The plain estimate over all query blocks: ``G`` pooled queries per block against the keys
    before it, and (``select``) the best keys of each block of a chunk, as many as the chunk's
    largest budget ``ceil(density * end) - 64`` (an upper bound on the work; block ``m``'s keys are
    the first ``min(64 m, ceil(density * 64 (m + 1)) - 64)``, as ``minference eval``'s
    ``blockkeys:D:G`` chooses them for whole blocks). Returns the chunks' ``[B, H, blocks, k]``
    indices (none without ``select``)."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    mb = -(-n // BLOCK)
    picked = []
    for m0 in range(0, mb, chunk):
        m1 = min(mb, m0 + chunk)
        end = min(n, m1 * BLOCK)
        rows = q[:, :, m0 * BLOCK : end]
        pad = (m1 - m0) * BLOCK - rows.shape[2]
        if pad:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
        qg = rows.view(b, hq, m1 - m0, groups, BLOCK // groups, d).float().mean(4)
        qg = (qg * (d**-0.5 if scale is None else scale)).to(q.dtype)  # the scale, folded in
        # [B, Hkv, g * blocks * G, D] against the keys up to the chunk's end, no K copy per head
        qg = qg.view(b, k.shape[1], g * (m1 - m0) * groups, d)
        s = torch.matmul(qg, k[:, :, :end].transpose(-1, -2)).view(b, hq, m1 - m0, groups, end)
        starts = torch.arange(m0, m1, device=q.device) * BLOCK
        early = torch.arange(end, device=q.device)[None] < starts[:, None]  # [blocks, end]
        s = s.masked_fill(~early[None, None, :, None], float("-inf"))
        score = s[:, :, :, 0] if groups == 1 else torch.softmax(s.float(), -1).sum(3)
        if select:
            kmax = max(1, min((m1 - 1) * BLOCK, math.ceil(density * end) - BLOCK))
            picked.append(score.topk(kmax, -1).indices)
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--densities", default="0.02,0.03,0.045,0.06", help="gathered-key densities")
    ap.add_argument("--tile-fracs", default="0.04,0.06,0.09", help="block_sparse shares")
    ap.add_argument("--estimate-density", type=float, default=0.045)
    ap.add_argument("--chunk", type=int, default=64, help="query blocks per estimation GEMM")
    a = ap.parse_args()
    n = a.n
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, n, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    causal_flops = 4 * D * HQ * n * (n + 1) / 2
    rows: dict[str, list] = {}
    for d in filter(None, a.densities.split(",")):
        rows[f"gathered keys {float(d):g}"] = [
            mk.HeadPattern.vertical_slash(round(float(d) * n), 64)
        ] * HQ
    for f in filter(None, a.tile_fracs.split(",")):
        t = max(1, math.ceil(float(f) * n / BLOCK))
        rows[f"tiles {float(f):g}"] = [mk.HeadPattern.block_sparse(t)] * HQ

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=400, return_mode="median")

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cudnn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=True
    )
    info, idxs = {}, {}
    for name, heads in rows.items():
        idx = mk.build_index(q, k, heads, validate=False)
        dens = mk.index_density(idx, list(range(0, idx.num_blocks, 37))).mean().item()
        cc = idx.col_count[0].float()  # [H, MB]: gathered keys per block
        info[name] = dict(density=dens, mean_gathered_per_block=cc.mean().item())
        idxs[name] = idx
        print(f"{name}: density {dens:.4f}, gathered keys per block {cc.mean().item():.0f}",
              flush=True)  # fmt: skip
    runs: dict[str, list] = {name: [] for name in rows}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        bench(cudnn)
        for r in range(a.rounds):
            for name, heads in rows.items():
                idx = idxs[name]
                t_c = bench(cudnn)
                t_k = bench(lambda: attention_triton.attend(q, k, v, idx, D**-0.5))
                t_p = bench(lambda: mk.sparse_prefill(q, k, v, heads, validate=False))
                runs[name].append(dict(cudnn_ms=t_c, kernel_ms=t_k, pipeline_ms=t_p))
            print(f"round {r + 1}/{a.rounds} done", flush=True)
    log: dict = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        args=vars(a), n=n, heads=HQ, kv_heads=HKV, head_dim=D, rows={}, estimate={},
    )  # fmt: skip
    for name, rs in runs.items():
        med = {key: statistics.median(x[key] for x in rs) for key in rs[0]}
        kr = [x["cudnn_ms"] / x["kernel_ms"] for x in rs]
        pr = [x["cudnn_ms"] / x["pipeline_ms"] for x in rs]
        dens = info[name]["density"]
        log["rows"][name] = dict(
            **info[name], runs=rs, **med,
            kernel_ratio=statistics.median(kr), pipeline_ratio=statistics.median(pr),
            kernel_tflops_kept=causal_flops * dens / med["kernel_ms"] / 1e9,
            cudnn_tflops=causal_flops / med["cudnn_ms"] / 1e9,
        )  # fmt: skip
        x = log["rows"][name]
        print(f"{name:22s} density {dens:.4f} kernel {med['kernel_ms']:.2f} ms "
              f"({x['kernel_ratio']:.2f}x, {x['kernel_tflops_kept']:.0f} TF/s kept) pipeline "
              f"{med['pipeline_ms']:.2f} ms ({x['pipeline_ratio']:.2f}x); cuDNN "
              f"{med['cudnn_ms']:.1f} ms ({x['cudnn_tflops']:.0f} TF/s)", flush=True)  # fmt: skip
    del idxs
    torch.cuda.empty_cache()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for groups in (1, 4):
            for select in (False, True):
                t_c = bench(cudnn)
                t_e = bench(lambda: pooled_topk(q, k, a.estimate_density, groups, a.chunk, select))
                key = f"G={groups}" + (" + top-k" if select else " GEMM")
                log["estimate"][key] = dict(ms=t_e, cudnn_ms=t_c, share_of_cudnn=t_e / t_c)
                print(f"estimate {key}: {t_e:.2f} ms = {t_e / t_c:.4f} of cuDNN's {t_c:.1f} ms",
                      flush=True)  # fmt: skip
    write_json(f"{a.out}/block_keys_cost.json", log)


if __name__ == "__main__":
    main()
