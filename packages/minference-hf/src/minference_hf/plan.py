"""The per-model sparse pre-fill plan that :func:`minference_hf.patch` attaches to a model."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from minference_kernels.options import DEFAULT_MIN_SPARSE_LEN as DEFAULT_MIN_SPARSE_LEN
from minference_kernels.options import DEFAULT_MIN_SPARSE_QUERY as DEFAULT_MIN_SPARSE_QUERY
from minference_kernels.options import PrefillOptions

if TYPE_CHECKING:
    from minference_kernels import HeadPattern
    from minference_patterns import PatternConfig

# DEFAULT_MIN_SPARSE_LEN / DEFAULT_MIN_SPARSE_QUERY: re-exported from minference_kernels.options,
# where every sparse pre-fill default is declared (PrefillOptions).
#: CPU default: the PyTorch sparse path is a reference implementation (accuracy checks, machines
#: without a GPU), not a fast one. ``benchmarks/cpu_crossover.py`` times it against dense attention
#: on one layer; below the measured crossover (``benchmarks/results/cpu_crossover.json``) dense is
#: faster, so on CPU pre-fill goes sparse only from this length. ``None``: no crossover was
#: measured up to the longest length tried, so CPU pre-fill stays dense unless asked.
CPU_MIN_SPARSE_LEN: int | None = 16384
CPU_CROSSOVER_RESULT = "benchmarks/results/cpu_crossover.json"


def default_min_sparse_len(device: torch.device | str) -> int:
    """The default sparse threshold (keys) on ``device``: :data:`DEFAULT_MIN_SPARSE_LEN` on GPUs,
    :data:`CPU_MIN_SPARSE_LEN` on CPU (never, when no CPU crossover was measured)."""
    if torch.device(device).type == "cpu":
        return CPU_MIN_SPARSE_LEN if CPU_MIN_SPARSE_LEN is not None else 2**62
    return DEFAULT_MIN_SPARSE_LEN


def cpu_crossover_note(device: torch.device | str, min_sparse_len: int, prompt_tokens: int) -> str:
    """A line to print when a CPU run goes sparse below the measured CPU crossover ("" otherwise):
    the run shows what sparse pre-fill does to the answer, not how fast it is."""
    if torch.device(device).type != "cpu" or prompt_tokens < min_sparse_len:
        return ""
    cross = CPU_MIN_SPARSE_LEN
    if cross is not None and prompt_tokens >= cross:
        return ""
    where = f"below the measured CPU crossover ({cross} tokens)" if cross else (
        "on CPU, where no crossover with dense was measured"
    )  # fmt: skip
    return (
        f"note: sparse pre-fill is forced here ({where}; see {CPU_CROSSOVER_RESULT}). The CPU "
        "path is a reference implementation for accuracy checks and GPU-less machines; its "
        "timings are not the product's speed (GPU figures: docs/benchmarks.md)."
    )


@dataclass
class AttentionStats:
    """Counters of attention calls routed through the ``minference`` implementation.

    Attributes:
        sparse_calls: calls of :func:`minference_kernels.sparse_prefill` (one per layer per
            forward for an unpadded batch, one per sample and layer for a padded batch).
        dense_calls: forward calls (per layer) that took the dense SDPA path: decode steps and
            pre-fills below the thresholds.
        local_calls: calls of sliding-window layers longer than their window, computed exactly
            by the streaming kernel (one per layer per forward, or per sample when padded).
        fallback_calls: pre-fill calls that qualified for the sparse or streaming path but ran
            dense because the attention mask was not "causal (or sliding window) + key padding"
            (packed sequences, chunked attention, custom 4D masks, padding with holes in a
            sliding-window layer). Each kind is logged once.
        sparse_layers: layer indices that took the sparse path at least once.
        seen_layers: layer indices whose attention ran through the implementation at all.
        kept_pairs / causal_pairs: per layer, the (query, key) pairs the sparse kernel computed
            (its tiles and columns, at most the causal pairs of each head) and the causal pairs
            of those calls, summed over heads and calls; filled only while
            :attr:`SparsePrefillPlan.record_density` is on.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    local_calls: int = 0
    fallback_calls: int = 0
    sparse_layers: set[int] = field(default_factory=set)
    seen_layers: set[int] = field(default_factory=set)
    kept_pairs: dict[int, float] = field(default_factory=dict)
    causal_pairs: dict[int, float] = field(default_factory=dict)
    _pending: list[tuple[int, Any, float]] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        """Set every counter back to zero."""
        self.sparse_calls = 0
        self.dense_calls = 0
        self.local_calls = 0
        self.fallback_calls = 0
        self.sparse_layers = set()
        self.seen_layers = set()
        self.kept_pairs = {}
        self.causal_pairs = {}
        self._pending = []

    def record(self, layer: int, index: Any, nq: int, nk: int, heads: int) -> None:
        """Note one sparse call's index (``None``: it ran dense after all); its pairs are counted
        when a density is asked for, outside the timed forward pass."""
        causal = _causal_count(nq, nk) * heads
        self.causal_pairs[layer] = self.causal_pairs.get(layer, 0.0) + causal
        if index is None:
            self.kept_pairs[layer] = self.kept_pairs.get(layer, 0.0) + causal
        else:
            self._pending.append((layer, index, _causal_count(nq, nk)))

    def _count(self) -> None:
        from minference_kernels import BLOCK

        for layer, index, causal in self._pending:
            # the pairs the kernel computes: per query block, its rows times the keys of its tiles
            # and columns (SparseIndex.candidate_keys; one vectorised pass, also on a GPU)
            mb = index.num_blocks
            rows = torch.full((mb,), BLOCK, dtype=torch.float64, device=index.sink.device)
            rows[-1] = index.n_q - BLOCK * (mb - 1)
            per_head = (index.candidate_keys().double() * rows).sum(-1)  # [B, H]
            kept = float(per_head.clamp(max=causal).sum())
            self.kept_pairs[layer] = self.kept_pairs.get(layer, 0.0) + kept
        self._pending = []

    def density(self) -> float | None:
        """Kept / causal pairs over every recorded sparse call (``None`` if none was recorded).
        Layers that ran dense are not in it; see :meth:`model_density`."""
        self._count()
        causal = sum(self.causal_pairs.values())
        return sum(self.kept_pairs.values()) / causal if causal else None

    def model_density(self, layers: int | Iterable[int]) -> float | None:
        """Share of the causal pairs of the given layers (``range(layers)`` for an int) that were
        computed, counting a layer without a recorded sparse call as dense (``None`` if nothing
        was recorded)."""
        self._count()
        if not self.causal_pairs:
            return None
        ids = range(layers) if isinstance(layers, int) else list(layers)
        per_layer = max(self.causal_pairs.values())
        kept = sum(self.kept_pairs.get(i, per_layer) for i in ids)
        causal = sum(self.causal_pairs.get(i, per_layer) for i in ids)
        return kept / causal if causal else None


def _causal_count(nq: int, nk: int) -> float:
    """Causal (query, key) pairs of ``nq`` queries that are the last of ``nk`` positions."""
    return nq * (nq + 1) / 2 + nq * (nk - nq)


@dataclass
class SparsePrefillPlan:
    """What the ``minference`` attention function does for one patched model.

    Built by :func:`minference_hf.patch`; reachable as ``model.minference_plan`` and from every
    attention module of the model (no global state). The sparse pre-fill settings are one
    :class:`minference_kernels.PrefillOptions` (``options``), validated when it is made; the
    plan's ``min_sparse_len``, ``min_sparse_query``, ``last_q``, ``backend``, ``coverage``,
    ``block_allocation`` and ``max_density`` read it, and setting one (e.g.
    ``plan.min_sparse_len = 8192`` to move the dense/sparse threshold) replaces ``options`` with a
    validated copy.

    Attributes:
        config: the per-layer, per-head pattern config (:class:`minference_patterns.PatternConfig`).
        options: the sparse pre-fill settings (:class:`minference_kernels.PrefillOptions`;
            its docstring defines each one).
        previous_attn_implementation: what :func:`minference_hf.unpatch` restores.
        stats: call counters (:class:`AttentionStats`).
        record_density: keep each sparse call's index in ``stats`` so that the pairs it attends
            to can be counted afterwards (:meth:`AttentionStats.model_density`; for accuracy
            reports). On CUDA the ``max_density`` guard is applied to the kept index.
    """

    config: PatternConfig
    options: PrefillOptions = field(default_factory=PrefillOptions)
    previous_attn_implementation: str | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    record_density: bool = False
    _heads_cache: dict[tuple[int, int], tuple[HeadPattern, ...]] = field(
        default_factory=dict, repr=False
    )
    _mask_check: Any = field(default=None, repr=False)
    _packed_check: Any = field(default=None, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.options, PrefillOptions):
            raise TypeError(
                "options must be a minference_kernels.PrefillOptions, "
                f"got {type(self.options).__name__}"
            )

    def __deepcopy__(self, memo: dict[int, Any]) -> SparsePrefillPlan:
        # The pattern config and the options are immutable: share them.
        new = SparsePrefillPlan(
            config=self.config,
            options=self.options,
            previous_attn_implementation=self.previous_attn_implementation,
            stats=copy.deepcopy(self.stats, memo),
            record_density=self.record_density,
        )
        memo[id(self)] = new
        return new

    def _set(self, **change: Any) -> None:
        self.options = self.options.replace(**change)

    min_sparse_len = property(
        lambda self: self.options.min_sparse_len,
        lambda self, v: self._set(min_sparse_len=v),
        doc="``options.min_sparse_len`` (settable: replaces ``options``).",
    )
    min_sparse_query = property(
        lambda self: self.options.min_sparse_query,
        lambda self, v: self._set(min_sparse_query=v),
        doc="``options.min_sparse_query`` (settable: replaces ``options``).",
    )
    last_q = property(
        lambda self: self.options.last_q,
        lambda self, v: self._set(last_q=v),
        doc="``options.last_q`` (settable: replaces ``options``).",
    )
    backend = property(
        lambda self: self.options.backend,
        lambda self, v: self._set(backend=v),
        doc="``options.backend`` (settable: replaces ``options``).",
    )
    coverage = property(
        lambda self: self.options.coverage,
        lambda self, v: self._set(coverage=v),
        doc="``options.coverage`` (settable: replaces ``options``).",
    )
    block_allocation = property(
        lambda self: self.options.block_allocation,
        lambda self, v: self._set(block_allocation=v),
        doc="``options.block_allocation`` (settable: replaces ``options``).",
    )
    max_density = property(
        lambda self: self.options.max_density,
        lambda self, v: self._set(max_density=v),
        doc="``options.max_density`` (settable: replaces ``options``).",
    )

    def wants_sparse(self, num_queries: int, num_keys: int) -> bool:
        """Whether a call with ``num_queries`` new tokens over ``num_keys`` keys goes sparse
        (:meth:`minference_kernels.PrefillOptions.wants_sparse`)."""
        return self.options.wants_sparse(num_queries, num_keys)

    def heads_for_layer(self, layer: int, seq_len: int) -> tuple[HeadPattern, ...]:
        """The ``Hq`` head patterns of ``layer`` for a sequence of ``seq_len`` keys (memoised)."""
        key = (layer, seq_len)
        heads = self._heads_cache.get(key)
        if heads is None:
            heads = tuple(self.config.heads_for_layer(layer, seq_len=seq_len))
            if len(self._heads_cache) > 4096:
                self._heads_cache.clear()
            self._heads_cache[key] = heads
        return heads

    def summary(self) -> str:
        """One line: model id of the config, thresholds and counters."""
        s = self.stats
        return (
            f"minference plan for {self.config.model_id!r}: sparse from {self.min_sparse_len} "
            f"keys / {self.min_sparse_query} queries; calls sparse={s.sparse_calls} "
            f"dense={s.dense_calls} local={s.local_calls} fallback={s.fallback_calls}"
        )
