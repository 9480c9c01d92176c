"""The KV cache that :func:`~minference_hf.long_prefill` fills: one preallocated buffer per layer,
either resident on the GPU or in pinned host memory and streamed back for each decode step
(:class:`OffloadedKVCache`, a regular transformers ``Cache``), and the model's cache helpers."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._pinned import copy_kv, pinned_empty

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel


class _KVBuffer(CacheLayerMixin):
    """One layer's keys and values in preallocated ``[B, Hkv, capacity, D]`` buffers.

    ``keys`` / ``values`` are views of the filled part. Appending past the capacity reallocates
    with 50% headroom.
    """

    is_sliding = False
    is_croppable = True
    # views of the filled part, set from the start (transformers' layers may have them None)
    keys: torch.Tensor
    values: torch.Tensor

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
            k, v = self.keys, self.values
            self._fetched = (
                copy_kv(torch.empty(k.shape, dtype=k.dtype, device=self.device), k, nb),
                copy_kv(torch.empty(v.shape, dtype=v.dtype, device=self.device), v, nb),
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
        assert isinstance(layer, _KVBuffer)  # __init__ takes only these; none are added later
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_kwarg(model: PreTrainedModel) -> str:
    """Name of the KV-cache argument of ``model.forward`` (``cache`` in newer transformers,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: PreTrainedModel) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
