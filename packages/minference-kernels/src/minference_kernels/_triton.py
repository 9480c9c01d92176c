"""Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Only plain pointer arithmetic (no block pointers), so the same source runs on Triton 3.6 and 3.9.
Imported lazily by the public functions; importing this module compiles nothing.

Attention-logit soft-capping (Gemma 2, ``softcap``): the attention kernel and the vertical-slash
estimation kernels take a ``HAS_SOFTCAP`` compile-time flag; without it they compile to the
uncapped code. With it each raw score ``s = q.k`` becomes ``t = tanh(scale * s / softcap)``
(:func:`_softcap`) before masking, and the exponent's factor ``qk_scale`` is ``softcap * log2(e)``
instead of ``scale * log2(e)``: ``t * qk_scale`` is the capped logit ``softcap * tanh(logit /
softcap)`` in log2 units, as the ``exp2`` softmax wants (:func:`_softcap_args`).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import triton
import triton.language as tl

from ._validate import interpreting
from .index import BLOCK, SparseIndex

LOG2E = 1.4426950408889634
_log = logging.getLogger("minference_kernels")


def _softcap_args(scale: float, softcap: float | None) -> tuple[float, float]:
    """``(qk_scale, cap_in)`` of the kernels: the factor that takes a (capped) score to log2 units
    of the logit, and the factor of :func:`_softcap` (``0.0``, unused, without ``softcap``)."""
    if softcap is None:
        return scale * LOG2E, 0.0
    return softcap * LOG2E, 2.0 * LOG2E * scale / softcap


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter computes half-precision dots wrongly; float32 inputs want IEEE products.
    return interpreting() or dtype == torch.float32


# Pipeline depth that fits each launch's shared memory on this device, learnt at its first launch.
_FIT_STAGES: dict = {}


def _launch(kernel, grid, args: tuple, *, num_stages: int, **meta) -> None:
    """``kernel[grid](*args, num_stages=num_stages, **meta)``, with fewer stages where this GPU's
    shared memory is too small for the requested depth (cards with ~100 KiB per SM, such as sm_86 and
    sm_89, or large head dims). Each step down is logged; the depth that fits is remembered per
    (kernel, device, dtype, compile-time arguments)."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
    t = args[0]
    key = (name, str(t.device), t.dtype, tuple(sorted(meta.items())), num_stages)
    stages = _FIT_STAGES.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_stages=stages, **meta)
        except triton.OutOfResources as e:
            if stages <= 1:
                raise
            _log.warning(
                "%s does not fit this GPU with num_stages=%d (%s); retrying with %d",
                name, stages, e, stages - 1,
            )  # fmt: skip
            stages -= 1
            continue
        _FIT_STAGES[key] = stages
        return


@triton.jit
def _load_rows(base, rows, ok, s_row, offs_d, d_ok, s_d):
    """Rows ``rows`` (masked by ``ok``) of a ``[N, D]`` slice at ``base``: ``[len(rows), BLOCK_D]``."""
    ptrs = base + rows[:, None].to(tl.int64) * s_row + offs_d[None, :] * s_d
    return tl.load(ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST: tl.constexpr):
    """Fold one key step's raw scores ``s`` (unscaled; masked pairs -inf) into the running state.

    The softmax scale folds into the exponent (one FMA per score) and ``p @ v`` accumulates into
    ``acc`` in place (benchmarks/NOTES.md, v0.2.0-e: ~2% over scale-first and ``acc + p @ v``).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _softcap(s, cap_in, HAS_SOFTCAP: tl.constexpr):
    """With ``HAS_SOFTCAP``: ``tanh(s * cap_in / (2 log2 e))`` as ``1 - 2 / (exp2(s * cap_in) + 1)``
    (``cap_in = 2 log2(e) * scale / softcap``, so this is ``tanh(scale * s / softcap)``). Portable
    (no libdevice: the same on a GPU and under the interpreter) and safe at both ends: ``exp2``
    overflowing to inf gives 1, underflowing to 0 gives -1, never NaN. Its absolute error is a few
    float32 ulps of 1 (near 0 too: the capped logit's error is ~``softcap * 1e-7``, as large as the
    rounding of the dot product itself). Without the flag ``s`` as it is (nothing compiled)."""
    if HAS_SOFTCAP:
        s = 1.0 - 2.0 / (tl.math.exp2(s * cap_in) + 1.0)
    return s


@triton.jit
def _qk(q, k, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(k))


# Sizes and counts vary per prompt; specialising on them (divisibility by 16, == 1) would compile a
# new variant for many prompt lengths. Strides stay specialised (alignment matters for loads).
_NO_SPEC = ["n_rel", "n_cols", "n_cov", "n_abs", "H", "G", "Nq", "Nk", "q_off", "MB"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _sparse_attn_fwd(
    Q,
    K,
    V,
    Out,
    DESC_K,
    DESC_V,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    son,
    sod,
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
    Nq,
    Nk,
    q_off,
    MB,
    qk_scale,
    cap_in,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_MASK: tl.constexpr,
    TMA: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    m = MB - 1 - pid_m  # the longest causal rows start first
    b = bh // H
    h = bh % H
    hk = h // G
    b64 = b.to(tl.int64)

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_D
    row_ok = offs_m < Nq
    q_ptr = (
        Q
        + b64 * sqb
        + h.to(tl.int64) * sqh
        + offs_m[:, None].to(tl.int64) * sqn
        + offs_d[None, :] * sqd
    )
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = offs_m + q_off
    a0 = m * BLOCK_M + q_off
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    sink = tl.load(SINK + bh)
    win = tl.load(WIN + bh)

    # relative tiles: keys [a0 + r, a0 + r + BLOCK_N)
    t_end = tl.load(REL_END + bh * MB + m)
    for t in range(0, t_end):
        r = tl.load(REL + bh * n_rel + t)
        offs_n = a0 + r + offs_n0
        kv_ok = (offs_n >= 0) & (offs_n < Nk)
        if TMA:
            # tensor-memory loads; rows outside [0, Nk) and dims past HEAD_D arrive as zeros
            k = DESC_K.load([b, hk, a0 + r, 0]).reshape([BLOCK_N, BLOCK_D])
            v = DESC_V.load([b, hk, a0 + r, 0]).reshape([BLOCK_N, BLOCK_D])
        else:
            k = _load_rows(k_base, offs_n, kv_ok, skn, offs_d, d_ok, skd)
            v = _load_rows(v_base, offs_n, kv_ok, svn, offs_d, d_ok, svd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)  # capped before the mask
        st = a0 + r
        if SPLIT_MASK:
            # interior tiles (fully causal, in range, no A-shape window) need no mask
            # A-shape heads: only tiles reaching past the window (for the block's last row) mask
            past_window = (win > 0) & (a0 + BLOCK_M - 1 - st >= win)
            need = (st + BLOCK_N - 1 > a0) | (st < 0) | (st + BLOCK_N > Nk) | past_window
        else:
            need = True
        if need:
            ok = kv_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            ok = ok & (
                (win <= 0) | (offs_n[None, :] < sink) | (q_pos[:, None] - offs_n[None, :] < win)
            )
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST)

    # gathered columns not covered by this block's relative tiles
    c_cnt = tl.load(COL_CNT + bh * MB + m)
    for c0 in range(0, c_cnt, BLOCK_N):
        offs_c = c0 + offs_n0
        c_ok = offs_c < c_cnt
        cidx = tl.load(COLS + bh * n_cols + offs_c, mask=c_ok, other=0)
        cov = tl.load(
            COV + bh.to(tl.int64) * n_cov + (cidx - a0 + Nk + BLOCK_N), mask=c_ok, other=1
        )
        c_ok = c_ok & (cov == 0)
        k = _load_rows(k_base, cidx, c_ok, skn, offs_d, d_ok, skd)
        v = _load_rows(v_base, cidx, c_ok, svn, offs_d, d_ok, svd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)
        ok = c_ok[None, :] & (cidx[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST)

    # absolute tiles (block-sparse)
    a_cnt = tl.load(ABS_CNT + bh * MB + m)
    for t in range(0, a_cnt):
        st = tl.load(ABS + (bh * MB + m).to(tl.int64) * n_abs + t)
        offs_n = st + offs_n0
        kv_ok = offs_n < Nk
        if TMA:
            k = DESC_K.load([b, hk, st, 0]).reshape([BLOCK_N, BLOCK_D])
            v = DESC_V.load([b, hk, st, 0]).reshape([BLOCK_N, BLOCK_D])
        else:
            k = _load_rows(k_base, offs_n, kv_ok, skn, offs_d, d_ok, skd)
            v = _load_rows(v_base, offs_n, kv_ok, svn, offs_d, d_ok, svd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)
        if SPLIT_MASK:
            need = (st + BLOCK_N - 1 > a0) | (st + BLOCK_N > Nk)
        else:
            need = True
        if need:
            ok = kv_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, qk_scale, UPCAST)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = (
        Out
        + b64 * sob
        + h.to(tl.int64) * soh
        + offs_m[:, None].to(tl.int64) * son
        + offs_d[None, :] * sod
    )
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# launch settings, tuned on an H200 (benchmarks/NOTES.md, v0.1.0-b and v0.2.0-f): K/V tiles of
# relative and absolute tiles arrive through tensor descriptors (TMA) where the GPU and layout allow
ATTN_CONFIG = {"num_warps": 4, "num_stages": 3, "split_mask": True, "tma": True}
_TMA_NOTED: set = set()


@functools.cache
def _tma_device(device: str, interp: bool) -> bool:
    """Whether this device (sm_90+, or the interpreter) and Triton (>= 3.3) have tensor
    descriptors; asked once per device, not on every launch."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    if interp:
        return True
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether ``t`` ([B, H, N, D]) can be read through a tensor descriptor (TMA, sm_90+): fp16/bf16,
    unit stride on D, 16-byte aligned base and strides, and a Triton that has descriptors."""
    if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
        return False
    if not _tma_device(str(t.device), interpreting()):
        return False
    e = t.element_size()
    # broadcast (stride-0) dims, e.g. expanded K/V, are left to pointer loads: not checked on a GPU
    outer = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n > 1]
    return t.data_ptr() % 16 == 0 and all(st > 0 and (st * e) % 16 == 0 for _, st in outer)


def _desc_strides(t: torch.Tensor) -> list:
    """``t``'s strides, with those of size-1 dims (never stepped over, but still encoded in the
    descriptor) replaced by the packed stride, so they too are positive multiples of 16 bytes."""
    st = list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            st[i] = st[i + 1] * max(1, t.shape[i + 1])
    return st


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    blk = [1, 1, block_n, block_d]
    return (
        TensorDescriptor(k, list(k.shape), _desc_strides(k), blk),
        TensorDescriptor(v, list(v.shape), _desc_strides(v), blk),
    )


def attend(
    q, k, v, index: SparseIndex, scale: float, *, softcap: float | None = None, **cfg
) -> torch.Tensor:
    """Attention over ``index``'s pairs (``softcap``: logits ``softcap * tanh(scale * q.k /
    softcap)``, the ``HAS_SOFTCAP`` variant of the kernel); ``cfg`` overrides ``ATTN_CONFIG``."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    # [B, Hq, Nq, D] view of [B, Nq, Hq, D] memory: what integrations hand back to the model
    # (``out.transpose(1, 2)`` is then contiguous: no extra copy, no second output-sized buffer)
    out = torch.empty((b, nq, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    mb = index.num_blocks
    block_d = max(16, triton.next_power_of_2(d))
    upcast = _upcast(q.dtype)
    c = {**ATTN_CONFIG, **cfg}
    tma = bool(c["tma"]) and _tma_ok(k) and _tma_ok(v)
    if c["tma"] and not tma:
        why = (str(k.device), k.dtype, k.stride(), v.stride())
        if why not in _TMA_NOTED:  # a speed choice, not a correctness one: said once per layout
            _TMA_NOTED.add(why)
            _log.info(
                "K/V (%s, %s, strides %s / %s) cannot be read through tensor descriptors "
                "(needs fp16/bf16, sm_90+, 16-byte aligned strides, Triton >= 3.3); the sparse "
                "attention kernel uses pointer loads, which are ~20%% slower on Hopper",
                *why,
            )
    desc_k, desc_v = _kv_descriptors(k, v, BLOCK, block_d) if tma else (k, v)
    qk_scale, cap_in = _softcap_args(scale, softcap)
    grid = (mb, b * hq)
    _launch(
        _sparse_attn_fwd,
        grid,
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
            index.rel_tiles,
            index.rel_end,
            index.cols,
            index.col_count,
            index.cov,
            index.abs_tiles,
            index.abs_count,
            index.sink,
            index.window,
            index.rel_tiles.shape[-1],
            index.cols.shape[-1],
            index.cov.shape[-1],
            index.abs_tiles.shape[-1],
            hq,
            hq // hkv,
            nq,
            nk,
            nk - nq,
            mb,
            qk_scale,
            cap_in,
        ),
        num_stages=c["num_stages"],
        HEAD_D=d,
        BLOCK_D=block_d,
        BLOCK_M=BLOCK,
        BLOCK_N=BLOCK,
        UPCAST=upcast,
        SPLIT_MASK=c["split_mask"],
        TMA=tma,
        HAS_SOFTCAP=softcap is not None,
        num_warps=c["num_warps"],
    )
    return out


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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
# tuned on an H200 (benchmarks/tune_vs_scores.py, NOTES v0.2.0-c): 16 windows on 4 warps is 31%
# faster than 1 window on 8
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
        from .estimate import vs_scores_torch

        key = (k.dtype, lq_p, block_d)
        if key not in _warned:
            _warned.add(key)
            _log.warning(
                "vertical-slash scores: last_q=%d, head dim %d, %s need a %d KiB key window, "
                "over the Triton score pass's %d KiB; using the PyTorch score pass",
                last_q, d, k.dtype, window >> 10, VS_SCORE_WINDOW_MAX >> 10,
            )  # fmt: skip
        return vs_scores_torch(q, k, last_q, scale, softcap=softcap)
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


# ---------------------------------------------------------------------------------------------
# block-sparse estimation: top-k key blocks of each query block (one program per row)

#: Widest row of block scores (causal key blocks of one query block) the Triton selection holds in
#: registers: 16384 blocks = 1M tokens at ``block_size = 64``. Wider rows use the PyTorch selection.
BLOCK_SELECT_MAX = 16384
_I32_MAX = tl.constexpr(2147483647)


@triton.jit
def _float_key(x):
    """The int32 image of float32 ``x`` that orders like the floats (NaN aside)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


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
):
    """Row ``r`` (query block ``r0 + r``) of head ``bh``: the ``min(LIMIT[h], kmax, causal)``
    highest-ranked causal key blocks, ascending, into ``OUT`` (pre-filled with -1). Rank: the block
    of the query block's first row, then its other diagonal block, then key block 0 (the sinks),
    then the scores; ties go to the lowest block id. The k-th largest rank is found by bisection
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
) -> None:
    """Top-k selection of :func:`minference_kernels.estimate.block_topk` for one chunk of query
    blocks: ``scores [B, H, R, W]`` float32 (raw pooled dot products, soft-capped by the caller
    where ``softcap`` is set; causality and the forced blocks -- diagonal, then key block 0 -- are
    applied here), ``out [B, H, R, >= kmax]`` int64 pre-filled with -1 (a view is fine),
    ``limit [H]`` per-head budgets. ``W <= BLOCK_SELECT_MAX``.

    ``shares`` (float32, ``out``'s shape and strides, pre-filled with -inf): also write each
    winner's log-share, ``log_softmax(scale * scores)`` over the causal blocks, in ``out``'s slot
    (the block of the first row: inf, another diagonal block: float32 max, key block 0:
    ``estimate.SINK_RANK``), as ``allocation="head"`` ranks them. ``floor [H]`` (with
    ``shares``): each row's ``floor[h]`` best blocks (by the rank above) get share ``inf``: the
    guaranteed blocks of ``estimate.HEAD_ALLOCATION_FLOOR``."""
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
        num_warps=4 if w_p <= 2048 else (8 if w_p <= 8192 else 16),
    )


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
    for s0 in range(0, CHUNK, SUB):
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


__all__ = ["attend", "block_select", "head_keep", "slash_tiles", "vs_scores", "math"]
