"""Per-head sparse attention pattern configs for long-context LLM pre-fill.

* :class:`PatternConfig`: the typed config (per layer, per query head a
  :class:`~minference_kernels.HeadPattern`), JSON load/save with validation (:class:`ConfigError`
  names the layer, head and field), a :class:`BudgetPolicy` for other prompt lengths.
* :func:`load`: a file (ours, MInference's or Qwen's format) or the id of a shipped config.
* :func:`from_minference`, :func:`to_minference`, :func:`from_qwen`: conversions.
* :func:`search_config`, :func:`search_head`: the offline kernel-aware pattern search, with a
  replaceable :class:`CostModel` (:class:`AnalyticCostModel`, :class:`MeasuredCostModel`).
* :func:`plot_config`, :func:`plot_head`, :func:`summarize`: pictures and summaries.
* :func:`read_model_shape` (:class:`ModelShape`): a model's attention shape from its transformers
  config, as both integrations read it.

The search and plotting modules (torch, matplotlib) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from minference_kernels.patterns import HeadPattern

from .__about__ import __version__
from .config import SCHEMA_VERSION, PatternConfig, Provenance, json_schema
from .convert import MINFERENCE_KINDS, from_minference, from_qwen, to_minference
from .errors import ConfigError, UnknownModelError
from .model_shape import ModelShape, read_model_shape, text_config
from .policy import BudgetPolicy, adapt_pattern
from .registry import load
from .shipped import shipped_model_ids

if TYPE_CHECKING:
    from .cost import AnalyticCostModel, CostModel, MeasuredCostModel
    from .plot import plot_config, plot_head
    from .search import (
        CandidateScore,
        HeadSearchResult,
        default_candidates,
        search_config,
        search_head,
        search_layer,
    )
    from .summary import summarize

_LAZY = {
    "AnalyticCostModel": "cost",
    "CostModel": "cost",
    "MeasuredCostModel": "cost",
    "plot_config": "plot",
    "plot_head": "plot",
    "CandidateScore": "search",
    "HeadSearchResult": "search",
    "default_candidates": "search",
    "search_config": "search",
    "search_head": "search",
    "search_layer": "search",
    "summarize": "summary",
}

__all__ = [
    "SCHEMA_VERSION",
    "AnalyticCostModel",
    "BudgetPolicy",
    "CandidateScore",
    "ConfigError",
    "CostModel",
    "HeadPattern",
    "HeadSearchResult",
    "MINFERENCE_KINDS",
    "MeasuredCostModel",
    "ModelShape",
    "PatternConfig",
    "Provenance",
    "UnknownModelError",
    "__version__",
    "adapt_pattern",
    "default_candidates",
    "from_minference",
    "from_qwen",
    "json_schema",
    "load",
    "plot_config",
    "plot_head",
    "read_model_shape",
    "search_config",
    "search_head",
    "search_layer",
    "shipped_model_ids",
    "summarize",
    "text_config",
    "to_minference",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'minference_patterns' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
