"""Exact-size page-locked host buffers for offloaded KV-cache layers.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds
every request up to a power of two and keeps the block for reuse: one 1M-token cache tensor of an
8B model (2 GiB + the decode reserve) then pins 4 GiB, so offloading 12 layers pins 96 GiB instead
of 48 and the pinning itself (the kernel faulting and locking every page) runs on the pre-fill's
critical path.

:func:`pinned_empty` maps exactly the bytes asked for (anonymous ``mmap``, page aligned), touches
the pages with PyTorch's multi-threaded ``zero_`` and registers the range with
``cudaHostRegister``; the registration is dropped when the last tensor viewing the memory dies.
:class:`HostBufferQueue` makes these buffers on a worker thread, in the order the pre-fill needs
them, so the work overlaps the GPU computing the layers before.
"""

from __future__ import annotations

import logging
import math
import mmap
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

logger = logging.getLogger("minference_hf")

_warned = False


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the process is exiting anyway
        pass


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of exactly ``shape`` in page-locked (pinned) memory.

    Falls back to ``torch.empty(..., pin_memory=True)`` with a log line if the registration fails
    (for example a container's locked-memory limit).
    """
    global _warned
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * elem
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
    raw.zero_()  # fault the pages in on all intra-op threads; registering them is then cheaper
    cudart = torch.cuda.cudart()
    rc = cudart.cudaHostRegister(raw.data_ptr(), nbytes, 0)
    if rc != cudart.cudaError.success:
        if not _warned:
            logger.warning(
                "cudaHostRegister of %.1f GiB failed (%s); falling back to PyTorch's pinned "
                "allocator, which rounds each buffer up to a power of two",
                nbytes / 2**30,
                cudart.cudaGetErrorString(rc),
            )
            _warned = True
        del raw
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    # the mmap object outlives every view (the storage holds it); unregister before it unmaps
    weakref.finalize(mm, _unregister, raw.data_ptr())
    return raw.view(dtype).view(shape)


def copy_kv(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``dst.copy_(src)`` for ``[B, H, N, D]`` cache views, one ``[N, D]`` block per batch and head.

    A cache layer's filled part (``buf[:, :, :n]`` of a ``[B, H, capacity, D]`` buffer) is not
    contiguous. PyTorch copies a non-contiguous tensor between devices through a contiguous
    temporary in pageable host memory, synchronously, followed by a strided CPU copy: seconds for
    a 2 GiB layer. Each ``[N, D]`` block is contiguous on both sides, so copying block by block
    is a plain DMA at the link's rate, asynchronous with ``non_blocking`` and pinned memory.
    """
    if dst.shape != src.shape or dst.dim() != 4:
        raise ValueError(f"copy_kv needs equal [B, H, N, D] shapes, got {dst.shape} <- {src.shape}")
    if dst.is_contiguous() and src.is_contiguous():
        return dst.copy_(src, non_blocking=non_blocking)
    for b in range(dst.shape[0]):
        for h in range(dst.shape[1]):
            dst[b, h].copy_(src[b, h], non_blocking=non_blocking)
    return dst


class HostBufferQueue:
    """Allocates ``(keys, values)`` host buffers for a list of layers on a worker thread.

    All pairs are queued at once, in the order given (the caller has checked that they fit in
    host memory), so the worker pins ahead for as long as the GPU computes; ``get(layer)`` blocks
    until that layer's pair exists. :meth:`close` (or leaving the ``with`` block) cancels what has
    not started and waits for the worker.

    Args:
        layers: the layer indices, in the order :meth:`get` will ask for them.
        shape: each buffer's shape (``[B, Hkv, capacity, D]``).
        dtype: the buffers' dtype.
        alloc: ``(shape, dtype) -> tensor``; :func:`pinned_empty` on CUDA.
    """

    def __init__(
        self,
        layers: list[int],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = pinned_empty,
    ) -> None:
        self._shape, self._dtype, self._alloc = tuple(shape), dtype, alloc
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minference-pin")
        self._futures: dict[int, Future] = {li: self._pool.submit(self._pair) for li in layers}

    def _pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._alloc(self._shape, self._dtype), self._alloc(self._shape, self._dtype)

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers for ``layer`` (waits for the worker if they are not ready yet)."""
        if layer not in self._futures:
            raise KeyError(f"layer {layer} was not queued or was already taken")
        return self._futures.pop(layer).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()

    def __enter__(self) -> HostBufferQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
