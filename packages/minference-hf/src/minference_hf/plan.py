"""The per-model sparse pre-fill plan that :func:`minference_hf.patch` attaches to a model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from minference_kernels.estimate import check_allocation

if TYPE_CHECKING:
    from minference_kernels import HeadPattern
    from minference_patterns import PatternConfig

#: Default prompt length (keys) from which pre-fill takes the sparse path. Below it dense SDPA
#: (cuDNN / FlashAttention on GPU) is as fast or faster, so short prompts never pay for sparsity.
#: Measured crossover of the shipped Llama-3.1 config vs cuDNN on an H200 (benchmarks/NOTES.md):
#: 0.93x at 16K, 1.89x at 32K (0.42x and 1.18x with the pointer-load kernel of other GPUs).
DEFAULT_MIN_SPARSE_LEN = 32768
#: On CUDA, a layer whose estimated index keeps more than this share of the causal pairs (inputs
#: without sparse structure) runs dense. Our kernel computes kept pairs at ~0.68 of cuDNN's dense
#: rate with pointer loads and ~0.85 with TMA loads on Hopper (benchmarks/NOTES.md); 0.6 keeps the
#: sparse path a win for both, and dense is exact.
DEFAULT_MAX_DENSITY = 0.6
#: Default number of new query tokens a forward call needs before it may take the sparse path
#: (a chunk of a chunked pre-fill smaller than this runs dense).
DEFAULT_MIN_SPARSE_QUERY = 64


@dataclass
class AttentionStats:
    """Counters of attention calls routed through the ``minference`` implementation.

    Attributes:
        sparse_calls: calls of :func:`minference_kernels.sparse_prefill` (one per layer per
            forward for an unpadded batch, one per sample and layer for a padded batch).
        dense_calls: forward calls (per layer) that took the dense SDPA path: decode steps and
            pre-fills below the thresholds.
        fallback_calls: pre-fill calls that qualified for the sparse path but ran dense because
            the attention mask was not "causal + key padding" (sliding-window layers longer than
            their window, packed sequences, custom 4D masks). Each kind is logged once.
        sparse_layers: layer indices that took the sparse path at least once.
        seen_layers: layer indices whose attention ran through the implementation at all.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    fallback_calls: int = 0
    sparse_layers: set[int] = field(default_factory=set)
    seen_layers: set[int] = field(default_factory=set)

    def reset(self) -> None:
        """Set every counter back to zero."""
        self.sparse_calls = 0
        self.dense_calls = 0
        self.fallback_calls = 0
        self.sparse_layers = set()
        self.seen_layers = set()


@dataclass
class SparsePrefillPlan:
    """What the ``minference`` attention function does for one patched model.

    Built by :func:`minference_hf.patch`; reachable as ``model.minference_plan`` and from every
    attention module of the model (no global state). Mutable: change ``min_sparse_len`` at any
    time to move the dense/sparse threshold.

    Attributes:
        config: the per-layer, per-head pattern config (:class:`minference_patterns.PatternConfig`).
        min_sparse_len: a pre-fill call takes the sparse path only when the number of keys (cached
            plus new tokens) is at least this.
        min_sparse_query: ... and the number of new query tokens is at least this. Decode steps
            (one query token) are always dense.
        last_q: number of trailing queries used for the online vertical-slash estimate.
        backend: passed to :func:`minference_kernels.sparse_prefill` (``"auto"``, or a backend it
            names).
        coverage: when set (e.g. ``0.95``), vertical-slash budgets become adaptive: each head
            keeps only the columns and diagonals needed for that share of its estimated attention
            mass, at most its configured budget (passed to ``sparse_prefill``).
        block_allocation: ``"query_block"`` (default: each block-sparse head keeps ``top_k`` key
            blocks per query block), ``"head"`` (the same number of blocks per head, spread over
            its query blocks by estimated attention share) or ``"layer"`` (the same number per
            layer, spread over its block-sparse heads and their query blocks); passed to
            ``sparse_prefill``.
        previous_attn_implementation: what :func:`minference_hf.unpatch` restores.
        stats: call counters (:class:`AttentionStats`).
    """

    config: PatternConfig
    min_sparse_len: int = DEFAULT_MIN_SPARSE_LEN
    min_sparse_query: int = DEFAULT_MIN_SPARSE_QUERY
    last_q: int = 64
    backend: str = "auto"
    coverage: float | None = None
    block_allocation: str = "query_block"
    previous_attn_implementation: str | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    _heads_cache: dict[tuple[int, int], tuple[HeadPattern, ...]] = field(
        default_factory=dict, repr=False
    )
    _mask_check: Any = field(default=None, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        for name in ("min_sparse_len", "min_sparse_query", "last_q"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.coverage is not None and not 0.0 < float(self.coverage) <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage!r}")
        check_allocation(self.block_allocation)

    def __deepcopy__(self, memo: dict[int, Any]) -> SparsePrefillPlan:
        # The pattern config is immutable (and holds read-only mappings): share it.
        new = SparsePrefillPlan(
            config=self.config,
            min_sparse_len=self.min_sparse_len,
            min_sparse_query=self.min_sparse_query,
            last_q=self.last_q,
            backend=self.backend,
            coverage=self.coverage,
            block_allocation=self.block_allocation,
            previous_attn_implementation=self.previous_attn_implementation,
            stats=copy.deepcopy(self.stats, memo),
        )
        memo[id(self)] = new
        return new

    def wants_sparse(self, num_queries: int, num_keys: int) -> bool:
        """Whether a call with ``num_queries`` new tokens over ``num_keys`` keys goes sparse."""
        return (
            num_queries > 1
            and num_queries >= self.min_sparse_query
            and num_keys >= self.min_sparse_len
        )

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
            f"dense={s.dense_calls} fallback={s.fallback_calls}"
        )
