"""Layer-by-layer pre-fill for prompts whose KV cache or activations do not fit the GPU (to 1M tokens).

:func:`long_prefill` runs the prompt through the model one decoder layer at a time instead of
calling ``model(...)``:

* every layer sees all ``N`` tokens at once (the sparse estimate is made on the whole prompt, as in
  a single-pass pre-fill), but the norms, projections, RoPE, output projection and MLP run in
  chunks of ``chunk_size`` tokens, so the only full-length tensors are the residual stream and the
  layer's ``q``, ``k``, ``v`` and attention output (all in the model dtype; no full-length float32);
* attention goes through the model's configured attention implementation (``"minference"`` after
  :func:`minference_hf.patch`, else SDPA / FlashAttention / ...), exactly as in ``model(...)``;
* each layer's keys and values go to the KV cache as soon as the layer's attention is done; a cache
  layer either stays on the GPU or is copied to **pinned host memory** on a side stream (the copy
  overlaps the next layers' compute);
* only the last position is normed and projected to logits; the last layer's MLP runs on the last
  position only (the other positions' outputs feed nothing: the cache holds keys and values).

The returned :class:`OffloadedKVCache` is a regular transformers ``Cache``: decoding continues with
``model(next_ids, cache=...)`` or ``model.generate(ids, past_key_values=...)``. For offloaded layers
each decode step streams the layer's keys and values back to the GPU, prefetching the next
offloaded layer on a side stream while the current one computes.

Memory model (``B`` batch, ``N`` tokens, ``s`` bytes per element of the model dtype, ``h`` hidden
size, ``q = Hq * D``, ``kv = Hkv * D``, ``I`` MLP width, ``C`` chunk size, ``L`` layers, ``G`` layers
whose cache stays on the GPU)::

    GPU peak ~ weights + B*N*s*(h + 2q + 2kv) + workspace(N) + G * 2*B*N*kv*s + chunk(C)
    host     ~ (L - G) * 2*B*N*kv*s   (pinned)

``workspace`` is the sparse kernels' index (a coverage byte per query head and key) and ``chunk`` is
``B*C*(4h*4 + 3I*s + (q + 2kv)*s)``. For Llama-3-8B (h 4096, 32 x 128 query heads, 8 KV heads,
I 14336, bf16) at N = 1M: activations ~28 GiB, the KV cache 128 GiB (4 GiB a layer), weights 15 GiB;
see :func:`estimate_memory`.

Supported models: decoder stacks of the Llama family (``model.model.layers`` of
``input_layernorm -> self_attn -> residual -> post_attention_layernorm -> mlp -> residual``, with
``q_proj``/``k_proj``/``v_proj`` or a fused ``qkv_proj``, optional ``q_norm``/``k_norm``, RoPE from
``model.model.rotary_emb``): Llama, Mistral, Qwen2, Qwen3, Phi-3. Anything else raises
:class:`~minference_hf.UnsupportedModelError` naming what differs.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._pinned import HostBufferQueue, copy_kv, pinned_empty
from ._progress import Progress
from .caches import HostKVLayer, OffloadedKVCache, ResidentKVLayer, _KVBuffer, _sync
from .inspection import _check_window, _fail, _inspect, _Model
from .memory import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_RESERVE_TOKENS,
    MemoryEstimate,
    OffloadSpec,
    plan_offload,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("minference_hf")


@dataclass
class PrefillResult:
    """Outcome of :func:`long_prefill`.

    Attributes:
        cache: the filled :class:`OffloadedKVCache` (``seq_len`` tokens per layer).
        logits: ``[B, vocab]`` float32 logits of the last prompt position.
        seq_len: ``N``.
        memory: the placement and predicted memory (:class:`MemoryEstimate`).
        seconds: wall time (synchronised).
        peak_gpu_bytes: measured peak allocated bytes on the device during the call (CUDA only).
        layer_seconds: wall time per layer (synchronised when ``time_layers``).
        attention_seconds: wall time of each layer's attention call (``time_layers`` only).
    """

    cache: OffloadedKVCache
    logits: torch.Tensor
    seq_len: int
    memory: MemoryEstimate
    seconds: float
    peak_gpu_bytes: int | None = None
    layer_seconds: list[float] = field(default_factory=list)
    attention_seconds: list[float] = field(default_factory=list)


def _attention_fn(model: torch.nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        raise _fail(
            "the model uses eager attention, which materialises the [N, N] score matrix; load it "
            "with attn_implementation='sdpa' (or patch it with minference_hf.patch)"
        )
    if impl not in ALL_ATTENTION_FUNCTIONS:
        raise _fail(f"unknown attention implementation {impl!r}")
    return ALL_ATTENTION_FUNCTIONS[impl]


def _project(
    attn: Any,
    h: torch.Tensor,
    m: _Model,  # attn: the model's own class, checked by _inspect
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h [B, n, hidden]`` -> ``q [B, Hq, n, D]``, ``k``/``v`` ``[B, Hkv, n, D]`` (before RoPE)."""
    bsz, n, _ = h.shape
    d = m.head_dim
    if getattr(attn, "qkv_proj", None) is not None:
        qkv = attn.qkv_proj(h)
        qd, kd = m.num_heads * d, m.num_kv_heads * d
        q, k, v = qkv[..., :qd], qkv[..., qd : qd + kd], qkv[..., qd + kd :]
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q = q.reshape(bsz, n, -1, d)
    k = k.reshape(bsz, n, -1, d)
    v = v.reshape(bsz, n, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def long_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    offload_kv: OffloadSpec = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    progress: bool = False,
    time_layers: bool = False,
) -> PrefillResult:
    """Pre-fill ``input_ids`` layer by layer with a chunked MLP and an optionally offloaded cache.

    Produces the same last-position logits and KV cache as ``model(input_ids, use_cache=True)``
    (up to floating-point summation order) with far less device memory; see the module docstring.

    Args:
        model: a supported causal LM in eval mode, on one device (patched with
            :func:`minference_hf.patch` for sparse attention, or plain SDPA for dense).
        input_ids: ``[B, N]`` token ids on the model's device, no padding.
        offload_kv: ``"auto"`` (offload the fewest layers that fit the GPU), ``True`` (all),
            ``False`` (none) or the number of layers to offload. On CPU models nothing is pinned.
        chunk_size: tokens per chunk for norms, projections and the MLP.
        reserve_tokens: spare cache capacity for decoding (grows if exceeded).
        progress: per-layer progress on stderr.
        time_layers: synchronise around each layer and its attention call and record
            ``layer_seconds`` and ``attention_seconds``.

    Returns:
        :class:`PrefillResult` (the cache continues decoding; ``logits`` are ``[B, vocab]``).

    Raises:
        UnsupportedModelError: the model is not of the supported layout (named).
        MemoryError: the plan cannot fit (see :func:`plan_offload`).
        ValueError: bad ``input_ids`` / arguments.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a [B, N] tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids is empty")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if model.training:
        raise ValueError("long_prefill is for inference: call model.eval() first")
    m = _inspect(model)
    dev = m.embed_weight.device
    if input_ids.device != dev:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {dev}")
    vocab_hi = int(input_ids.max())
    if int(input_ids.min()) < 0 or vocab_hi >= m.embed_weight.shape[0]:
        raise ValueError(f"input_ids out of range [0, {m.embed_weight.shape[0]})")
    bsz, n = int(input_ids.shape[0]), int(input_ids.shape[1])
    for i, layer in enumerate(m.layers):
        _check_window(layer.self_attn, model.config, i, n)
    attention = _attention_fn(model)
    plan = plan_offload(
        model,
        n,
        batch=bsz,
        offload_kv=offload_kv,
        chunk_size=chunk_size,
        reserve_tokens=reserve_tokens,
    )
    num_layers = len(m.layers)
    # the last layers go to the host: their pinned buffers are made while the first layers compute
    host_layers = set(range(plan.gpu_kv_layers, num_layers))
    if host_layers:
        logger.info("long_prefill: %s", plan.summary())
    rope = sys.modules[type(m.layers[0].self_attn).__module__].apply_rotary_pos_emb
    dtype = m.embed_weight.dtype
    cuda = dev.type == "cuda"
    pin = cuda
    copy_stream = torch.cuda.Stream(device=dev) if cuda and host_layers else None
    cap = n + int(reserve_tokens)
    d, hq, hkv = m.head_dim, m.num_heads, m.num_kv_heads
    chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    cache_layers: list[_KVBuffer] = []
    # (copy done, device keys, device values) of the last offloaded layer: its device buffers are
    # freed once the copy has landed, before the next layer allocates (no record_stream, so the
    # allocator never holds two layers' keys and values at the peak)
    pending: tuple[torch.cuda.Event, torch.Tensor, torch.Tensor] | None = None
    layer_times: list[float] = []
    attn_times: list[float] = []
    prog = Progress(f"long pre-fill {n} tokens", num_layers, enabled=progress)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    host_bufs = HostBufferQueue(
        sorted(host_layers), (bsz, hkv, cap, d), dtype, alloc=pinned_empty if pin else _empty
    )
    with torch.no_grad(), host_bufs:
        x = m.embed(input_ids)  # [B, N, hidden]
        pos = torch.arange(n, device=dev)[None].expand(bsz, n)
        rot = [m.rotary(x[:, s:e], pos[:, s:e]) for s, e in chunks]
        for li, layer in enumerate(m.layers):
            tl = time.perf_counter()
            if pending is not None:  # the last layer's copy to the host has landed: free its KV
                pending[0].synchronize()
                pending = None
            attn = layer.self_attn
            q = torch.empty(bsz, hq, n, d, dtype=dtype, device=dev)
            kbuf = torch.empty(
                bsz, hkv, cap if li not in host_layers else n, d, dtype=dtype, device=dev
            )
            vbuf = torch.empty_like(kbuf)
            for (s, e), (cos, sin) in zip(chunks, rot):
                h = layer.input_layernorm(x[:, s:e])
                qc, kc, vc = _project(attn, h, m)
                qc, kc = rope(qc, kc, cos, sin)
                q[:, :, s:e] = qc
                kbuf[:, :, s:e] = kc
                vbuf[:, :, s:e] = vc
                del h, qc, kc, vc
            k, v = kbuf[:, :, :n], vbuf[:, :, :n]
            if time_layers:
                _sync(dev)
                ta = time.perf_counter()
            out, _ = attention(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
            if time_layers:
                _sync(dev)
                attn_times.append(time.perf_counter() - ta)
            del q
            out = out.reshape(bsz, n, hq * d)
            if li in host_layers:
                hk, hv = host_bufs.get(li)
                if copy_stream is not None:
                    copy_stream.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(copy_stream):
                        copy_kv(hk[:, :, :n], k, non_blocking=True)
                        copy_kv(hv[:, :, :n], v, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(copy_stream)
                    pending = (done, kbuf, vbuf)
                else:
                    copy_kv(hk[:, :, :n], k)
                    copy_kv(hv[:, :, :n], v)
                cache_layers.append(HostKVLayer(hk, hv, n, dev))
            else:
                cache_layers.append(ResidentKVLayer(kbuf, vbuf, n))
            del k, v, kbuf, vbuf
            last = li == num_layers - 1
            spans = [(n - 1, n)] if last else chunks
            for s, e in spans:
                xa = x[:, s:e]
                a = attn.o_proj(out[:, s:e])
                drop = getattr(layer, "resid_attn_dropout", None)
                xa += drop(a) if drop is not None else a
                hm = layer.mlp(layer.post_attention_layernorm(xa))
                drop = getattr(layer, "resid_mlp_dropout", None)
                xa += drop(hm) if drop is not None else hm
                del a, hm
            del out
            if time_layers:
                _sync(dev)
            layer_times.append(time.perf_counter() - tl)
            prog.update(1, note=f"layer {li + 1}/{num_layers}")
        logits = m.lm_head(m.norm(x[:, -1:]))[:, -1].float()
        del x
        if pending is not None:
            pending[0].synchronize()
            pending = None
    _sync(dev)  # the copy stream's last work was awaited through `pending` above
    seconds = time.perf_counter() - t0
    prog.close()
    peak = torch.cuda.max_memory_allocated(dev) if cuda else None
    return PrefillResult(
        cache=OffloadedKVCache(cache_layers),
        logits=logits,
        seq_len=n,
        memory=plan,
        seconds=seconds,
        peak_gpu_bytes=peak,
        layer_seconds=layer_times,
        attention_seconds=attn_times,
    )
