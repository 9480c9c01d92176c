"""Per-head pattern specifications consumed by :func:`minference_kernels.sparse_prefill`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

PatternKind = Literal["dense", "a_shape", "vertical_slash", "block_sparse", "vertical_block"]
KINDS: tuple[str, ...] = ("dense", "a_shape", "vertical_slash", "block_sparse", "vertical_block")
#: How a block-sparse head scores (query block, key block) pairs online: ``"pooled"``, the dot
#: product of mean-pooled queries and keys (cheap: one small matmul), or ``"sampled"``, the exact
#: softmax attention of a few query rows of each block summed per key block (the estimated
#: attention mass; :data:`minference_kernels.ops.block_sampled.SAMPLED_ROWS` rows per block, about
#: ``SAMPLED_ROWS / 64`` of a dense attention's score work). Both force the diagonal key blocks;
#: ``"pooled"`` also key block 0 (the sinks, which pooling dilutes), ``"sampled"`` not (its rows
#: weigh the sinks themselves). On the real heads of SmolLM2-135M and Gemma-3-270M at 8K, 4 / 8 / 16
#: of 128 key blocks (benchmarks/block_scoring.py; results/block_scoring_*_8k.json) ``"sampled"``
#: keeps at least 0.93 of the block oracle's recall on every head, ``"pooled"`` 0.35 on SmolLM2's
#: worst head at 4 blocks.
BLOCK_SCORINGS: tuple[str, ...] = ("pooled", "sampled")


@dataclass(frozen=True)
class HeadPattern:
    """What one query head attends to during pre-fill.

    * ``dense``: full causal attention.
    * ``a_shape``: the first ``sink_tokens`` keys plus a local window of ``window_tokens`` keys
      (``0 <= i - j < window_tokens``), exact at token granularity.
    * ``vertical_slash``: ``num_vertical`` key columns and ``num_slash`` diagonals, estimated online
      per prompt by :func:`minference_kernels.estimate_vertical_slash`.
    * ``block_sparse``: ``top_k`` key blocks of ``block_size`` per query block, estimated online by
      :func:`minference_kernels.estimate_block_sparse`, scored by ``scoring``
      (:data:`BLOCK_SCORINGS`: ``"pooled"`` or ``"sampled"``).
    * ``vertical_block``: the ``num_vertical`` key columns with the best column scores of the last
      queries (as a vertical-slash head scores them; no forced sink columns), plus ``top_k`` key
      blocks of 64 per query block, estimated online as a pooled block-sparse head's (the diagonal
      blocks and key block 0 forced). A column key inside a kept block counts once. The global
      columns keep the sinks and anchor tokens that mean pooling dilutes; the per-block tiles
      follow content that moves with the query. Not run by the one-launch varlen kernel yet
      (the vLLM plugin, and minference-hf's padded batches on a GPU, refuse it).

    Use the constructors (:meth:`dense`, :meth:`a_shape`, :meth:`vertical_slash`,
    :meth:`block_sparse`, :meth:`vertical_block`); invalid sizes raise ``ValueError``.
    """

    kind: PatternKind
    sink_tokens: int = 0
    window_tokens: int = 0
    num_vertical: int = 0
    num_slash: int = 0
    top_k: int = 0
    block_size: int = 64
    scoring: str = "pooled"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"HeadPattern.kind must be one of {KINDS}, got {self.kind!r}")
        for name in (
            "sink_tokens",
            "window_tokens",
            "num_vertical",
            "num_slash",
            "top_k",
            "block_size",
        ):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"HeadPattern.{name} must be an int, got {type(val).__name__}")
            if val < 0:
                raise ValueError(f"HeadPattern.{name} must be >= 0, got {val}")
        if self.scoring not in BLOCK_SCORINGS:
            raise ValueError(
                f"HeadPattern.scoring must be one of {BLOCK_SCORINGS}, got {self.scoring!r}"
            )
        if self.scoring != "pooled" and self.kind != "block_sparse":
            raise ValueError(f"HeadPattern.scoring applies to block_sparse only, not {self.kind}")
        if self.kind == "a_shape" and self.window_tokens < 1:
            raise ValueError("a_shape needs window_tokens >= 1 (the diagonal itself)")
        if self.kind == "vertical_slash" and self.num_vertical + self.num_slash < 1:
            raise ValueError("vertical_slash needs num_vertical + num_slash >= 1")
        if self.kind == "vertical_block":
            if self.top_k < 1:
                raise ValueError("vertical_block needs top_k >= 1")
            if self.block_size != 64:
                raise ValueError(f"vertical_block's key blocks are 64 keys, got {self.block_size}")
        if self.kind == "block_sparse":
            if self.top_k < 1:
                raise ValueError("block_sparse needs top_k >= 1")
            if self.block_size < 64 or self.block_size % 64:
                raise ValueError(
                    f"block_size must be a positive multiple of 64, got {self.block_size}"
                )

    @classmethod
    def dense(cls) -> HeadPattern:
        return cls("dense")

    @classmethod
    def a_shape(cls, sink_tokens: int, window_tokens: int) -> HeadPattern:
        return cls("a_shape", sink_tokens=sink_tokens, window_tokens=window_tokens)

    @classmethod
    def vertical_slash(cls, num_vertical: int, num_slash: int) -> HeadPattern:
        return cls("vertical_slash", num_vertical=num_vertical, num_slash=num_slash)

    @classmethod
    def block_sparse(cls, top_k: int, block_size: int = 64, scoring: str = "pooled") -> HeadPattern:
        return cls("block_sparse", top_k=top_k, block_size=block_size, scoring=scoring)

    @classmethod
    def vertical_block(cls, num_vertical: int, top_k: int) -> HeadPattern:
        return cls("vertical_block", num_vertical=num_vertical, top_k=top_k)

    def describe(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "a_shape":
            return f"a_shape(sink={self.sink_tokens}, window={self.window_tokens})"
        if self.kind == "vertical_slash":
            return f"vertical_slash(v={self.num_vertical}, s={self.num_slash})"
        if self.kind == "vertical_block":
            return f"vertical_block(v={self.num_vertical}, top_k={self.top_k})"
        extra = f", scoring={self.scoring}" if self.scoring != "pooled" else ""
        return f"block_sparse(top_k={self.top_k}, block={self.block_size}{extra})"


def check_heads(heads: Sequence[HeadPattern], num_heads: int) -> tuple[HeadPattern, ...]:
    """Validate a per-query-head pattern list against the number of query heads."""
    if isinstance(heads, (str, bytes, HeadPattern)) or not isinstance(heads, Iterable):
        raise TypeError(
            f"heads must be a sequence of HeadPattern (one per query head), got {type(heads).__name__}"
        )
    heads = tuple(heads)
    if len(heads) != num_heads:
        raise ValueError(f"heads has {len(heads)} patterns but q has {num_heads} query heads")
    for i, h in enumerate(heads):
        if not isinstance(h, HeadPattern):
            raise TypeError(f"heads[{i}] must be a HeadPattern, got {type(h).__name__}")
    return heads
