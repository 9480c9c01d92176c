"""Cost models of our kernels: what a head's pattern costs at a prompt length.

The search compares candidates by :func:`relative_cost`: a pattern's cost divided by dense
attention's at the same length, so a budget of ``0.1`` means "at most a tenth of dense attention's
time for this head". A cost model has one method, :meth:`CostModel.cost`, and two implementations:

* :class:`AnalyticCostModel` (the default): ``pair_cost[kind] * kept_pairs + estimation`` in units
  of one dense (query, key) pair, from assumed per-kind rates;
* :class:`MeasuredCostModel`: the same linear form with coefficients fitted to kernel timings
  measured on a GPU (:func:`measure_kernel_costs`, saved as JSON and read back with
  :meth:`MeasuredCostModel.from_json`).

``kept_pairs`` is the number of causal pairs the kernel computes for the head over the whole
prompt, counted from the kernel's own mask (the search does that), so block-granular rounding
(e.g. a slash costing a whole 64-wide key tile) is paid for. Without it, :func:`nominal_pairs`
estimates it from the budget.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from minference_kernels.patterns import KINDS, HeadPattern

from .density import dense_pairs, nominal_pairs

__all__ = [
    "AnalyticCostModel",
    "CostModel",
    "CostRecord",
    "MeasuredCostModel",
    "estimation_work",
    "measure_kernel_costs",
    "relative_cost",
]

_DENSE = HeadPattern.dense()


@runtime_checkable
class CostModel(Protocol):
    """Anything that prices one head's pattern at a prompt length (any unit, consistently)."""

    def cost(
        self, pattern: HeadPattern, seq_len: int, *, kept_pairs: float | None = None,
        head_dim: int | None = None,
    ) -> float:  # fmt: skip
        """Cost of one head with ``pattern`` over an ``seq_len``-token causal pre-fill.

        ``kept_pairs``: pairs the kernel computes (``None``: estimate from the budget).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored in a searched config's provenance)."""
        ...


def relative_cost(
    model: CostModel,
    pattern: HeadPattern,
    seq_len: int,
    *,
    kept_pairs: float | None = None,
    head_dim: int | None = None,
) -> float:
    """``model.cost(pattern) / model.cost(dense)`` at ``seq_len`` (dense is 1.0)."""
    dense = model.cost(_DENSE, seq_len, kept_pairs=float(dense_pairs(seq_len)), head_dim=head_dim)
    if dense <= 0:
        raise ValueError(f"cost model {model!r} gives dense attention a cost of {dense}")
    return model.cost(pattern, seq_len, kept_pairs=kept_pairs, head_dim=head_dim) / dense


def estimation_work(pattern: HeadPattern, seq_len: int, *, last_q: int = 64) -> float:
    """Work of the online index estimation, in (query, key) score units.

    ``vertical_slash``: the last ``last_q`` queries against every key (scores, softmax, column
    and diagonal sums). ``block_sparse``: pooled block scores (``nb (nb + 1) / 2`` with ``nb``
    key blocks) plus the pooling pass over the ``seq_len`` tokens; with ``scoring="sampled"``,
    ``SAMPLED_ROWS`` rows of every query block against their causal keys (about ``SAMPLED_ROWS /
    block_size`` of the causal pairs). ``vertical_block``: both, the vertical-slash scores and the
    pooled 64-key block scores (weighted as one, by its ``estimation_cost``). Static kinds: 0.
    """
    n = seq_len
    if pattern.kind == "vertical_slash":
        return float(min(last_q, n) * n)
    if pattern.kind == "vertical_block":  # the column scores and the pooled block scores
        return estimation_work(
            HeadPattern.vertical_slash(pattern.num_vertical, 1), n, last_q=last_q
        ) + estimation_work(HeadPattern.block_sparse(pattern.top_k), n, last_q=last_q)
    if pattern.kind == "block_sparse":
        nb = math.ceil(n / pattern.block_size)
        if pattern.scoring == "sampled":
            from minference_kernels.ops.block_sampled import SAMPLED_ROWS

            return SAMPLED_ROWS * nb * (n + pattern.block_size) / 2 + n
        return nb * (nb + 1) / 2 + n
    return 0.0


def _freeze(m: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class AnalyticCostModel:
    """Default cost model: ``pair_cost[kind] * kept_pairs + estimation_cost[kind] * work``.

    Units: one dense (query, key) pair = 1. The default rates are assumptions, not measurements:
    a kept pair of a static pattern (``a_shape``) costs what a dense one does; ``block_sparse``
    pays 10% for indirect tile loads, ``vertical_slash`` 20% for gathered key columns and slash
    tiles; estimating a vertical-slash index costs two units per (last-q query, key) score (QK,
    softmax, two reductions), a block-sparse one one unit per pooled block pair. Replace it with
    a :class:`MeasuredCostModel` calibrated on your GPU for real numbers.

    Attributes:
        pair_cost: cost per kept pair, by kind.
        estimation_cost: cost per unit of :func:`estimation_work`, by kind.
        overhead: fixed cost per head, by kind (launches, index building), in pair units.
        last_q: queries used by the vertical-slash estimation.
    """

    pair_cost: Mapping[str, float] = field(
        default_factory=lambda: {
            "dense": 1.0, "a_shape": 1.0, "vertical_slash": 1.2, "block_sparse": 1.1,
            "vertical_block": 1.2,
        }
    )  # fmt: skip
    estimation_cost: Mapping[str, float] = field(
        default_factory=lambda: {"vertical_slash": 2.0, "block_sparse": 1.0, "vertical_block": 2.0}
    )
    overhead: Mapping[str, float] = field(default_factory=dict)
    last_q: int = 64

    def __post_init__(self) -> None:
        for name in ("pair_cost", "estimation_cost", "overhead"):
            m = getattr(self, name)
            if not isinstance(m, Mapping):
                raise TypeError(f"AnalyticCostModel.{name} must be a mapping kind -> float")
            for k, v in m.items():
                if k not in KINDS:
                    raise ValueError(f"AnalyticCostModel.{name}: unknown kind {k!r}")
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"AnalyticCostModel.{name}[{k!r}] must be >= 0, got {v!r}")
            object.__setattr__(self, name, _freeze(m))
        missing = [k for k in KINDS if k not in self.pair_cost]
        if missing:
            raise ValueError(f"AnalyticCostModel.pair_cost lacks kind(s) {missing}")
        if self.pair_cost["dense"] <= 0:
            raise ValueError("AnalyticCostModel.pair_cost['dense'] must be > 0")

    def cost(
        self, pattern: HeadPattern, seq_len: int, *, kept_pairs: float | None = None,
        head_dim: int | None = None,
    ) -> float:  # fmt: skip
        kept = nominal_pairs(pattern, seq_len) if kept_pairs is None else float(kept_pairs)
        est = estimation_work(pattern, seq_len, last_q=self.last_q)
        return (
            self.pair_cost[pattern.kind] * kept
            + self.estimation_cost.get(pattern.kind, 0.0) * est
            + self.overhead.get(pattern.kind, 0.0)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "type": "analytic",
            "pair_cost": dict(self.pair_cost),
            "estimation_cost": dict(self.estimation_cost),
            "overhead": dict(self.overhead),
            "last_q": self.last_q,
        }


# --------------------------------------------------------------------------------------------
# measured


@dataclass(frozen=True)
class CostRecord:
    """One timing: ``time_ms`` for ``num_heads`` heads of ``pattern`` at ``seq_len`` tokens,
    computing ``kept_pairs`` causal pairs in all (summed over the heads)."""

    pattern: HeadPattern
    seq_len: int
    kept_pairs: float
    time_ms: float
    num_heads: int = 1

    def to_dict(self) -> dict[str, Any]:
        from .config import head_to_dict

        return {
            "pattern": head_to_dict(self.pattern),
            "seq_len": self.seq_len,
            "kept_pairs": self.kept_pairs,
            "time_ms": self.time_ms,
            "num_heads": self.num_heads,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, index: int = 0) -> CostRecord:
        from .config import head_from_dict

        try:
            pattern, _ = head_from_dict(data["pattern"])
            rec = cls(
                pattern=pattern,
                seq_len=int(data["seq_len"]),
                kept_pairs=float(data["kept_pairs"]),
                time_ms=float(data["time_ms"]),
                num_heads=int(data.get("num_heads", 1)),
            )
        except KeyError as exc:
            raise ValueError(f"cost record {index}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cost record {index}: {exc}") from None
        if rec.seq_len < 1 or rec.kept_pairs < 0 or rec.time_ms < 0 or rec.num_heads < 1:
            raise ValueError(f"cost record {index}: sizes and times must be positive: {data}")
        return rec


def _nonneg_lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with non-negative coefficients (exhaustive over feature subsets; <= 3)."""
    import torch

    a_full = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)[:, None]
    nf = a_full.shape[1]
    best, best_err = [0.0] * nf, math.inf
    for mask in range(1, 1 << nf):
        cols = [i for i in range(nf) if mask >> i & 1]
        a = a_full[:, cols]
        # scale columns for conditioning
        norm = a.abs().amax(0).clamp(min=1e-300)
        sol = torch.linalg.lstsq(a / norm, b).solution[:, 0] / norm
        if (sol < 0).any():
            continue
        err = float(((a @ sol[:, None] - b) ** 2).sum())
        if err < best_err - 1e-12 * max(1.0, best_err if math.isfinite(best_err) else 1.0):
            coef = [0.0] * nf
            for c, v in zip(cols, sol.tolist()):
                coef[c] = v
            best, best_err = coef, err
    return best


@dataclass(frozen=True)
class MeasuredCostModel:
    """Cost model fitted to measured kernel timings (milliseconds per head).

    For each kind with records, ``time = a * kept_pairs + b * estimation_work + c`` is fitted by
    non-negative least squares. Kinds without records fall back to the dense fit scaled by the
    :class:`AnalyticCostModel` rates (a dense fit is required). Build it with
    :meth:`from_records`, :meth:`from_json` or :func:`measure_kernel_costs`.
    """

    coefficients: Mapping[str, tuple[float, float, float]]
    records: tuple[CostRecord, ...] = ()
    device: str | None = None
    dtype: str | None = None
    head_dim: int | None = None
    last_q: int = 64

    def __post_init__(self) -> None:
        if "dense" not in self.coefficients:
            raise ValueError("MeasuredCostModel needs timings of dense attention")
        object.__setattr__(self, "coefficients", MappingProxyType(dict(self.coefficients)))

    @classmethod
    def from_records(
        cls, records: Sequence[CostRecord], *, device: str | None = None,
        dtype: str | None = None, head_dim: int | None = None, last_q: int = 64,
    ) -> MeasuredCostModel:  # fmt: skip
        """Fit the per-kind coefficients to ``records``."""
        records = tuple(records)
        by_kind: dict[str, list[CostRecord]] = {}
        for r in records:
            by_kind.setdefault(r.pattern.kind, []).append(r)
        if "dense" not in by_kind:
            raise ValueError("cost records must include dense attention timings")
        coef: dict[str, tuple[float, float, float]] = {}
        for kind, recs in by_kind.items():
            rows, y = [], []
            for r in recs:
                est = estimation_work(r.pattern, r.seq_len, last_q=last_q)
                rows.append([r.kept_pairs / r.num_heads, est, 1.0])
                y.append(r.time_ms / r.num_heads)
            a, b, c = _nonneg_lstsq(rows, y)
            coef[kind] = (a, b, c)
        analytic = AnalyticCostModel(last_q=last_q)
        a_d, _, c_d = coef["dense"]
        for kind in KINDS:
            if kind not in coef:
                coef[kind] = (
                    a_d * analytic.pair_cost[kind],
                    a_d * analytic.estimation_cost.get(kind, 0.0),
                    c_d,
                )
        return cls(coef, records, device, dtype, head_dim, last_q)

    def cost(
        self, pattern: HeadPattern, seq_len: int, *, kept_pairs: float | None = None,
        head_dim: int | None = None,
    ) -> float:  # fmt: skip
        if pattern.kind not in self.coefficients:
            raise ValueError(f"no cost coefficients for kind {pattern.kind!r}")
        a, b, c = self.coefficients[pattern.kind]
        kept = nominal_pairs(pattern, seq_len) if kept_pairs is None else float(kept_pairs)
        return a * kept + b * estimation_work(pattern, seq_len, last_q=self.last_q) + c

    def describe(self) -> dict[str, Any]:
        return {
            "type": "measured",
            "device": self.device,
            "dtype": self.dtype,
            "head_dim": self.head_dim,
            "coefficients_ms": {k: list(v) for k, v in self.coefficients.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "minference-patterns-costs",
            "version": 1,
            "device": self.device,
            "dtype": self.dtype,
            "head_dim": self.head_dim,
            "last_q": self.last_q,
            "records": [r.to_dict() for r in self.records],
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Save the timing records (the fit is redone on load)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> MeasuredCostModel:
        """Load timing records written by :meth:`to_json` and fit them."""
        from .convert import read_json

        data = read_json(path)
        if not isinstance(data, Mapping) or data.get("format") != "minference-patterns-costs":
            raise ValueError(f"{path}: not a minference-patterns cost file")
        if int(data.get("version", 0)) > 1:
            raise ValueError(f"{path}: cost file version {data['version']} is newer than supported")
        raw = data.get("records")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{path}: no timing records")
        records = [CostRecord.from_dict(r, index=i) for i, r in enumerate(raw)]
        return cls.from_records(
            records,
            device=data.get("device"),
            dtype=data.get("dtype"),
            head_dim=data.get("head_dim"),
            last_q=int(data.get("last_q", 64)),
        )


def _default_patterns(n: int) -> list[HeadPattern]:
    nb = math.ceil(n / 64)
    pats = [HeadPattern.dense()]
    for f in (1 / 64, 1 / 16, 1 / 4):
        t = max(64, int(f * n) // 64 * 64)
        pats.append(HeadPattern.a_shape(64, t))
        pats.append(HeadPattern.vertical_slash(t, t))
        pats.append(HeadPattern.vertical_slash(max(30, t // 8), t))
        pats.append(HeadPattern.block_sparse(max(1, int(f * nb))))
    return pats


def measure_kernel_costs(
    seq_lens: Sequence[int] = (8192, 16384, 32768),
    patterns: Sequence[HeadPattern] | None = None,
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: Any = None,
    device: str = "cuda",
    repeats: int = 5,
    warmup: int = 2,
    density_rows: int = 512,
    seed: int = 0,
) -> MeasuredCostModel:
    """Time :func:`minference_kernels.sparse_prefill` and fit a :class:`MeasuredCostModel`.

    For each length and pattern (the same pattern in all ``num_heads`` heads, random inputs),
    the median of ``repeats`` timed runs is recorded with the pairs the kernel computes, estimated
    from its mask on ``density_rows`` evenly spaced query rows. ``patterns`` default to dense plus
    a small grid of each kind. Run it on the GPU you will serve on; timings on CPU are valid for
    the CPU path only.
    """
    import torch
    from minference_kernels import sparse_prefill, sparse_prefill_mask

    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    records: list[CostRecord] = []
    for n in seq_lens:
        g = torch.Generator(device="cpu").manual_seed(seed + n)
        q = torch.randn(1, num_heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(1, num_kv_heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(1, num_kv_heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
        rows = torch.linspace(0, n - 1, min(density_rows, n), device=device).round().long().unique()
        causal = float((rows + 1).sum())
        for p in patterns if patterns is not None else _default_patterns(n):
            heads = (p,) * num_heads
            if p.kind == "dense":
                kept = float(dense_pairs(n)) * num_heads
            else:
                mask = sparse_prefill_mask(q, k, heads, query_rows=rows)
                kept = float(mask.sum()) / causal * dense_pairs(n)
                del mask
            for _ in range(warmup):
                sparse_prefill(q, k, v, heads, validate=False)
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sparse_prefill(q, k, v, heads, validate=False)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            records.append(CostRecord(p, n, kept, times[len(times) // 2], num_heads))
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else str(device)
    return MeasuredCostModel.from_records(
        records, device=name, dtype=str(dtype).replace("torch.", ""), head_dim=head_dim
    )
