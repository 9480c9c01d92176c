"""Memory planning of the layer-by-layer pre-fill: what a prompt needs on the GPU and in pinned host
memory (:func:`estimate_memory`), and which cache layers to offload (:func:`plan_offload`).
The memory model is in :mod:`minference_hf.layerwise`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .inspection import _inspect

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Default tokens per chunk for the per-token parts of a layer (norms, projections, MLP).
DEFAULT_CHUNK_SIZE = 16384
#: Default spare capacity (tokens) allocated in every cache layer for decoding after pre-fill.
DEFAULT_RESERVE_TOKENS = 1024
_GIB = 1 << 30
#: GPU memory kept free by the automatic placement (allocator fragmentation, library workspaces).
_GPU_MARGIN = 3 * _GIB

OffloadSpec = bool | int | Literal["auto"]


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
