"""vLLM's CPU attention (``CPU_ATTN``) with sparse pre-fill.

vLLM always selects ``CPU_ATTN`` on CPU, so the plugin points that registry entry here. Without a
MInference config every call goes straight to the parent classes.
"""

from __future__ import annotations

from .. import _compat as compat
from .._sparse import SparseBuilderMixin, SparseImplMixin

_Backend, _Impl, _Builder = compat.cpu_attention_classes()

__all__ = [
    "MInferenceCPUAttentionBackend",
    "MInferenceCPUAttentionImpl",
    "MInferenceCPUMetadataBuilder",
]


class MInferenceCPUMetadataBuilder(SparseBuilderMixin, _Builder):  # type: ignore[misc, valid-type]
    """``CPU_ATTN``'s metadata builder that also plans the sparse pre-fill requests."""


class MInferenceCPUAttentionImpl(SparseImplMixin, _Impl):  # type: ignore[misc, valid-type]
    """``CPU_ATTN``'s impl that runs long pre-fill chunks through ``minference_kernels``."""


class MInferenceCPUAttentionBackend(_Backend):  # type: ignore[misc, valid-type]
    """``CPU_ATTN`` with sparse pre-fill (keeps the name ``CPU_ATTN``: it replaces that entry)."""

    @staticmethod
    def get_impl_cls() -> type[MInferenceCPUAttentionImpl]:
        return MInferenceCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MInferenceCPUMetadataBuilder]:
        return MInferenceCPUMetadataBuilder
