"""Triton sparse attention over a :class:`~minference_kernels.index.SparseIndex` (the PyTorch
reference is :mod:`minference_kernels.ops.attention`). CUDA, or CPU tensors under
``TRITON_INTERPRET=1``; importing this module compiles nothing."""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .._validate import interpreting
from ..index import BLOCK, SparseIndex
from ._triton_common import (
    _launch,
    _load_rows,
    _online_update,
    _qk,
    _softcap,
    _softcap_args,
    _upcast,
)

_log = logging.getLogger("minference_kernels")

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
    ABS_FLAG,
    COL_MAP,
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
    MASK_COLS: tl.constexpr,
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
        if MASK_COLS:
            # a tile holding a column key of this head (vertical-block): the column pass above
            # attends that key, so the tile skips it
            if tl.load(ABS_FLAG + (bh * MB + m).to(tl.int64) * n_abs + t) != 0:
                hit = tl.load(COL_MAP + bh.to(tl.int64) * Nk + offs_n, mask=kv_ok, other=0)
                s = tl.where(hit[None, :] == 0, s, float("-inf"))
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
                "attention kernel uses pointer loads, which are slower on Hopper (docs/benchmarks.md)",
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
            index.abs_flag,
            index.col_map,
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
        MASK_COLS=index.masks_columns,
        num_warps=c["num_warps"],
    )
    return out
