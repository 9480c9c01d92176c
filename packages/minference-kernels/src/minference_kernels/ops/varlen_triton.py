"""Triton kernel of :func:`minference_kernels.sparse_prefill_varlen`: one attention launch for a
packed batch of sequences of different lengths (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Layout (flash-attn's varlen convention): ``q [total_q, Hq, D]``, ``k/v [total_k, Hkv, D]``; sequence
``i`` owns rows ``cu_q[i] .. cu_q[i+1]`` of q and ``cu_k[i] .. cu_k[i+1]`` of k/v, and its query row
``r`` sits at position ``r + Nk_i - Nq_i`` of its own keys (bottom-right causal alignment per
sequence). The index is the per-sequence :class:`~minference_kernels.index.SparseIndex` pieces
stacked along a sequence axis and padded to the largest (:func:`pack_indices`); a small table maps
each program to its (sequence, 64-row query block). The kernel body is the per-pair logic of the
equal-length kernel in ``ops/attention_triton.py`` with per-sequence offsets and lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index import BLOCK, SparseIndex
from . import vs_scores_triton as _vs
from ._triton_common import (
    _launch,
    _load_rows,
    _online_update,
    _qk,
    _softcap,
    _softcap_args,
    _upcast,
)
from .attention_triton import ATTN_CONFIG, _desc_strides, _tma_ok

_NO_SPEC = ["n_rel", "n_cols", "n_cov", "n_abs", "H", "G", "MB"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _varlen_attn_fwd(
    Q,
    K,
    V,
    Out,
    DESC_K,
    DESC_V,
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
    TMA: tl.constexpr,
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
        if TMA:
            # tensor-memory loads of packed rows k0 + a0 + r ..: rows of a neighbouring sequence
            # (a tile reaching before key 0 or past Nk) arrive too, and are masked below
            k = DESC_K.load([(k0 + a0 + r).to(tl.int32), hk, 0]).reshape([BLOCK_N, BLOCK_D])
            v = DESC_V.load([(k0 + a0 + r).to(tl.int32), hk, 0]).reshape([BLOCK_N, BLOCK_D])
        else:
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
        if TMA:
            k = DESC_K.load([(k0 + st).to(tl.int32), hk, 0]).reshape([BLOCK_N, BLOCK_D])
            v = DESC_V.load([(k0 + st).to(tl.int32), hk, 0]).reshape([BLOCK_N, BLOCK_D])
        else:
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
        region: tuple[int | slice, ...] = (i, *(slice(0, n) for n in p.shape[1:]))
        out[region] = p[0]
    return out.contiguous()


def pack_indices(indices: list[SparseIndex]) -> dict[str, torch.Tensor]:
    """Per-sequence indices (batch 1 each) -> the kernel's packed tensors ``[S, H, ...]``. Padding
    is never read: the block counts (``rel_end``, ``col_count``, ``abs_count``) bound every read."""
    names = ("rel_tiles", "rel_end", "cols", "col_count", "abs_tiles", "abs_count", "sink")
    packed = {n: _stack([getattr(ix, n) for ix in indices], 0) for n in names}
    packed["window"] = _stack([ix.window for ix in indices], 0)
    packed["cov"] = _stack([ix.cov for ix in indices], 1)
    return packed


#: program orders of the varlen attention launch: ``"sequence"`` (default) runs the sequences
#: longest first, each one's query blocks longest first, so the programs in flight together share
#: a sequence's K/V tiles in L2 as in the equal-length kernel; ``"causal"`` sorts every block of the
#: batch by its causal key count, which interleaves sequences (measured slower on the H200)
BLOCK_ORDERS = ("sequence", "causal")


def block_table(n_q: list[int], n_kv: list[int], device, order: str = "sequence") -> torch.Tensor:
    """``int32 [NB, 2]``: (sequence, query block) of each program, in ``order`` (see
    ``BLOCK_ORDERS``); either way the longest programs of a sequence start first."""
    if order not in BLOCK_ORDERS:
        raise ValueError(f"order must be one of {BLOCK_ORDERS}, got {order!r}")
    # built with tensor operations: a batch of 8 x 128K has ~9000 blocks, and a Python sort of
    # them cost ~50 ms of host time per layer
    nb = torch.tensor([-(-nq // BLOCK) for nq in n_q], dtype=torch.int64)
    seq_of = torch.repeat_interleave(torch.arange(len(n_q)), nb)
    first = torch.cumsum(nb, 0) - nb  # each sequence's first row
    m = torch.arange(int(nb.sum())) - first[seq_of]
    if order == "causal":
        # causal keys of the block's last row, every block of the batch sorted by it (stable)
        nq_t = torch.tensor(n_q, dtype=torch.int64)
        nk_t = torch.tensor(n_kv, dtype=torch.int64)
        keys = nk_t[seq_of] - nq_t[seq_of] + torch.minimum((m + 1) * BLOCK, nq_t[seq_of])
        perm = torch.sort(keys, descending=True, stable=True).indices
    else:
        # sequences by key count (longest first, stable), each one's blocks last to first
        rank = torch.empty(len(n_kv), dtype=torch.int64)
        by_len = sorted(range(len(n_kv)), key=lambda s: -n_kv[s])
        rank[by_len] = torch.arange(len(n_kv))
        perm = torch.sort(rank[seq_of] * (max(nb.tolist(), default=0) + 1) - m, stable=True).indices
    table = torch.stack([seq_of[perm], m[perm]], 1).to(torch.int32)
    return table.reshape(-1, 2).to(device)


def _kv_descriptors_packed(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int):
    """Tensor descriptors of packed ``[total_k, Hkv, D]`` K/V, one ``[block_n, 1, block_d]`` tile
    per load (rows outside ``[0, total_k)`` and dims past D arrive as zeros)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    blk = [block_n, 1, block_d]
    return (
        TensorDescriptor(k, list(k.shape), _desc_strides(k), blk),
        TensorDescriptor(v, list(v.shape), _desc_strides(v), blk),
    )


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
    tma: bool | None = None,
    order: str = "sequence",
) -> torch.Tensor:
    """One launch over every (sequence, query block, head), in ``order`` (``BLOCK_ORDERS``). ``q [total_q, Hq, D]``, ``k/v
    [total_k, Hkv, D]``; sequence ``s`` is rows ``starts_q[s] ..+ n_q[s]`` of q (``n_q[s] >= 1``)
    and ``starts_k[s] ..+ n_kv[s]`` of k/v, with index ``indices[s]``. Returns ``[total_q, Hq, D]``
    (rows of no listed sequence are zero)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    alloc = torch.zeros if sum(n_q) != total_q else torch.empty
    out = alloc(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's strides
    if not indices:
        return out
    if any(ix.masks_columns for ix in indices):
        raise ValueError(
            "vertical_block heads (columns inside absolute tiles) are not supported by the "
            "one-launch varlen kernel yet; run each sequence with sparse_prefill, or use the "
            "PyTorch backend"
        )
    p = pack_indices(indices)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    table = block_table(n_q, n_kv, dev, order)
    mb = p["rel_end"].shape[-1]
    qk_scale, cap_in = _softcap_args(scale, softcap)
    block_d = max(16, triton.next_power_of_2(d))
    # K/V tiles through tensor descriptors (TMA, sm_90+) where the layout allows, as in the
    # equal-length kernel (``ATTN_CONFIG["tma"]``); ``tma=False`` forces pointer loads
    use_tma = bool(ATTN_CONFIG["tma"] if tma is None else tma) and _tma_ok(k) and _tma_ok(v)
    desc_k, desc_v = _kv_descriptors_packed(k, v, BLOCK, block_d) if use_tma else (k, v)
    _launch(
        _varlen_attn_fwd,
        (table.shape[0], hq),
        (
            q,
            k,
            v,
            out,
            desc_k,
            desc_v,
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
        BLOCK_D=block_d,
        BLOCK_M=BLOCK,
        BLOCK_N=BLOCK,
        UPCAST=_upcast(q.dtype),
        TMA=use_tma,
        HAS_SOFTCAP=softcap is not None,
        num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# vertical-slash scores of every sequence of a packed batch: the two passes of ``ops.vs_scores_triton.vs_scores``
# (log-sum-exp of the last queries, then column and diagonal sums), one launch each for the whole
# batch. Each program does exactly what the equal-length kernels do for its sequence (same chunks,
# same key windows, same reduction shapes), so each sequence's scores are those of
# ``ops.vs_scores_triton.vs_scores`` on it alone.


@triton.jit(do_not_specialize=["H", "G"])
def _varlen_vs_lse_kernel(
    Q,
    K,
    M_OUT,
    L_OUT,
    sqn,
    sqh,
    sqd,
    skn,
    skh,
    skd,
    TABLE,
    Q_START,
    K_START,
    NQ,
    NK,
    LQS,
    CHUNKS,
    H,
    G,
    qk_scale,
    cap_in,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LQ_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)  # (sequence, chunk) row of the table
    h = tl.program_id(1)
    seq = tl.load(TABLE + 2 * row)
    cid = tl.load(TABLE + 2 * row + 1)
    hk = h // G
    q0 = tl.load(Q_START + seq).to(tl.int64)
    k0 = tl.load(K_START + seq).to(tl.int64)
    Nq = tl.load(NQ + seq)
    Nk = tl.load(NK + seq)
    LQ = tl.load(LQS + seq)
    CHUNK = tl.load(CHUNKS + seq)
    t = tl.arange(0, LQ_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    row_ok = t < LQ
    qrow = Nq - LQ + t
    q = _load_rows(Q + q0 * sqn + h.to(tl.int64) * sqh, qrow, row_ok, sqn, offs_d, d_ok, sqd)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = Nk - LQ + t
    m_i = tl.full([LQ_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([LQ_P], dtype=tl.float32)
    lo = cid * CHUNK
    hi = tl.minimum(lo + CHUNK, Nk)
    k_base = K + k0 * skn + hk.to(tl.int64) * skh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < hi
        k = _load_rows(k_base, offs_n, kv_ok, skn, offs_d, d_ok, skd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP) * qk_scale
        s = tl.where(
            kv_ok[None, :] & (offs_n[None, :] <= qpos[:, None]) & row_ok[:, None], s, float("-inf")
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    base = (row.to(tl.int64) * H + h) * LQ_P
    tl.store(M_OUT + base + t, m_i)
    tl.store(L_OUT + base + t, l_i)


@triton.jit(do_not_specialize=["H", "G", "NKMAX", "PER"])
def _varlen_vs_score_kernel(
    Q,
    K,
    LSE,
    VERT,
    SLASH,
    sqn,
    sqh,
    sqd,
    skn,
    skh,
    skd,
    TABLE,
    Q_START,
    K_START,
    NQ,
    NK,
    LQS,
    H,
    G,
    NKMAX,
    qk_scale,
    cap_in,
    PER,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LQ_P: tl.constexpr,
    BS: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)  # (sequence, program of that sequence) row of the table
    h = tl.program_id(1)
    seq = tl.load(TABLE + 2 * row)
    pid = tl.load(TABLE + 2 * row + 1)
    hk = h // G
    sh = (seq * H + h).to(tl.int64)
    q0 = tl.load(Q_START + seq).to(tl.int64)
    k0 = tl.load(K_START + seq).to(tl.int64)
    Nq = tl.load(NQ + seq)
    Nk = tl.load(NK + seq)
    LQ = tl.load(LQS + seq)
    t = tl.arange(0, LQ_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    row_ok = t < LQ
    qrow = Nq - LQ + t
    q = _load_rows(Q + q0 * sqn + h.to(tl.int64) * sqh, qrow, row_ok, sqn, offs_d, d_ok, sqd)
    if UPCAST:
        q = q.to(tl.float32)
    p0 = Nk - LQ
    qpos = p0 + t
    lse = tl.load(LSE + sh * LQ_P + t)
    c = tl.arange(0, LQ_P + BS)
    u = tl.arange(0, BS)
    idx = (BS - 1) + t[:, None] - u[None, :]
    k_base = K + k0 * skn + hk.to(tl.int64) * skh
    for j in range(0, PER):
        sid = pid * PER + j
        s0 = sid * BS
        w0 = p0 - s0 - (BS - 1)
        keys = w0 + c
        kv_ok = (keys >= 0) & (keys < Nk)
        k = _load_rows(k_base, keys, kv_ok, skn, offs_d, d_ok, skd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP) * qk_scale
        ok = kv_ok[None, :] & (keys[None, :] <= qpos[:, None]) & row_ok[:, None]
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
        colsum = tl.sum(p, 0)
        own = (c >= LQ_P) & kv_ok
        tl.store(VERT + sh * NKMAX + keys, colsum, mask=own)
        diag = tl.gather(p, idx, axis=1)
        ssum = tl.sum(diag, 0)
        offs_s = s0 + u
        tl.store(SLASH + sh * NKMAX + offs_s, ssum, mask=offs_s < Nk)


def vs_scores_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    starts_q: list[int],
    starts_k: list[int],
    n_q: list[int],
    n_kv: list[int],
    last_q: int,
    scale: float,
    *,
    softcap: float | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``(vertical, slash)`` float32 ``[1, Hq, Nk_s]`` views for each listed sequence (``n_q[s]
    >= 1``), as ``ops.vs_scores_triton.vs_scores`` gives them for the sequence alone, in two launches for all
    of them. ``None`` where the equal-length pass would not run these in Triton (a key window
    over ``VS_SCORE_WINDOW_MAX``, or sequences whose ``min(last_q, Nq)`` round to different
    powers of two: the caller then scores each sequence on its own)."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    lqs = [min(last_q, n) for n in n_q]
    lq_ps = {max(16, triton.next_power_of_2(x)) for x in lqs}
    if len(lq_ps) != 1:
        return None
    lq_p = lq_ps.pop()
    block_d = max(16, triton.next_power_of_2(d))
    if _vs._score_window(lq_p, block_d, k.element_size()) > _vs.VS_SCORE_WINDOW_MAX:
        return None
    dev = q.device
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    upcast = _upcast(q.dtype)
    qk_scale, cap_in = _softcap_args(scale, softcap)
    has_cap = softcap is not None
    block_n = 64
    chunks = [max(block_n, triton.cdiv(triton.cdiv(nk, 16), block_n) * block_n) for nk in n_kv]
    nchunks = [triton.cdiv(nk, c) for nk, c in zip(n_kv, chunks)]
    table = i32([[s, c] for s, nc in enumerate(nchunks) for c in range(nc)]).reshape(-1, 2)
    m_part = torch.empty((table.shape[0], hq, lq_p), dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    meta = (i32(starts_q), i32(starts_k), i32(n_q), i32(n_kv), i32(lqs))
    _launch(
        _varlen_vs_lse_kernel,
        (table.shape[0], hq),
        (q, k, m_part, l_part, *q.stride(), *k.stride(), table, *meta, i32(chunks), hq,
         hq // hkv, qk_scale, cap_in),
        num_stages=3,
        HEAD_D=d,
        BLOCK_D=block_d,
        LQ_P=lq_p,
        BLOCK_N=block_n,
        UPCAST=upcast,
        HAS_SOFTCAP=has_cap,
        num_warps=4,
    )  # fmt: skip
    lse_parts, first = [], 0
    for nc in nchunks:  # the combination of vs_scores, on each sequence's [Hq, nchunk, LQ_P]
        mp = m_part[first : first + nc].transpose(0, 1)
        lp = l_part[first : first + nc].transpose(0, 1)
        first += nc
        m_max = mp.amax(1)
        m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
        l_tot = (lp * torch.exp2(mp - m_safe[:, None])).sum(1)
        lse_parts.append(m_safe + torch.log2(torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot))))
    lse = torch.stack(lse_parts).contiguous()  # [S, Hq, LQ_P]
    nk_max = max(n_kv)
    vertical = torch.empty((len(n_q), hq, nk_max), dtype=torch.float32, device=dev)
    slash = torch.empty_like(vertical)
    bs = lq_p
    per = _vs.VS_SCORE_PER
    progs = [triton.cdiv(triton.cdiv(nk, bs) + 1, per) for nk in n_kv]
    table = i32([[s, p] for s, n in enumerate(progs) for p in range(n)]).reshape(-1, 2)
    _launch(
        _varlen_vs_score_kernel,
        (table.shape[0], hq),
        (q, k, lse, vertical, slash, *q.stride(), *k.stride(), table, *meta, hq, hq // hkv,
         nk_max, qk_scale, cap_in, per),
        num_stages=_vs._score_stages(lq_p, block_d, k.element_size()),
        HEAD_D=d,
        BLOCK_D=block_d,
        LQ_P=lq_p,
        BS=bs,
        UPCAST=upcast,
        HAS_SOFTCAP=has_cap,
        num_warps=_vs.VS_SCORE_WARPS,
    )  # fmt: skip
    return [(vertical[s : s + 1, :, :nk], slash[s : s + 1, :, :nk]) for s, nk in enumerate(n_kv)]
