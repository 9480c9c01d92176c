"""Block-sparse estimation time (issue 3's index share): the top-k selection of
``block_select.block_topk`` on a Llama-3-8B-shaped layer (32 query / 8 KV heads, head dim 128, bf16,
B = 1), per sequence length and budget, three ways in one process:

* ``topk``: the v0.2.0-f selection (``torch.topk(sorted=True)`` over each chunk of ranked scores,
  re-implemented below exactly as it shipped), for the 'before' column;
* ``torch``: the PyTorch selection as shipped now (stable sort, ascending ids; the reference of the
  Triton path and of ``sparse_prefill_mask``);
* ``triton``: the Triton selection (bisection over the scores in registers, no sort).

Checks, per case: the Triton blocks equal the PyTorch ones exactly; the same sets as ``topk``
(random inputs have no ties). Then ``build_index`` of 32 block-sparse heads (estimation + index
conversion), and its peak memory added.

    PYTHONPATH=packages/minference-kernels/src python benchmarks/bench_block_select.py --out DIR

Writes DIR/bench_block_select.json and prints a table.
"""

from __future__ import annotations

import argparse
import math
import time

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from minference_kernels.ops import block_select
from minference_kernels.ops.block_select import (
    _block_geometry,
    _causal_forced,
    _pool_blocks,
    force_diagonal,
)

HQ, HKV, D = 32, 8, 128


def topk_v020f(q, k, top_k: int, block_size: int) -> torch.Tensor:
    """The selection as it shipped in v0.2.0-f (torch.topk, score order), all heads."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    block_size, mbq, mbk = _block_geometry(nq, nk, block_size)
    off = nk - nq
    pq = _pool_blocks(q, nq, mbq, block_size)
    kv_of_q = torch.arange(hq, device=dev) // (hq // k.shape[1])
    pk = _pool_blocks(k, nk, mbk, block_size).index_select(1, kv_of_q)
    out = torch.full((b, hq, mbq, top_k), -1, dtype=torch.int64, device=dev)
    rows_per = max(1, block_select.BLOCK_SCORE_CHUNK_BYTES // (3 * 4 * b * hq * mbk))
    for r0 in range(0, mbq, rows_per):
        r1 = min(mbq, r0 + rows_per)
        rows = torch.arange(r0, r1, device=dev)
        last_pos = min(r1 * block_size, nq) - 1 + off
        width = min(mbk, last_pos // block_size + 1)
        causal, forced = _causal_forced(rows, width, nq, off, block_size)
        s = torch.matmul(pq[:, :, r0:r1], pk[:, :, :width].transpose(-1, -2))
        s = force_diagonal(s.masked_fill_(~causal, float("-inf")), forced)
        kk = min(top_k, width)
        order = torch.topk(s, kk, dim=-1, largest=True, sorted=True).indices
        vals = torch.gather(s, -1, order)
        out[:, :, r0:r1, :kk] = torch.where(vals > float("-inf"), order, torch.full_like(order, -1))
    return out


def timed(fn, reps: int) -> float:
    """Median ms over ``reps`` runs after one warm-up (compiles), CUDA events."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def odd_shapes() -> dict[str, bool]:
    """Triton vs PyTorch selection on CUDA: odd lengths, continuation (Nq < Nk), GQA 1/4/8,
    batch 2, block sizes 64/128/192, per-head budgets, budgets above the causal count, bf16/fp32."""
    res = {}
    cases = [(2, 8, 2, 1000, 1000, 64), (1, 8, 1, 777, 1303, 128), (2, 4, 4, 4097, 4097, 192),
             (1, 32, 8, 20000, 20000, 64), (1, 8, 8, 1, 65, 64), (1, 4, 1, 5000, 9000, 64)]  # fmt: skip
    for b, hq, hkv, nq, nk, bs in cases:
        for dt in (torch.bfloat16, torch.float32):
            g = torch.Generator(device="cuda").manual_seed(nq + bs)
            q = torch.randn(b, hq, nq, 128, device="cuda", dtype=dt, generator=g)
            k = torch.randn(b, hkv, nk, 128, device="cuda", dtype=dt, generator=g)
            mbk = -(-nk // bs)
            for top_k in (1, 3, max(1, mbk // 10), mbk + 5):
                lim = torch.tensor([1 + (i * 7) % top_k for i in range(hq)], device="cuda")
                for t in (top_k, lim):
                    a = block_select.block_topk(q, k, t, bs, top_k_max=top_k, backend="torch")
                    c = block_select.block_topk(q, k, t, bs, top_k_max=top_k, backend="triton")
                    name = f"{b}x{hq}/{hkv} {nq}/{nk} bs{bs} {dt} k{top_k} per-head {t is lim}"
                    res[name] = bool(torch.equal(a, c))
    return res


def as_sets(bi: torch.Tensor) -> torch.Tensor:
    big = torch.iinfo(torch.int64).max
    return torch.where(bi < 0, big, bi).sort(-1).values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ns", default="32768,131072,524288,1048576")
    ap.add_argument("--fracs", default="0.02,0.10")
    ap.add_argument("--torch-max", type=int, default=131072, help="time the stable sort up to N")
    a = ap.parse_args()
    log = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=[])
    log["triton"] = triton.__version__
    print(f"{log['device']}  torch {torch.__version__}  triton {triton.__version__}")
    odd = odd_shapes()
    log["odd_shapes"] = odd
    print(f"odd shapes, Triton == PyTorch selection: {sum(odd.values())}/{len(odd)}")
    bad = [k_ for k_, ok in odd.items() if not ok]
    if bad:
        print("  FAILED:", bad)
    hdr = "{:>8} {:>5} {:>6} | {:>10} {:>10} {:>10} | {:>7} | {:>12} {:>9} | {}"
    print(hdr.format("N", "frac", "top_k", "topk ms", "torch ms", "triton ms", "gain",
                     "build_index", "+GiB", "checks"))  # fmt: skip
    for n in [int(x) for x in a.ns.split(",") if x]:
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        for frac in [float(x) for x in a.fracs.split(",") if x]:
            top_k = max(1, math.ceil(frac * n / 64))
            slow = n >= 524288
            reps = 3 if slow else 10
            sel = lambda be: block_select.block_topk(q, k, top_k, 64, backend=be)
            t_old = timed(lambda: topk_v020f(q, k, top_k, 64), reps)
            old = topk_v020f(q, k, top_k, 64)
            tri = sel("triton")
            t_tri = timed(lambda: sel("triton"), reps)
            checks = []
            same_sets = bool(torch.equal(as_sets(old), as_sets(tri)))
            checks.append(f"sets==topk {same_sets}")
            t_torch = None
            if n <= a.torch_max:
                ref = sel("torch")
                checks.append(f"triton==torch {bool(torch.equal(ref, tri))}")
                t_torch = timed(lambda: sel("torch"), reps)
                del ref
            if not same_sets:
                diff = int((as_sets(old) != as_sets(tri)).any(-1).sum())
                checks.append(f"rows differing {diff}/{tri.shape[1] * tri.shape[2]}")
            del old, tri
            heads = [mk.HeadPattern.block_sparse(top_k)] * HQ
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t_idx = timed(lambda: mk.build_index(q, k, heads, validate=False), reps)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            row = dict(n=n, frac=frac, top_k=top_k, topk_ms=t_old, torch_ms=t_torch,
                       triton_ms=t_tri, build_index_ms=t_idx, peak_added_gib=peak,
                       checks=checks)  # fmt: skip
            log["rows"].append(row)
            print(hdr.format(n, frac, top_k, f"{t_old:.2f}",
                             "-" if t_torch is None else f"{t_torch:.2f}", f"{t_tri:.2f}",
                             f"{t_old / t_tri:.1f}x", f"{t_idx:.2f}", f"{peak:.2f}",
                             ", ".join(checks)), flush=True)  # fmt: skip
            write_json(f"{a.out}/bench_block_select.json", log)
        q = k = None  # free before the next length
        torch.cuda.empty_cache()
    log["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(f"{a.out}/bench_block_select.json", log)


if __name__ == "__main__":
    main()
