"""Block-sparse estimation: pooled or sampled block scores, the per-query-block selection and the
``allocation="head"`` / ``"layer"`` budgets, PyTorch (the reference) and the dispatch to the Triton
selection (:mod:`minference_kernels.ops.block_select_triton`), ranking
(:mod:`~minference_kernels.ops.head_rank_triton`) and sampled scoring
(:mod:`~minference_kernels.ops.block_sampled_triton`). Definitions: see
:mod:`minference_kernels.estimate`."""

from __future__ import annotations

import logging

import torch

from ..index import _BIG
from . import block_sampled
from ._common import softcap_
from ._dispatch import triton_module
from .head_rank import _best_of_rows

_log = logging.getLogger("minference_kernels")


def _topk_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """As :func:`~minference_kernels.ops.vs_scores._topk_indices`, but equal scores go to the lowest index (a stable sort), the rule
    of the Triton block selection: the same blocks on every device and backend."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def _triton_select_max() -> int:
    return triton_module("block_select_triton").BLOCK_SELECT_MAX


_wide_logged: set[int] = set()


def _log_wide_once(width: int) -> None:
    bucket = width.bit_length()
    if bucket not in _wide_logged:
        _wide_logged.add(bucket)
        _log.info(
            "block-sparse estimation: %d key blocks per row exceed the Triton selection's %d; "
            "using the PyTorch top-k",
            width,
            _triton_select_max(),
        )


def _pool_blocks(x: torch.Tensor, n: int, nb: int, block_size: int) -> torch.Tensor:
    """Mean over consecutive ``block_size`` positions: ``[B, H, n, D] -> [B, H, nb, D]`` float32
    (a partial last block averages its real rows). Accumulates in float32 without a float32 copy
    of ``x`` (16 GB for a 32-head q at 1M tokens); strided views are fine."""
    full = min(n // block_size, nb)
    parts = []
    if full:
        head = x[:, :, : full * block_size].unflatten(2, (full, block_size))
        parts.append(head.sum(-2, dtype=torch.float32) / block_size)
    if nb > full:
        tail = x[:, :, full * block_size : n]
        parts.append(tail.sum(-2, keepdim=True, dtype=torch.float32) / tail.shape[2])
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def _block_geometry(nq: int, nk: int, block_size: int) -> tuple[int, int, int]:
    # a block beyond the sequence is one block either way: pool without padding to its size
    block_size = min(block_size, -(-nk // 64) * 64)
    return block_size, -(-nq // block_size), -(-nk // block_size)


def _causal_forced(rows: torch.Tensor, width: int, nq: int, off: int, block_size: int):
    """For query blocks ``rows [R]`` and key blocks ``0 .. width-1``: ``causal`` and ``forced``
    (the diagonal blocks: they hold some of the query block's own positions), both
    ``bool [R, width]``."""
    first = rows * block_size + off  # absolute position of the block's first row
    last = torch.clamp((rows + 1) * block_size, max=nq) - 1 + off
    kstart = torch.arange(width, device=rows.device) * block_size
    causal = kstart[None, :] <= last[:, None]
    forced = (kstart[None, :] + block_size > first[:, None]) & causal
    return causal, forced


def block_scores(
    q: torch.Tensor, k: torch.Tensor, block_size: int, kv_of_q: torch.Tensor | None = None
):
    """Pooled block scores with causality: ``[B, Hq, MBq, MBk]`` float32 (``-inf`` = not causal),
    plus the forced (diagonal) mask ``[MBq, MBk]``. ``kv_of_q [Hq]`` maps query heads to K's heads
    (default: consecutive groups). Materialises every block pair (``4 Hq MBq MBk`` bytes): for
    pictures and tests; the estimator itself (:func:`block_topk`) works in bounded chunks."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    block_size, mbq, mbk = _block_geometry(nq, nk, block_size)
    kv_of_q = _kv_map(hq, k.shape[1], kv_of_q, q.device)
    pk = _pool_blocks(k, nk, mbk, block_size).index_select(1, kv_of_q)
    scores = torch.matmul(_pool_blocks(q, nq, mbq, block_size), pk.transpose(-1, -2))
    causal, forced = _causal_forced(
        torch.arange(mbq, device=q.device), mbk, nq, nk - nq, block_size
    )
    return scores.masked_fill(~causal, float("-inf")), forced


def _kv_map(hq: int, hkv: int, kv_of_q: torch.Tensor | None, device) -> torch.Tensor:
    if kv_of_q is not None:
        return kv_of_q
    return torch.arange(hq, device=device) // (hq // hkv)


# Ranks of the forced key blocks (block-sparse), above every score: the block holding the query
# block's first row (inf), its other diagonal block (float32 max), then key block 0, the attention
# sinks (the float32 just below max). allocation="head"/"layer" gives the same values to their
# shares, except that a query block's guaranteed blocks (its own best, HEAD_ALLOCATION_FLOOR) all
# rank at inf: they always fit the budget, and rank above forced blocks beyond the floor.
_F32_MAX = torch.finfo(torch.float32).max
SINK_RANK = float(torch.nextafter(torch.tensor(_F32_MAX), torch.tensor(0.0)))


def force_diagonal(scores: torch.Tensor, forced: torch.Tensor, sink: bool = True) -> torch.Tensor:
    """Rank the forced key blocks first: the diagonal blocks (``forced [R, W]``, from
    :func:`_causal_forced`) and, with ``sink``, key block 0 (the first tokens: attention sinks,
    which mean pooling dilutes). The block holding the query block's first row above all
    (``inf``), any other diagonal block next (float32 max), then key block 0 (:data:`SINK_RANK`),
    then the scores (``-inf``: not causal). A query block can straddle two key blocks (``Nq <
    Nk``, offset not a multiple of the block); with ``top_k = 1`` the block of its first row is
    kept, so every row still attends to a key (its own block, or a fully causal earlier one) --
    never to nothing. With ``sink`` and ``top_k >= 2`` (3 when straddling) key block 0 is kept
    too. Sampled scoring passes ``sink=False`` (:func:`forces_sink`)."""
    first = forced & ~torch.nn.functional.pad(forced[:, :-1], (1, 0))  # leftmost forced block
    rank = torch.where(forced, torch.finfo(scores.dtype).max, scores)
    if sink:
        is_sink = (rank[..., :1] > float("-inf")) & ~forced[:, :1]  # block 0, where not diagonal
        rank[..., :1] = torch.where(is_sink, SINK_RANK, rank[..., :1])
    return rank.masked_fill_(first, float("inf"))


def forces_sink(scoring: str) -> bool:
    """Whether a scoring's selection forces key block 0 (the sinks) after the diagonal blocks:
    ``"pooled"`` does (mean pooling dilutes a sink's few keys), ``"sampled"`` does not. The
    sampled rows' exact attention already gives the sinks their mass, and a forced block 0 takes
    a slot from blocks that hold more: on SmolLM2-135M's real heads at 8K, 4 of 128 key blocks,
    even the block oracle made to keep block 0 falls to 0.82 of the oracle on its worst head, and
    sampled scoring with block 0 forced to 0.81; without it sampled(4) keeps 0.956 (worst head),
    and on Gemma-3-270M's global heads 0.942 (``benchmarks/block_scoring.py``,
    ``results/block_scoring_smollm2_8k.json``, ``block_scoring_gemma3_8k.json``)."""
    return check_block_scoring(scoring) == "pooled"


# allocation="head" / "layer": a query block keeps at most this many times its head's top_k key
# blocks. 2, not more: at 128K (bench_layer's heads, "layer" at 7.5%) caps of 2 / 3 gave recall
# 0.8061 / 0.8064 for the same tiles, and the ranking's work grows with the cap (NOTES v0.2.0-j)
HEAD_ALLOCATION_CAP = 2

# allocation="head" / "layer": each query block first keeps this share of its own top_k (rounded
# up; its forced blocks rank first in it), whatever the other query blocks' (or heads') estimated
# shares; only the rest of the budget goes to the largest shares. Pooled shares come from mean-
# pooled scores, which miss attention that sits in a few key columns (sinks, anchor tokens), and
# flat shares favour the early query blocks (fewer causal blocks, larger shares): with no floor
# such heads lost most of their blocks (issue #20). 0.875, not 0.75 or 0.5: on SmolLM2-135M's
# real heads (9 layers, 81 heads, 8K tokens, top_k 4 / 8 / 16 of 128 blocks, recall on 256
# stratified rows; benchmarks/allocation_real_heads.py, results/allocation_smollm2_8k.json) "layer"
# lost up to 0.044 / 0.046 / 0.085 of a head's recall against "query_block" with 0.75 (2 of 81
# heads beyond the promised 0.05 at 16) and 0.000 / 0.026 / 0.040 with 0.875, for a mean gain of
# +0.0064 / +0.0059 at 8 / 16 (0.75: +0.0088 / +0.0082); 0.5 lost up to 0.17. With top_k <= 7
# nothing is pooled.
HEAD_ALLOCATION_FLOOR = 0.875


def _floor_count(limit: torch.Tensor) -> torch.Tensor:
    """The guaranteed key blocks per query block of each head: ``ceil(FLOOR * limit)``."""
    return torch.ceil(limit.to(torch.float64) * HEAD_ALLOCATION_FLOOR).to(torch.int64)


# Scratch bytes of one chunk of query blocks in :func:`block_topk` (the scores; on the PyTorch
# path also their ranking copy and sort temporaries). Bounds the estimator's memory at any length: all block pairs of a 32-head
# layer at 1M tokens would be 34 GB in float32.
BLOCK_SCORE_CHUNK_BYTES = 256 << 20


def block_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: torch.Tensor | int,
    block_size: int,
    *,
    heads: slice | torch.Tensor | None = None,
    kv_of_q: torch.Tensor | None = None,
    top_k_max: int | None = None,
    backend: str = "torch",
    allocation: str = "query_block",
    scale: float | None = None,
    scoring: str = "pooled",
    softcap: float | None = None,
) -> torch.Tensor:
    """Block-sparse estimation (module doc): ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` ->
    ``[B, Hq, ceil(Nq / block_size), K]`` int64 key-block ids in ascending order, ``-1`` padding
    after them, with ``K = top_k_max`` (default ``max(top_k)``: a host sync when ``top_k`` is a
    tensor). Equal scores go to the lowest block id.

    ``backend="triton"`` selects with one Triton program per query block (no sort; rows of at most
    ``block_select_triton.BLOCK_SELECT_MAX`` key blocks, wider ones use the PyTorch top-k, with a log line);
    ``"torch"`` with a stable sort. Both pick the same blocks from the same scores.

    ``allocation="head"`` spreads each head's budget over its query blocks by estimated attention
    share, ``"layer"`` the budget of all the heads estimated here over their heads and query blocks
    (module doc; ``scale`` is the attention scale, default ``D ** -0.5``); the result then has
    ``K = HEAD_ALLOCATION_CAP * top_k_max`` columns (at most the key blocks). Each query block's
    candidates come from the same selection as above. With ``backend="triton"`` the candidates'
    shares come from that selection's kernel and the ranking across query blocks is Triton
    (:func:`minference_kernels.ops.head_rank_triton.head_keep`: no sort, no host sync); shares equal to float32
    rounding may then rank in another order than on the PyTorch path, which stays the reference.

    ``heads`` (a slice or an index tensor) estimates only those query heads of ``q`` (``Hq`` below
    is then their count; q is never copied). ``top_k`` is an int or a per-head ``[Hq]`` tensor;
    ``kv_of_q [Hq]`` maps the query heads to K's heads (default: the selected heads' own KV heads
    in consecutive GQA groups). Query blocks are scored in chunks of at most
    ``BLOCK_SCORE_CHUNK_BYTES`` against the key blocks causal for the chunk, so memory stays
    bounded and the non-causal half of the block pairs is never computed.

    ``scoring="sampled"`` scores each (query block, key block) pair by the attention mass that
    :data:`minference_kernels.ops.block_sampled.SAMPLED_ROWS` rows of the query block give the key block
    (their exact softmax; ranked as ``log(mass) / scale``, so the allocations' shares are the
    normalised masses) instead of the pooled dot product; the selection is the same, except that
    key block 0 is not forced (:func:`forces_sink`).

    ``softcap`` (module doc): the sampled rows' logits are soft-capped before their softmax; the
    pooled scores ``s`` become ``softcap * tanh(scale * s / softcap) / scale`` (the same proxy,
    capped like logits). ``scale`` (default ``D ** -0.5``) is the attention scale of both.
    """
    sink = forces_sink(scoring)
    b, _, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    if isinstance(heads, torch.Tensor):  # an index tensor may come from the host
        heads = heads.to(dev)
    block_size, mbq, mbk = _block_geometry(nq, nk, block_size)
    off = nk - nq
    pq: torch.Tensor | _SampledQ
    if scoring == "sampled":  # the sampled estimate: pk only carries the key-block count
        sampled = _SampledQ(q, k, heads, kv_of_q, block_size, d**-0.5 if scale is None else scale,
                            softcap=softcap, backend=backend)  # fmt: skip
        softcap = None  # the sampled rows cap their own logits
        pq = sampled
        kv_of_q = sampled.kv_of_q
    elif heads is None:
        pq = _pool_blocks(q, nq, mbq, block_size)  # [B, Hq, MBq, D]: 8 bytes per head and token
    elif isinstance(heads, slice):
        pq = _pool_blocks(q[:, heads], nq, mbq, block_size)
    else:
        pq = _pool_blocks(q, nq, mbq, block_size).index_select(1, heads)
    hq = pq.shape[1]
    if kv_of_q is None and heads is not None:  # the selected heads' own KV heads
        ids = (
            heads
            if isinstance(heads, torch.Tensor)
            else torch.arange(q.shape[1], device=dev)[heads]
        )
        kv_of_q = ids // (q.shape[1] // k.shape[1])  # built on the device: no host sync
    if top_k_max is None:
        top_k_max = int(top_k) if isinstance(top_k, int) else int(top_k.max())
    kmax = int(top_k_max)
    if isinstance(top_k, int):
        limit = torch.full((hq,), top_k, dtype=torch.int64, device=dev)
    else:
        limit = top_k.to(device=dev, dtype=torch.int64).expand(hq)
    kv_of_q = _kv_map(hq, k.shape[1], kv_of_q, dev)
    if isinstance(pq, _SampledQ):
        pk = torch.empty((b, hq, mbk, 0), device=dev)
    else:
        pk = _pool_blocks(k, nk, mbk, block_size).index_select(1, kv_of_q)  # [B, Hq, MBk, D]
    if kmax == 0:
        return torch.full((b, hq, mbq, 0), -1, dtype=torch.int64, device=dev)
    use_triton = backend == "triton"
    if use_triton and mbk > _triton_select_max():
        _log_wide_once(mbk)
        use_triton = False
    sc = d**-0.5 if scale is None else scale
    if allocation in ("head", "layer"):  # its own output, HEAD_ALLOCATION_CAP times wider
        return _select_per_head(
            pq, pk, limit, kmax, nq, nk, block_size, sc, use_triton, backend == "triton",
            pooled=allocation == "layer", softcap=softcap, sink=sink,
        )  # fmt: skip
    out = torch.full((b, hq, mbq, kmax), -1, dtype=torch.int64, device=dev)
    # bytes per score held at once: the scores (Triton), plus a ranking copy, sorted values and
    # int64 order (PyTorch)
    chunks = _score_chunks(
        pq, pk, nq, nk, block_size, 4 if use_triton else 20, scale=sc, softcap=softcap
    )
    for r0, r1, width, s in chunks:
        if use_triton:
            triton_module("block_select_triton").block_select(
                s, out[:, :, r0:r1], limit, r0=r0, nq=nq, off=off, block_size=block_size,
                kmax=kmax, sink=sink,
            )  # fmt: skip
            continue
        rows = torch.arange(r0, r1, device=dev)
        causal, forced = _causal_forced(rows, width, nq, off, block_size)
        ranked = force_diagonal(s.masked_fill_(~causal, float("-inf")), forced, sink)
        _select_rows(ranked, min(kmax, width), limit, out[:, :, r0:r1])
    return out


def _score_chunks(
    pq,
    pk,
    nq: int,
    nk: int,
    block_size: int,
    per_score: int,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
):
    """The pooled block scores in chunks of query blocks: yields ``(r0, r1, width, s)`` with
    ``s = pq[:, :, r0:r1] @ pk[:, :, :width]^T`` (float32), ``width`` the key blocks causal for the
    chunk's last row (later ones would be -inf for every row of the chunk). Chunks hold at most
    ``BLOCK_SCORE_CHUNK_BYTES`` at ``per_score`` bytes per score (the scores and the caller's
    temporaries). ``softcap``: ``s <- softcap * tanh(scale * s / softcap) / scale`` (the pooled
    proxy capped like logits, in its own units; module doc). Sampled scores (``pq`` a
    ``_SampledQ``, which caps its rows' logits itself) are yielded as they are."""
    if isinstance(pq, _SampledQ):
        yield from pq.chunks(per_score)
        return
    b, hq, mbq, _ = pq.shape
    mbk = pk.shape[2]
    rows_per = max(1, BLOCK_SCORE_CHUNK_BYTES // (per_score * b * hq * mbk))
    for r0 in range(0, mbq, rows_per):
        r1 = min(mbq, r0 + rows_per)
        last_pos = min(r1 * block_size, nq) - 1 + nk - nq
        width = min(mbk, last_pos // block_size + 1)
        s = torch.matmul(pq[:, :, r0:r1], pk[:, :, :width].transpose(-1, -2))
        yield r0, r1, width, softcap_(s, softcap, scale)


BLOCK_SCORINGS = ("pooled", "sampled")


def check_block_scoring(scoring: str, name: str = "scoring") -> str:
    """``scoring`` if it is one of :data:`BLOCK_SCORINGS`, else a ``ValueError`` naming ``name``."""
    if scoring not in BLOCK_SCORINGS:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, BLOCK_SCORINGS))}, got {scoring!r}"
        )
    return scoring


class _SampledQ:
    """Stands in for the pooled queries ``pq [B, H, MBq, D]`` of :func:`block_topk` when blocks are
    scored by sampled rows (:mod:`minference_kernels.ops.block_sampled`): it has the same ``shape``,
    ``device`` and head slicing, and :func:`_score_chunks` asks it for the scores."""

    def __init__(
        self, q, k, heads, kv_of_q, block_size: int, scale: float, ids=None, softcap=None,
        backend: str = "torch",
    ):  # fmt: skip
        self.q, self.k, self.block_size, self.scale = q, k, block_size, float(scale)
        self.softcap, self.backend = softcap, backend
        dev = q.device
        if ids is None:
            ids = torch.arange(q.shape[1], device=dev)
            if heads is not None:
                ids = ids[heads] if isinstance(heads, slice) else heads.to(dev)
        self.ids = ids
        if kv_of_q is None:
            kv_of_q = ids // (q.shape[1] // k.shape[1])
        self.kv_of_q = kv_of_q
        nq = q.shape[2]
        self.shape = (q.shape[0], int(ids.numel()), -(-nq // block_size), q.shape[3])
        self.device = dev

    def __getitem__(self, key):
        _, hs = key
        return _SampledQ(self.q, self.k, None, self.kv_of_q[hs], self.block_size, self.scale,
                         ids=self.ids[hs], softcap=self.softcap, backend=self.backend)  # fmt: skip

    def chunks(self, per_score: int):
        """The ranked scores ``log(mass + 1e-30) / scale`` in chunks of query blocks: the fused
        Triton kernel (:mod:`minference_kernels.ops.block_sampled_triton`) with ``backend="triton"``, where
        it supports the shape (else the PyTorch path, with a log line), else the PyTorch reference
        (:func:`minference_kernels.ops.block_sampled.sampled_mass_chunks`)."""
        rows = block_sampled.SAMPLED_ROWS  # read at each call (benchmarks set it)
        if self.backend == "triton":
            st = triton_module("block_sampled_triton")
            why = st.unsupported(self.q, self.block_size, rows)
            if why is None:
                yield from st.sampled_mass_chunks_triton(
                    self.q, self.k, self.ids, self.kv_of_q, self.block_size, self.scale,
                    rows=rows, softcap=self.softcap, ranked=True, per_score=per_score,
                )  # fmt: skip
                return
            st.log_fallback(why)
        for r0, r1, width, mass in block_sampled.sampled_mass_chunks(
            self.q, self.k, self.ids, self.kv_of_q, self.block_size, self.scale, rows=rows,
            softcap=self.softcap,
        ):  # fmt: skip
            yield r0, r1, width, mass.add_(1e-30).log_().div_(self.scale)


def _select_rows(
    ranked: torch.Tensor,
    kk: int,
    limit: torch.Tensor,
    dst: torch.Tensor,
    order: torch.Tensor | None = None,
) -> None:
    """The PyTorch selection: of ``ranked [B, H, R, W]`` (causal-masked, forced blocks ranked
    first), the ``min(limit[h], kk)`` best key blocks of each row, by a stable sort (ties to the
    lowest id), written ascending into ``dst[..., :kk]`` (pre-filled with -1). ``order``: that
    sort's first ``kk`` indices, when the caller has them."""
    if order is None:
        order = _topk_stable(ranked, kk)
    ok = (torch.gather(ranked, -1, order) > float("-inf")) & (
        torch.arange(kk, device=ranked.device)[None, None, None, :] < limit[None, :, None, None]
    )
    picked = torch.where(ok, order, _BIG).sort(-1).values
    dst[..., :kk] = torch.where(picked == _BIG, -1, picked)


# allocation="head": bytes of candidates ranked at once (share, id and ranking temporaries: under
# 28 bytes each on the PyTorch path, 20 with the Triton ranking: share, id and output id); heads
# are ranked in groups that fit, at least one head per group
HEAD_RANK_BYTES = 1 << 30


def _select_per_head(
    pq, pk, limit, kmax, nq, nk, block_size, scale, use_triton, rank_triton, pooled=False,
    softcap=None, sink=True,
) -> torch.Tensor:  # fmt: skip
    """``allocation="head"`` (``pooled``: ``"layer"``; module doc): pooled ``pq [B, H, MBq, D]``,
    ``pk [B, H, MBk, D]``, per-head ``limit [H]`` -> ``[B, H, MBq, cap]`` ascending key-block ids,
    ``-1`` padding.

    Each query block's candidates are its ``HEAD_ALLOCATION_CAP * limit[h]`` best key blocks by
    the per-block rule (forced blocks first, then the scores, ties to the lowest id; the Triton
    selection where ``use_triton``, which then also writes their shares); of their shares
    (log-softmax of the scaled pooled scores; the forced blocks' ranks; ``inf`` for the query
    block's ``ceil(HEAD_ALLOCATION_FLOOR * limit[h])`` best, which always fit) the
    head's ``budget[h]`` largest win (:func:`_best_of_rows`, or the Triton ranking where
    ``rank_triton``; equal shares: the lower query block, then the lower key block). ``pooled``:
    the heads ranked together pool their budgets, and the largest shares of all of them win
    (equal shares: the lower head first). Memory: under 28 bytes (20 with ``rank_triton``) per
    candidate of the heads ranked together (``HEAD_RANK_BYTES``), plus a chunk's scores within
    ``BLOCK_SCORE_CHUNK_BYTES``. ``softcap``: the pooled scores are capped first
    (:func:`_score_chunks`), so the shares are those of the capped logits. ``sink``: key block 0
    is forced (:func:`forces_sink`).
    """
    b, hq, mbq, _ = pq.shape
    cap = min(pk.shape[2], HEAD_ALLOCATION_CAP * kmax)
    per = (20 if rank_triton else 28) * b * mbq * cap
    group = max(1, HEAD_RANK_BYTES // per)
    if pooled and group < hq:
        _log.info(
            "block_allocation='layer': the candidates of %d heads (%.1f GiB) exceed "
            "HEAD_RANK_BYTES; ranked in groups of %d heads, each pooling its own budget",
            hq, hq * per / 2**30, group,
        )  # fmt: skip
    parts = [
        _select_heads(pq[:, h0 : h0 + group], pk[:, h0 : h0 + group], limit[h0 : h0 + group],
                      cap, nq, nk, block_size, scale, use_triton, rank_triton, pooled, softcap,
                      sink)
        for h0 in range(0, hq, group)
    ]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _select_heads(
    pq, pk, limit, cap, nq, nk, block_size, scale, use_triton, rank_triton, pooled, softcap=None,
    sink=True,
) -> torch.Tensor:  # fmt: skip
    b, hq, mbq, _ = pq.shape
    mbk = pk.shape[2]
    dev = pq.device
    off = nk - nq
    per_cap = HEAD_ALLOCATION_CAP * limit
    floor = _floor_count(limit)
    ids = torch.full((b, hq, mbq, cap), -1, dtype=torch.int64, device=dev)
    vals = torch.full((b, hq, mbq, cap), float("-inf"), dtype=torch.float32, device=dev)
    # bytes per score held at once: the scores (Triton, which also writes the winners' shares),
    # plus ranking and share temporaries (PyTorch)
    per_score = 4 if use_triton else 20
    chunks = _score_chunks(pq, pk, nq, nk, block_size, per_score, scale=scale, softcap=softcap)
    for r0, r1, width, s in chunks:
        cand = ids[:, :, r0:r1]
        if use_triton:
            triton_module("block_select_triton").block_select(
                s, cand, per_cap, r0=r0, nq=nq, off=off, block_size=block_size, kmax=cap,
                shares=vals[:, :, r0:r1], scale=scale, floor=floor, sink=sink,
            )  # fmt: skip
            continue
        rows = torch.arange(r0, r1, device=dev)
        causal, forced = _causal_forced(rows, width, nq, off, block_size)
        kk = min(cap, width)
        ranked = force_diagonal(s.masked_fill(~causal, float("-inf")), forced, sink)
        order = _topk_stable(ranked, kk)  # each query block's candidates, best first
        _select_rows(ranked, kk, per_cap, cand, order=order)
        share = torch.log_softmax(s.mul_(scale).masked_fill_(~causal, float("-inf")), -1)
        share = force_diagonal(share, forced, sink)
        # the query block's guaranteed blocks (its floor[h] best) rank above everything else
        best = torch.gather(share, -1, order)
        guar = torch.arange(kk, device=dev)[None, None, None, :] < floor[None, :, None, None]
        guar = guar & (best > float("-inf"))  # causal ones only
        share.scatter_(-1, order, best.masked_fill_(guar, float("inf")))
        got = torch.gather(share, -1, cand[..., :kk].clamp(min=0))
        vals[:, :, r0:r1, :kk] = got.masked_fill_(cand[..., :kk] < 0, float("-inf"))
    # the head's budget: what top_k per query block would keep (causal blocks per query block)
    rows = torch.arange(mbq, device=dev)
    last = torch.clamp((rows + 1) * block_size, max=nq) - 1 + off
    n_causal = torch.clamp(last // block_size + 1, max=mbk)
    budget = torch.minimum(limit[:, None], n_causal[None, :]).sum(-1)  # [H]
    # "layer": one ranking row per batch item, the heads' candidates one after the other
    rank_shape = (b, 1, hq * mbq, cap) if pooled else (b, hq, mbq, cap)
    if pooled:
        budget = budget.sum(0, keepdim=True)
    if rank_triton:  # the same winners, by counting passes and a compaction (no sort)
        head_keep = triton_module("head_rank_triton").head_keep
        out = head_keep(vals.view(rank_shape), ids.view(rank_shape), budget)
        return out.view_as(ids)
    keep = _best_of_rows(vals.reshape(b, rank_shape[1], -1), budget)
    # candidates are ascending per query block: dropping the losers keeps them ascending
    picked = torch.where(keep.view_as(ids), ids, _BIG).sort(-1).values
    return torch.where(picked == _BIG, -1, picked)
