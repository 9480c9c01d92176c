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

Sliding-window (local) layers -- Gemma-2/3, Mistral, Qwen2 ``layer_types`` -- get a compact mask
too when the window bites (more keys than the window): ``[B, 1, 1, L]`` **int32** holding the
window ``W`` at real keys and 0 at padding. The mask carries its window, so the attention function
cannot mistake it for plain causal; it computes such a layer exactly with the streaming kernel
(no sink, the keys with ``0 <= i - j < W``, transformers' ``kv_idx > q_idx - W``), at ``O(N W)``
instead of the quadratic masked SDPA, whatever the pattern config says (configs leave local
layers dense). Attention-logit soft-capping (``softcap``, Gemma-2) is passed to the kernels; the
dense path computes it too.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from minference_kernels import BLOCK
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from .plan import SparsePrefillPlan, _causal_count

logger = logging.getLogger("minference_hf")

IMPLEMENTATION = "minference"
CAPTURE_IMPLEMENTATION = "minference_capture"

#: Keyword arguments of the attention interface that change the attention itself and that the
#: sparse kernels cannot honour. Passing any of them (not ``None``) is an error.
_UNSUPPORTED_KWARGS = {
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


def _expand_compact(
    key_valid: torch.Tensor, num_queries: int, num_keys: int, window: int | None = None
) -> torch.Tensor:
    """Compact ``[B, 1, 1, L]`` key-padding mask -> the full ``[B, 1, Nq, Nk]`` SDPA mask.

    ``L <= Nk`` is the filled length of the cache (``L < Nk`` for static caches): keys at or after
    ``L`` are masked, and the queries are the last ``Nq`` of the first ``L`` positions. With a
    ``window``, query ``i`` sees only keys ``j`` with ``i - j < window``.
    """
    key_valid = key_valid.to(torch.bool)
    filled = key_valid.shape[-1]
    if filled < num_keys:
        key_valid = torch.nn.functional.pad(key_valid, (0, num_keys - filled), value=False)
    pos = torch.arange(num_queries, device=key_valid.device) + (filled - num_queries)
    keys = torch.arange(num_keys, device=key_valid.device)[None, :]
    allowed = keys <= pos[:, None]
    if window is not None:
        allowed = allowed & (keys > pos[:, None] - window)
    return key_valid & allowed[None, None]


def _compact_window(mask: torch.Tensor) -> int | None:
    """The window a compact mask carries (int32 form), ``None`` for the causal (bool) form."""
    if mask.dtype == torch.bool:
        return None
    return int(mask.max())


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
        got = rows[:, start:stop]
        # every row must match: a window that bites makes the last row's "padding" a guess, and
        # the rows it would call padded queries are where the guess shows. A padded query's row
        # may only differ when it is all-True or all-False (SDPA's unmasking of empty rows).
        uniform = got.all(-1, keepdim=True) | ~got.any(-1, keepdim=True)
        padded = ~query_valid[:, start:stop, None]
        bad = (got != expected) & ~(padded & uniform)
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
    softcap: float | None,
) -> torch.Tensor:
    """Attention for one unpadded (sub-)batch, ``[b, Hq, nq, D]`` in q's dtype."""
    import minference_kernels

    nq, nk = q.shape[2], k.shape[2]
    cap: dict[str, Any] = {} if softcap is None else {"softcap": softcap}
    if not plan.wants_sparse(nq, nk):
        plan.stats.dense_calls += 1
        return minference_kernels.dense_attention(q, k, v, scale=scale, **cap)
    heads = plan.heads_for_layer(layer, nk)
    plan.stats.sparse_calls += 1
    plan.stats.sparse_layers.add(layer)
    # the density guard is tuned to the GPU kernel's rate; on CPU, sparse runs as configured
    kw: dict[str, Any] = {**plan.options.kernel_kwargs(cuda=q.is_cuda), **cap}
    max_density = kw.pop("max_density")
    if not plan.record_density:
        return minference_kernels.sparse_prefill(
            q, k, v, heads, scale, max_density=max_density, **kw
        )
    out, idx = minference_kernels.sparse_prefill(q, k, v, heads, scale, return_index=True, **kw)
    if max_density is not None:  # the same guard sparse_prefill applies without return_index
        visited = float(idx.candidate_keys().sum()) * BLOCK
        if visited > max_density * _causal_count(nq, nk) * q.shape[0] * q.shape[1]:
            plan.stats.record(layer, None, nq, nk, q.shape[0] * q.shape[1])
            return minference_kernels.dense_attention(q, k, v, scale=scale, **cap)
    plan.stats.record(layer, idx, nq, nk, q.shape[0] * q.shape[1])
    return out


def _call_local(
    plan: SparsePrefillPlan,
    window: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """A sliding-window layer, exactly: the streaming kernel with no sink and ``window`` keys."""
    import minference_kernels

    plan.stats.local_calls += 1
    cap: dict[str, Any] = {} if softcap is None else {"softcap": softcap}
    return minference_kernels.streaming_attention(
        q, k, v, 0, window, scale, backend=plan.backend, **cap
    )


def _per_sample(
    fn: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor | None,
    *,
    gather: bool = True,
) -> torch.Tensor | None:
    """``fn(q, k, v)`` per sample on its valid tokens when the batch is padded (``[B, Hq, Nq, D]``).

    A sample whose valid tokens have holes is gathered (the positions close up) when ``gather``;
    otherwise (sliding windows count positions, holes included) ``None`` is returned.
    """
    if key_valid is None or bool(key_valid.all()):
        return fn(query, key, value)
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
            ob = fn(
                query[b : b + 1, :, q0:q1],
                key[b : b + 1, :, first : last + 1],
                value[b : b + 1, :, first : last + 1],
            )
            out[b : b + 1, :, q0:q1] = ob
        elif not gather:
            return None
        else:  # holes: gather the real tokens; queries are the last of them
            qidx = idx[idx >= offset] - offset
            ob = fn(
                query[b : b + 1].index_select(2, qidx),
                key[b : b + 1].index_select(2, idx),
                value[b : b + 1].index_select(2, idx),
            )
            out[b : b + 1].index_copy_(2, qidx, ob)
    return out


def _varlen_forward(
    plan: SparsePrefillPlan,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Sparse pre-fill of a packed batch of sequences: ``q [total_q, Hq, D]``, ``k/v
    [total_k, Hkv, D]``, sequence ``i`` = rows ``cu_q[i]:cu_q[i+1]`` / ``cu_k[i]:cu_k[i+1]``.

    Each sequence gets the plan's decision for its own length: a dense one runs
    :func:`~minference_kernels.dense_attention` alone, the sparse ones go through
    :func:`~minference_kernels.sparse_prefill_varlen` in one call per distinct head-pattern row
    (one call in all when the config's patterns do not depend on the length). Returns
    ``[total_q, Hq, D]`` (rows of empty sequences are zero)."""
    import minference_kernels

    cap: dict[str, Any] = {} if softcap is None else {"softcap": softcap}
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    groups: dict[tuple, list[int]] = {}
    for i in range(len(cu_q) - 1):
        nq, nk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if nq == 0:
            continue
        if not plan.wants_sparse(nq, nk):
            plan.stats.dense_calls += 1
            seq = lambda x, c: x[c[i] : c[i + 1]].transpose(0, 1)[None]  # noqa: E731
            o = minference_kernels.dense_attention(
                seq(q, cu_q), seq(k, cu_k), seq(v, cu_k), scale=scale, **cap
            )
            out[cu_q[i] : cu_q[i + 1]] = o[0].transpose(0, 1)
            continue
        groups.setdefault(plan.heads_for_layer(layer, nk), []).append(i)
    # the density guard (max_density) is tuned to the GPU kernel's rate: CUDA only
    kw: dict[str, Any] = {**plan.options.kernel_kwargs(cuda=q.is_cuda), **cap}
    for heads, seqs in groups.items():
        if len(seqs) == len(cu_q) - 1:  # every sequence: the packed tensors as they are
            qg, kg, vg, cq, ck = q, k, v, cu_q, cu_k
        else:
            rows_q = torch.cat([torch.arange(cu_q[i], cu_q[i + 1]) for i in seqs])
            rows_k = torch.cat([torch.arange(cu_k[i], cu_k[i + 1]) for i in seqs])
            rows_q, rows_k = rows_q.to(q.device), rows_k.to(q.device)
            qg, kg = q.index_select(0, rows_q), k.index_select(0, rows_k)
            vg = v.index_select(0, rows_k)
            cq, ck = [0], [0]
            for i in seqs:
                cq.append(cq[-1] + cu_q[i + 1] - cu_q[i])
                ck.append(ck[-1] + cu_k[i + 1] - cu_k[i])
        # on the host: the kernels read the lengths there (a GPU tensor would cost a sync)
        i32 = lambda c: torch.tensor(c, dtype=torch.int32)  # noqa: E731
        og, indices = minference_kernels.sparse_prefill_varlen(
            qg,
            kg,
            vg,
            i32(cq),
            i32(ck),
            heads,
            scale,
            return_index=True,
            **kw,
        )
        plan.stats.sparse_calls += len(seqs)
        plan.stats.sparse_layers.add(layer)
        if qg is q:
            out = og
        else:
            for j, i in enumerate(seqs):
                out[cu_q[i] : cu_q[i + 1]] = og[cq[j] : cq[j + 1]]
        if plan.record_density:
            for j, idx in enumerate(indices):
                plan.stats.record(layer, idx, cq[j + 1] - cq[j], ck[j + 1] - ck[j], q.shape[1])
    return out


def _sparse_forward(
    plan: SparsePrefillPlan,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sparse pre-fill of one layer. An unpadded batch runs as it is (equal lengths); a padded
    one is packed (each sample's real tokens, holes closed up; its queries are the last of them)
    and runs through :func:`_varlen_forward`, then scattered back (padded queries give 0)."""
    if key_valid is None or bool(key_valid.all()):
        return _call_one(plan, layer, query, key, value, scale, softcap)
    bsz, hq, nq, d = query.shape
    nk = key.shape[2]
    offset = nk - nq
    if key_valid.shape[0] == 1 and bsz > 1:
        key_valid = key_valid.expand(bsz, -1)
    dev = query.device
    rows_q, rows_k, cu_q, cu_k = [], [], [0], [0]
    for b in range(bsz):
        idx = torch.nonzero(key_valid[b], as_tuple=False).flatten()
        qidx = idx[idx >= offset] - offset
        if qidx.numel() == 0:  # no real token among the new queries: nothing to compute
            continue
        rows_q.append(qidx + b * nq)
        rows_k.append(idx + b * nk)
        cu_q.append(cu_q[-1] + int(qidx.numel()))
        cu_k.append(cu_k[-1] + int(idx.numel()))
    out = query.new_zeros(bsz * nq, hq, value.shape[-1])
    if len(cu_q) > 1:
        rq, rk = torch.cat(rows_q).to(dev), torch.cat(rows_k).to(dev)
        flat = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # noqa: E731
        packed = _varlen_forward(
            plan,
            layer,
            flat(query).index_select(0, rq),
            flat(key).index_select(0, rk),
            flat(value).index_select(0, rk),
            cu_q,
            cu_k,
            scale,
            softcap,
        )
        out.index_copy_(0, rq, packed)
    return out.reshape(bsz, nq, hq, -1).transpose(1, 2)


def _packed_cached(
    plan: SparsePrefillPlan,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
    query: torch.Tensor,
    key: torch.Tensor,
) -> list[int] | None:
    """:func:`_packed_segments`, checked once per forward pass (every layer gets the same mask
    and position tensors), not once per layer."""
    if attention_mask is None:
        return None
    src = kwargs.get("cu_seq_lens_q")
    src = kwargs.get("position_ids") if src is None else src
    cached = plan._packed_check
    if (
        cached is not None
        and cached[0]() is attention_mask
        and (cached[1] is None if src is None else cached[1]() is src)
    ):
        return cached[2]
    cu = _packed_segments(attention_mask, kwargs, query.shape[0], query.shape[2], key.shape[2])
    ref = None if not isinstance(src, torch.Tensor) else weakref.ref(src)
    plan._packed_check = (weakref.ref(attention_mask), ref, cu)
    return cu


def _packed_segments(
    attention_mask: torch.Tensor | None, kwargs: dict[str, Any], bsz: int, num_queries: int,
    num_keys: int,
) -> list[int] | None:  # fmt: skip
    """Sequence boundaries of a packed batch (several sequences one after the other in a row,
    transformers' packed-sequence path), over the rows flattened ``[B * N]``: ``cu_seqlens`` as a
    list, or ``None`` when this is not a packed batch we can prove.

    The boundaries come from ``cu_seq_lens_q`` (flash-attn's kwarg, batch 1) if given, else from
    ``position_ids`` restarting (a step other than +1, transformers' rule). They are used only if
    ``attention_mask`` is exactly the block-diagonal causal mask they imply (no cache, no
    padding), so a mask that says anything else keeps the dense path."""
    if attention_mask is None or attention_mask.dtype != torch.bool or num_queries != num_keys:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return None
    if tuple(attention_mask.shape[-2:]) != (num_queries, num_keys):
        return None
    dev = attention_mask.device
    cu = kwargs.get("cu_seq_lens_q")
    pos = kwargs.get("position_ids")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if bsz != 1 or (cu_k is not None and not torch.equal(cu_k.cpu(), cu.cpu())):
            return None
        c = [int(x) for x in cu.flatten().tolist()]
        if c[0] != 0 or c[-1] != num_queries or any(b <= a for a, b in zip(c, c[1:])):
            return None
        seg = torch.zeros(1, num_queries, dtype=torch.long, device=dev)
        for a in c[1:-1]:
            seg[0, a:] += 1
    elif isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == num_queries:
        pos = pos.to(dev).expand(bsz, -1)
        step = torch.ones_like(pos, dtype=torch.bool)
        step[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
        step[:, 0] = False
        seg = step.long().cumsum(-1)  # [B, N] segment id per token
        if not bool((seg[:, -1] > 0).any()):
            return None  # nothing restarts: not packed
    else:
        return None
    if attention_mask.shape[0] not in (1, bsz):
        return None
    mask = attention_mask[:, 0].expand(bsz, -1, -1)
    for start in range(0, num_queries, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, num_queries)
        qpos = torch.arange(start, stop, device=dev)
        causal = torch.arange(num_keys, device=dev)[None, :] <= qpos[:, None]
        same = seg[:, start:stop, None] == seg[:, None, :]
        if not torch.equal(mask[:, start:stop], causal[None] & same):
            return None
    cu_all = [0]
    for b in range(seg.shape[0]):
        base = cu_all[-1]
        cu_all.extend(base + int(x) for x in torch.bincount(seg[b]).cumsum(0).tolist())
    return cu_all


def _softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float,
) -> torch.Tensor:
    """Dense attention with logits ``softcap * tanh(q.k * scale / softcap)`` under ``mask``
    (``None``: causal, bottom-right aligned; bool ``True`` = attend, or additive float;
    broadcastable to ``[B, 1, Nq, Nk]``). ``query [B, Hq, Nq, D]``, ``key``/``value``
    ``[B, Hkv, Nk, D]``; returns ``[B, Nq, Hq, D]`` in the query's dtype. Float32 arithmetic, in
    chunks of query rows. Rows that see no key output zeros."""
    b, hq, nq, d = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    kf, vf = key.float(), value.float()
    qf = query.float().reshape(b, hkv, g, nq, d)
    out = query.new_empty(b, nq, hq, value.shape[-1])
    for s0 in range(0, nq, _ROW_CHUNK):
        s1 = min(s0 + _ROW_CHUNK, nq)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", qf[:, :, :, s0:s1], kf) * scale
        logits = softcap * torch.tanh(logits / softcap)
        if mask is None:
            allowed = _causal(nq, nk, query.device)[s0:s1][None, None, None]
        else:
            m = mask[..., s0:s1, :] if mask.shape[-2] != 1 else mask
            m = m.expand(m.shape[0], m.shape[1], s1 - s0, nk)
            if m.shape[1] != 1:  # per-head masks: [B, Hq, n, Nk] -> [B, Hkv, g, n, Nk]
                m = m.reshape(m.shape[0], hkv, g, s1 - s0, nk)
            else:
                m = m[:, :, None]
            if m.dtype == torch.bool:
                allowed = m
            else:
                logits = logits + m.float()
                allowed = None
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        o = torch.einsum("bhgqk,bhkd->bhgqd", p, vf)  # [B, Hkv, g, n, D]
        out[:, s0:s1] = o.reshape(b, hq, s1 - s0, -1).transpose(1, 2).to(out.dtype)
    return out


def _key_valid_for_sparse(
    plan: SparsePrefillPlan, attention_mask: torch.Tensor | None, num_queries: int
) -> tuple[bool, torch.Tensor | None]:
    """``(usable, key_valid)``: whether the mask allows the sparse path, and the key padding."""
    if attention_mask is None:
        return True, None
    key_valid: torch.Tensor | None
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


def _layer_idx(module: torch.nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    if not isinstance(idx, int):
        raise UnsupportedAttentionError(
            f"{type(module).__name__} has no integer layer_idx (got {idx!r}); minference needs it "
            "to pick the layer's patterns"
        )
    return idx


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
            :func:`minference_mask` (bool: causal; int32: a sliding window, its value at real
            keys), or a full ``[B, 1, Nq, Nk]`` mask.
        dropout: attention dropout; must be 0 on the sparse path (inference only).
        scaling: softmax scale (``None``: ``D ** -0.5``).
        kwargs: transformers' extras; ``softcap`` (Gemma-2's ``attn_logit_softcapping``) caps
            the logits as ``softcap * tanh(logits / softcap)`` on every path.

    Returns:
        ``(output [B, Nq, Hq, D], None)`` like transformers' SDPA function.
    """
    plan = _plan_of(module)
    _check_kwargs(module, is_causal, kwargs)
    layer_idx = _layer_idx(module)
    plan.stats.seen_layers.add(layer_idx)
    softcap = kwargs.get("softcap")
    num_queries, num_keys = query.shape[2], key.shape[2]
    compact_mask = (
        attention_mask
        if attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[-2] == 1
        and num_queries > 1
        else None
    )
    window = _compact_window(compact_mask) if compact_mask is not None else None
    # a static cache passes its whole buffer; the compact mask says how much of it is filled
    filled = compact_mask.shape[-1] if compact_mask is not None else num_keys
    sparse = window is None and plan.wants_sparse(num_queries, filled)
    if window is not None or sparse:  # a kernel path
        if dropout and module.training:
            raise UnsupportedAttentionError(
                "minference sparse pre-fill is inference-only: call model.eval() (attention "
                "dropout is active)"
            )
        if filled < num_keys:
            key, value = key[:, :, :filled], value[:, :, :filled]
    if window is not None:  # a sliding-window layer longer than its window: exact, O(N W)
        assert compact_mask is not None  # the window comes from the compact mask
        real_keys = compact_mask[:, 0, 0, :] != 0
        out = _per_sample(
            lambda q, k, v: _call_local(plan, window, q, k, v, scaling, softcap),
            query,
            key,
            value,
            None if bool(real_keys.all()) else real_keys,
            gather=False,
        )
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
        plan.stats.fallback_calls += 1
        _warn_once(
            plan,
            f"holes:{type(module).__name__}",
            f"minference: {type(module).__name__} (sliding window {window}) got padding with "
            "holes (padded tokens between real ones); these calls run dense SDPA with the full "
            "sliding-window mask instead of the streaming kernel.",
        )
    elif sparse:
        usable, key_valid = _key_valid_for_sparse(plan, attention_mask, num_queries)
        if usable:
            out = _sparse_forward(plan, layer_idx, query, key, value, key_valid, scaling, softcap)
            # the Triton kernels write [B, N, H, D] memory, so this is a view, not a copy
            return out.transpose(1, 2).contiguous(), None
        elif (cu := _packed_cached(plan, attention_mask, kwargs, query, key)) is not None:
            flat = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # noqa: E731
            out = _varlen_forward(
                plan,
                layer_idx,
                flat(query),
                flat(key),
                flat(value),
                cu,
                cu,
                scaling,
                softcap,
            )
            return out.reshape(query.shape[0], num_queries, query.shape[1], -1), None
        elif kwargs.get("sliding_window") is not None and all(
            h.kind == "dense" for h in plan.heads_for_layer(layer_idx, filled)
        ):
            # a sliding-window layer (dense in the plan: patch makes it so) in a later pre-fill
            # chunk over its cache: the model's own window mask with SDPA is the exact path
            plan.stats.dense_calls += 1
        else:
            plan.stats.fallback_calls += 1
            _warn_once(
                plan,
                f"mask:{type(module).__name__}:{kwargs.get('sliding_window')}",
                f"minference: {type(module).__name__} got an attention mask that is not plain "
                f"causal + padding (sliding_window={kwargs.get('sliding_window')}, a custom "
                "mask, or packed sequences that are not exactly their block-diagonal causal "
                "mask); these calls run dense SDPA instead of the sparse path.",
            )
    else:
        plan.stats.dense_calls += 1
    if compact_mask is not None:
        attention_mask = _expand_compact(compact_mask, num_queries, key.shape[2], window)
    if softcap is not None:  # SDPA has no soft-capping
        if dropout and module.training:
            raise UnsupportedAttentionError(
                "minference's soft-capped attention is inference-only: call model.eval() "
                "(attention dropout is active)"
            )
        return _softcap_attention(query, key, value, attention_mask, scaling, softcap), None
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
    static cache is longer; its tail is masked). For a sliding-window pre-fill
    (``local_size=W``, a mask function that is transformers' sliding-window causal one, checked
    by probing it) whose keys outrun the window, the compact mask is int32 and holds ``W`` at the
    real keys (0 at padding), for a fresh pre-fill (no cached tokens). Everything else (decode
    steps, later pre-fill chunks over a sliding cache, packed sequences, chunked attention, custom
    overlays, compiled graphs) gets transformers' own SDPA mask.
    """
    if isinstance(q_offset, torch.Tensor) and not _tracing():
        q_offset = int(q_offset)  # static caches pass a tensor (for torch.compile)
    local = kwargs.get("local_size")
    plain = (
        q_length > 1
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and not kwargs.get("use_vmap", False)
    )
    compactable = (
        plain
        and mask_function is causal_mask_function
        and kv_offset == 0
        and q_offset + q_length <= kv_length
        and local is None
    )
    device = kwargs.get("device", "cpu")
    window: int | None = None
    if (
        not compactable
        and plain
        and isinstance(q_offset, int)  # (plain checks it; repeated for the type checker)
        and isinstance(local, int)
        and local >= 1
        and kwargs.get("allow_is_causal_skip", True)
        # a fresh pre-fill only: a later chunk over a sliding cache keeps transformers' mask
        # (older transformers versions count that cache's offset differently)
        and q_offset == 0
        and kv_offset == 0
        and q_length <= kv_length
        and _is_sliding_causal(
            mask_function, local, batch_size, q_offset, q_length, kv_offset, device
        )
    ):
        compactable = True
        window = local if q_offset + q_length - kv_offset > local else None
    if not compactable:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            # a tensor q_offset (static caches under tracing) is passed on as transformers does
            q_offset=q_offset,  # type: ignore[arg-type]  # transformers types it int only
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    assert isinstance(q_offset, int)  # compactable implies plain, which checks it
    # positions kv_offset .. kv_offset + filled - 1 are in the cache (static: < kv_length)
    filled = q_offset + q_length - kv_offset
    if attention_mask is None:
        if window is not None:
            return torch.full((batch_size, 1, 1, filled), window, dtype=torch.int32, device=device)
        if filled == q_length == kv_length:
            return None
        return torch.ones(batch_size, 1, 1, filled, dtype=torch.bool, device=device)
    pad = attention_mask.to(dtype=torch.bool)
    if pad.shape[-1] < kv_offset + filled:
        pad = torch.nn.functional.pad(pad, (0, kv_offset + filled - pad.shape[-1]), value=False)
    pad = pad[:, kv_offset : kv_offset + filled]
    if window is not None:
        return (pad.to(torch.int32) * window)[:, None, None, :]
    if filled == q_length == kv_length and bool(pad.all()):
        return None
    return pad[:, None, None, :]


#: Query rows probed by :func:`_is_sliding_causal` (spread over the queries, ends included).
_PROBE_ROWS = 33


def _is_sliding_causal(
    mask_function: Any,
    window: int,
    batch_size: int,
    q_offset: int,
    q_length: int,
    kv_offset: int,
    device: Any,
) -> bool:
    """Whether ``mask_function`` (an index-based transformers mask function) is exactly
    ``kv_idx <= q_idx and kv_idx > q_idx - window`` on probed query rows: every key from two
    before the window to two after the diagonal, and the first cached key. Chunked attention,
    packed sequences or extra overlays differ somewhere on those rows and are left to
    transformers' own mask."""
    rows = torch.linspace(0, q_length - 1, min(_PROBE_ROWS, q_length)).round().long()
    qpos = (rows + q_offset).to(device)[:, None]  # [R, 1]
    offs = torch.arange(-window - 2, 3, device=device)[None, :]
    kpos = torch.cat([qpos + offs, torch.full_like(qpos, kv_offset)], dim=1)
    kpos = kpos.clamp(min=kv_offset)  # [R, C]
    expected = (kpos <= qpos) & (kpos > qpos - window)
    b = torch.arange(batch_size, device=device)[:, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[:, None, None]
    try:
        got = mask_function(b, h, qpos[None], kpos[None])
        got = torch.as_tensor(got, device=device).to(torch.bool)
        return bool((got == expected[None]).all())
    except Exception:  # not index-based (vmap-only) or otherwise unexpected: not ours to take
        return False


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
    by :func:`minference_hf.capture_qkv`), then computes the exact attention: sliding-window
    layers through the streaming kernel (the compact mask of :func:`minference_mask`, which is
    registered beside it), everything else dense (SDPA, or capped PyTorch attention)."""
    hook = getattr(module, "_minference_capture_hook", None)
    if hook is not None:
        hook(module, query, key, value)
    softcap = kwargs.get("softcap")
    num_queries = query.shape[2]
    if (
        attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[-2] == 1
        and num_queries > 1
    ):  # the compact mask of minference_mask: a sliding window runs exactly in O(N W)
        window = _compact_window(attention_mask)
        filled = attention_mask.shape[-1]
        if window is not None:
            import minference_kernels

            key_valid = attention_mask[:, 0, 0, :] != 0
            cap: dict[str, Any] = {} if softcap is None else {"softcap": float(softcap)}
            out = _per_sample(
                lambda q, k, v: minference_kernels.streaming_attention(
                    q, k, v, 0, window, kwargs.get("scaling"), **cap
                ),
                query,
                key[:, :, :filled],
                value[:, :, :filled],
                None if bool(key_valid.all()) else key_valid,
                gather=False,
            )
            if out is not None:
                return out.transpose(1, 2).contiguous(), None
        attention_mask = _expand_compact(attention_mask, num_queries, key.shape[2], window)
    if softcap is not None:  # SDPA cannot cap the logits (Gemma-2)
        out = _softcap_attention(
            query, key, value, attention_mask, kwargs.get("scaling"), float(softcap)
        )
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
