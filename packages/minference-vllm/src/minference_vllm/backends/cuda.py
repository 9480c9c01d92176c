"""vLLM's FlashAttention backend (``FLASH_ATTN``) with sparse pre-fill, for CUDA GPUs.

:class:`MInferenceFlashAttentionBackend` fills the registry's ``CUSTOM`` slot (opt in with
``--attention-backend CUSTOM``); :class:`MInferenceFlashAttentionDefaultBackend` keeps the name
``FLASH_ATTN`` and replaces the default entry when ``MINFERENCE_VLLM_REPLACE_DEFAULT=1``. Sparse
requests run the Triton kernels of ``minference_kernels``; everything else runs FlashAttention.
"""

from __future__ import annotations

from typing import Any

from .. import _compat as compat
from .._sparse import SparseBuilderMixin, SparseImplMixin

_Backend, _Impl, _Builder = compat.flash_attention_classes()

__all__ = [
    "MInferenceFlashAttentionBackend",
    "MInferenceFlashAttentionDefaultBackend",
    "MInferenceFlashAttentionImpl",
    "MInferenceFlashAttentionMetadataBuilder",
]


class MInferenceFlashAttentionMetadataBuilder(SparseBuilderMixin, _Builder):  # type: ignore[misc, valid-type]
    """FlashAttention's builder that also plans the sparse pre-fill requests.

    CUDA graphs are limited to pure decode batches: a graph replayed for a mixed batch would run
    the captured dense kernel instead of the sparse path. For the same reason the per-group block
    table update shortcut is disabled (it would receive a :class:`~minference_vllm._sparse.SparseBatch`).
    """

    supports_update_block_table: bool = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> Any:
        parent = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        cap = compat.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return parent if parent.value <= cap.value else cap


class MInferenceFlashAttentionImpl(SparseImplMixin, _Impl):  # type: ignore[misc, valid-type]
    """FlashAttention's impl that runs long pre-fill chunks through ``minference_kernels``."""


class MInferenceFlashAttentionBackend(_Backend):  # type: ignore[misc, valid-type]
    """FlashAttention with sparse pre-fill, in the ``CUSTOM`` registry slot."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[MInferenceFlashAttentionImpl]:
        return MInferenceFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MInferenceFlashAttentionMetadataBuilder]:
        return MInferenceFlashAttentionMetadataBuilder


class MInferenceFlashAttentionDefaultBackend(MInferenceFlashAttentionBackend):
    """The same backend under the name ``FLASH_ATTN``, to replace the default entry."""

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"
