"""minference-hf: MInference sparse pre-fill for HuggingFace transformers models.

Plugs in through transformers' own extension points (``AttentionInterface`` and
``AttentionMaskInterface``) instead of replacing any model's forward::

    import minference_hf
    model = minference_hf.patch(model, config="meta-llama/Llama-3.1-8B-Instruct")
    ...  # long prompts pre-fill sparse, decode steps and short prompts run dense SDPA
    minference_hf.unpatch(model)

Importing this package registers nothing and loads no model; :func:`register` (called by
:func:`patch`) does the registration.
"""

from __future__ import annotations

from .__about__ import __version__ as __version__
from .attention import UnsupportedAttentionError
from .caches import OffloadedKVCache
from .capture import CapturedLayer, capture_qkv, search_model_config
from .generation import generate_long
from .layerwise import PrefillResult, long_prefill
from .memory import MemoryEstimate, estimate_memory, plan_offload
from .patching import UnsupportedModelError, get_plan, patch, register, unpatch
from .plan import (
    DEFAULT_MIN_SPARSE_LEN,
    DEFAULT_MIN_SPARSE_QUERY,
    AttentionStats,
    SparsePrefillPlan,
)

__all__ = [
    "DEFAULT_MIN_SPARSE_LEN",
    "DEFAULT_MIN_SPARSE_QUERY",
    "AttentionStats",
    "CapturedLayer",
    "MemoryEstimate",
    "OffloadedKVCache",
    "PrefillResult",
    "SparsePrefillPlan",
    "UnsupportedAttentionError",
    "UnsupportedModelError",
    "capture_qkv",
    "estimate_memory",
    "generate_long",
    "get_plan",
    "long_prefill",
    "patch",
    "plan_offload",
    "register",
    "search_model_config",
    "unpatch",
]
