"""Offline kernel-aware pattern search: captured Q/K/V of a calibration prompt -> a config.

For every (layer, query head) the search scores a set of candidate patterns (kinds x budgets) on
sampled query rows of the calibration prompt and picks, among the candidates whose cost (by a
:class:`~minference_patterns.cost.CostModel`, relative to dense attention) fits the budget, the
one that keeps the most attention; within ``tolerance`` of the best it takes the cheapest. The
pairs a candidate keeps come from :func:`minference_kernels.sparse_prefill_mask`, i.e. the
kernel's own online estimation and block-granular masks, so what is scored is what will run.

Per candidate and head, on ``num_rows`` stratified query rows (all rows if the prompt is shorter):

* ``recall``: softmax attention mass (dense, float64 on CPU / float32 on GPU) inside the mask,
  averaged over the rows;
* ``output_error`` (if V is given): ``||o_sparse - o_dense|| / ||o_dense||`` averaged over the rows,
  where ``o_sparse`` renormalises the softmax inside the mask;
* ``density``: kept pairs / causal pairs over the sampled rows (a ratio estimate of the kernel's
  density over the whole prompt, exact when every row is sampled).

See ``docs/patterns/search.md`` for the algorithm, its defaults and why.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from minference_kernels import check_softcap, sparse_prefill_mask
from minference_kernels.patterns import BLOCK_SCORINGS, HeadPattern

from .__about__ import __version__
from ._progress import progress as _progress_bar
from .config import PatternConfig, Provenance, _is_int
from .cost import AnalyticCostModel, CostModel, relative_cost
from .density import dense_pairs
from .policy import BudgetPolicy

__all__ = [
    "CandidateScore",
    "HeadSearchResult",
    "default_candidates",
    "search_config",
    "search_head",
    "search_layer",
]

Objective = Literal["recall", "output"]
Candidates = Sequence[HeadPattern] | Callable[[int], Sequence[HeadPattern]] | None


def _powers(lo: int, hi: int, step: int) -> list[int]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= step
    return out


def default_candidates(
    seq_len: int, *, sink_tokens: int = 64, block_size: int = 64, max_fraction: float = 1 / 8
) -> list[HeadPattern]:
    """The default candidate set at a calibration length of ``seq_len`` tokens.

    Sizes grow geometrically up to ``max_fraction * seq_len`` (at least the smallest size):

    * ``a_shape(sink_tokens, w)``, ``w`` in 64, 128, 256, ...;
    * ``vertical_slash(v, s)``, ``v`` in 32, 128, 512, ... and ``s`` in 64, 128, 512, 2048, ...
      (``v = 32``: little more than the 30 first columns the estimator always keeps; ``s = 64``:
      only the local band, one key tile; ``s = 128``: the 100 always-kept nearest diagonals plus
      28 chosen ones);
    * ``block_sparse(top_k, block_size, scoring)``, ``top_k`` in 1, 2, 4, ... (blocks), each with
      pooled and with sampled scoring (the sampled estimate costs more, and the cost model says
      how much);
    * ``dense`` (the fallback).

    The order is deterministic (by kind, then size); ties in the search go to the earlier one.
    """
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    n = seq_len
    cap = max_fraction * n
    out: list[HeadPattern] = []

    def add(p: HeadPattern) -> None:
        if p not in out:
            out.append(p)

    for w in _powers(64, max(64, int(cap)), 2):
        add(HeadPattern.a_shape(min(sink_tokens, n), min(w, n)))
    verticals = _powers(32, max(32, int(cap)), 4)
    slashes = [64, *_powers(128, max(128, int(cap)), 4)]
    for v in verticals:
        for s in slashes:
            add(HeadPattern.vertical_slash(min(v, n), min(s, n)))
    nb = math.ceil(n / block_size)
    for scoring in BLOCK_SCORINGS:
        for top_k in _powers(1, max(1, int(max_fraction * nb)), 2):
            if top_k < nb:
                add(HeadPattern.block_sparse(top_k, block_size, scoring))
    add(HeadPattern.dense())
    return out


@dataclass(frozen=True)
class CandidateScore:
    """How one candidate pattern did on one head."""

    pattern: HeadPattern
    recall: float
    output_error: float | None
    density: float
    cost: float


@dataclass(frozen=True)
class HeadSearchResult:
    """The pattern chosen for one head, with the scores of every candidate.

    ``score`` is the objective of the chosen pattern (recall, or ``1 - output_error``);
    ``within_budget`` is False when no candidate fit the budget (the cheapest was taken) or when
    ``min_score`` forced a costlier one.
    """

    layer: int
    head: int
    pattern: HeadPattern
    score: float
    recall: float
    output_error: float | None
    density: float
    cost: float
    within_budget: bool
    candidates: tuple[CandidateScore, ...]


def _sample_rows(n: int, num_rows: int, seed: int, layer: int) -> torch.Tensor:
    """``num_rows`` stratified query rows of ``[0, n)``: one uniform draw per equal stratum."""
    if num_rows >= n:
        return torch.arange(n)
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + layer * 7919) % (2**63))
    edges = torch.linspace(0, n, num_rows + 1, dtype=torch.float64)
    lo, hi = edges[:-1], edges[1:]
    rows = (lo + torch.rand(num_rows, generator=g, dtype=torch.float64) * (hi - lo)).floor().long()
    return rows.clamp_(0, n - 1).unique()


def _resolve_candidates(candidates: Candidates, n: int) -> list[HeadPattern]:
    cands = default_candidates(n) if candidates is None else (
        candidates(n) if callable(candidates) else candidates
    )  # fmt: skip
    cands = list(cands)
    if not cands:
        raise ValueError("candidates is empty")
    for i, c in enumerate(cands):
        if not isinstance(c, HeadPattern):
            raise TypeError(f"candidates[{i}] must be a HeadPattern, got {type(c).__name__}")
    uniq: list[HeadPattern] = []
    for c in cands:
        if c not in uniq:
            uniq.append(c)
    if HeadPattern.dense() not in uniq:
        uniq.append(HeadPattern.dense())
    return uniq


def _check_inputs(q: Any, k: Any, v: Any) -> tuple[int, int, int, int]:
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [1, heads, N, D], got shape {tuple(t.shape)}")
        if t.shape[0] != 1:
            raise ValueError(f"{name} must hold one sequence (batch 1), got batch {t.shape[0]}")
    _, hq, nq, d = q.shape
    _, hkv, nk, dk = k.shape
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} vs {dk}")
    if nq != nk:
        raise ValueError(f"the search needs the full prompt: q has {nq} rows but k has {nk}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if v is not None and (v.shape[1] != hkv or v.shape[2] != nk):
        raise ValueError(f"v must be [1, {hkv}, {nk}, Dv], got shape {tuple(v.shape)}")
    return hq, hkv, nq, d


def _objective_value(c: CandidateScore, objective: Objective) -> float:
    if objective == "recall":
        return c.recall
    assert c.output_error is not None  # objective "output" needs v (checked by search_layer)
    return 1.0 - c.output_error


def _select(
    scores: list[CandidateScore],
    objective: Objective,
    budget: float,
    tolerance: float,
    min_score: float | None,
) -> tuple[int, bool]:
    def quality(c: CandidateScore) -> float:
        return _objective_value(c, objective)

    idx = range(len(scores))
    feasible = [i for i in idx if scores[i].cost <= budget * (1 + 1e-9)]
    within = bool(feasible)
    if feasible:
        best = max(quality(scores[i]) for i in feasible)
        pool = [i for i in feasible if quality(scores[i]) >= best - tolerance]
    else:
        pool = [min(idx, key=lambda i: (scores[i].cost, i))]
    if min_score is not None and max(quality(scores[i]) for i in pool) < min_score:
        good = [i for i in idx if quality(scores[i]) >= min_score]
        if good:
            pool = good
            within = within and all(scores[i].cost <= budget * (1 + 1e-9) for i in good)
    choice = min(pool, key=lambda i: (scores[i].cost, i))
    if scores[choice].cost > budget * (1 + 1e-9):
        within = False
    return choice, within


@torch.no_grad()
def search_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    layer: int = 0,
    budget: float = 0.1,
    candidates: Candidates = None,
    cost_model: CostModel | None = None,
    objective: Objective = "recall",
    num_rows: int = 256,
    tolerance: float = 1e-3,
    min_score: float | None = None,
    seed: int = 0,
    scale: float | None = None,
    last_q: int = 64,
    max_elements: int = 1 << 24,
    softcap: float | None = None,
) -> list[HeadSearchResult]:
    """Search every query head of one layer. ``q [1, Hq, N, D]``, ``k``/``v [1, Hkv, N, D]``.

    Args:
        layer: layer index (seeds the row sampling and labels the results).
        budget: maximum cost per head relative to dense attention (e.g. 0.1 = a tenth).
        candidates: patterns to try (``dense`` is always added), a function of the prompt
            length returning them, or ``None`` for :func:`default_candidates`.
        cost_model: prices candidates (default :class:`AnalyticCostModel`).
        objective: ``"recall"`` (attention mass kept) or ``"output"`` (1 - relative output
            error; needs ``v``).
        num_rows: query rows sampled (stratified) per layer.
        tolerance: candidates within this of the best objective count as equal; the cheapest
            of them wins.
        min_score: if the best affordable candidate scores below this, take the cheapest
            candidate (any cost; dense qualifies) that reaches it.
        seed: seeds the row sampling; the search is deterministic for given inputs and seed.
        scale: attention scale (default ``1 / sqrt(D)``), passed to the kernels' estimation.
        last_q: queries used by the vertical-slash estimation (as at inference).
        max_elements: bound on ``heads x rows x N`` elements processed at once (memory).
        softcap: the model's attention-logit soft-capping (Gemma-2), applied to the true
            attention (``softcap * tanh(logit / softcap)`` before the softmax) and passed to the
            kernels' estimation, as at inference.
    """
    hq, hkv, n, d = _check_inputs(q, k, v)
    softcap = check_softcap(softcap)
    if objective not in ("recall", "output"):
        raise ValueError(f"objective must be 'recall' or 'output', got {objective!r}")
    if objective == "output" and v is None:
        raise ValueError("objective='output' needs v")
    if not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget must be a positive number (relative to dense), got {budget!r}")
    if not _is_int(num_rows) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    cost_model = cost_model or AnalyticCostModel(last_q=last_q)
    cands = _resolve_candidates(candidates, n)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rows = _sample_rows(n, num_rows, seed, layer).to(q.device)
    r = rows.numel()
    work = torch.float64 if q.device.type == "cpu" else torch.float32
    causal = torch.arange(n, device=q.device)[None, :] <= rows[:, None]  # [R, N]
    causal_pairs = float((rows + 1).sum())
    total_pairs = float(dense_pairs(n))

    group = hq // hkv
    kv_per_chunk = max(1, min(hkv, max_elements // max(1, group * r * n)))
    # per head: list over candidates of (recall, err, density)
    stats: list[list[tuple[float, float | None, float]]] = [[] for _ in range(hq)]
    for kv0 in range(0, hkv, kv_per_chunk):
        kv1 = min(hkv, kv0 + kv_per_chunk)
        h0, h1 = kv0 * group, kv1 * group
        qs, ks = q[:, h0:h1], k[:, kv0:kv1]
        hc, kvc = h1 - h0, kv1 - kv0
        # the query heads of a KV head share it: [KVc, g * R, D] @ [KVc, D, N], no K/V copies
        qr = qs[0, :, rows].to(work).reshape(kvc, group * r, d)
        logits = torch.matmul(qr, ks[0].to(work).transpose(-1, -2)) * sm_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.view(hc, r, n).masked_fill(~causal, float("-inf"))
        prob = torch.softmax(logits, dim=-1)  # [Hc, R, N]
        del logits, qr
        o_dense = None
        if v is not None:
            vv = v[0, kv0:kv1].to(work)  # [KVc, N, Dv]

            def attend(p: torch.Tensor) -> torch.Tensor:
                out = torch.matmul(p.reshape(kvc, group * r, n), vv)
                return out.view(hc, r, -1)

            o_dense = attend(prob)
            o_norm = o_dense.norm(dim=-1).clamp(min=1e-30)
        for cand in cands:
            if cand.kind == "dense":
                rec = torch.ones(hc, dtype=work, device=q.device)
                err = torch.zeros(hc, dtype=work, device=q.device) if v is not None else None
                dens = torch.ones(hc, dtype=work, device=q.device)
            else:
                mask = sparse_prefill_mask(
                    qs, ks, (cand,) * hc, scale=sm_scale, last_q=last_q, query_rows=rows,
                    softcap=softcap,
                )[0]  # fmt: skip
                mask &= causal
                kept = prob * mask
                mass = kept.sum(-1)  # [Hc, R]
                rec = mass.mean(-1)
                dens = mask.sum((-1, -2)).to(work) / causal_pairs
                err = None
                if o_dense is not None:  # set exactly when v is given
                    o_sparse = attend(kept / mass.clamp(min=1e-30)[..., None])
                    err = ((o_sparse - o_dense).norm(dim=-1) / o_norm).mean(-1)
                del mask, kept
            for j in range(hc):
                stats[h0 + j].append(
                    (
                        float(rec[j]),
                        None if err is None else float(err[j]),
                        float(dens[j]),
                    )
                )
        del prob, o_dense

    results = []
    for h in range(hq):
        scored = []
        for cand, (h_rec, h_err, h_dens) in zip(cands, stats[h]):
            kept_pairs = h_dens * total_pairs
            c = relative_cost(cost_model, cand, n, kept_pairs=kept_pairs, head_dim=d)
            scored.append(CandidateScore(cand, h_rec, h_err, h_dens, c))
        i, within = _select(scored, objective, float(budget), tolerance, min_score)
        ch = scored[i]
        score = _objective_value(ch, objective)
        results.append(
            HeadSearchResult(
                layer=layer,
                head=h,
                pattern=ch.pattern,
                score=score,
                recall=ch.recall,
                output_error=ch.output_error,
                density=ch.density,
                cost=ch.cost,
                within_budget=within,
                candidates=tuple(scored),
            )
        )
    return results


def search_head(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, **kwargs: Any
) -> HeadSearchResult:
    """Search one head: ``q``/``k``/``v`` as ``[N, D]`` or ``[1, 1, N, D]``.

    Keyword arguments are those of :func:`search_layer`.
    """

    def as4(t: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 2:
            return t[None, None]
        if t.dim() == 4 and t.shape[:2] == (1, 1):
            return t
        raise ValueError(
            f"{name} must be [N, D] or [1, 1, N, D] for one head, got {tuple(t.shape)}"
        )

    return search_layer(as4(q, "q"), as4(k, "k"), None if v is None else as4(v, "v"), **kwargs)[0]


LayerInput = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def search_config(
    layer_iter: Iterable[LayerInput],
    *,
    model_id: str,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    budget: float = 0.1,
    candidates: Candidates = None,
    cost_model: CostModel | None = None,
    objective: Objective = "recall",
    num_rows: int = 256,
    tolerance: float = 1e-3,
    min_score: float | None = None,
    seed: int = 0,
    scale: float | None = None,
    last_q: int = 64,
    num_layers: int | None = None,
    calibration: str | None = None,
    budget_policy: BudgetPolicy | None = None,
    progress: bool = True,
    on_layer: Callable[[int, list[HeadSearchResult]], None] | None = None,
    date: str | None = None,
    fixed: dict[int, HeadPattern] | None = None,
    softcap: float | None = None,
) -> PatternConfig:
    """Search a whole model, one layer at a time, into a :class:`PatternConfig`.

    ``layer_iter`` yields, per layer in order, ``(q, k)`` or ``(q, k, v)`` with q
    ``[1, Hq, N, D]`` and k/v ``[1, Hkv, N, D]`` (post-RoPE, one calibration prompt). Only one
    layer is held at a time, so a generator that captures layers lazily keeps memory bounded.

    ``num_kv_heads`` / ``head_dim``, when given, are checked against the tensors. ``num_layers``
    only sizes the progress bar. ``calibration`` describes the prompt (stored in provenance).
    ``on_layer(layer, results)`` receives each layer's :class:`HeadSearchResult` list.
    ``fixed`` maps layer indices to a pattern every head of that layer takes without being
    searched (e.g. ``dense`` for a model's sliding-window layers, whose attention is local by
    construction); their scores are ``None`` and they are listed in the provenance.
    The other arguments are those of :func:`search_layer`. The config's scores are the chosen
    patterns' objective values and its ``context_length`` the calibration length; its
    ``budget_policy`` is ``budget_policy`` or :meth:`BudgetPolicy.measured` (sizes held on shorter
    prompts, grown as measured on longer ones: ``docs/patterns/budget-policy.md``). Deterministic
    for given inputs and ``seed`` (``date`` defaults to today and is the only varying field).
    """
    fixed = dict(fixed or {})
    for li, p in fixed.items():
        if not isinstance(p, HeadPattern):
            raise TypeError(f"fixed[{li}] must be a HeadPattern, got {type(p).__name__}")
    if not isinstance(model_id, str) or not model_id:
        raise ValueError("model_id must be a non-empty string")
    layers: list[tuple[HeadPattern, ...]] = []
    scores: list[tuple[float | None, ...]] = []
    shape: tuple[int, int, int, int] | None = None
    recalls: list[float] = []
    costs: list[float] = []
    over_budget = 0
    it = iter(layer_iter)
    for li, item in enumerate(progress_iter(it, num_layers, progress)):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise TypeError(f"layer {li}: layer_iter must yield (q, k) or (q, k, v) tuples")
        q, k = item[0], item[1]
        v = item[2] if len(item) == 3 else None
        this = _check_inputs(q, k, v)
        if shape is None:
            shape = this
            if num_kv_heads is not None and this[1] != num_kv_heads:
                raise ValueError(f"k has {this[1]} KV heads but num_kv_heads={num_kv_heads}")
            if head_dim is not None and this[3] != head_dim:
                raise ValueError(f"q has head dim {this[3]} but head_dim={head_dim}")
        elif this != shape:
            raise ValueError(
                f"layer {li}: shapes (Hq, Hkv, N, D) = {this} differ from layer 0's {shape}"
            )
        if li in fixed:
            del q, k, v, item
            layers.append((fixed[li],) * this[0])
            scores.append((None,) * this[0])
            continue
        res = search_layer(
            q, k, v, layer=li, budget=budget, candidates=candidates, cost_model=cost_model,
            objective=objective, num_rows=num_rows, tolerance=tolerance, min_score=min_score,
            seed=seed, scale=scale, last_q=last_q, softcap=softcap,
        )  # fmt: skip
        del q, k, v, item
        layers.append(tuple(r.pattern for r in res))
        scores.append(tuple(r.score for r in res))
        recalls.extend(r.recall for r in res)
        costs.extend(r.cost for r in res)
        over_budget += sum(not r.within_budget for r in res)
        if on_layer is not None:
            on_layer(li, res)
    if shape is None:
        raise ValueError("layer_iter yielded no layers")
    hq, hkv, n, d = shape
    cm = cost_model or AnalyticCostModel(last_q=last_q)
    cand_list = _resolve_candidates(candidates, n)
    prov = Provenance(
        source="search",
        calibration=calibration,
        budget=float(budget),
        objective=objective,
        tool="minference-patterns",
        tool_version=__version__,
        date=date or _dt.date.today().isoformat(),
        extra={
            "seed": seed,
            "num_rows": num_rows,
            "tolerance": tolerance,
            "min_score": min_score,
            "last_q": last_q,
            "cost_model": cm.describe(),
            "candidates": [c.describe() for c in cand_list],
            "mean_recall": sum(recalls) / len(recalls) if recalls else None,
            "mean_relative_cost": sum(costs) / len(costs) if costs else None,
            "heads_over_budget": over_budget,
            **(
                {"fixed_layers": {str(i): p.describe() for i, p in sorted(fixed.items())}}
                if fixed
                else {}
            ),
        },
    )
    return PatternConfig(
        model_id=model_id,
        num_layers=len(layers),
        num_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        layers=tuple(layers),
        context_length=n,
        provenance=prov,
        budget_policy=budget_policy or BudgetPolicy.measured(),
        scores=tuple(scores),
    )


def progress_iter(it: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    return _progress_bar(it, total=total, desc="searching layers", enabled=enabled, unit="layer")
