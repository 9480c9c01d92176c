"""The ``minference`` attention and mask functions registered with transformers.

transformers calls the attention function of the configured implementation from every attention
layer, after RoPE and after the KV-cache update, with

* ``query`` ``[B, Hq, Nq, D]``, ``key`` / ``value`` ``[B, Hkv, Nk, D]`` (``Nk = cached + Nq``; the
  queries are the last ``Nq`` of the ``Nk`` positions; a static cache passes its whole capacity),
* the mask made by the mask function registered under the same name.

Our mask function returns transformers' own SDPA mask for decode steps and anything that is not
plain causal, and for a causal pre-fill a compact key-padding mask ``[B, 1, 1, L]`` (bool, ``True``
= real token; ``L <= Nk`` the filled length of the cache) instead of the ``[B, 1, Nq, Nk]`` mask,
which at 128K tokens would take 16 GiB per sample. The attention function recognises the compact
form by its query dimension of 1 while ``Nq > 1``, decides dense vs sparse with
:meth:`SparsePrefillPlan.wants_sparse`, and expands the compact mask for the dense path.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from minference_kernels import BLOCK
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .plan import DEFAULT_MAX_DENSITY, SparsePrefillPlan, _causal_count

logger = logging.getLogger("minference_hf")

IMPLEMENTATION = "minference"
CAPTURE_IMPLEMENTATION = "minference_capture"

#: Keyword arguments of the attention interface that change the attention itself and that the
#: sparse kernels cannot honour. Passing any of them (not ``None``) is an error.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "position_bias": "an additive position bias (ALiBi / relative bias)",
    "s_aux": "attention sinks (learned per-head sink logits)",
    "sinks": "attention sinks (learned per-head sink logits)",
}

_ROW_CHUNK = 1024


class UnsupportedAttentionError(ValueError):
    """The model asked the ``minference`` attention for something it cannot compute."""


def _plan_of(module: torch.nn.Module) -> SparsePrefillPlan:
    plan = getattr(module, "_minference_plan", None)
    if plan is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses "
            f"attn_implementation={IMPLEMENTATION!r} but has no MInference plan: call "
            "minference_hf.patch(model, config=...) instead of setting the implementation by hand"
        )
    return plan


def _check_kwargs(module: torch.nn.Module, is_causal: bool | None, kwargs: dict[str, Any]) -> None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedAttentionError(
                f"{type(module).__name__} passes `{name}` ({what}); minference's sparse pre-fill "
                "does not support it. Use another attn_implementation for this model."
            )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise UnsupportedAttentionError(
            f"{type(module).__name__} runs non-causal (bidirectional) attention; minference only "
            "supports causal decoder self-attention."
        )


def _causal(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """``[Nq, Nk]`` bool, bottom-right aligned: query ``i`` sits at key position ``Nk - Nq + i``."""
    pos = torch.arange(num_queries, device=device) + (num_keys - num_queries)
    return torch.arange(num_keys, device=device)[None, :] <= pos[:, None]


def _expand_compact(key_valid: torch.Tensor, num_queries: int, num_keys: int) -> torch.Tensor:
    """Compact ``[B, 1, 1, L]`` key-padding mask -> the full ``[B, 1, Nq, Nk]`` SDPA mask.

    ``L <= Nk`` is the filled length of the cache (``L < Nk`` for static caches): keys at or after
    ``L`` are masked, and the queries are the last ``Nq`` of the first ``L`` positions.
    """
    filled = key_valid.shape[-1]
    if filled < num_keys:
        key_valid = torch.nn.functional.pad(key_valid, (0, num_keys - filled), value=False)
    pos = torch.arange(num_queries, device=key_valid.device) + (filled - num_queries)
    causal = torch.arange(num_keys, device=key_valid.device)[None, :] <= pos[:, None]
    return key_valid & causal[None, None]


def _key_padding_from_full_mask(mask: torch.Tensor, num_queries: int) -> torch.Tensor | None:
    """If a full 4D mask is exactly "causal AND key padding", return the key padding ``[B, Nk]``.

    Rows of padded queries are not checked (their outputs are never used). Returns ``None`` for
    anything else (sliding windows that bite, packed sequences, float or per-head masks).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if mask.shape[2] != num_queries:
        return None
    num_keys = mask.shape[-1]
    rows = mask[:, 0]  # [B, Nq, Nk]
    key_valid = rows[:, -1, :]  # the last query sees every key it may see
    offset = num_keys - num_queries
    query_valid = key_valid[:, offset:]
    key_pos = torch.arange(num_keys, device=mask.device)
    for start in range(0, num_queries, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, num_queries)
        qpos = torch.arange(start, stop, device=mask.device) + offset
        expected = (key_pos[None, :] <= qpos[:, None])[None] & key_valid[:, None, :]
        bad = (rows[:, start:stop] != expected) & query_valid[:, start:stop, None]
        if bool(bad.any()):
            return None
    return key_valid


def _warn_once(plan: SparsePrefillPlan, key: str, message: str) -> None:
    if key not in plan._warned:
        plan._warned.add(key)
        logger.warning(message)


def _call_one(
    plan: SparsePrefillPlan,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """Attention for one unpadded (sub-)batch, ``[b, Hq, nq, D]`` in q's dtype."""
    import minference_kernels

    nq, nk = q.shape[2], k.shape[2]
    if not plan.wants_sparse(nq, nk):
        plan.stats.dense_calls += 1
        return minference_kernels.dense_attention(q, k, v, scale=scale)
    heads = plan.heads_for_layer(layer, nk)
    plan.stats.sparse_calls += 1
    plan.stats.sparse_layers.add(layer)
    # the density guard is tuned to the GPU kernel's rate; on CPU, sparse runs as configured
    max_density = DEFAULT_MAX_DENSITY if q.is_cuda else None
    kw: dict[str, Any] = dict(
        last_q=plan.last_q,
        backend=plan.backend,
        coverage=plan.coverage,
        block_allocation=plan.block_allocation,
    )
    if not plan.record_density:
        return minference_kernels.sparse_prefill(
            q, k, v, heads, scale, max_density=max_density, **kw
        )
    out, idx = minference_kernels.sparse_prefill(q, k, v, heads, scale, return_index=True, **kw)
    if max_density is not None:  # the same guard sparse_prefill applies without return_index
        visited = float(idx.candidate_keys().sum()) * BLOCK
        if visited > max_density * _causal_count(nq, nk) * q.shape[0] * q.shape[1]:
            plan.stats.record(layer, None, nq, nk, q.shape[0] * q.shape[1])
            return minference_kernels.dense_attention(q, k, v, scale=scale)
    plan.stats.record(layer, idx, nq, nk, q.shape[0] * q.shape[1])
    return out


def _sparse_forward(
    plan: SparsePrefillPlan,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Sparse pre-fill of one layer; per sample on the valid tokens when the batch is padded."""
    if key_valid is None or bool(key_valid.all()):
        return _call_one(plan, layer, query, key, value, scale)
    bsz, hq, nq, _ = query.shape
    nk = key.shape[2]
    offset = nk - nq
    out = query.new_zeros(bsz, nq, hq, value.shape[-1]).transpose(1, 2)  # see below: no copy
    if key_valid.shape[0] == 1 and bsz > 1:
        key_valid = key_valid.expand(bsz, -1)
    for b in range(bsz):
        idx = torch.nonzero(key_valid[b], as_tuple=False).flatten()
        n = int(idx.numel())
        if n == 0:
            continue
        first, last = int(idx[0]), int(idx[-1])
        if last < offset:  # this sample has no real token among the new queries
            continue
        if last - first + 1 == n:  # one contiguous run (left or right padding): slice, no copy
            q0, q1 = max(first, offset) - offset, last - offset + 1
            ob = _call_one(
                plan,
                layer,
                query[b : b + 1, :, q0:q1],
                key[b : b + 1, :, first : last + 1],
                value[b : b + 1, :, first : last + 1],
                scale,
            )
            out[b : b + 1, :, q0:q1] = ob
        else:  # holes: gather the real tokens; queries are the last of them
            qidx = idx[idx >= offset] - offset
            ob = _call_one(
                plan,
                layer,
                query[b : b + 1].index_select(2, qidx),
                key[b : b + 1].index_select(2, idx),
                value[b : b + 1].index_select(2, idx),
                scale,
            )
            out[b : b + 1].index_copy_(2, qidx, ob)
    return out


def _key_valid_for_sparse(
    plan: SparsePrefillPlan, attention_mask: torch.Tensor | None, num_queries: int
) -> tuple[bool, torch.Tensor | None]:
    """``(usable, key_valid)``: whether the mask allows the sparse path, and the key padding."""
    if attention_mask is None:
        return True, None
    if attention_mask.dim() == 4 and attention_mask.shape[-2] == 1 and num_queries > 1:
        key_valid = attention_mask[:, 0, 0, :]
        return True, None if bool(key_valid.all()) else key_valid
    cached = plan._mask_check
    if cached is not None and cached[0]() is attention_mask:
        key_valid = cached[1]
    else:
        key_valid = _key_padding_from_full_mask(attention_mask, num_queries)
        plan._mask_check = (weakref.ref(attention_mask), key_valid)
    return key_valid is not None, key_valid


def minference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"minference"`` with transformers' AttentionInterface.

    Args:
        module: the attention layer; must carry the plan set by :func:`minference_hf.patch` and
            ``layer_idx``.
        query: ``[B, Hq, Nq, D]`` after RoPE.
        key, value: ``[B, Hkv, Nk, D]`` (cache included); ``Hq % Hkv == 0``, never repeated here.
        attention_mask: ``None``, the compact key-padding mask ``[B, 1, 1, L]`` from
            :func:`minference_mask`, or a full boolean ``[B, 1, Nq, Nk]`` mask.
        dropout: attention dropout; must be 0 on the sparse path (inference only).
        scaling: softmax scale (``None``: ``D ** -0.5``).

    Returns:
        ``(output [B, Nq, Hq, D], None)`` like transformers' SDPA function.
    """
    plan = _plan_of(module)
    _check_kwargs(module, is_causal, kwargs)
    plan.stats.seen_layers.add(int(module.layer_idx))
    num_queries, num_keys = query.shape[2], key.shape[2]
    compact = (
        attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[-2] == 1
        and num_queries > 1
    )
    # a static cache passes its whole buffer; the compact mask says how much of it is filled
    filled = attention_mask.shape[-1] if compact else num_keys
    if plan.wants_sparse(num_queries, filled):
        if dropout and module.training:
            raise UnsupportedAttentionError(
                "minference sparse pre-fill is inference-only: call model.eval() (attention "
                "dropout is active)"
            )
        if filled < num_keys:
            key, value = key[:, :, :filled], value[:, :, :filled]
        usable, key_valid = _key_valid_for_sparse(plan, attention_mask, num_queries)
        if usable:
            out = _sparse_forward(
                plan, int(module.layer_idx), query, key, value, key_valid, scaling
            )
            # the Triton kernels write [B, N, H, D] memory, so this is a view, not a copy
            return out.transpose(1, 2).contiguous(), None
        plan.stats.fallback_calls += 1
        _warn_once(
            plan,
            f"mask:{type(module).__name__}:{kwargs.get('sliding_window')}",
            f"minference: {type(module).__name__} got an attention mask that is not plain causal "
            f"+ padding (sliding_window={kwargs.get('sliding_window')}, packed sequences or a "
            "custom mask); these calls run dense SDPA instead of the sparse path.",
        )
    else:
        plan.stats.dense_calls += 1
    if compact:
        attention_mask = _expand_compact(attention_mask, num_queries, key.shape[2])
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def minference_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function registered as ``"minference"`` with transformers' AttentionMaskInterface.

    For a multi-token causal pre-fill (``q_offset + q_length <= kv_length``), returns ``None``
    when nothing is masked and ``q_length == kv_length``, else the compact key-padding mask
    ``[B, 1, 1, L]`` (bool) with ``L = q_offset + q_length``, the filled part of the cache (a
    static cache is longer; its tail is masked). Everything else (decode steps, sliding windows,
    packed sequences, custom overlays, compiled graphs) gets transformers' own SDPA mask.
    """
    if isinstance(q_offset, torch.Tensor) and not _tracing():
        q_offset = int(q_offset)  # static caches pass a tensor (for torch.compile)
    compactable = (
        q_length > 1
        and mask_function is causal_mask_function
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and kv_offset == 0
        and q_offset + q_length <= kv_length
        and kwargs.get("local_size") is None
        and not kwargs.get("use_vmap", False)
    )
    if not compactable:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    device = kwargs.get("device", "cpu")
    filled = q_offset + q_length  # positions written to the cache so far (static: < kv_length)
    if attention_mask is None:
        if filled == q_length == kv_length:
            return None
        return torch.ones(batch_size, 1, 1, filled, dtype=torch.bool, device=device)
    pad = attention_mask.to(dtype=torch.bool)
    if pad.shape[-1] < filled:
        pad = torch.nn.functional.pad(pad, (0, filled - pad.shape[-1]), value=False)
    pad = pad[:, :filled]
    if filled == q_length == kv_length and bool(pad.all()):
        return None
    return pad[:, None, None, :]


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"minference_capture"``: hands post-RoPE ``query``
    ``[B, Hq, N, D]`` and ``key`` / ``value`` ``[B, Hkv, N, D]`` to the module's capture hook (set
    by :func:`minference_hf.capture_qkv`), then computes dense SDPA attention."""
    hook = getattr(module, "_minference_capture_hook", None)
    if hook is not None:
        hook(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
