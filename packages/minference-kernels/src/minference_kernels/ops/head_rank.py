"""The head-wide ranking of ``allocation="head"`` / ``"layer"`` in PyTorch (the reference; the Triton
ranking is :func:`minference_kernels.ops.head_rank_triton.head_keep`)."""

from __future__ import annotations

import torch


def _best_of_rows(x: torch.Tensor, count: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """``bool`` mask of the ``count[h]`` largest finite entries of each row of ``x [B, H, L]``
    (float32), equal values to the earlier position: what a stable descending sort ranks first.

    The PyTorch ranking (the reference; CUDA with ``backend="triton"`` uses
    :func:`minference_kernels.ops.head_rank_triton.head_keep`; ``benchmarks/bench_head_rank.py``
    times the two: benchmarks/results/archive/bench_head_rank_v020i_h200.json). ``method="bisect"`` (the default on CUDA) finds the ``count``-th largest value
    by a bisection over a monotone int32 image of the floats (32 counting passes, no sort, no host
    sync), then cuts ties by position; ``"sort"`` (the default elsewhere: on a CPU one sort costs
    less than 32 passes) ranks by a stable sort. Both give the same mask."""
    if (method or ("bisect" if x.is_cuda else "sort")) == "sort":
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
        return (rank < count.to(torch.int64)[None, :, None]) & (x > float("-inf"))
    bits = x.contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32, ordered like the floats
    need = count.to(torch.int64)[None, :, None]
    # invariant: #(key >= lo) >= need > #(key >= hi)
    lo = torch.full(need.shape, -(2**31), dtype=torch.int64, device=x.device).expand(
        x.shape[0], -1, -1
    )
    hi = torch.full_like(lo, 2**31)
    for _ in range(32):
        mid = (lo + hi) >> 1
        ge = (key >= mid.to(torch.int32)).sum(-1, keepdim=True) >= need
        lo = torch.where(ge, mid, lo)
        hi = torch.where(ge, hi, mid)
    t = lo.to(torch.int32)
    above = key > t
    tie = key == t
    room = need - above.sum(-1, keepdim=True)
    keep = above | (tie & (torch.cumsum(tie, -1) <= room))
    return keep & (x > float("-inf"))
