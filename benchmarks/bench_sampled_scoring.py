"""The fused Triton kernel of ``scoring="sampled"`` on a GPU: checks, launch settings, timings.

One Llama-3-8B-shaped layer (32 query / 8 KV heads, head dim 128, bf16, structured inputs of
``bench_layer.structured_layer``):

1. checks the fused kernel (``ops.block_sampled_triton``) against the PyTorch reference masses
   (``block_sampled.sampled_mass_chunks``; float32 products of the same bf16 inputs) and a float64
   reference on a few heads, and the blocks ``block_topk(backend="triton", scoring="sampled")``
   selects against the PyTorch backend's (4K, 32K and an odd Nq < Nk; softcap on one);
2. tries a few launch settings of the kernel at 32K (the fastest is used below);
3. times, interleaved in rounds (median of each function's ``do_bench`` medians), at 32K and 128K:
   dense cuDNN SDPA (causal, GQA), the block-sparse estimation with pooled scoring, with the old
   PyTorch sampled scoring (32K only), with the fused kernel at ``SAMPLED_ROWS`` 4 and 2 (and the
   kernel alone), ``build_index`` (estimation + index) and the whole ``sparse_prefill`` of a layer of
   ``block_sparse`` heads keeping ~8% of the key blocks per query block, pooled vs sampled.

Rates: the kernel's FLOPs are ``2 * D`` per (sampled row, causal key) pair, one ``q.k`` pass (the
kernel makes one pass; a two-pass kernel would do twice that); also given per visited pair (the
tile's keys up to its last row). cuDNN's are ``4 * D`` per causal (query, key) pair (QK and PV).

    PYTHONPATH=packages/minference-kernels/src:benchmarks \\
        python benchmarks/bench_sampled_scoring.py --out $OUT/bench_sampled_scoring.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from minference_kernels.ops import block_sampled, block_sampled_triton
from minference_kernels.ops.block_select import block_topk
from minference_kernels.synthetic import structured_qkv
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D, BS = 32, 8, 128, 64
DEV, DTYPE = "cuda", torch.bfloat16  # --smoke: CPU, float32, under TRITON_INTERPRET=1


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, warmup, rep):
    """``triton.testing.do_bench``'s median (ms); one host-timed call in a CPU smoke run."""
    if DEV == "cuda":
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def layer(n: int):
    return structured_qkv(1, HQ, HKV, n, D, dtype=DTYPE, device=DEV, seed=n % 97, kind="mixed")


def ids_kv():
    ids = torch.arange(HQ, device=DEV)
    return ids, ids // (HQ // HKV)


def assemble(chunks, shape):
    out = torch.zeros(shape, dtype=torch.float32, device=DEV)
    for r0, r1, width, m in chunks:
        out[:, :, r0:r1, :width] = m
    return out


def block_sets(idx, mbk):
    """``bool [..., mbk]``: the key blocks of each row of a block index (``-1`` padding)."""
    sets = torch.zeros((*idx.shape[:-1], mbk + 1), dtype=torch.bool, device=idx.device)
    sets.scatter_(-1, torch.where(idx >= 0, idx, mbk), True)
    return sets[..., :mbk]


def mass64(q, k, heads, rows, scale, softcap=None):
    """Float64 ``[len(heads), MBq, MBk]`` masses of batch item 0 (direct softmax of the rows)."""
    nq, nk = q.shape[2], k.shape[2]
    mbq, mbk = -(-nq // BS), -(-nk // BS)
    r = block_sampled.sampled_rows(mbq, nq, BS, rows, DEV).reshape(-1)
    pos = r + nk - nq
    outs = []
    for h in heads:
        s = q[0, h, r].double() @ k[0, h // (HQ // HKV)].double().T * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(torch.arange(nk, device=DEV)[None, :] > pos[:, None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(s, -1), (0, mbk * BS - nk))
        outs.append(p.view(mbq, rows, mbk, BS).sum((1, 3)))
    return torch.stack(outs)


def check(n: int, nq: int, softcap, rows_list=(4, 2)) -> dict:
    q, k, _ = layer(n)
    q = q[:, :, n - nq :]  # a strided view when nq < n (the kernel takes strides)
    ids, kv = ids_kv()
    scale = D**-0.5
    mbq, mbk = -(-nq // BS), -(-n // BS)
    res = {"n": n, "nq": nq, "softcap": softcap}
    for rows in rows_list:
        got = assemble(
            block_sampled_triton.sampled_mass_chunks_triton(
                q, k, ids, kv, BS, scale, rows=rows, softcap=softcap
            ),
            (1, HQ, mbq, mbk),
        )
        ref = assemble(
            block_sampled.sampled_mass_chunks(q, k, ids, kv, BS, scale, rows=rows, softcap=softcap),
            (1, HQ, mbq, mbk),
        )
        heads = sorted({0, HQ // 2 - 3, HQ - 1})
        m64 = mass64(q, k, heads, rows, scale, softcap)
        res[f"rows{rows}_max_abs_err_vs_torch"] = float((got - ref).abs().max())
        res[f"rows{rows}_max_abs_err_vs_f64"] = float((got[0, heads].double() - m64).abs().max())
        res[f"rows{rows}_torch_max_abs_err_vs_f64"] = float(
            (ref[0, heads].double() - m64).abs().max()
        )
        res[f"rows{rows}_mass_sum_err"] = float((got.sum(-1) - rows).abs().max())
        old = block_sampled.SAMPLED_ROWS
        block_sampled.SAMPLED_ROWS = rows
        try:
            for frac in (0.02, 0.08):
                top_k = max(1, math.ceil(frac * n / BS))
                t = block_topk(q, k, top_k, BS, backend="triton", scoring="sampled",
                               softcap=softcap)  # fmt: skip
                c = block_topk(q, k, top_k, BS, backend="torch", scoring="sampled",
                               softcap=softcap)  # fmt: skip
                same_rows = (t == c).all(-1).float().mean()
                # blocks picked by one and not the other (symmetric difference)
                diff = int((block_sets(t, mbk) ^ block_sets(c, mbk)).sum())
                res[f"rows{rows}_top{frac}_rows_equal"] = float(same_rows)
                res[f"rows{rows}_top{frac}_blocks_differing"] = diff
                res[f"rows{rows}_top{frac}_blocks_picked"] = int((c >= 0).sum())
        finally:
            block_sampled.SAMPLED_ROWS = old
    print(json.dumps(res), flush=True)
    return res


def kernel_fn(q, k, rows, cfg=None):
    ids, kv = ids_kv()

    def run():
        for _ in block_sampled_triton.sampled_mass_chunks_triton(
            q, k, ids, kv, BS, D**-0.5, rows=rows, ranked=True, cfg=cfg
        ):
            pass

    return run


def sweep(n: int) -> tuple[dict, list]:
    q, k, _ = layer(n)
    cfgs = [
        {"tile_m": 64, "num_warps": 4, "num_stages": 3},
        {"tile_m": 128, "num_warps": 4, "num_stages": 3},
        {"tile_m": 128, "num_warps": 8, "num_stages": 3},
        {"tile_m": 128, "num_warps": 8, "num_stages": 2},
        {"tile_m": 128, "num_warps": 8, "num_stages": 4},
        {"tile_m": 256, "num_warps": 8, "num_stages": 2},
    ]
    out = []
    for cfg in cfgs:
        try:
            f = kernel_fn(q, k, 4, cfg)
            f()
            sync()
            t = [bench(f, warmup=5, rep=40) for _ in range(2)]
            out.append({**cfg, "ms_rows4": min(t)})
        except Exception as e:  # noqa: BLE001 -- record and go on
            out.append({**cfg, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(out[-1]), flush=True)
    ok = [c for c in out if "ms_rows4" in c]
    best = min(ok, key=lambda c: c["ms_rows4"])
    return {x: best[x] for x in ("tile_m", "num_warps", "num_stages")}, out


def flops_of(n, nq, rows, tile_m):
    """``(useful, visited)`` (sampled row, key) pairs of one head and batch item."""
    mbq = -(-nq // BS)
    r = block_sampled.sampled_rows(mbq, nq, BS, rows, "cpu")  # [mbq, rows]
    off = n - nq
    useful = int((r + off + 1).sum())
    qb_per = tile_m // triton.next_power_of_2(rows)
    visited = 0
    for t0 in range(0, mbq, qb_per):
        t1 = min(mbq, t0 + qb_per)
        last = min(t1 * BS, nq) - 1 + off
        visited += (last // 64 + 1) * 64 * (t1 - t0) * rows
    return useful, visited


def with_rows(rows, fn):
    def run():
        old = block_sampled.SAMPLED_ROWS
        block_sampled.SAMPLED_ROWS = rows
        try:
            return fn()
        finally:
            block_sampled.SAMPLED_ROWS = old

    return run


def torch_scoring(fn):
    """``fn`` with the sampled scores from the PyTorch path (the fused kernel declined)."""

    def run():
        real = block_sampled_triton.unsupported
        block_sampled_triton.unsupported = lambda *a: "benchmark: the PyTorch sampled path"
        try:
            return fn()
        finally:
            block_sampled_triton.unsupported = real

    return run


def timings(n: int, rounds: int, frac: float, cfg: dict, rows_list=(4, 2), recall=False) -> dict:
    q, k, v = layer(n)
    top_k = max(1, math.ceil(frac * n / BS))
    pooled = [mk.HeadPattern.block_sparse(top_k)] * HQ
    sampled = [mk.HeadPattern.block_sparse(top_k, scoring="sampled")] * HQ

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if DEV == "cuda" else SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )

    def est(scoring):
        return lambda: block_topk(q, k, top_k, BS, backend="triton", scoring=scoring)

    fns = {"dense_cudnn": dense, "est_pooled": est("pooled")}
    if n <= 32768:
        fns["est_sampled_torch_r4"] = torch_scoring(with_rows(4, est("sampled")))
    for r in rows_list:
        fns[f"kernel_r{r}"] = kernel_fn(q, k, r)
        fns[f"est_sampled_r{r}"] = with_rows(r, est("sampled"))
    fns["index_pooled"] = lambda: mk.build_index(q, k, pooled, validate=False)
    fns["layer_pooled"] = lambda: mk.sparse_prefill(q, k, v, pooled, validate=False)
    for r in rows_list:
        fns[f"index_sampled_r{r}"] = with_rows(
            r, lambda: mk.build_index(q, k, sampled, validate=False)
        )
        fns[f"layer_sampled_r{r}"] = with_rows(
            r, lambda: mk.sparse_prefill(q, k, v, sampled, validate=False)
        )
    for f in fns.values():  # warm-up: Triton compiles
        f()
    sync()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            times[name].append(bench(f, warmup=3, rep=25))
    ms = {name: statistics.median(t) for name, t in times.items()}
    res = {"n": n, "top_k": top_k, "frac": frac, "rounds": rounds, "ms": ms,
           "ms_spread": {name: [min(t), max(t)] for name, t in times.items()}}  # fmt: skip
    causal = n * (n + 1) / 2
    res["tflops"] = {"dense_cudnn": 4 * D * HQ * causal / ms["dense_cudnn"] / 1e9}
    for r in rows_list:
        useful, visited = flops_of(n, n, r, cfg["tile_m"])
        t = ms[f"kernel_r{r}"]
        res["tflops"][f"kernel_r{r}_useful"] = 2 * D * HQ * useful / t / 1e9
        res["tflops"][f"kernel_r{r}_visited"] = 2 * D * HQ * visited / t / 1e9
        res[f"share_r{r}"] = {
            "est_of_layer": ms[f"est_sampled_r{r}"] / ms[f"layer_sampled_r{r}"],
            "index_of_layer": ms[f"index_sampled_r{r}"] / ms[f"layer_sampled_r{r}"],
            "kernel_of_layer": ms[f"kernel_r{r}"] / ms[f"layer_sampled_r{r}"],
            "layer_speedup_over_dense": ms["dense_cudnn"] / ms[f"layer_sampled_r{r}"],
        }
    res["share_pooled"] = {
        "est_of_layer": ms["est_pooled"] / ms["layer_pooled"],
        "index_of_layer": ms["index_pooled"] / ms["layer_pooled"],
        "layer_speedup_over_dense": ms["dense_cudnn"] / ms["layer_pooled"],
    }
    if recall:
        idx = {"pooled": block_topk(q, k, top_k, BS, backend="triton")}
        for r in rows_list:
            idx[f"sampled_r{r}"] = with_rows(r, est("sampled"))()
        res["recall"] = recall_of_oracle(q, k, top_k, idx)
    print(json.dumps(res), flush=True)
    return res


def recall_of_oracle(q, k, top_k: int, indices: dict, count: int = 96) -> dict:
    """Attention mass of ``count`` sampled query rows (``bench_layer.sample_rows``) inside the key
    blocks each block index keeps for the rows' query blocks, against the block oracle at the same
    budget (the ``top_k`` key blocks of the query block by its true attention mass, its diagonal
    block always): per method the mean recall and, per head, recall / oracle recall (mean, min).
    Nq = Nk here."""
    from bench_layer import sample_rows

    n = q.shape[2]
    mbk = -(-n // BS)
    g = HQ // HKV
    rows = sample_rows(n, min(count, n), device=DEV)
    qb = rows // BS
    s = q[0, :, rows].float() @ k[0].float().repeat_interleave(g, 0).transpose(-1, -2) * D**-0.5
    causal = torch.arange(n, device=DEV)[None, :] <= rows[:, None]
    p = torch.softmax(s.masked_fill_(~causal, float("-inf")), -1)  # [H, R, N]
    del s
    pb = torch.nn.functional.pad(p, (0, mbk * BS - n)).view(HQ, len(rows), mbk, BS).sum(-1)
    del p
    got = {}
    for name, idx in indices.items():
        keep = block_sets(idx[0][:, qb], mbk)  # [H, R, MBk]
        got[name] = (pb * keep).sum(-1)  # [H, R]
    blocks, inv = qb.unique(return_inverse=True)
    ar = torch.arange(BS, device=DEV)
    orc = torch.empty(HQ, len(rows), device=DEV)
    for h in range(HQ):
        r_all = (blocks[:, None] * BS + ar[None, :]).clamp(max=n - 1).flatten()
        s = q[0, h, r_all].float() @ k[0, h // g].float().T * D**-0.5
        s.masked_fill_(torch.arange(n, device=DEV)[None, :] > r_all[:, None], float("-inf"))
        pm = torch.nn.functional.pad(torch.softmax(s, -1), (0, mbk * BS - n))
        mass = pm.view(len(blocks), BS, mbk, BS).sum((1, 3))
        del s, pm
        mass[torch.arange(len(blocks), device=DEV), blocks] = float("inf")
        top = mass.topk(min(top_k, mbk), -1).indices
        keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(1, top, True)
        orc[h] = (pb[h] * keep[inv]).sum(-1)
    out = {"oracle_recall_mean": float(orc.mean())}
    for name, rec in got.items():
        ratio = rec.mean(-1) / orc.mean(-1)  # per head
        out[name] = {"recall_mean": float(rec.mean()), "of_oracle_mean": float(ratio.mean()),
                     "of_oracle_min_head": float(ratio.min())}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ns", default="32768,131072")
    ap.add_argument("--frac", type=float, default=0.08)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--rows", default="4,2", help="SAMPLED_ROWS values timed")
    ap.add_argument("--recall", action="store_true", help="also each index's recall vs the oracle")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    a = ap.parse_args()
    global DEV, DTYPE, HQ, HKV, D
    if a.smoke:
        DEV, DTYPE, HQ, HKV, D = "cpu", torch.float32, 4, 2, 64
    t0 = time.time()
    doc = {
        "benchmark": "bench_sampled_scoring",
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"hq": HQ, "hkv": HKV, "d": D, "dtype": "bfloat16", "block": BS},
    }

    def save():
        doc["wall_s"] = time.time() - t0
        write_json(a.out, doc)

    checks = [(4096, 4096, None, (4, 2, 1)), (4096, 4096, 50.0, (4,)), (5000, 3001, None, (4,)),
              (32768, 32768, None, (4, 2))]  # fmt: skip
    if a.smoke:
        checks = [(300, 300, None, (4, 2, 1)), (300, 200, 50.0, (4,))]
    doc["checks"] = [check(*c) for c in checks]
    save()
    if not a.no_sweep:
        best, doc["sweep_32k"] = sweep(400 if a.smoke else 32768)
        block_sampled_triton.SAMPLED_CONFIG.update(best)
        save()
    doc["config"] = dict(block_sampled_triton.SAMPLED_CONFIG)
    doc["timings"] = []
    for n in (int(x) for x in a.ns.split(",")):
        rows_list = tuple(int(x) for x in a.rows.split(","))
        doc["timings"].append(timings(n, a.rounds, a.frac, doc["config"], rows_list, a.recall))
        save()
    print("\n| N | what | ms | share of sampled layer |", file=sys.stderr)
    for row in doc["timings"]:
        for name, t in row["ms"].items():
            print(f"| {row['n']} | {name} | {t:.2f} | |", file=sys.stderr)
        print(json.dumps({k: row[k] for k in row if k.startswith(("share", "tflops"))}),
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
