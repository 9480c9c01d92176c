"""Triton vertical-slash scores (the PyTorch reference is
:func:`minference_kernels.ops.vs_scores.vs_scores_torch`)."""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from . import vs_scores as _reference
from ._triton_common import (
    _launch,
    _load_rows,
    _qk,
    _softcap,
    _softcap_args,
    _upcast,
)

_log = logging.getLogger("minference_kernels")

# vertical-slash estimation: pass 1 = per-row log-sum-exp of the last queries, pass 2 = scores


@triton.jit(do_not_specialize=["H", "G", "Nq", "Nk", "LQ", "CHUNK", "NCHUNK"])
def _vs_lse_kernel(
    Q,
    K,
    M_OUT,
    L_OUT,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    H,
    G,
    Nq,
    Nk,
    LQ,
    qk_scale,
    cap_in,
    CHUNK,
    NCHUNK,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LQ_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    cid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // G
    t = tl.arange(0, LQ_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    row_ok = t < LQ
    qrow = Nq - LQ + t
    q = _load_rows(Q + b * sqb + h.to(tl.int64) * sqh, qrow, row_ok, sqn, offs_d, d_ok, sqd)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = Nk - LQ + t
    m_i = tl.full([LQ_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([LQ_P], dtype=tl.float32)
    lo = cid * CHUNK
    hi = tl.minimum(lo + CHUNK, Nk)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < hi
        k = _load_rows(K + b * skb + hk.to(tl.int64) * skh, offs_n, kv_ok, skn, offs_d, d_ok, skd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP) * qk_scale
        s = tl.where(
            kv_ok[None, :] & (offs_n[None, :] <= qpos[:, None]) & row_ok[:, None], s, float("-inf")
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    base = (bh.to(tl.int64) * NCHUNK + cid) * LQ_P
    tl.store(M_OUT + base + t, m_i)
    tl.store(L_OUT + base + t, l_i)


@triton.jit(do_not_specialize=["H", "G", "Nq", "Nk", "LQ", "PER"])
def _vs_score_kernel(
    Q,
    K,
    LSE,
    VERT,
    SLASH,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    H,
    G,
    Nq,
    Nk,
    LQ,
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
    # program owns PER consecutive steps; step sid owns slash offsets [s0, s0 + BS) and vertical
    # keys [w0 + LQ_P, w0 + LQ_P + BS). The last queries and their LSE are loaded once per program.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // G
    t = tl.arange(0, LQ_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    row_ok = t < LQ
    qrow = Nq - LQ + t
    q = _load_rows(Q + b * sqb + h.to(tl.int64) * sqh, qrow, row_ok, sqn, offs_d, d_ok, sqd)
    if UPCAST:
        q = q.to(tl.float32)
    p0 = Nk - LQ
    qpos = p0 + t
    lse = tl.load(LSE + bh.to(tl.int64) * LQ_P + t)
    c = tl.arange(0, LQ_P + BS)
    u = tl.arange(0, BS)
    idx = (BS - 1) + t[:, None] - u[None, :]
    k_base = K + b * skb + hk.to(tl.int64) * skh
    for j in range(0, PER):
        sid = pid * PER + j
        s0 = sid * BS
        w0 = p0 - s0 - (BS - 1)
        keys = w0 + c
        kv_ok = (keys >= 0) & (keys < Nk)  # steps past the last window see only keys < 0
        k = _load_rows(k_base, keys, kv_ok, skn, offs_d, d_ok, skd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP) * qk_scale
        ok = kv_ok[None, :] & (keys[None, :] <= qpos[:, None]) & row_ok[:, None]
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # [LQ_P, LQ_P + BS]
        # verticals: column sums of the keys this step owns
        colsum = tl.sum(p, 0)
        own = (c >= LQ_P) & kv_ok
        tl.store(VERT + bh.to(tl.int64) * Nk + keys, colsum, mask=own)
        # slashes: offset s0 + u for row t is column BS - 1 + t - u
        diag = tl.gather(p, idx, axis=1)
        ssum = tl.sum(diag, 0)
        offs_s = s0 + u
        tl.store(SLASH + bh.to(tl.int64) * Nk + offs_s, ssum, mask=offs_s < Nk)


# score pass: key windows per program (the last queries are loaded once per program) and warps;
# tuned on an H200 by benchmarks/tune_vs_scores.py: the fastest setting it timed (its timings are
# in benchmarks/results/archive/NOTES-2026.md, v0.2.0-c)
VS_SCORE_PER = 16
VS_SCORE_WARPS = 4
# shared memory for the pipelined key windows; the rest of the kernel's scratch (the last queries,
# layout conversions for the diagonal gather) must still fit beside them (H100/H200: 227 KiB)
VS_SCORE_WINDOW_SMEM = 144 << 10
# largest key window (2 * last_q rounded up to a power of two, times D, times the element size) the
# score pass takes: measured on an H200 (NOTES v0.2.0-e) up to 64 KiB (bf16/fp16 with last_q = 128
# and D = 128; fp32 with last_q = 64). fp32 with last_q = 128 (128 KiB) did not finish compiling
# in 200 s. Larger windows use the PyTorch score pass, with a log line.
VS_SCORE_WINDOW_MAX = 64 << 10
_warned: set = set()


def _score_window(lq_p: int, block_d: int, elem_bytes: int) -> int:
    return 2 * lq_p * block_d * elem_bytes


def _score_stages(lq_p: int, block_d: int, elem_bytes: int) -> int:
    """Pipeline depth of the score pass: up to 3 key windows in flight, as many as fit
    ``VS_SCORE_WINDOW_SMEM`` (bf16 with ``last_q = 128`` and D = 128 takes 2; 3 would ask 240 KiB)."""
    return max(1, min(3, VS_SCORE_WINDOW_SMEM // _score_window(lq_p, block_d, elem_bytes)))


def vs_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    last_q: int,
    scale: float,
    *,
    score_per: int | None = None,
    score_warps: int | None = None,
    softcap: float | None = None,
):
    """``(vertical, slash)`` float32 ``[B, Hq, Nk]`` for every query head, two launches (the
    PyTorch score pass where the key window exceeds ``VS_SCORE_WINDOW_MAX``). ``softcap``: the
    last queries' logits are soft-capped before their softmax (both passes)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    lq = min(last_q, nq)
    lq_p = max(16, triton.next_power_of_2(lq))
    block_d = max(16, triton.next_power_of_2(d))
    window = _score_window(lq_p, block_d, k.element_size())
    if window > VS_SCORE_WINDOW_MAX:
        key = (k.dtype, lq_p, block_d)
        if key not in _warned:
            _warned.add(key)
            _log.warning(
                "vertical-slash scores: last_q=%d, head dim %d, %s need a %d KiB key window, "
                "over the Triton score pass's %d KiB; using the PyTorch score pass",
                last_q, d, k.dtype, window >> 10, VS_SCORE_WINDOW_MAX >> 10,
            )  # fmt: skip
        return _reference.vs_scores_torch(q, k, last_q, scale, softcap=softcap)
    upcast = _upcast(q.dtype)
    qk_scale, cap_in = _softcap_args(scale, softcap)
    has_cap = softcap is not None
    block_n = 64
    chunk = max(block_n, triton.cdiv(triton.cdiv(nk, 16), block_n) * block_n)
    nchunk = triton.cdiv(nk, chunk)
    m_part = torch.empty((b * hq, nchunk, lq_p), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    nw = 4
    _launch(
        _vs_lse_kernel,
        (nchunk, b * hq),
        (
            q,
            k,
            m_part,
            l_part,
            *q.stride(),
            *k.stride(),
            hq,
            hq // hkv,
            nq,
            nk,
            lq,
            qk_scale,
            cap_in,
            chunk,
            nchunk,
        ),
        num_stages=3,
        HEAD_D=d,
        BLOCK_D=block_d,
        LQ_P=lq_p,
        BLOCK_N=block_n,
        UPCAST=upcast,
        HAS_SOFTCAP=has_cap,
        num_warps=nw,
    )
    m_max = m_part.amax(1)
    m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    l_tot = (l_part * torch.exp2(m_part - m_safe[:, None])).sum(1)
    lse = (m_safe + torch.log2(torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot)))).contiguous()
    vertical = torch.empty((b, hq, nk), dtype=torch.float32, device=q.device)
    slash = torch.empty((b, hq, nk), dtype=torch.float32, device=q.device)
    bs = lq_p  # the window of LQ_P + BS keys must be a power of two
    nsb = triton.cdiv(nk, bs) + 1
    per = score_per if score_per is not None else VS_SCORE_PER
    _launch(
        _vs_score_kernel,
        (triton.cdiv(nsb, per), b * hq),
        (
            q,
            k,
            lse,
            vertical,
            slash,
            *q.stride(),
            *k.stride(),
            hq,
            hq // hkv,
            nq,
            nk,
            lq,
            qk_scale,
            cap_in,
            per,
        ),
        num_stages=_score_stages(lq_p, block_d, k.element_size()),
        HEAD_D=d,
        BLOCK_D=block_d,
        LQ_P=lq_p,
        BS=bs,
        UPCAST=upcast,
        HAS_SOFTCAP=has_cap,
        num_warps=score_warps if score_warps is not None else VS_SCORE_WARPS,
    )
    return vertical, slash
