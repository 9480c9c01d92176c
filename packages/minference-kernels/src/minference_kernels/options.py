"""The settings of sparse pre-fill, declared once: :class:`PrefillOptions`.

Every layer that runs sparse pre-fill takes its settings from one :class:`PrefillOptions`: the
transformers integration (``minference_hf.patch(..., options=)``, the plan it attaches), the vLLM
plugin (``--additional-config '{"minference": {...}}'`` and ``MINFERENCE_VLLM_*``), the
``minference`` CLI and the benchmarks. Each setting has one name, one default (the module constants
below) and one validator (:mod:`minference_kernels._validate`, shared with the kernels' own
functions), run once when the object is made. The object is frozen: change a setting with
:meth:`PrefillOptions.replace`, which validates again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._validate import (
    check_allocation,
    check_backend,
    check_coverage,
    check_int,
    check_last_q,
    check_share,
)

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_BLOCK_ALLOCATION",
    "DEFAULT_COVERAGE",
    "DEFAULT_LAST_Q",
    "DEFAULT_MAX_DENSITY",
    "DEFAULT_MIN_SPARSE_LEN",
    "DEFAULT_MIN_SPARSE_QUERY",
    "PrefillOptions",
]

#: Context length (keys: cached plus new tokens) from which pre-fill takes the sparse path: the
#: shortest measured length where the shipped Llama-3.1 config beats cuDNN on an H200, in
#: benchmarks/results/bench_layer_v020f_h200.json (sources.json key ``layer``; TMA loads) and
#: bench_layer_h200.json (``layer_earlier``; pointer loads). The figures: the "dense is faster
#: below" headline of benchmarks/RESULTS.md; the history: benchmarks/NOTES.md, "Crossover".
DEFAULT_MIN_SPARSE_LEN = 32768
#: Fewest new query tokens a forward call (a pre-fill chunk) needs to take the sparse path; decode
#: steps (one token) and short chunks run dense.
DEFAULT_MIN_SPARSE_QUERY = 64
#: Trailing queries that estimate each vertical-slash head's index (MInference 1.0's ``last_q``).
DEFAULT_LAST_Q = 64
#: Kernel backend: ``"auto"`` is Triton on CUDA and PyTorch on CPU.
DEFAULT_BACKEND = "auto"
#: ``None``: the pattern config's fixed vertical-slash budgets (no adaptive coverage).
DEFAULT_COVERAGE: float | None = None
#: Block-sparse heads keep ``top_k`` key blocks per query block.
DEFAULT_BLOCK_ALLOCATION = "query_block"
#: On CUDA, a layer whose estimated index keeps more than this share of the causal pairs (inputs
#: without sparse structure) runs dense. The sparse kernel computes kept pairs at ~0.68 of cuDNN's
#: dense rate with pointer loads and ~0.85 with TMA loads on Hopper (benchmarks/NOTES.md); 0.6
#: keeps the sparse path a win for both, and dense is exact.
DEFAULT_MAX_DENSITY: float | None = 0.6


@dataclass(frozen=True)
class PrefillOptions:
    """The settings of sparse pre-fill, validated once when the object is made.

    Attributes:
        min_sparse_len: a pre-fill call takes the sparse path only when its context length
            (keys: cached plus new tokens) is at least this (int >= 1). Default
            :data:`DEFAULT_MIN_SPARSE_LEN`, the measured crossover with dense attention on an H200.
        min_sparse_query: ... and it has at least this many new query tokens (int >= 1). Decode
            steps (one query token) are always dense.
        last_q: trailing queries used for the online vertical-slash estimate (int in [1, 128]).
        backend: :func:`minference_kernels.sparse_prefill` backend: ``"auto"`` (Triton on CUDA,
            PyTorch on CPU), ``"triton"`` or ``"torch"``.
        coverage: ``None`` (the config's fixed budgets), or a number in (0, 1]: each
            vertical-slash head keeps only the columns and diagonals needed for that share of its
            estimated attention mass, at most its configured budget (heads whose budget stays
            below the target are logged at INFO, logger ``minference_kernels``). Strings and
            bools are rejected.
        block_allocation: ``"query_block"`` (each block-sparse head keeps ``top_k`` key blocks per
            query block), ``"head"`` (the same number per head, spread over its query blocks by
            estimated attention share) or ``"layer"`` (the heads of one call pool their blocks).
        max_density: on CUDA, a layer whose estimated index keeps more than this share (in
            (0, 1]) of its causal pairs runs dense instead; ``None`` never falls back. The
            integrations pass it to the kernels on CUDA only (:meth:`kernel_kwargs`).

    Raises:
        TypeError / ValueError: naming the setting and the bad value, when the object is made.
    """

    min_sparse_len: int = DEFAULT_MIN_SPARSE_LEN
    min_sparse_query: int = DEFAULT_MIN_SPARSE_QUERY
    last_q: int = DEFAULT_LAST_Q
    backend: str = DEFAULT_BACKEND
    coverage: float | None = DEFAULT_COVERAGE
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION
    max_density: float | None = DEFAULT_MAX_DENSITY

    def __post_init__(self) -> None:
        check_int(self.min_sparse_len, "min_sparse_len", low=1)
        check_int(self.min_sparse_query, "min_sparse_query", low=1)
        check_last_q(self.last_q)
        check_backend(self.backend)
        # stored as a float (an int 1 becomes 1.0), so equal options compare and hash equal
        object.__setattr__(self, "coverage", check_coverage(self.coverage))
        check_allocation(self.block_allocation)
        object.__setattr__(self, "max_density", check_share(self.max_density, "max_density"))

    def replace(self, **changes: Any) -> PrefillOptions:
        """A copy with ``changes`` applied (validated like a new object). An unknown name raises
        ``TypeError`` naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"unknown PrefillOptions setting(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)

    def wants_sparse(self, num_queries: int, num_keys: int) -> bool:
        """Whether a call with ``num_queries`` new tokens over ``num_keys`` keys (cached plus new)
        takes the sparse path: more than one query, at least ``min_sparse_query`` of them, and at
        least ``min_sparse_len`` keys."""
        return (
            num_queries > 1
            and num_queries >= self.min_sparse_query
            and num_keys >= self.min_sparse_len
        )

    def kernel_kwargs(self, cuda: bool) -> dict[str, Any]:
        """The keyword arguments of :func:`minference_kernels.sparse_prefill` these options set:
        ``last_q``, ``backend``, ``coverage``, ``block_allocation`` and ``max_density`` (``None``
        unless ``cuda``: the dense fallback is tuned to GPU rates)."""
        return {
            "last_q": self.last_q,
            "backend": self.backend,
            "coverage": self.coverage,
            "block_allocation": self.block_allocation,
            "max_density": self.max_density if cuda else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (for result files); ``PrefillOptions(**d)`` makes the
        same object again."""
        return dataclasses.asdict(self)
