"""Triton slash-offset cover (the PyTorch reference is
:func:`minference_kernels.ops.index_build.slash_tiles_torch`, same tiles)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index import BLOCK

# slash offsets -> relative tiles (right-to-left greedy; one program per (b, h) row)


@triton.jit(do_not_specialize=["s_len"])
def _slash_tiles_kernel(S, CNT, OUT, NOUT, s_len, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    n = tl.load(CNT + row)
    f = tl.full([], 2**30, tl.int64)
    cnt = tl.full([], 0, tl.int64)
    for j in range(0, n):
        x = -tl.load(S + row.to(tl.int64) * s_len + j)
        emit = x < f
        start = tl.where(x + (BLOCK_N - 1) < f, x, f - BLOCK_N)
        tl.store(OUT + row.to(tl.int64) * s_len + cnt, start, mask=emit)
        cnt += emit.to(tl.int64)
        f = tl.where(emit, start, f)
    tl.store(NOUT + row, cnt)


def slash_tiles(slashes: torch.Tensor, count: torch.Tensor):
    rows, s_len = slashes.shape
    s_len = max(s_len, 1)
    if slashes.shape[1] == 0:
        slashes = slashes.new_zeros((rows, 1))
    out = torch.full((rows, s_len), -(2**30), dtype=torch.int64, device=slashes.device)
    nout = torch.zeros(rows, dtype=torch.int64, device=slashes.device)
    _slash_tiles_kernel[(rows,)](
        slashes.contiguous(),
        count.to(torch.int64).contiguous(),
        out,
        nout,
        s_len,
        BLOCK_N=BLOCK,
        num_warps=1,
    )
    return out, nout
