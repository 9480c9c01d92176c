"""Triton kernel of :func:`minference_kernels.sparse_prefill_varlen`: one attention launch for a
packed batch of sequences of different lengths (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Layout (flash-attn's varlen convention): ``q [total_q, Hq, D]``, ``k/v [total_k, Hkv, D]``; sequence
``i`` owns rows ``cu_q[i] .. cu_q[i+1]`` of q and ``cu_k[i] .. cu_k[i+1]`` of k/v, and its query row
``r`` sits at position ``r + Nk_i - Nq_i`` of its own keys (bottom-right causal alignment per
sequence). The index is the per-sequence :class:`~minference_kernels.index.SparseIndex` pieces
stacked along a sequence axis and padded to the largest (:func:`pack_indices`); a small table maps
each program to its (sequence, 64-row query block). The kernel body is the per-pair logic of the
equal-length kernel in ``_triton.py`` with per-sequence offsets and lengths (pointer loads only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import _launch, _load_rows, _online_update, _qk, _softcap, _softcap_args, _upcast
from .index import BLOCK, SparseIndex

_NO_SPEC = ["n_rel", "n_cols", "n_cov", "n_abs", "H", "G", "MB"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _varlen_attn_fwd(
    Q,
    K,
    V,
    Out,
    sqn,
    sqh,
    sqd,
    skn,
    skh,
    skd,
    svn,
    svh,
    svd,
    son,
    soh,
    sod,
    TABLE,
    Q_START,
    K_START,
    NQ,
    NK,
    REL,
    REL_END,
    COLS,
    COL_CNT,
    COV,
    ABS,
    ABS_CNT,
    SINK,
    WIN,
    n_rel,
    n_cols,
    n_cov,
    n_abs,
    H,
    G,
    MB,
    qk_scale,
    cap_in,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(TABLE + 2 * pid)
    m = tl.load(TABLE + 2 * pid + 1)
    hk = h // G
    sh = seq * H + h  # row of the packed index
    q0 = tl.load(Q_START + seq).to(tl.int64)
    k0 = tl.load(K_START + seq).to(tl.int64)
    Nq = tl.load(NQ + seq)
    Nk = tl.load(NK + seq)
    q_off = Nk - Nq

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_D
    row_ok = offs_m < Nq
    q_base = Q + q0 * sqn + h.to(tl.int64) * sqh
    q = _load_rows(q_base, offs_m, row_ok, sqn, offs_d, d_ok, sqd)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = offs_m + q_off
    a0 = m * BLOCK_M + q_off
    k_base = K + k0 * skn + hk.to(tl.int64) * skh
    v_base = V + k0 * svn + hk.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    sink = tl.load(SINK + sh)
    win = tl.load(WIN + sh)

    # relative tiles: keys [a0 + r, a0 + r + BLOCK_N) of this sequence
    t_end = tl.load(REL_END + sh * MB + m)
    for t in range(0, t_end):
        r = tl.load(REL + sh * n_rel + t)
        offs_n = a0 + r + offs_n0
        kv_ok = (offs_n >= 0) & (offs_n < Nk)
        k = _load_rows(k_base, offs_n, kv_ok, skn, offs_d, d_ok, skd)
        v = _load_rows(v_base, offs_n, kv_ok, svn, offs_d, d_ok, svd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)  # capped before the mask
        st = a0 + r
        past_window = (win > 0) & (a0 + BLOCK_M - 1 - st >= win)
        need = (st + BLOCK_N - 1 > a0) | (st < 0) | (st + BLOCK_N > Nk) | past_window
        if need:
            ok = kv_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            ok = ok & (
                (win <= 0) | (offs_n[None, :] < sink) | (q_pos[:, None] - offs_n[None, :] < win)
            )
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST)

    # gathered columns not covered by this block's relative tiles
    c_cnt = tl.load(COL_CNT + sh * MB + m)
    for c0 in range(0, c_cnt, BLOCK_N):
        offs_c = c0 + offs_n0
        c_ok = offs_c < c_cnt
        cidx = tl.load(COLS + sh * n_cols + offs_c, mask=c_ok, other=0)
        cov = tl.load(
            COV + sh.to(tl.int64) * n_cov + (cidx - a0 + Nk + BLOCK_N), mask=c_ok, other=1
        )
        c_ok = c_ok & (cov == 0)
        k = _load_rows(k_base, cidx, c_ok, skn, offs_d, d_ok, skd)
        v = _load_rows(v_base, cidx, c_ok, svn, offs_d, d_ok, svd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)
        ok = c_ok[None, :] & (cidx[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST)

    # absolute tiles (block-sparse)
    a_cnt = tl.load(ABS_CNT + sh * MB + m)
    for t in range(0, a_cnt):
        st = tl.load(ABS + (sh * MB + m).to(tl.int64) * n_abs + t)
        offs_n = st + offs_n0
        kv_ok = offs_n < Nk
        k = _load_rows(k_base, offs_n, kv_ok, skn, offs_d, d_ok, skd)
        v = _load_rows(v_base, offs_n, kv_ok, svn, offs_d, d_ok, svd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)
        need = (st + BLOCK_N - 1 > a0) | (st + BLOCK_N > Nk)
        if need:
            ok = kv_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = (
        Out
        + q0 * son
        + h.to(tl.int64) * soh
        + offs_m[:, None].to(tl.int64) * son
        + offs_d[None, :] * sod
    )
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _stack(parts: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Stack ``[1, H, *rest]`` tensors along dim 0, padding every trailing dim to the largest."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = parts[0].new_full((len(parts), *shape), fill)
    for i, p in enumerate(parts):
        out[(i, *(slice(0, n) for n in p.shape[1:]))] = p[0]
    return out.contiguous()


def pack_indices(indices: list[SparseIndex]) -> dict[str, torch.Tensor]:
    """Per-sequence indices (batch 1 each) -> the kernel's packed tensors ``[S, H, ...]``. Padding
    is never read: the block counts (``rel_end``, ``col_count``, ``abs_count``) bound every read."""
    names = ("rel_tiles", "rel_end", "cols", "col_count", "abs_tiles", "abs_count", "sink")
    packed = {n: _stack([getattr(ix, n) for ix in indices], 0) for n in names}
    packed["window"] = _stack([ix.window for ix in indices], 0)
    packed["cov"] = _stack([ix.cov for ix in indices], 1)
    return packed


def block_table(n_q: list[int], n_kv: list[int], device) -> torch.Tensor:
    """``int32 [NB, 2]``: (sequence, query block) of each program, the blocks with the most causal
    keys first (the longest programs start first, as in the equal-length kernel)."""
    rows = [
        (nk - nq + min((m + 1) * BLOCK, nq), s, m)
        for s, (nq, nk) in enumerate(zip(n_q, n_kv))
        for m in range(-(-nq // BLOCK))
    ]
    rows.sort(key=lambda r: -r[0])
    table = torch.tensor([[s, m] for _, s, m in rows], dtype=torch.int32)
    return table.reshape(-1, 2).to(device)


def attend_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts_q: list[int],
    starts_k: list[int],
    n_q: list[int],
    n_kv: list[int],
    indices: list[SparseIndex],
    scale: float,
    *,
    softcap: float | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """One launch over every (sequence, query block, head). ``q [total_q, Hq, D]``, ``k/v
    [total_k, Hkv, D]``; sequence ``s`` is rows ``starts_q[s] ..+ n_q[s]`` of q (``n_q[s] >= 1``)
    and ``starts_k[s] ..+ n_kv[s]`` of k/v, with index ``indices[s]``. Returns ``[total_q, Hq, D]``
    (rows of no listed sequence are zero)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    out = torch.zeros_like(q) if sum(n_q) != total_q else torch.empty_like(q)
    if not indices:
        return out
    p = pack_indices(indices)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    table = block_table(n_q, n_kv, dev)
    mb = p["rel_end"].shape[-1]
    qk_scale, cap_in = _softcap_args(scale, softcap)
    _launch(
        _varlen_attn_fwd,
        (table.shape[0], hq),
        (
            q,
            k,
            v,
            out,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            table,
            i32(starts_q),
            i32(starts_k),
            i32(n_q),
            i32(n_kv),
            p["rel_tiles"],
            p["rel_end"],
            p["cols"],
            p["col_count"],
            p["cov"],
            p["abs_tiles"],
            p["abs_count"],
            p["sink"],
            p["window"],
            p["rel_tiles"].shape[-1],
            p["cols"].shape[-1],
            p["cov"].shape[-1],
            p["abs_tiles"].shape[-1],
            hq,
            hq // hkv,
            mb,
            qk_scale,
            cap_in,
        ),
        num_stages=num_stages,
        HEAD_D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=BLOCK,
        BLOCK_N=BLOCK,
        UPCAST=_upcast(q.dtype),
        HAS_SOFTCAP=softcap is not None,
        num_warps=num_warps,
    )
    return out
