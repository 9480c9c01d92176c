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
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._pinned import HostBufferQueue, copy_kv, pinned_empty
from ._progress import Progress
from .generation import _sync, cache_kwarg
from .patching import UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel

logger = logging.getLogger("minference_hf")

#: Default tokens per chunk for the per-token parts of a layer (norms, projections, MLP).
DEFAULT_CHUNK_SIZE = 16384
#: Default spare capacity (tokens) allocated in every cache layer for decoding after pre-fill.
DEFAULT_RESERVE_TOKENS = 1024
_GIB = 1 << 30
#: GPU memory kept free by the automatic placement (allocator fragmentation, library workspaces).
_GPU_MARGIN = 3 * _GIB

_LAYER_CHILDREN = {
    "input_layernorm",
    "self_attn",
    "post_attention_layernorm",
    "mlp",
    "resid_attn_dropout",
    "resid_mlp_dropout",
}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm"}

OffloadSpec = bool | int | Literal["auto"]


# --------------------------------------------------------------------------------------------
# the cache


class _KVBuffer(CacheLayerMixin):
    """One layer's keys and values in preallocated ``[B, Hkv, capacity, D]`` buffers.

    ``keys`` / ``values`` are views of the filled part. Appending past the capacity reallocates
    with 50% headroom.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, keys_buf: torch.Tensor, values_buf: torch.Tensor, length: int) -> None:
        super().__init__()
        self._kbuf = keys_buf
        self._vbuf = values_buf
        self.length = int(length)
        self.is_initialized = True
        self._sync_views()

    def _sync_views(self) -> None:
        self.keys = self._kbuf[:, :, : self.length]
        self.values = self._vbuf[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return int(self._kbuf.shape[2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("an OffloadedKVCache layer is created filled by long_prefill")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Shorten the cache: ``crop(-k)`` removes the last ``k`` tokens (transformers 5);
        ``crop(n)`` with ``n > 0`` keeps the first ``n`` (the legacy absolute length); ``crop(0)``
        does nothing."""
        if tokens_to_remove == 0:
            return
        n = self.length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        self.length = max(0, min(self.length, n))
        self._sync_views()

    def _index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        pinned = self._kbuf.is_pinned()
        if pinned:  # earlier non-blocking copies into the old buffer must land first
            torch.cuda.synchronize()
        for name in ("_kbuf", "_vbuf"):
            new = fn(getattr(self, name))
            if pinned and not new.is_pinned():
                new = pinned_empty(tuple(new.shape), new.dtype).copy_(new)
            setattr(self, name, new)
        self._sync_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        self._index_batch(lambda b: b.index_select(0, beam_idx.to(b.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch entry ``repeats`` times (beam search / contrastive search expansion)."""
        self._index_batch(lambda b: b.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch entries ``indices``."""
        self._index_batch(
            lambda b: b[indices.to(b.device) if torch.is_tensor(indices) else indices]
        )

    def reset(self) -> None:
        self.length = 0
        self._sync_views()

    def offload(self) -> None:  # placement is fixed at pre-fill
        pass

    def prefetch(self) -> None:
        pass

    def _grow(self, needed: int) -> None:
        cap = max(needed, self.capacity + self.capacity // 2)
        pinned = self._kbuf.is_pinned()
        if pinned:  # earlier non-blocking copies into the old buffer must land first
            torch.cuda.synchronize()
        for name in ("_kbuf", "_vbuf"):
            old = getattr(self, name)
            shape = (*old.shape[:2], cap, old.shape[3])
            new = (
                pinned_empty(shape, old.dtype)
                if pinned
                else torch.empty(shape, dtype=old.dtype, device=old.device)
            )
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n = key_states.shape[2]
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        nb = self._kbuf.is_pinned() and key_states.is_cuda
        copy_kv(self._kbuf[:, :, self.length : self.length + n], key_states, nb)
        copy_kv(self._vbuf[:, :, self.length : self.length + n], value_states, nb)
        self.length += n
        self._sync_views()


class ResidentKVLayer(_KVBuffer):
    """A cache layer that lives on the compute device; decode writes in place (no re-allocation)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._append(key_states, value_states)
        return self.keys, self.values


class HostKVLayer(_KVBuffer):
    """A cache layer held in (pinned) host memory and streamed to ``device`` when it is used."""

    def __init__(
        self,
        keys_buf: torch.Tensor,
        values_buf: torch.Tensor,
        length: int,
        device: torch.device,
    ) -> None:
        super().__init__(keys_buf, values_buf, length)
        self.device = torch.device(device)
        self._fetched: tuple[torch.Tensor, torch.Tensor] | None = None

    def prefetch(self) -> None:
        """Start copying the filled part to ``device`` (on the caller's current stream)."""
        if self._fetched is None:
            nb = self._kbuf.is_pinned()
            self._fetched = tuple(  # type: ignore[assignment]
                copy_kv(torch.empty(t.shape, dtype=t.dtype, device=self.device), t, nb)
                for t in (self.keys, self.values)
            )

    def _index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._fetched = None  # a prefetched copy has the old batch order
        super()._index_batch(fn)

    def crop(self, tokens_to_remove: int) -> None:
        self._fetched = None  # a prefetched copy has the old length
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        self._fetched = None
        super().reset()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        assert self._fetched is not None
        k_old, v_old = self._fetched
        self._fetched = None
        k = torch.cat([k_old, key_states.to(k_old.dtype)], dim=2)
        v = torch.cat([v_old, value_states.to(v_old.dtype)], dim=2)
        self._append(key_states, value_states)
        return k, v


class OffloadedKVCache(Cache):
    """KV cache made by :func:`long_prefill`: each layer resident on the GPU or in pinned host memory.

    A regular transformers ``Cache`` (``get_seq_length``, ``get_mask_sizes``, ``crop`` ...): pass it
    to ``model(...)`` or ``model.generate(..., past_key_values=cache)``. Host layers are fetched to
    the GPU for each decode step; the next host layer is prefetched on a side stream while the
    current layer computes (the same scheme as transformers' own offloaded cache).

    Attributes:
        offloaded: indices of the layers held in host memory.
    """

    def __init__(self, layers: list[_KVBuffer]) -> None:
        super().__init__(layers=list(layers))
        self.offloaded = tuple(i for i, ly in enumerate(layers) if isinstance(ly, HostKVLayer))
        dev = next((ly.device for ly in layers if isinstance(ly, HostKVLayer)), None)
        self._stream = (
            torch.cuda.Stream(device=dev) if dev is not None and dev.type == "cuda" else None
        )

    def _next_offloaded(self, layer_idx: int) -> int | None:
        if not self.offloaded:
            return None
        later = [i for i in self.offloaded if i > layer_idx]
        return later[0] if later else self.offloaded[0]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if isinstance(layer, HostKVLayer) and self._stream is not None:
            cur = torch.cuda.current_stream(key_states.device)
            cur.wait_stream(self._stream)  # this layer's prefetch has landed
            self._stream.wait_stream(cur)  # the next prefetch may reuse memory read so far
            nxt = self._next_offloaded(layer_idx)
            if nxt is not None and nxt != layer_idx:
                with torch.cuda.stream(self._stream):
                    self.layers[nxt].prefetch()
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory held by the offloaded layers (capacity included)."""
        return sum(
            ly._kbuf.numel() * ly._kbuf.element_size() * 2
            for ly in self.layers
            if isinstance(ly, HostKVLayer)
        )


# --------------------------------------------------------------------------------------------
# model structure


@dataclass
class _Model:
    embed: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    rotary: torch.nn.Module
    lm_head: torch.nn.Module
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def _fail(msg: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"long_prefill: {msg}")


def _inspect(model: torch.nn.Module) -> _Model:
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise _fail(
            f"{type(model).__name__} has no `model.layers` decoder stack; supported: causal LMs "
            "of the Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3)"
        )
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if getattr(base, name, None) is None:
            raise _fail(f"{type(base).__name__} has no `{name}`")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise _fail(f"{type(model).__name__} has no `lm_head` (pass the *ForCausalLM model)")
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    for attr, what in (
        ("final_logit_softcapping", "final logit soft-capping"),
        ("attn_logit_softcapping", "attention logit soft-capping"),
        ("logit_scale", "a logit scale"),
    ):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise _fail(f"{type(model).__name__} uses {what} ({attr}), which it does not apply")
    layers = list(base.layers)
    for i, layer in enumerate(layers):
        extra = {n for n, _ in layer.named_children()} - _LAYER_CHILDREN
        if extra:
            raise _fail(
                f"decoder layer {i} ({type(layer).__name__}) has submodules {sorted(extra)} beyond "
                "the Llama layout (input_layernorm, self_attn, post_attention_layernorm, mlp)"
            )
        for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if getattr(layer, n, None) is None:
                raise _fail(f"decoder layer {i} ({type(layer).__name__}) has no `{n}`")
        attn = layer.self_attn
        extra = {n for n, _ in attn.named_children()} - _ATTN_CHILDREN
        if extra:
            raise _fail(
                f"attention of layer {i} ({type(attn).__name__}) has submodules {sorted(extra)} "
                "beyond q/k/v/o projections and q/k norms"
            )
        if getattr(attn, "qkv_proj", None) is None and not all(
            getattr(attn, n, None) is not None for n in ("q_proj", "k_proj", "v_proj")
        ):
            raise _fail(f"attention of layer {i} has neither q/k/v_proj nor qkv_proj")
        if getattr(attn, "o_proj", None) is None:
            raise _fail(f"attention of layer {i} has no o_proj")
        if not hasattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb"):
            raise _fail(f"{type(attn).__module__} defines no apply_rotary_pos_emb")
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    head_dim = int(getattr(layers[0].self_attn, "head_dim", cfg.hidden_size // hq))
    return _Model(
        embed=base.embed_tokens,
        layers=layers,
        norm=base.norm,
        rotary=base.rotary_emb,
        lm_head=lm_head,
        hidden=int(cfg.hidden_size),
        num_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        intermediate=int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
        vocab=int(cfg.vocab_size),
    )


def _check_window(attn: torch.nn.Module, config: Any, layer: int, n: int) -> None:
    # Qwen2 sets the window per attention module (None on full-attention layers); Mistral and
    # Phi-3 keep it in the config only
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < n:
        raise _fail(
            f"layer {layer} uses sliding-window attention (window {window} < {n} tokens); "
            "long_prefill computes full causal attention only"
        )


# --------------------------------------------------------------------------------------------
# memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of :func:`long_prefill` (bytes; see the module docstring for the model).

    Attributes:
        seq_len / batch: prompt shape.
        num_layers: decoder layers ``L``.
        gpu_kv_layers: layers whose cache stays on the compute device (``G``).
        weights: parameter bytes on the compute device.
        kv_per_layer: keys + values of one layer for ``seq_len`` tokens (capacity included).
        activations: full-length tensors alive during a layer (residual, q, k, v, output) plus the
            sparse kernels' workspace.
        chunk: temporaries of one chunk (norm in float32, MLP intermediate, projections).
        standard_forward: peak of a plain ``model(...)`` pre-fill (whole cache on the device, the
            MLP on all tokens at once, logits of the last position only), for comparison.
    """

    seq_len: int
    batch: int
    num_layers: int
    gpu_kv_layers: int
    weights: int
    kv_per_layer: int
    activations: int
    chunk: int
    standard_forward: int

    @property
    def gpu_peak(self) -> int:
        """Predicted peak bytes on the compute device."""
        return self.weights + self.activations + self.chunk + self.gpu_kv_layers * self.kv_per_layer

    @property
    def host_kv(self) -> int:
        """Bytes of pinned host memory for the offloaded cache layers."""
        return (self.num_layers - self.gpu_kv_layers) * self.kv_per_layer

    def summary(self) -> str:
        g = lambda b: f"{b / _GIB:.1f} GiB"
        return (
            f"{self.seq_len} tokens: GPU peak ~{g(self.gpu_peak)} (weights {g(self.weights)}, "
            f"activations {g(self.activations + self.chunk)}, KV {self.gpu_kv_layers}/"
            f"{self.num_layers} layers {g(self.gpu_kv_layers * self.kv_per_layer)}); host KV "
            f"{g(self.host_kv)}; plain forward would need ~{g(self.standard_forward)}"
        )


def _param_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def estimate_memory(
    model: PreTrainedModel,
    seq_len: int,
    *,
    batch: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    gpu_kv_layers: int | None = None,
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
) -> MemoryEstimate:
    """Predict the memory of :func:`long_prefill` for a ``[batch, seq_len]`` prompt.

    Args:
        model: a supported causal LM (see the module docstring).
        seq_len: prompt tokens ``N``.
        batch: ``B``.
        chunk_size: ``C``.
        gpu_kv_layers: cache layers kept on the device (``None``: all).
        reserve_tokens: spare cache capacity for decoding.
    """
    m = _inspect(model)
    s = next(model.parameters()).element_size()
    n, b = int(seq_len), int(batch)
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    c = min(int(chunk_size), n)
    kv_layer = 2 * b * (n + reserve_tokens) * kv * s
    # residual + q + out + k + v; the coverage byte per head and key; estimator scratch (VS scores,
    # or block-sparse pooled q/k: ~8 bytes per head and token either way; block scores are chunked,
    # estimate.BLOCK_SCORE_CHUNK_BYTES) + the RoPE tables (the kernels' NaN scan of q runs in 64 MiB
    # slices: inside the margin)
    act = b * n * s * (m.hidden + 2 * q + 2 * kv) + b * m.num_heads * n * (1 + 8)
    act += 2 * b * n * m.head_dim * s
    chunk = b * c * (4 * m.hidden * 4 + 3 * m.intermediate * s + (q + 2 * kv) * s)
    chunk += b * m.vocab * 4
    layers = len(m.layers)
    g = layers if gpu_kv_layers is None else max(0, min(layers, int(gpu_kv_layers)))
    weights = _param_bytes(model)
    # plain forward: hidden states x3, q/k/v/out, the MLP's three intermediates, the whole cache
    std = weights + b * n * s * (3 * m.hidden + 2 * q + 2 * kv + 3 * m.intermediate)
    std += layers * 2 * b * n * kv * s + b * n * m.hidden * 4
    return MemoryEstimate(
        seq_len=n,
        batch=b,
        num_layers=layers,
        gpu_kv_layers=g,
        weights=weights,
        kv_per_layer=kv_layer,
        activations=act,
        chunk=chunk,
        standard_forward=std,
    )


def _host_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _device_budget(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def plan_offload(
    model: PreTrainedModel,
    seq_len: int,
    *,
    batch: int = 1,
    offload_kv: OffloadSpec = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
    device_budget: int | None = None,
) -> MemoryEstimate:
    """Decide how many cache layers stay on the device and check that the plan fits.

    Args:
        offload_kv: ``False`` keep every layer on the device; ``True`` offload every layer;
            an ``int`` offload that many layers (the last ones); ``"auto"`` offload the fewest
            layers that make the predicted peak fit ``device_budget``.
        device_budget: bytes the run may use on the device (default: free CUDA memory plus the
            allocator's cached blocks, minus a 3 GiB margin; no limit on CPU).

    Raises:
        MemoryError: the activations alone do not fit the budget, or the offloaded layers need
            more host memory than is available.
        ValueError: a bad ``offload_kv``.
    """
    est = estimate_memory(
        model, seq_len, batch=batch, chunk_size=chunk_size, reserve_tokens=reserve_tokens
    )
    layers = est.num_layers
    dev = next(model.parameters()).device
    if device_budget is None:
        avail = _device_budget(dev)
        if avail is not None:  # margin: 3 GiB or 4% of the card, whichever is larger
            total = torch.cuda.get_device_properties(dev).total_memory
            avail -= max(_GPU_MARGIN, total // 25)
        device_budget = None if avail is None else avail + est.weights
    if isinstance(offload_kv, bool):
        g = 0 if offload_kv else layers
    elif isinstance(offload_kv, int):
        if not 0 <= offload_kv <= layers:
            raise ValueError(
                f"offload_kv={offload_kv} must be in [0, {layers}] (layers to offload)"
            )
        g = layers - offload_kv
    elif offload_kv == "auto":
        if device_budget is None:
            g = layers
        else:
            room = device_budget - (est.weights + est.activations + est.chunk)
            g = max(0, min(layers, room // est.kv_per_layer))
    else:
        raise ValueError(f"offload_kv must be True, False, 'auto' or an int, got {offload_kv!r}")
    est = estimate_memory(
        model,
        seq_len,
        batch=batch,
        chunk_size=chunk_size,
        gpu_kv_layers=int(g),
        reserve_tokens=reserve_tokens,
    )
    if device_budget is not None and est.weights + est.activations + est.chunk > device_budget:
        raise MemoryError(
            f"long_prefill of {seq_len} tokens needs ~{(est.activations + est.chunk) / _GIB:.1f} GiB "
            f"of activations besides {est.weights / _GIB:.1f} GiB of weights, but only "
            f"{device_budget / _GIB:.1f} GiB are available on {dev}; use a shorter prompt, a smaller "
            "chunk_size or a GPU with more memory"
        )
    host = _host_available()
    if dev.type == "cuda" and host is not None and est.host_kv > 0.9 * host:
        raise MemoryError(
            f"offloading {layers - est.gpu_kv_layers} cache layers needs {est.host_kv / _GIB:.1f} GiB "
            f"of pinned host memory but only {host / _GIB:.1f} GiB are free"
        )
    return est


# --------------------------------------------------------------------------------------------
# the pre-fill


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
    attn: torch.nn.Module, h: torch.Tensor, m: _Model
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
    dev = m.embed.weight.device
    if input_ids.device != dev:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {dev}")
    vocab_hi = int(input_ids.max())
    if int(input_ids.min()) < 0 or vocab_hi >= m.embed.weight.shape[0]:
        raise ValueError(f"input_ids out of range [0, {m.embed.weight.shape[0]})")
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
    dtype = m.embed.weight.dtype
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


def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    offload_kv: OffloadSpec = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` with the pre-fill done by :func:`long_prefill`.

    Pre-fills the first ``N - 1`` prompt tokens layer by layer (cache offloaded as asked), then
    hands the cache to ``model.generate``, which processes the last prompt token and decodes.
    Extra keyword arguments go to ``model.generate`` (``max_new_tokens``, ``do_sample`` ...).

    Args:
        input_ids: ``[B, N]`` prompt ids (no padding), ``N >= 2``.

    Returns:
        ``[B, N + new]`` ids, like ``model.generate``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, N] with N >= 2, got {tuple(input_ids.shape)}")
    if "past_key_values" in generate_kwargs or "cache" in generate_kwargs:
        raise ValueError("generate() makes the cache itself; do not pass past_key_values")
    for key in ("prompt_lookup_num_tokens", "assistant_model", "assistant_early_exit"):
        if generate_kwargs.get(key) is not None:
            raise ValueError(
                f"generate_long does not support {key} (assisted / prompt-lookup decoding re-feeds "
                "the whole prompt on its first step, ignoring the pre-filled cache)"
            )
    max_new = int(generate_kwargs.get("max_new_tokens") or DEFAULT_RESERVE_TOKENS)
    res = long_prefill(
        model,
        input_ids[:, :-1],
        offload_kv=offload_kv,
        chunk_size=chunk_size,
        reserve_tokens=max_new + 1,
        progress=progress,
    )
    # generate() expands the prompt to B x num_beams (or x num_return_sequences) rows but not a
    # cache passed in: expand the cache the same way
    gc = generate_kwargs.get("generation_config") or model.generation_config
    expand = max(
        int(generate_kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1),
        int(
            generate_kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
        ),
    )
    if expand > 1:
        res.cache.batch_repeat_interleave(expand)
    return model.generate(input_ids, **{cache_kwarg(model): res.cache}, **generate_kwargs)
