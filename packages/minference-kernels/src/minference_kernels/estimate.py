"""Online index estimation (MInference 1.0's definitions), PyTorch path and dispatch.

Vertical-slash (per query head): take the last ``last_q`` queries (absolute positions
``p_t = Nk - last_q + t``), compute their causal softmax attention against all keys with the
attention scale, and score

* column ``j``:   ``vertical[j] = sum_t P[t, j]``
* diagonal ``o``: ``slash[o] = sum_t P[t, p_t - o]`` (``o = i - j >= 0``).

The first ``keep_first`` columns (attention sinks, default 30) and the nearest ``keep_local``
diagonals (the local window, default 100) are always kept, inside the budget (MInference forces
the same 30 columns and 100 diagonals). The top ``num_vertical`` columns and ``num_slash`` diagonals
are returned, budgets clipped to ``Nk``.

With ``coverage`` (adaptive budgets) a head keeps, of those, the forced entries and then the
others in order of the mass they add, until the true attention mass of the estimation rows inside
the kept set -- the union of columns and diagonals, each (query, key) pair counted once, the
forced entries with their real mass -- reaches ``coverage`` of the rows' total, or the budget runs
out (:func:`~minference_kernels.ops.vs_scores.coverage_select`; the same function on both scoring
backends). The kept sets grow with ``coverage``.

Block-sparse (per query head): mean-pool queries and keys over blocks of ``block_size`` positions
(queries from q's first row, keys from position 0; a partial last block averages its real rows),
score block pairs by the dot product of the pooled vectors, and keep the ``top_k`` highest causal key
blocks per query block. Forced, inside the ``top_k`` budget and in this order: the key block that
holds the query block's first row, its other diagonal block (a query block can straddle two key
blocks when ``Nq < Nk``), then key block 0 -- the first tokens, the attention sinks, which mean
pooling dilutes (a single sink key barely moves its block's mean; on SmolLM2-135M at 8K tokens key
block 0 holds 0.23-0.70 of the attention in every head of layers 15-25, though under 0.05 in
layers 0-10, where forcing it costs one block). So every row attends at least to itself (with
``top_k = 1``, the block holding the first row: every row still attends to a key), and with
``top_k >= 2`` (3 when straddling) to the sinks. Rows with fewer than ``top_k`` causal key blocks
are padded with ``-1``. ``scoring="sampled"`` scores the pairs by the attention mass of a few
sampled rows of each query block instead, and forces only the diagonal blocks: those rows' exact
softmax already weighs the sinks, and a forced key block 0 would take a slot from blocks that hold
more (:func:`minference_kernels.ops.block_select.forces_sink`).

With ``allocation="head"`` the budget is the head's, not the query block's: the head keeps as many
(query block, key block) pairs in all as ``top_k`` per query block would (``sum_m min(top_k,
causal blocks of m)``). Each query block first keeps its own best ``ceil(HEAD_ALLOCATION_FLOOR
* top_k)`` blocks (7/8 of them) by the rule above (the forced blocks first; forced blocks beyond
the floor rank above every other share, so they are kept while the budget lasts); the rest of the
budget goes where the estimated attention share is highest: each query block's pooled scores
(times the attention scale) go through a softmax over its causal key blocks, and the pairs with
the largest shares win, across query blocks. A query block keeps at most ``HEAD_ALLOCATION_CAP * top_k`` key
blocks. Query blocks whose attention is spread get more key blocks, peaked ones fewer, for the
same kernel work; the floor keeps a query block (and a head) from losing the blocks that pooled
shares underrate, such as a few key columns that hold most of the attention.

With ``allocation="layer"`` the heads estimated together (a layer's block-sparse heads) pool their
budgets: the layer keeps as many pairs in all as ``"head"`` would, every query block of every head
keeps its floor, and the largest shares win the rest across heads and query blocks (equal shares:
the lower head, then as above), so heads whose attention is spread take pairs from peaked ones.
Each query block keeps at most ``HEAD_ALLOCATION_CAP`` times its head's ``top_k``. Heads whose
candidates exceed ``HEAD_RANK_BYTES`` are ranked in consecutive groups, each pooling its own heads'
budgets (with a log line).

Attention-logit soft-capping (Gemma 2; ``softcap`` on every estimator): the estimation uses the
attention the kernels compute, so each logit ``scale * q.k`` becomes ``softcap * tanh(logit /
softcap)`` before the causal mask and the softmax: the vertical-slash scores (the last ``last_q``
queries' softmax, on both backends), ``coverage``'s masses, and the sampled block scoring. Pooled
block scoring has no real logits: its pooled ``q.k`` products are a proxy, and they are capped the
same way (``softcap * tanh(scale * s / softcap) / scale``, still in the proxy's units). ``tanh`` is
monotone, so the per-query-block ranking does not change (except where float32 rounds capped
scores to equal values, which then go to the lowest block id); the shares of ``allocation="head"``
/ ``"layer"`` (a softmax of the scaled scores) are those of the capped logits.

Selection is deterministic: the same inputs give the same indices run to run.

The implementations live in :mod:`minference_kernels.ops` (``vs_scores``, ``block_select``,
``block_sampled``, ``head_rank``: each PyTorch reference beside its Triton kernel); this module keeps
the settings validators the layers share and the estimators' entry points.
"""

from __future__ import annotations

# re-exported: the setting validators live in _validate (one per setting, PrefillOptions uses them)
from ._validate import ALLOCATIONS as ALLOCATIONS
from ._validate import check_allocation as check_allocation
from ._validate import check_coverage as check_coverage
from .ops.block_select import block_topk
from .ops.vs_scores import KEEP_FIRST, KEEP_LOCAL, select_vertical_slash, vs_scores


def estimate_vertical_slash_impl(
    q,
    k,
    num_vertical,
    num_slash,
    last_q,
    scale,
    backend,
    keep_first=KEEP_FIRST,
    keep_local=KEEP_LOCAL,
    coverage=None,
    softcap=None,
):
    vertical, slash = vs_scores(q, k, last_q, scale, backend, softcap=softcap)
    return select_vertical_slash(
        vertical, slash, num_vertical, num_slash, keep_first, keep_local, coverage,
        q=q, k=k, scale=scale, last_q=last_q, softcap=softcap,
    )  # fmt: skip


def estimate_block_sparse_impl(
    q, k, top_k, block_size, backend: str = "torch", allocation: str = "query_block",
    scoring: str = "pooled", scale: float | None = None, softcap: float | None = None,
):  # fmt: skip
    return block_topk(
        q, k, int(top_k), block_size, backend=backend, allocation=allocation, scoring=scoring,
        scale=scale, softcap=softcap,
    )  # fmt: skip
