"""Sparse pre-fill of one request's chunk against a paged KV cache (no vLLM import).

This is the computation the backends run for each request that takes the sparse path; it is kept
free of vLLM so it can be tested on its own, on CPU and on GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from minference_kernels.options import PrefillOptions

from .kvcache import CacheLayout, gather_kv

if TYPE_CHECKING:
    from minference_kernels import HeadPattern

__all__ = ["prefill_request", "prefill_requests"]


def prefill_request(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: torch.Tensor,
    layout: Callable[[], CacheLayout],
    block_ids: torch.Tensor,
    seq_len: int,
    heads: Sequence[HeadPattern],
    *,
    scale: float,
    options: PrefillOptions | None = None,
) -> torch.Tensor:
    """Attention output ``[Nq, Hq, D]`` for the last ``Nq`` tokens of a ``seq_len``-token request.

    Args:
        query: the chunk's queries, ``[Nq, Hq, D]`` (vLLM's token-major layout).
        key, value: the chunk's keys/values ``[Nq, Hkv, D]``; ``None`` when the layer reads a
            cache another layer wrote (then every key comes from the cache).
        kv_cache: the layer's paged cache; its first ``seq_len - Nq`` tokens (or all ``seq_len``
            when ``key`` is ``None``) are read through ``layout`` from blocks ``block_ids``.
        layout: returns the cache's :class:`CacheLayout`; called only when the cache is read.
        heads: one pattern per query head of ``query``.
        scale: the attention scale, passed to ``minference_kernels.sparse_prefill``.
        options: the sparse pre-fill settings (:class:`minference_kernels.PrefillOptions`;
            ``None``: the defaults); their kernel arguments are passed to ``sparse_prefill``
            (``max_density`` on CUDA only: an index that keeps most pairs runs dense instead).

    The causal diagonal is aligned bottom-right: query ``i`` of the chunk sits at position
    ``seq_len - Nq + i`` and sees keys ``0 .. seq_len - Nq + i``.
    """
    import minference_kernels

    k, v = _request_kv(query, key, value, kv_cache, layout, block_ids, seq_len, head_major=True)
    out = minference_kernels.sparse_prefill(
        query.transpose(0, 1).unsqueeze(0).contiguous(),
        k.unsqueeze(0).contiguous(),
        v.unsqueeze(0).contiguous(),
        heads,
        scale=scale,
        validate=False,
        **(options or PrefillOptions()).kernel_kwargs(cuda=query.is_cuda),
    )
    return out[0].transpose(0, 1)


def _request_kv(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: torch.Tensor,
    layout: Callable[[], CacheLayout],
    block_ids: torch.Tensor,
    seq_len: int,
    *,
    head_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's keys and values: the cached ones read from the paged cache, then the chunk's
    own (``key``/``value`` ``[Nq, Hkv, D]``, or every key from the cache when ``None``), in the
    query's dtype where read from the cache. ``[seq_len, Hkv, D]`` (token-major, as the varlen
    batch packs them), or ``[Hkv, seq_len, D]`` with ``head_major`` (as ``sparse_prefill`` takes
    them); either may be a view, and the cached part is copied once."""
    n = query.shape[0]
    cached = seq_len - n
    if cached < 0:
        raise ValueError(f"chunk of {n} tokens is longer than its request ({seq_len} tokens)")
    if key is not None and value is not None:
        k, v = key[:n].transpose(0, 1), value[:n].transpose(0, 1)
        if cached > 0:
            k_old, v_old = gather_kv(kv_cache, layout(), block_ids, cached)  # [Hkv, cached, D]
            k = torch.cat([k_old.to(k.dtype), k], dim=1)
            v = torch.cat([v_old.to(v.dtype), v], dim=1)
    else:
        k, v = gather_kv(kv_cache, layout(), block_ids, seq_len)
        k, v = k.to(query.dtype), v.to(query.dtype)
    return (k, v) if head_major else (k.transpose(0, 1), v.transpose(0, 1))


def prefill_requests(
    chunks: Sequence[
        tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, int]
    ],
    kv_cache: torch.Tensor,
    layout: Callable[[], CacheLayout],
    heads: Sequence[HeadPattern],
    *,
    scale: float,
    options: PrefillOptions | None = None,
) -> list[torch.Tensor]:
    """:func:`prefill_request` for several requests that share ``heads``, in one
    ``minference_kernels.sparse_prefill_varlen`` call (one attention launch for all of them).

    ``chunks``: per request ``(query [Nq, Hq, D], key, value [Nq, Hkv, D] or None, block_ids,
    seq_len)`` as :func:`prefill_request` takes them; ``options`` as there. Returns each request's
    ``[Nq, Hq, D]``, equal to :func:`prefill_request` on it alone.
    """
    import minference_kernels

    if not chunks:
        return []
    qs, ks, vs = [], [], []
    for query, key, value, block_ids, seq_len in chunks:
        k, v = _request_kv(query, key, value, kv_cache, layout, block_ids, seq_len)
        qs.append(query)
        ks.append(k)
        vs.append(v)
    dev = qs[0].device
    cu_q = torch.tensor([0, *torch.tensor([x.shape[0] for x in qs]).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor([x.shape[0] for x in ks]).cumsum(0).tolist()])
    out = minference_kernels.sparse_prefill_varlen(
        torch.cat(qs),
        torch.cat(ks),
        torch.cat(vs),
        cu_q.to(torch.int32),  # on the host: the kernels read the lengths there (no sync)
        cu_k.to(torch.int32),
        heads,
        scale,
        validate=False,
        **(options or PrefillOptions()).kernel_kwargs(cuda=dev.type == "cuda"),
    )
    return [out[int(cu_q[i]) : int(cu_q[i + 1])] for i in range(len(qs))]
