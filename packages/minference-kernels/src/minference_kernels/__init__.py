"""minference-kernels: sparse attention for long-context pre-fill.

Vertical-slash, block-sparse and A-shape attention with online index estimation; Triton kernels on
CUDA, a PyTorch path on CPU. Importing this package loads no Triton kernel and touches no device.
See :mod:`minference_kernels.api` for the layout and conventions.
"""

from __future__ import annotations

from .__about__ import __version__ as __version__
from ._validate import check_softcap
from .api import (
    block_sparse_attention,
    build_index,
    dense_attention,
    estimate_block_sparse,
    estimate_vertical_slash,
    index_density,
    sparse_prefill,
    sparse_prefill_mask,
    streaming_attention,
    vertical_slash_attention,
)
from .index import BLOCK, SparseIndex
from .masks import block_sparse_mask, dense_mask, streaming_mask, vertical_slash_mask
from .options import PrefillOptions
from .patterns import KINDS, HeadPattern, PatternKind
from .varlen import sparse_prefill_varlen

__all__ = [
    "BLOCK",
    "KINDS",
    "HeadPattern",
    "PatternKind",
    "PrefillOptions",
    "SparseIndex",
    "block_sparse_attention",
    "block_sparse_mask",
    "build_index",
    "check_softcap",
    "dense_attention",
    "dense_mask",
    "estimate_block_sparse",
    "estimate_vertical_slash",
    "index_density",
    "sparse_prefill",
    "sparse_prefill_mask",
    "sparse_prefill_varlen",
    "streaming_attention",
    "streaming_mask",
    "vertical_slash_attention",
    "vertical_slash_mask",
]
