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

The reference length ``L`` is the config's ``context_length``, or the policy's own
``reference_length`` when it sets one (a config converted from MInference does not know the length
it was searched at, but it knows the lengths its published accuracy was measured at). With neither,
only clamping, ``densify_covering`` and ``dense_below`` apply.

Fixed budgets lose recall as prompts grow: measured on real heads (Gemma-3-270M's global layers
4K-32K, SmolLM2-135M 2K-8K), keeping the recall of the reference length needs budgets that grow
like ``n ** e`` with ``e`` up to :data:`MEASURED_LONGER_EXPONENT` (calibrated structured heads,
16K-128K, ask for more) (``benchmarks/length_policy.py``,
``benchmarks/results/length_policy_cpu.json``). :meth:`BudgetPolicy.measured` is that policy; the
shipped configs carry it. See ``docs/patterns/budget-policy.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from minference_kernels.patterns import HeadPattern

__all__ = ["MEASURED_LONGER_EXPONENT", "BudgetPolicy", "adapt_pattern"]

#: The budget growth exponent beyond the reference length that holds recall, fitted from
#: measurements on real heads (module doc): the largest per-estimator median (block-sparse on
#: Gemma-3-270M: 0.75-0.78; vertical-slash 0.58-0.62; SmolLM2's block-sparse 0.47), rounded up
#: to 0.05. The calibrated synthetic heads decay faster (1.0-1.5, many points beyond the budget
#: ladder); they are reported beside it, not fitted to.
MEASURED_LONGER_EXPONENT = 0.8


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
        reference_length: the length the stored sizes are meant for, when the config has no
            ``context_length`` (which takes precedence): scaling starts from it. ``None``
            (default): the config's ``context_length``.
    """

    shorter_exponent: float = 0.0
    longer_exponent: float = 0.0
    densify_covering: bool = True
    dense_below: int = 0
    reference_length: int | None = None

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
        ref = self.reference_length
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or ref < 1):
            raise ValueError(
                f"BudgetPolicy.reference_length must be None or a positive int, got {ref!r}"
            )

    @classmethod
    def absolute(cls, *, dense_below: int = 0) -> BudgetPolicy:
        """Sizes as stored at every length (MInference's behaviour); the default."""
        return cls(0.0, 0.0, True, dense_below)

    @classmethod
    def proportional(cls, *, dense_below: int = 0) -> BudgetPolicy:
        """Sizes scale linearly with the prompt length: the density of the searched length."""
        return cls(1.0, 1.0, True, dense_below)

    @classmethod
    def measured(cls, *, reference_length: int | None = None, dense_below: int = 0) -> BudgetPolicy:
        """Sizes as stored up to the reference length (never less attention on shorter prompts),
        growing like ``(n / L) ** MEASURED_LONGER_EXPONENT`` beyond it: the growth that held the
        reference length's recall in the measurements (module doc). The shipped configs' policy."""
        return cls(0.0, MEASURED_LONGER_EXPONENT, True, dense_below, reference_length)

    def reference(self, context_length: int | None) -> int | None:
        """The length scaling starts from: ``context_length``, else ``reference_length``."""
        return context_length if context_length is not None else self.reference_length

    def scale(self, seq_len: int, context_length: int | None) -> float:
        """The factor applied to the sizes at ``seq_len`` (1.0 without a reference length)."""
        ref = self.reference(context_length)
        if ref is None or seq_len == ref:
            return 1.0
        ratio = seq_len / ref
        exp = self.shorter_exponent if seq_len < ref else self.longer_exponent
        return ratio**exp

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shorter_exponent": self.shorter_exponent,
            "longer_exponent": self.longer_exponent,
            "densify_covering": self.densify_covering,
            "dense_below": self.dense_below,
        }
        if self.reference_length is not None:  # files without it stay as they were
            out["reference_length"] = self.reference_length
        return out

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
    if pattern.kind == "vertical_block":  # columns as vertical_slash's, blocks as block_sparse's
        nb = math.ceil(n / 64)
        v = min(_scaled(pattern.num_vertical, f), n)
        top_k = min(_scaled(pattern.top_k, f), nb)
        if policy.densify_covering and top_k >= nb:
            return HeadPattern.dense()
        return HeadPattern.vertical_block(v, top_k)
    raise ValueError(f"no budget rule for pattern kind {pattern.kind!r}")  # pragma: no cover
