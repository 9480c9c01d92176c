"""Triton head-wide ranking of ``allocation="head"`` / ``"layer"`` (the PyTorch reference is
:func:`minference_kernels.ops.head_rank._best_of_rows`, same winners)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _float_key

# ``allocation="head"``: the head-wide ranking of candidate shares. A 16-way search over the int32
# image of the float32 shares narrows [lo, hi) 16-fold per pass, so 8 counting passes find the
# ``count``-th largest share; one more pass counts, per query block, the shares equal to it, and
# equal shares go to the earlier query block, then the earlier candidate (a stable sort's order).
_RANK_PASSES = 8
_RANK_CHUNK = 8192  # shares per counting program
_RANK_SUB = 128  # shares compared at once against the 16 probes


@triton.jit
def _rank_keys(X, base, offs, ok):
    """Float32 ``X[base + offs]`` (-inf where not ``ok``) and int32 keys ordered like them."""
    x = tl.load(X + base + offs, mask=ok, other=float("-inf"))
    return x, _float_key(x)


@triton.jit
def _rank_interval(LO, HI, CNT, p, row, R, need):
    """The int64 search interval ``[lo, hi)`` of pass ``p`` for ``row``: pass ``p - 1``'s cut to
    the probe slice holding the ``need``-th largest key (``p = 0``: the stored start)."""
    if p == 0:
        lo = tl.load(LO + row)
        hi = tl.load(HI + row)
    else:
        lo = tl.load(LO + (p - 1) * R + row)
        hi = tl.load(HI + (p - 1) * R + row)
        step = (hi - lo + 15) >> 4
        cnt = tl.load(CNT + ((p - 1) * R + row) * 16 + tl.arange(0, 16))
        idx = tl.sum((cnt >= need).to(tl.int32), 0) - 1  # probe 0 (= lo) always counts
        new_lo = lo + idx.to(tl.int64) * step
        hi = tl.where(idx < 15, tl.minimum(hi, new_lo + step), hi)
        lo = new_lo
    return lo, hi


@triton.jit(do_not_specialize=["L", "R", "p"])
def _rank_count_kernel(X, NEED, LO, HI, CNT, L, R, p, CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Pass ``p``: for row ``pid(1)``, count the keys of one chunk at or above each of the 16
    probes ``lo + i * step`` (per-thread counts, summed once, then atomic adds into
    ``CNT[p, row]``)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    need = tl.load(NEED + row)
    lo, hi = _rank_interval(LO, HI, CNT, p, row, R, need)
    if c == 0:  # the interval of this pass, for the next pass's programs
        tl.store(LO + p * R + row, lo)
        tl.store(HI + p * R + row, hi)
    w = tl.arange(0, 16)
    probes = lo + w.to(tl.int64) * ((hi - lo + 15) >> 4)
    probes = tl.minimum(probes, 2147483647).to(tl.int32)  # past every key: counts 0 either way
    acc = tl.zeros([SUB, 16], dtype=tl.int32)
    base = row.to(tl.int64) * L
    # only this chunk's part of the row (short rows stop after their last SUB-slice)
    for s0 in range(0, tl.minimum(CHUNK, L - c * CHUNK), SUB):
        offs = c.to(tl.int64) * CHUNK + s0 + tl.arange(0, SUB)
        ok = offs < L
        _, key = _rank_keys(X, base, offs, ok)
        acc += ((key[:, None] >= probes[None, :]) & ok[:, None]).to(tl.int32)
    tl.atomic_add(CNT + (p * R + row) * 16 + w, tl.sum(acc, 0))


@triton.jit
def _rank_threshold(LO, HI, CNT, row, R, P, need):
    """The ``need``-th largest key of ``row`` after ``P`` passes (``need = 0``: above all)."""
    t, _ = _rank_interval(LO, HI, CNT, P, row, R, need)
    return tl.where(need > 0, t, 2147483647).to(tl.int32)


@triton.jit(do_not_specialize=["L", "R", "cap", "P"])
def _rank_ties_kernel(X, NEED, LO, HI, CNT, GT, EQ, L, R, cap, P, CAP_P: tl.constexpr):
    """Query block ``pid(0)`` of row ``pid(1)``: how many of its keys are above the threshold
    (``GT``) and equal to it (``EQ``), both ``[R, MB]``."""
    m = tl.program_id(0)
    row = tl.program_id(1)
    t = _rank_threshold(LO, HI, CNT, row, R, P, tl.load(NEED + row))
    j = tl.arange(0, CAP_P)
    ok = j < cap
    _, key = _rank_keys(X, row.to(tl.int64) * L, m.to(tl.int64) * cap + j, ok)
    mb = L // cap
    tl.store(GT + row.to(tl.int64) * mb + m, tl.sum((ok & (key > t)).to(tl.int32), 0))
    tl.store(EQ + row.to(tl.int64) * mb + m, tl.sum((ok & (key == t)).to(tl.int32), 0))


@triton.jit(do_not_specialize=["L", "R", "cap", "P"])
def _rank_keep_kernel(
    X, IDS, OUT, NEED, LO, HI, CNT, EQ_BEFORE, ROOM, L, R, cap, P, CAP_P: tl.constexpr
):
    """Query block ``pid(0)`` of row ``pid(1)``: its finite candidates above the threshold, and
    those equal to it while the row's ``ROOM`` for ties lasts (``EQ_BEFORE``: equal keys in the
    earlier query blocks), compacted in their (ascending) order into ``OUT`` (pre-filled -1)."""
    m = tl.program_id(0)
    row = tl.program_id(1)
    t = _rank_threshold(LO, HI, CNT, row, R, P, tl.load(NEED + row))
    j = tl.arange(0, CAP_P)
    ok = j < cap
    base = row.to(tl.int64) * L
    offs = m.to(tl.int64) * cap + j
    x, key = _rank_keys(X, base, offs, ok)
    eq = ok & (key == t)
    before = tl.load(EQ_BEFORE + row.to(tl.int64) * (L // cap) + m)
    tie_ok = (before + tl.cumsum(eq.to(tl.int64), 0)) <= tl.load(ROOM + row)
    keep = ok & ((key > t) | (eq & tie_ok)) & (x > float("-inf"))
    ids = tl.load(IDS + base + offs, mask=keep, other=-1)
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(OUT + base + m.to(tl.int64) * cap + pos, ids, mask=keep)


def head_keep(vals: torch.Tensor, ids: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The head allocation's winners: ``vals [B, H, MB, cap]`` float32 shares of the candidates
    ``ids [B, H, MB, cap]`` int64 (ascending per query block, -1 with share -inf where none),
    ``count [H]`` winners per head -> ``[B, H, MB, cap]`` the winning ids of each query block,
    ascending, -1 after them. A winner is among the ``count[h]`` largest finite shares of its
    head; equal shares go to the lower query block, then the lower key block (the stable
    descending sort's order). No sort and no host sync: 8 counting passes, a pass counting the
    shares equal to the threshold, then one compaction."""
    b, h, mb, cap = vals.shape
    if cap == 0 or mb == 0:
        return ids.clone()
    rows, length = b * h, mb * cap
    vals = vals.contiguous()
    ids = ids.contiguous()
    dev = vals.device
    need = count.to(device=dev, dtype=torch.int64).clamp(max=length).repeat(b).contiguous()
    lo = torch.full((_RANK_PASSES, rows), -(2**31), dtype=torch.int64, device=dev)
    hi = torch.full((_RANK_PASSES, rows), 2**31, dtype=torch.int64, device=dev)
    cnt = torch.zeros((_RANK_PASSES, rows, 16), dtype=torch.int32, device=dev)
    grid = (triton.cdiv(length, _RANK_CHUNK), rows)
    for p in range(_RANK_PASSES):
        _rank_count_kernel[grid](
            vals, need, lo, hi, cnt, length, rows, p, CHUNK=_RANK_CHUNK, SUB=_RANK_SUB
        )
    cap_p = max(16, triton.next_power_of_2(cap))
    warps = 4 if cap_p <= 2048 else (8 if cap_p <= 8192 else 16)
    gt = torch.empty((rows, mb), dtype=torch.int32, device=dev)
    eq = torch.empty((rows, mb), dtype=torch.int32, device=dev)
    _rank_ties_kernel[(mb, rows)](
        vals, need, lo, hi, cnt, gt, eq, length, rows, cap, _RANK_PASSES,
        CAP_P=cap_p, num_warps=warps,
    )  # fmt: skip
    eq_before = (torch.cumsum(eq, 1, dtype=torch.int64) - eq).contiguous()
    room = (need - gt.sum(1, dtype=torch.int64)).contiguous()
    out = torch.full_like(ids, -1)
    _rank_keep_kernel[(mb, rows)](
        vals, ids, out, need, lo, hi, cnt, eq_before, room, length, rows, cap, _RANK_PASSES,
        CAP_P=cap_p, num_warps=warps,
    )  # fmt: skip
    return out
