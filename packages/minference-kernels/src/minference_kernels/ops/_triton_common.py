"""Helpers shared by the Triton kernels of :mod:`minference_kernels.ops`: launch with a
pipeline depth that fits the GPU, the soft-capping factors, and the ``@triton.jit`` building blocks
(row loads, the online-softmax update, ``q.k`` products).

Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

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

import logging

import torch
import triton
import triton.language as tl

from .._validate import interpreting

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


@triton.jit
def _float_key(x):
    """The int32 image of float32 ``x`` that orders like the floats (NaN aside)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)
