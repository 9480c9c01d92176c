"""Every contact with vLLM's code lives here, so a moved class or renamed field breaks in one place.

Tested against the vLLM versions in :data:`SUPPORTED_VLLM`; see ``docs/guides/vllm.md``. Importing
this module imports vLLM. Nothing else in the package does so at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import vllm
from minference_patterns.model_shape import ModelShape, read_model_shape
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from .settings import PluginSettings, resolve_settings

__all__ = [
    "DECODER",
    "SUPPORTED_VLLM",
    "AttentionCGSupport",
    "CommonAttentionMetadata",
    "VllmConfig",
    "block_table_row",
    "cpu_attention_classes",
    "current_vllm_config",
    "flash_attention_classes",
    "model_shape",
    "platform_name",
    "plugin_settings",
    "register",
    "request_lengths",
    "select_requests",
    "tensor_parallel",
    "unsupported_parallelism",
    "vllm_version",
]

#: Lowest tested version (inclusive) and first untested version (exclusive).
SUPPORTED_VLLM: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 32), (0, 33))

#: ``attn_type`` of decoder self-attention.
DECODER: str = AttentionType.DECODER


def vllm_version() -> str:
    """The installed vLLM version string."""
    return str(vllm.__version__)


def platform_name() -> str:
    """``"cpu"``, ``"cuda"`` or another platform's device type (``"rocm"``, ``"xpu"``, ...)."""
    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    return str(getattr(current_platform, "device_type", "unknown"))


def register(slot: str, class_path: str) -> None:
    """Point the attention backend registry entry ``slot`` (e.g. ``CUSTOM``) at ``class_path``."""
    register_backend(AttentionBackendEnum[slot], class_path)


def registered_path(slot: str) -> str:
    """The class path the registry currently resolves ``slot`` to."""
    return AttentionBackendEnum[slot].get_path()


def clear_registration(slot: str) -> None:
    """Drop an override (tests)."""
    AttentionBackendEnum[slot].clear_override()


def cpu_attention_classes() -> tuple[type, type, type]:
    """``(backend, impl, metadata builder)`` of vLLM's CPU attention (``CPU_ATTN``)."""
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )

    return CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder


def flash_attention_classes() -> tuple[type, type, type]:
    """``(backend, impl, metadata builder)`` of vLLM's FlashAttention backend (``FLASH_ATTN``)."""
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    return FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder


def current_vllm_config() -> VllmConfig:
    """The engine configuration of the model being built."""
    return get_current_vllm_config()


def plugin_settings(vllm_config: VllmConfig) -> PluginSettings | None:
    """The plugin's settings for this engine, ``None`` when MInference is not configured."""
    return resolve_settings(getattr(vllm_config, "additional_config", None) or {})


def model_shape(vllm_config: VllmConfig) -> ModelShape:
    """Layers, heads, KV heads and head size of the whole (unsplit) model.

    Read from the model's transformers config by :func:`minference_patterns.read_model_shape`
    (the reader minference-hf uses), and checked against vLLM's own reading of the KV heads and
    head size, which its attention layers are built with: a model whose config the two read
    differently is refused rather than checked against the wrong shape.
    """
    model_config = vllm_config.model_config
    try:
        shape = read_model_shape(model_config.hf_text_config)
    except ValueError as exc:
        raise ValueError(f"minference: cannot read the model's attention shape: {exc}") from exc
    vllm_kv = int(model_config.get_total_num_kv_heads())
    vllm_head = int(model_config.get_head_size())
    if (shape.num_kv_heads, shape.head_dim) != (vllm_kv, vllm_head):
        raise ValueError(
            "minference: the model config reads as "
            f"num_kv_heads={shape.num_kv_heads}, head_dim={shape.head_dim}, but vLLM builds its "
            f"attention with num_kv_heads={vllm_kv}, head_dim={vllm_head}; this model's config "
            "layout is not supported by the sparse pre-fill"
        )
    return shape


def tensor_parallel() -> tuple[int, int]:
    """``(world size, rank)`` of this worker's tensor-parallel group."""
    return get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()


def unsupported_parallelism(vllm_config: VllmConfig) -> list[str]:
    """Parallel modes that split a request's KV cache across ranks (the sparse path needs it whole)."""
    parallel = vllm_config.parallel_config
    reasons = []
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, name, 1) or 1
        if size > 1:
            reasons.append(f"{name}={size}")
    return reasons


def request_lengths(
    common: CommonAttentionMetadata,
) -> tuple[list[int], list[int]] | None:
    """``(query_start_loc, seq_lens)`` of a batch as Python lists, without a device sync.

    ``seq_lens`` counts every token of a request up to the end of this step's chunk. Returns
    ``None`` for batches the sparse path never handles (non-causal or per-token causality).
    """
    if common.causal is not True:
        return None
    starts = common.query_start_loc_cpu[: common.num_reqs + 1].tolist()
    upper = common.seq_lens_cpu_upper_bound
    # The upper bound is exact for pre-fill rows (the only rows the sparse path takes).
    seq_lens = upper if upper is not None else common.seq_lens.cpu()
    return starts, seq_lens[: common.num_reqs].tolist()


def block_table_row(common: CommonAttentionMetadata, req: int) -> torch.Tensor:
    """Block ids of request ``req`` (on the cache's device)."""
    return common.block_table_tensor[req]


# Fields of CommonAttentionMetadata: how to restrict each to a subset of the requests.
_PER_REQUEST = ("seq_lens", "block_table_tensor", "is_prefilling", "seq_lens_cpu_upper_bound")
_PER_TOKEN = ("slot_mapping", "positions")
_HANDLED = {
    "query_start_loc",
    "query_start_loc_cpu",
    "num_reqs",
    "num_actual_tokens",
    "max_query_len",
    "max_seq_len",
    "causal",
    "req_idx",
    *_PER_REQUEST,
    *_PER_TOKEN,
}
_DROPPED = {
    "logits_indices_padded",
    "num_logits_indices",
    "max_logits_per_req",
    "_num_computed_tokens_cache",
    "_token_to_req_indices_cache",
}


def select_requests(
    common: CommonAttentionMetadata, rows: Sequence[int]
) -> tuple[CommonAttentionMetadata, slice | torch.Tensor] | None:
    """The batch metadata restricted to requests ``rows`` (ascending), and their token selector.

    The selector is a ``slice`` when the requests' tokens are contiguous, else an index tensor.
    Returns ``None`` when the batch carries a field this function does not know how to restrict
    (a newer vLLM, or a feature such as encoder-decoder or context parallelism); the caller then
    runs the whole batch densely.
    """
    for f in dataclasses.fields(common):
        if f.name in _HANDLED or f.name in _DROPPED:
            continue
        if getattr(common, f.name) is not None:
            return None
    qsl = common.query_start_loc_cpu
    starts = [int(qsl[r]) for r in rows]
    ends = [int(qsl[r + 1]) for r in rows]
    lens = [e - s for s, e in zip(starts, ends)]
    cum = [0]
    for n in lens:
        cum.append(cum[-1] + n)
    device = common.query_start_loc.device
    new_qsl_cpu = torch.tensor(cum, dtype=qsl.dtype)
    contiguous = all(ends[i] == starts[i + 1] for i in range(len(rows) - 1))
    if contiguous:
        tokens: slice | torch.Tensor = slice(starts[0], ends[-1])
    else:
        tokens = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends)]).to(device)
    index = torch.tensor(list(rows), dtype=torch.int64)

    def per_request(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[index.to(x.device)]
        return x[list(rows)]  # numpy

    changes: dict[str, Any] = {
        "query_start_loc": new_qsl_cpu.to(device, non_blocking=True),
        "query_start_loc_cpu": new_qsl_cpu,
        "num_reqs": len(rows),
        "num_actual_tokens": cum[-1],
        "max_query_len": max(lens),
        "max_seq_len": common.max_seq_len,
        "req_idx": per_request(common.req_idx),
    }
    for name in _PER_REQUEST:
        changes[name] = per_request(getattr(common, name))
    for name in _PER_TOKEN:
        val = getattr(common, name)
        changes[name] = None if val is None else val[tokens]
    for name in _DROPPED:
        if hasattr(common, name):
            changes[name] = None
    return dataclasses.replace(common, **changes), tokens
