"""Triton block selection (the PyTorch reference is the selection in
:mod:`minference_kernels.ops.block_select`, same blocks from the same scores)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _float_key

# block-sparse estimation: top-k key blocks of each query block (one program per row)

#: Widest row of block scores (causal key blocks of one query block) the Triton selection holds in
#: registers: 16384 blocks = 1M tokens at ``block_size = 64``. Wider rows use the PyTorch selection.
BLOCK_SELECT_MAX = 16384
_I32_MAX = tl.constexpr(2147483647)


@triton.jit
def _kth_key(key, kk):
    """The ``kk``-th largest of the int32 ``key`` row and the mask of its ``kk`` largest entries
    (equal keys to the lowest position): bisection, 32 counting passes, no sort."""
    # invariant: count(key >= lo) >= kk > count(key >= hi)
    lo = tl.full([], -_I32_MAX, tl.int64)
    hi = tl.full([], _I32_MAX + 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        cnt = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0)
        ge = cnt >= kk
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid)
    t = lo.to(tl.int32)
    gt = key > t
    eq = key == t
    need = kk - tl.sum(gt.to(tl.int32), 0)
    return gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))


@triton.jit(do_not_specialize=["hq", "r0", "width", "nq", "off", "bs", "kmax", "scale"])
def _block_select_kernel(
    S,
    OUT,
    LIMIT,
    VALS,
    FLOOR,
    s_b,
    s_h,
    s_r,
    o_b,
    o_h,
    o_r,
    hq,
    r0,
    width,
    nq,
    off,
    bs,
    kmax,
    scale,
    W_P: tl.constexpr,
    SHARES: tl.constexpr,
    HAS_FLOOR: tl.constexpr,
    SINK: tl.constexpr,
):
    """Row ``r`` (query block ``r0 + r``) of head ``bh``: the ``min(LIMIT[h], kmax, causal)``
    highest-ranked causal key blocks, ascending, into ``OUT`` (pre-filled with -1). Rank: the block
    of the query block's first row, then its other diagonal block, then (``SINK``) key block 0
    (the sinks), then the scores; ties go to the lowest block id. The k-th largest rank is found by bisection
    over a monotone int32 image of the float32 scores (32 counting passes over the row in
    registers), so nothing is sorted."""
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // hq
    h = bh % hq
    qb = (r0 + r).to(tl.int64)
    first = qb * bs + off
    last = tl.minimum((qb + 1) * bs, nq) - 1 + off
    j = tl.arange(0, W_P)
    kstart = j.to(tl.int64) * bs
    causal = (j < width) & (kstart <= last)
    diag = causal & (kstart + bs > first)
    sink = causal & (j == 0) & ~diag
    if not SINK:  # key block 0 ranks by its score
        sink = causal & (j < 0)
    base = S + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + r.to(tl.int64) * s_r
    x = tl.load(base + j, mask=causal, other=0.0)
    key = tl.minimum(tl.maximum(_float_key(x), -_I32_MAX + 1), _I32_MAX - 3)
    key = tl.where(sink, _I32_MAX - 2, key)  # key block 0
    key = tl.where(diag, _I32_MAX - 1, key)  # diagonal blocks
    key = tl.where(j == first // bs, _I32_MAX, key)  # the block holding the first row
    key = tl.where(causal, key, -_I32_MAX - 1)
    n_causal = tl.sum(causal.to(tl.int32), 0)
    kk = tl.minimum(tl.minimum(tl.load(LIMIT + h).to(tl.int32), kmax), n_causal)
    sel = _kth_key(key, kk)
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    o_row = b.to(tl.int64) * o_b + h.to(tl.int64) * o_h + r.to(tl.int64) * o_r
    tl.store(OUT + o_row + pos, j.to(tl.int64), mask=sel)
    if SHARES:  # the winners' log-shares (log-softmax of the scaled scores; forced ones forced)
        # the row again (from cache) rather than kept live in registers through the bisection
        x = tl.load(base + j, mask=causal, other=0.0)
        t = tl.where(causal, x * scale, float("-inf"))
        t_max = tl.max(t, 0)
        share = (t - t_max) - tl.log(tl.sum(tl.exp(t - t_max), 0))
        share = tl.where(sink, 3.4028232635611926e38, share)  # SINK_RANK
        share = tl.where(diag, 3.4028234663852886e38, share)
        share = tl.where(j == first // bs, float("inf"), share)
        if HAS_FLOOR:  # the guaranteed blocks (the FLOOR[h] best): inf, above everything
            guar = _kth_key(key, tl.minimum(tl.load(FLOOR + h).to(tl.int32), kk))
            share = tl.where(guar, float("inf"), share)
        tl.store(VALS + o_row + pos, share, mask=sel)


def block_select(
    scores: torch.Tensor,
    out: torch.Tensor,
    limit: torch.Tensor,
    *,
    r0: int,
    nq: int,
    off: int,
    block_size: int,
    kmax: int,
    shares: torch.Tensor | None = None,
    scale: float = 1.0,
    floor: torch.Tensor | None = None,
    sink: bool = True,
) -> None:
    """Top-k selection of :func:`minference_kernels.ops.block_select.block_topk` for one chunk of query
    blocks: ``scores [B, H, R, W]`` float32 (raw pooled dot products, soft-capped by the caller
    where ``softcap`` is set; causality and the forced blocks -- diagonal, then key block 0 -- are
    applied here), ``out [B, H, R, >= kmax]`` int64 pre-filled with -1 (a view is fine),
    ``limit [H]`` per-head budgets. ``W <= BLOCK_SELECT_MAX``.

    ``shares`` (float32, ``out``'s shape and strides, pre-filled with -inf): also write each
    winner's log-share, ``log_softmax(scale * scores)`` over the causal blocks, in ``out``'s slot
    (the block of the first row: inf, another diagonal block: float32 max, key block 0:
    ``block_select.SINK_RANK``), as ``allocation="head"`` ranks them. ``floor [H]`` (with
    ``shares``): each row's ``floor[h]`` best blocks (by the rank above) get share ``inf``: the
    guaranteed blocks of ``block_select.HEAD_ALLOCATION_FLOOR``. ``sink=False``: key block 0 is
    not forced (``block_select.forces_sink``), it ranks by its score."""
    b, h, rows, width = scores.shape
    if width > BLOCK_SELECT_MAX:
        raise ValueError(f"block_select: {width} key blocks exceed {BLOCK_SELECT_MAX}")
    if scores.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("block_select: scores and out need a contiguous last dim")
    if shares is not None and (shares.shape != out.shape or shares.stride() != out.stride()):
        raise ValueError("block_select: shares needs out's shape and strides")
    if floor is not None and shares is None:
        raise ValueError("block_select: floor needs shares")
    w_p = max(512, triton.next_power_of_2(width))
    lim = limit.to(torch.int64).contiguous()
    _block_select_kernel[(rows, b * h)](
        scores,
        out,
        lim,
        out if shares is None else shares,
        lim if floor is None else floor.to(torch.int64).contiguous(),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        r0,
        width,
        nq,
        off,
        block_size,
        kmax,
        float(scale),
        W_P=w_p,
        SHARES=shares is not None,
        HAS_FLOOR=floor is not None,
        SINK=bool(sink),
        num_warps=4 if w_p <= 2048 else (8 if w_p <= 8192 else 16),
    )
