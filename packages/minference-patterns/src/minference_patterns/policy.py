"""How a config's budgets adapt to prompt lengths other than the one it was searched at.

MInference stores absolute sizes (e.g. 1000 verticals and 6096 slashes) and uses them unchanged at
every length. :class:`BudgetPolicy` keeps that as the default and makes the alternative explicit:

* below the searched length ``L`` the sizes are multiplied by ``(n / L) ** shorter_exponent``,
* above it by ``(n / L) ** longer_exponent``,

so exponent 0 keeps sizes absolute (MInference's behaviour: density falls as ``1 / n``) and exponent
1 keeps the density constant. Sink tokens and block sizes are never scaled; a size that was at least
1 stays at least 1. Sizes are then clamped to what exists at length ``n`` and, when
``densify_covering`` is set, a head whose clamped budget covers every causal pair becomes ``dense``
(the same pairs, without the estimation cost). Prompts shorter than ``dense_below`` get dense heads.

A config without a ``context_length`` (e.g. one converted from MInference, whose search length is
not published) has no reference length, so only clamping, ``densify_covering`` and ``dense_below``
apply. See ``docs/patterns/budget-policy.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from minference_kernels.patterns import HeadPattern

__all__ = ["BudgetPolicy", "adapt_pattern"]


@dataclass(frozen=True)
class BudgetPolicy:
    """Rule for adapting absolute budgets to a prompt length (see the module docstring).

    Attributes:
        shorter_exponent: scaling exponent for prompts shorter than the searched length
            (0 = absolute sizes, 1 = constant density). Default 0.
        longer_exponent: scaling exponent for prompts longer than the searched length. Default 0.
        densify_covering: turn a head whose budget covers every causal pair into ``dense``.
        dense_below: prompts shorter than this many tokens use dense attention in every head
            (0 = never).
    """

    shorter_exponent: float = 0.0
    longer_exponent: float = 0.0
    densify_covering: bool = True
    dense_below: int = 0

    def __post_init__(self) -> None:
        for name in ("shorter_exponent", "longer_exponent"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"BudgetPolicy.{name} must be a number, got {type(val).__name__}")
            if not (0.0 <= float(val) <= 2.0) or math.isnan(val):
                raise ValueError(f"BudgetPolicy.{name} must be in [0, 2], got {val}")
            object.__setattr__(self, name, float(val))
        if not isinstance(self.densify_covering, bool):
            raise TypeError("BudgetPolicy.densify_covering must be a bool")
        if isinstance(self.dense_below, bool) or not isinstance(self.dense_below, int):
            raise TypeError("BudgetPolicy.dense_below must be an int")
        if self.dense_below < 0:
            raise ValueError(f"BudgetPolicy.dense_below must be >= 0, got {self.dense_below}")

    @classmethod
    def absolute(cls, *, dense_below: int = 0) -> BudgetPolicy:
        """Sizes as stored at every length (MInference's behaviour); the default."""
        return cls(0.0, 0.0, True, dense_below)

    @classmethod
    def proportional(cls, *, dense_below: int = 0) -> BudgetPolicy:
        """Sizes scale linearly with the prompt length: the density of the searched length."""
        return cls(1.0, 1.0, True, dense_below)

    def scale(self, seq_len: int, context_length: int | None) -> float:
        """The factor applied to the sizes at ``seq_len`` (1.0 without a reference length)."""
        if context_length is None or seq_len == context_length:
            return 1.0
        ratio = seq_len / context_length
        exp = self.shorter_exponent if seq_len < context_length else self.longer_exponent
        return ratio**exp

    def to_dict(self) -> dict[str, Any]:
        return {
            "shorter_exponent": self.shorter_exponent,
            "longer_exponent": self.longer_exponent,
            "densify_covering": self.densify_covering,
            "dense_below": self.dense_below,
        }

    @classmethod
    def from_dict(cls, data: Any) -> BudgetPolicy:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"budget_policy must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"unknown budget_policy field(s): {', '.join(unknown)}")
        return cls(**data)


def _scaled(x: int, factor: float) -> int:
    if x == 0 or factor == 1.0:
        return x
    return max(1, int(round(x * factor)))


def adapt_pattern(
    pattern: HeadPattern, seq_len: int, context_length: int | None, policy: BudgetPolicy
) -> HeadPattern:
    """``pattern`` with its budget adapted to a prompt of ``seq_len`` key positions."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if pattern.kind == "dense":
        return pattern
    if seq_len < policy.dense_below:
        return HeadPattern.dense()
    f = policy.scale(seq_len, context_length)
    n = seq_len
    if pattern.kind == "a_shape":
        sink = min(pattern.sink_tokens, n)
        window = min(_scaled(pattern.window_tokens, f), n)
        if policy.densify_covering and sink + window >= n:
            return HeadPattern.dense()
        return HeadPattern.a_shape(sink, window)
    if pattern.kind == "vertical_slash":
        v = min(_scaled(pattern.num_vertical, f), n)
        s = min(_scaled(pattern.num_slash, f), n)
        if policy.densify_covering and (v >= n or s >= n):
            return HeadPattern.dense()
        return HeadPattern.vertical_slash(v, s)
    if pattern.kind == "block_sparse":
        nb = math.ceil(n / pattern.block_size)
        top_k = min(_scaled(pattern.top_k, f), nb)
        if policy.densify_covering and top_k >= nb:
            return HeadPattern.dense()
        return HeadPattern.block_sparse(top_k, pattern.block_size, pattern.scoring)
    raise ValueError(f"no budget rule for pattern kind {pattern.kind!r}")  # pragma: no cover
