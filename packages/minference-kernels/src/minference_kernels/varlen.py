"""Sparse pre-fill of a packed batch of sequences of different lengths (flash-attn's varlen layout).

``q [total_q, Hq, D]`` holds the queries of every sequence one after the other, ``k/v
[total_k, Hkv, D]`` their keys and values; ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 ``[B + 1]``,
starting at 0, non-decreasing, ending at ``total_q`` / ``total_k``) delimit sequence ``i``: query rows
``cu_seqlens_q[i] .. cu_seqlens_q[i+1]`` (``Nq_i`` of them) and key rows ``cu_seqlens_k[i] ..
cu_seqlens_k[i+1]`` (``Nk_i >= Nq_i``). Causality is per sequence and bottom-right aligned: query row
``r`` of sequence ``i`` sits at position ``r + Nk_i - Nq_i`` of that sequence's keys, so a sequence
whose first ``Nk_i - Nq_i`` keys are a cached prefix works. No pair crosses two sequences.

The result equals running each sequence alone through :func:`~minference_kernels.sparse_prefill`
with the same arguments (same index, same dense decisions), see :func:`sparse_prefill_varlen`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ._device import on_input_device
from ._validate import (
    FLOAT_DTYPES,
    Shape,
    _check_tensor,
    check_finite,
    check_layer_settings,
    check_scale,
    check_softcap,
    resolve_backend,
)
from .api import (
    _build_index,
    _dense_index,
    dense_attention,
)
from .index import BLOCK, SparseIndex
from .ops import attention as _torch_attn  # the PyTorch path
from .options import DEFAULT_BACKEND, DEFAULT_BLOCK_ALLOCATION, DEFAULT_LAST_Q
from .patterns import HeadPattern, check_heads

_log = logging.getLogger("minference_kernels")


def check_cu_seqlens(cu: object, name: str, total: int) -> list[int]:
    """Check ``cu`` (int32 ``[B + 1]``, starts at 0, non-decreasing, ends at ``total``) and return it
    as a Python list (one device-to-host read)."""
    cu = _check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor (flash-attn's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D [B + 1] with B >= 1, got shape {tuple(cu.shape)}")
    vals = [int(x) for x in cu.tolist()]
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    bad = [i for i in range(len(vals) - 1) if vals[i + 1] < vals[i]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{i + 1}] = {vals[i + 1]} < "
            f"{name}[{i}] = {vals[i]}"
        )
    if vals[-1] != total:
        raise ValueError(
            f"{name}[-1] = {vals[-1]} must equal the packed length {total} of its tensor"
        )
    return vals


def _check_packed(q, k, v) -> tuple[int, int, int]:
    """``q [total_q, Hq, D]``, ``k/v [total_k, Hkv, D]`` -> ``(Hq, Hkv, D)``."""
    named = [("q", q), ("k", k), ("v", v)]
    for name, x in named:
        _check_tensor(x, name)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D [total, H, D] (packed), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must match")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    if k.shape[2] != d:
        raise ValueError(f"k head dim {k.shape[2]} != q head dim {d}")
    if hq < 1 or hkv < 1 or d < 1:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} / k {tuple(k.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return hq, hkv, d


def _seq(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows ``start ..+ n`` of a packed ``[total, H, D]`` tensor as a ``[1, H, n, D]`` view."""
    return x[start : start + n].transpose(0, 1).unsqueeze(0)


@on_input_device
def sparse_prefill_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    heads: Sequence[HeadPattern],
    scale: float | None = None,
    *,
    last_q: int = DEFAULT_LAST_Q,
    backend: str = DEFAULT_BACKEND,
    validate: bool = True,
    return_index: bool = False,
    coverage: float | None = None,
    dense_below: int = 0,
    max_density: float | None = None,
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION,
    softcap: float | None = None,
):
    """:func:`~minference_kernels.sparse_prefill` for a packed batch of different-length sequences.

    ``q [total_q, Hq, D]``, ``k/v [total_k, Hkv, D]``, ``cu_seqlens_q`` / ``cu_seqlens_k`` int32
    ``[B + 1]`` (see :mod:`minference_kernels.varlen`; a sequence may be empty, and ``Nk_i - Nq_i``
    is its cached prefix). The lengths are read on the host: ``cu_seqlens_*`` on the CPU cost
    nothing, on ``q``'s GPU one device-to-host copy (a synchronisation) each, so callers that know
    the lengths on the host (as the transformers and vLLM integrations do) pass CPU tensors.
    ``heads`` and every keyword have the meaning they have in
    :func:`~minference_kernels.sparse_prefill`, applied to each sequence on its own: each sequence
    gets its own online estimation (its own last ``last_q`` queries) and its own dense decision
    (every head ``dense``, ``Nq_i < dense_below``, or its index above ``max_density``).

    Returns ``[total_q, Hq, D]`` (contiguous), equal to each sequence run alone through
    :func:`~minference_kernels.sparse_prefill`. With ``return_index=True`` also a list of ``B``
    entries: the sequence's :class:`SparseIndex` (batch 1), or ``None`` for a sequence that ran
    dense (or is empty). Which sequences ran dense is also logged at DEBUG level (logger
    ``minference_kernels``).

    Backends: ``"triton"`` scores the vertical-slash heads of every sequence in one launch per
    estimation pass (log-sum-exp, then column and diagonal sums; the same scores as each sequence
    alone), selects each sequence's index on its own (top-k selection, slash tiles and the
    block-sparse estimation still run per sequence), then runs ONE attention launch for the whole
    batch, dense sequences included (with a dense index); ``"torch"`` is the reference: each
    sequence alone through the PyTorch path.
    """
    hq, hkv, d = _check_packed(q, k, v)
    cq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    ck = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(
            f"cu_seqlens_q has {len(cq) - 1} sequences but cu_seqlens_k has {len(ck) - 1}"
        )
    n_q = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
    n_kv = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    for i, (a, b) in enumerate(zip(n_q, n_kv)):
        if a > b:
            raise ValueError(
                f"sequence {i} has {a} queries but {b} keys: its queries must be the last "
                f"Nq <= Nk positions"
            )
    heads = check_heads(heads, hq)
    scale = check_scale(scale, d)
    softcap = check_softcap(softcap)
    be = resolve_backend(backend, q.device)
    if be == "triton" and any(p.kind == "vertical_block" for p in heads):
        raise ValueError(
            "vertical_block heads are not supported by the one-launch varlen kernel yet; run "
            "each sequence with sparse_prefill, or pass backend='torch'"
        )
    check_layer_settings(coverage, max_density, last_q, block_allocation, dense_below)
    if validate:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite(name, x)

    all_dense = all(p.kind == "dense" for p in heads)
    est = [i for i in range(len(n_q)) if n_q[i] > 0 and not all_dense and n_q[i] >= dense_below]
    scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if be == "triton" and est and any(p.kind == "vertical_slash" for p in heads):
        from .ops import varlen_triton as _varlen_triton

        # the vertical-slash scores of every estimated sequence: one launch per pass
        got = _varlen_triton.vs_scores_varlen(
            q,
            k,
            [cq[i] for i in est],
            [ck[i] for i in est],
            [n_q[i] for i in est],
            [n_kv[i] for i in est],
            last_q,
            scale,
            softcap=softcap,
        )
        if got is not None:
            scores = dict(zip(est, got))
    indices: list[SparseIndex | None] = []
    dense_seqs: list[int] = []
    for i, (nq, nk) in enumerate(zip(n_q, n_kv)):
        if nq == 0:
            indices.append(None)
            continue
        idx = None
        if i in est:
            idx = _build_index(
                _seq(q, cq[i], nq),
                _seq(k, ck[i], nk),
                heads,
                scale=scale,
                last_q=last_q,
                backend=be,
                validate=False,
                coverage=coverage,
                block_allocation=block_allocation,
                softcap=softcap,
                scores=scores.get(i),
            )
            if max_density is not None and _too_dense(idx, hq, nq, nk, max_density):
                idx = None
        if idx is None:
            dense_seqs.append(i)
        indices.append(idx)
    if dense_seqs:
        _log.debug(
            "sparse_prefill_varlen: sequences %s ran dense (all heads dense, Nq < dense_below=%d "
            "or index above max_density)",
            dense_seqs,
            dense_below,
        )

    if be == "triton":
        from .ops import varlen_triton as _varlen_triton

        live = [i for i in range(len(n_q)) if n_q[i] > 0]
        run_idx = [
            si
            if (si := indices[i]) is not None
            else _dense_index(_shape(hq, hkv, n_q[i], n_kv[i], d), q.device)
            for i in live
        ]
        out = _varlen_triton.attend_varlen(
            q,
            k,
            v,
            [cq[i] for i in live],
            [ck[i] for i in live],
            [n_q[i] for i in live],
            [n_kv[i] for i in live],
            run_idx,
            scale,
            softcap=softcap,
        )
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for i, idx in enumerate(indices):
            if n_q[i] == 0:
                continue
            qs, ks, vs = (
                _seq(q, cq[i], n_q[i]),
                _seq(k, ck[i], n_kv[i]),
                _seq(v, ck[i], n_kv[i]),
            )
            if idx is None:
                o = dense_attention(qs, ks, vs, scale, backend="torch", softcap=softcap)
            else:
                o = _torch_attn.attend(qs, ks, vs, idx, scale, softcap=softcap)
            out[cq[i] : cq[i + 1]] = o[0].transpose(0, 1)
    return (out, indices) if return_index else out


def _shape(hq: int, hkv: int, nq: int, nk: int, d: int) -> Shape:
    return Shape(1, hq, hkv, nq, nk, d)


def _too_dense(idx: SparseIndex, hq: int, nq: int, nk: int, max_density: float) -> bool:
    """:func:`sparse_prefill`'s ``max_density`` test for one sequence (one host read)."""
    visited = float(idx.candidate_keys().sum()) * BLOCK
    causal = hq * nq * (nq + 1) / 2 + hq * nq * (nk - nq)
    return visited > max_density * causal
