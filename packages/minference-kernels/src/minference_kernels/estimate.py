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

Block-sparse (per query head): mean-pool queries and keys over blocks of ``block_size`` positions
(queries from q's first row, keys from position 0; a partial last block averages its real rows),
score block pairs by the dot product of the pooled vectors, and keep the ``top_k`` highest causal key
blocks per query block. The key blocks that hold the query block's own positions (its diagonal) are
always kept, so every row attends at least to itself (with ``top_k = 1`` and a query block that
straddles two key blocks, the one holding its first row: every row still attends to a key). Rows
with fewer than ``top_k`` causal key blocks are padded with ``-1``.

With ``allocation="head"`` the budget is the head's, not the query block's: the head keeps as many
(query block, key block) pairs in all as ``top_k`` per query block would (``sum_m min(top_k,
causal blocks of m)``), chosen where the estimated attention share is highest: each query block's
pooled scores (times the attention scale) go through a softmax over its causal key blocks, and the
pairs with the largest shares win, across query blocks (the diagonal blocks first, as above). A
query block keeps at most ``HEAD_ALLOCATION_CAP * top_k`` key blocks. Query blocks whose attention
is spread get more key blocks, peaked ones fewer, for the same kernel work.

With ``allocation="layer"`` the heads estimated together (a layer's block-sparse heads) pool their
budgets: the layer keeps as many pairs in all as ``"head"`` would, and the largest shares win across
heads and query blocks (equal shares: the lower head, then as above), so heads whose attention is
spread take pairs from peaked ones. Each query block keeps at most ``HEAD_ALLOCATION_CAP`` times its
head's ``top_k``. Heads whose candidates exceed ``HEAD_RANK_BYTES`` are ranked in consecutive
groups, each pooling its own heads' budgets (with a log line).

Selection is deterministic: the same inputs give the same indices run to run.
"""

from __future__ import annotations

import logging

import torch

from .index import _BIG

_log = logging.getLogger("minference_kernels")

KEEP_FIRST = 30
KEEP_LOCAL = 100


def _topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k along the last dim, highest first, int64 ``[..., k]``. Deterministic run to run."""
    if k == 0:
        return score.new_zeros((*score.shape[:-1], 0), dtype=torch.int64)
    return torch.topk(score, k, dim=-1, largest=True, sorted=True).indices


def _topk_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """As :func:`_topk_indices`, but equal scores go to the lowest index (a stable sort), the rule
    of the Triton block selection: the same blocks on every device and backend."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def _triton_select_max() -> int:
    from . import _triton

    return _triton.BLOCK_SELECT_MAX


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


def vs_scores_torch(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float):
    """``(vertical [B, Hq, Nk], slash [B, Hq, Nk])`` float32 scores, chunked over KV heads."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    lq = min(last_q, nq)
    p0 = nk - lq
    qpos = p0 + torch.arange(lq, device=q.device)
    keys = torch.arange(nk, device=q.device)
    causal = keys[None, :] <= qpos[:, None]  # [Lq, Nk]
    offs = (qpos[:, None] - keys[None, :]).clamp(min=0)  # [Lq, Nk]
    vertical = torch.empty((b, hq, nk), dtype=torch.float32, device=q.device)
    slash = torch.zeros((b, hq, nk), dtype=torch.float32, device=q.device)
    for j in range(hkv):
        qs = q[:, j * g : (j + 1) * g, nq - lq :].float()  # [B, g, Lq, D]
        kk = k[:, j : j + 1].float()  # [B, 1, Nk, D]
        s = torch.matmul(qs, kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        vertical[:, j * g : (j + 1) * g] = p.sum(-2)
        sl = torch.zeros((b, g, nk), dtype=torch.float32, device=q.device)
        sl.scatter_add_(-1, offs.expand(b, g, lq, nk).reshape(b, g, -1), p.reshape(b, g, -1))
        slash[:, j * g : (j + 1) * g] = sl
    return vertical, slash


def select_vertical_slash(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    num_vertical: torch.Tensor | int,
    num_slash: torch.Tensor | int,
    keep_first: int = KEEP_FIRST,
    keep_local: int = KEEP_LOCAL,
    coverage: float | None = None,
    budget_max: tuple[int, int] | None = None,
):
    """Scores -> indices with per-head budgets. Returns ``(v [B,H,NVmax], v_valid, s [B,H,NSmax],
    s_valid)``; entries beyond a head's budget are invalid (``valid == False``).

    Budgets are ints (every head) or ``[H]`` / ``[B, H]`` tensors. ``budget_max`` (the largest
    vertical and slash budget, when the caller knows them) avoids reading them back from the
    device (a host sync).

    ``coverage`` (adaptive budgets): keep only the highest-scoring columns and diagonals, taken
    jointly by score, until their estimated mass reaches ``coverage`` of the last queries' total
    attention (always at least the forced sinks and local diagonals, never more than the budget).
    """
    b, h, nk = vertical.shape
    dev = vertical.device

    def budget(x: torch.Tensor | int) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(dev).clamp(max=nk).expand(b, h)
        return torch.full((b, h), min(int(x), nk), dtype=torch.int64, device=dev)  # no sync

    nv, ns = budget(num_vertical), budget(num_slash)
    if budget_max is not None:
        nv_max, ns_max = min(int(budget_max[0]), nk), min(int(budget_max[1]), nk)
    elif isinstance(num_vertical, int) and isinstance(num_slash, int):
        nv_max, ns_max = min(num_vertical, nk), min(num_slash, nk)
    else:
        nv_max, ns_max = int(nv.max()), int(ns.max())
    pos = torch.arange(nk, device=dev)
    fv = torch.minimum(nv, torch.full_like(nv, keep_first))
    fs = torch.minimum(ns, torch.full_like(ns, keep_local))
    v_forced = torch.where(pos[None, None, :] < fv[..., None], float("inf"), vertical)
    s_forced = torch.where(pos[None, None, :] < fs[..., None], float("inf"), slash)
    v_idx = _topk_indices(v_forced, nv_max)
    s_idx = _topk_indices(s_forced, ns_max)
    if coverage is not None:
        nv, ns = _coverage_budgets(vertical, slash, v_idx, s_idx, nv, ns, fv, fs, coverage)
    v_valid = torch.arange(nv_max, device=dev)[None, None, :] < nv[..., None]
    s_valid = torch.arange(ns_max, device=dev)[None, None, :] < ns[..., None]
    return v_idx, v_valid, s_idx, s_valid


def _coverage_budgets(vertical, slash, v_idx, s_idx, nv, ns, fv, fs, coverage):
    """Per-head counts of columns / diagonals whose joint estimated mass reaches ``coverage``."""
    dev = vertical.device
    vv = torch.gather(vertical, -1, v_idx)
    sv = torch.gather(slash, -1, s_idx)
    # beyond-budget entries never count
    vv = torch.where(torch.arange(vv.shape[-1], device=dev) < nv[..., None], vv, -1.0)
    sv = torch.where(torch.arange(sv.shape[-1], device=dev) < ns[..., None], sv, -1.0)
    both = torch.sort(torch.cat([vv, sv], -1), dim=-1, descending=True).values
    total = vertical.sum(-1)  # = number of estimation rows (each softmax row sums to 1)
    cum = torch.cumsum(both.clamp(min=0), -1)
    n_take = (cum < coverage * total[..., None]).sum(-1, keepdim=True).clamp(max=both.shape[-1] - 1)
    tau = torch.gather(both, -1, n_take)  # the score of the last entry needed
    nv_eff = (vv >= tau).sum(-1)
    ns_eff = (sv >= tau).sum(-1)
    return torch.maximum(nv_eff, fv).minimum(nv), torch.maximum(ns_eff, fs).minimum(ns)


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
):
    if backend == "triton":
        from . import _triton

        vertical, slash = _triton.vs_scores(q, k, last_q, scale)
    else:
        vertical, slash = vs_scores_torch(q, k, last_q, scale)
    return select_vertical_slash(
        vertical, slash, num_vertical, num_slash, keep_first, keep_local, coverage
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


def force_diagonal(scores: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Rank the forced (diagonal) key blocks first: the one holding the query block's first row
    above all (``inf``), any other diagonal block next (the largest finite score). A query block can
    straddle two key blocks (``Nq < Nk``, offset not a multiple of the block); with ``top_k = 1`` the
    block of its first row is kept, so every row still attends to a key (its own block, or a fully
    causal earlier one) -- never to nothing."""
    first = forced & ~torch.nn.functional.pad(forced[:, :-1], (1, 0))  # leftmost forced block
    rank = torch.where(forced, torch.finfo(scores.dtype).max, scores)
    return rank.masked_fill_(first, float("inf"))


# allocation="head" / "layer": a query block keeps at most this many times its head's top_k key
# blocks. 2, not more: at 128K (bench_layer's heads, "layer" at 7.5%) caps of 2 / 3 gave recall
# 0.8061 / 0.8064 for the same tiles, and the ranking's work grows with the cap (NOTES v0.2.0-j)
HEAD_ALLOCATION_CAP = 2

ALLOCATIONS = ("query_block", "head", "layer")


def check_allocation(allocation: str, name: str = "block_allocation") -> str:
    """``allocation`` if it is one of :data:`ALLOCATIONS`, else a ``ValueError`` naming ``name``
    (the integrations validate their settings with it too)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}"
        )
    return allocation


def check_coverage(coverage: float | None, name: str = "coverage") -> None:
    """``None``, or a number in (0, 1] (NaN is not), else a ``TypeError``/``ValueError`` naming
    ``name`` (the adaptive budgets' share of the estimated mass; the integrations validate their
    settings with it too)."""
    if coverage is None:
        return
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1] or None, got {type(coverage).__name__}")
    if not (0.0 < coverage <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {coverage}")


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
) -> torch.Tensor:
    """Block-sparse estimation (module doc): ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` ->
    ``[B, Hq, ceil(Nq / block_size), K]`` int64 key-block ids in ascending order, ``-1`` padding
    after them, with ``K = top_k_max`` (default ``max(top_k)``: a host sync when ``top_k`` is a
    tensor). Equal scores go to the lowest block id.

    ``backend="triton"`` selects with one Triton program per query block (no sort; rows of at most
    ``_triton.BLOCK_SELECT_MAX`` key blocks, wider ones use the PyTorch top-k, with a log line);
    ``"torch"`` with a stable sort. Both pick the same blocks from the same scores.

    ``allocation="head"`` spreads each head's budget over its query blocks by estimated attention
    share, ``"layer"`` the budget of all the heads estimated here over their heads and query blocks
    (module doc; ``scale`` is the attention scale, default ``D ** -0.5``); the result then has
    ``K = HEAD_ALLOCATION_CAP * top_k_max`` columns (at most the key blocks). Each query block's
    candidates come from the same selection as above. With ``backend="triton"`` the candidates'
    shares come from that selection's kernel and the ranking across query blocks is Triton
    (:func:`minference_kernels._triton.head_keep`: no sort, no host sync); shares equal to float32
    rounding may then rank in another order than on the PyTorch path, which stays the reference.

    ``heads`` (a slice or an index tensor) estimates only those query heads of ``q`` (``Hq`` below
    is then their count; q is never copied). ``top_k`` is an int or a per-head ``[Hq]`` tensor;
    ``kv_of_q [Hq]`` maps the query heads to K's heads (default: the selected heads' own KV heads
    in consecutive GQA groups). Query blocks are scored in chunks of at most
    ``BLOCK_SCORE_CHUNK_BYTES`` against the key blocks causal for the chunk, so memory stays
    bounded and the non-causal half of the block pairs is never computed.
    """
    b, _, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    block_size, mbq, mbk = _block_geometry(nq, nk, block_size)
    off = nk - nq
    if heads is None:
        pq = _pool_blocks(q, nq, mbq, block_size)  # [B, Hq, MBq, D]: 8 bytes per head and token
    elif isinstance(heads, slice):
        pq = _pool_blocks(q[:, heads], nq, mbq, block_size)
    else:
        pq = _pool_blocks(q, nq, mbq, block_size).index_select(1, heads)
    hq = pq.shape[1]
    if kv_of_q is None and heads is not None:  # the selected heads' own KV heads
        ids = (
            heads.to(dev)
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
    pk = _pool_blocks(k, nk, mbk, block_size).index_select(1, kv_of_q)  # [B, Hq, MBk, D]
    if kmax == 0:
        return torch.full((b, hq, mbq, 0), -1, dtype=torch.int64, device=dev)
    use_triton = backend == "triton"
    if use_triton and mbk > _triton_select_max():
        _log_wide_once(mbk)
        use_triton = False
    if allocation in ("head", "layer"):  # its own output, HEAD_ALLOCATION_CAP times wider
        sc = d**-0.5 if scale is None else scale
        return _select_per_head(
            pq, pk, limit, kmax, nq, nk, block_size, sc, use_triton, backend == "triton",
            pooled=allocation == "layer",
        )  # fmt: skip
    out = torch.full((b, hq, mbq, kmax), -1, dtype=torch.int64, device=dev)
    # bytes per score held at once: the scores (Triton), plus a ranking copy, sorted values and
    # int64 order (PyTorch)
    for r0, r1, width, s in _score_chunks(pq, pk, nq, nk, block_size, 4 if use_triton else 20):
        if use_triton:
            from . import _triton

            _triton.block_select(
                s, out[:, :, r0:r1], limit, r0=r0, nq=nq, off=off, block_size=block_size, kmax=kmax
            )
            continue
        rows = torch.arange(r0, r1, device=dev)
        causal, forced = _causal_forced(rows, width, nq, off, block_size)
        ranked = force_diagonal(s.masked_fill_(~causal, float("-inf")), forced)
        _select_rows(ranked, min(kmax, width), limit, out[:, :, r0:r1])
    return out


def _score_chunks(pq, pk, nq: int, nk: int, block_size: int, per_score: int):
    """The pooled block scores in chunks of query blocks: yields ``(r0, r1, width, s)`` with
    ``s = pq[:, :, r0:r1] @ pk[:, :, :width]^T`` (float32), ``width`` the key blocks causal for the
    chunk's last row (later ones would be -inf for every row of the chunk). Chunks hold at most
    ``BLOCK_SCORE_CHUNK_BYTES`` at ``per_score`` bytes per score (the scores and the caller's
    temporaries)."""
    b, hq, mbq, _ = pq.shape
    mbk = pk.shape[2]
    rows_per = max(1, BLOCK_SCORE_CHUNK_BYTES // (per_score * b * hq * mbk))
    for r0 in range(0, mbq, rows_per):
        r1 = min(mbq, r0 + rows_per)
        last_pos = min(r1 * block_size, nq) - 1 + nk - nq
        width = min(mbk, last_pos // block_size + 1)
        yield r0, r1, width, torch.matmul(pq[:, :, r0:r1], pk[:, :, :width].transpose(-1, -2))


def _select_rows(ranked: torch.Tensor, kk: int, limit: torch.Tensor, dst: torch.Tensor) -> None:
    """The PyTorch selection: of ``ranked [B, H, R, W]`` (causal-masked, diagonal blocks ranked
    first), the ``min(limit[h], kk)`` best key blocks of each row, by a stable sort (ties to the
    lowest id), written ascending into ``dst[..., :kk]`` (pre-filled with -1)."""
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
    pq, pk, limit, kmax, nq, nk, block_size, scale, use_triton, rank_triton, pooled=False
) -> torch.Tensor:
    """``allocation="head"`` (``pooled``: ``"layer"``; module doc): pooled ``pq [B, H, MBq, D]``,
    ``pk [B, H, MBk, D]``, per-head ``limit [H]`` -> ``[B, H, MBq, cap]`` ascending key-block ids,
    ``-1`` padding.

    Each query block's candidates are its ``HEAD_ALLOCATION_CAP * limit[h]`` best key blocks by
    the per-block rule (diagonal blocks first, then the scores, ties to the lowest id; the Triton
    selection where
    ``use_triton``, which then also writes their shares); of their shares (log-softmax of the
    scaled pooled scores) the head's ``budget[h]`` largest win (:func:`_best_of_rows`, or the
    Triton ranking where ``rank_triton``; equal shares: the lower query block, then the lower key
    block). ``pooled``: the heads ranked together pool their budgets, and the largest shares of
    all of them win (equal shares: the lower head first). Memory: under 28 bytes (20 with
    ``rank_triton``) per candidate of the heads ranked together (``HEAD_RANK_BYTES``), plus a
    chunk's scores within ``BLOCK_SCORE_CHUNK_BYTES``.
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
                      cap, nq, nk, block_size, scale, use_triton, rank_triton, pooled)
        for h0 in range(0, hq, group)
    ]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _select_heads(
    pq, pk, limit, cap, nq, nk, block_size, scale, use_triton, rank_triton, pooled
) -> torch.Tensor:
    b, hq, mbq, _ = pq.shape
    mbk = pk.shape[2]
    dev = pq.device
    off = nk - nq
    per_cap = HEAD_ALLOCATION_CAP * limit
    ids = torch.full((b, hq, mbq, cap), -1, dtype=torch.int64, device=dev)
    vals = torch.full((b, hq, mbq, cap), float("-inf"), dtype=torch.float32, device=dev)
    # bytes per score held at once: the scores (Triton, which also writes the winners' shares),
    # plus ranking and share temporaries (PyTorch)
    per_score = 4 if use_triton else 20
    for r0, r1, width, s in _score_chunks(pq, pk, nq, nk, block_size, per_score):
        cand = ids[:, :, r0:r1]
        if use_triton:
            from . import _triton

            _triton.block_select(
                s, cand, per_cap, r0=r0, nq=nq, off=off, block_size=block_size, kmax=cap,
                shares=vals[:, :, r0:r1], scale=scale,
            )  # fmt: skip
            continue
        rows = torch.arange(r0, r1, device=dev)
        causal, forced = _causal_forced(rows, width, nq, off, block_size)
        kk = min(cap, width)
        ranked = force_diagonal(s.masked_fill(~causal, float("-inf")), forced)
        _select_rows(ranked, kk, per_cap, cand)
        share = torch.log_softmax(s.mul_(scale).masked_fill_(~causal, float("-inf")), -1)
        share = force_diagonal(share, forced)
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
        from . import _triton

        out = _triton.head_keep(vals.view(rank_shape), ids.view(rank_shape), budget)
        return out.view_as(ids)
    keep = _best_of_rows(vals.reshape(b, rank_shape[1], -1), budget)
    # candidates are ascending per query block: dropping the losers keeps them ascending
    picked = torch.where(keep.view_as(ids), ids, _BIG).sort(-1).values
    return torch.where(picked == _BIG, -1, picked)


def _best_of_rows(x: torch.Tensor, count: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """``bool`` mask of the ``count[h]`` largest finite entries of each row of ``x [B, H, L]``
    (float32), equal values to the earlier position: what a stable descending sort ranks first.

    The PyTorch ranking (the reference; CUDA with ``backend="triton"`` uses
    :func:`minference_kernels._triton.head_keep`, 7x faster at 128K). ``method="bisect"`` (the
    default on CUDA) finds the ``count``-th largest value by a bisection
    over a monotone int32 image of the floats (32 counting passes, no sort, no host sync), then
    cuts ties by position; ``"sort"`` (the default elsewhere: 2x faster than 32 passes on a CPU)
    ranks by a stable sort. Both give the same mask."""
    if (method or ("bisect" if x.is_cuda else "sort")) == "sort":
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
        return (rank < count.to(torch.int64)[None, :, None]) & (x > float("-inf"))
    bits = x.contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32, ordered like the floats
    need = count.to(torch.int64)[None, :, None]
    # invariant: #(key >= lo) >= need > #(key >= hi)
    lo = torch.full(need.shape, -(2**31), dtype=torch.int64, device=x.device).expand(
        x.shape[0], -1, -1
    )
    hi = torch.full_like(lo, 2**31)
    for _ in range(32):
        mid = (lo + hi) >> 1
        ge = (key >= mid.to(torch.int32)).sum(-1, keepdim=True) >= need
        lo = torch.where(ge, mid, lo)
        hi = torch.where(ge, hi, mid)
    t = lo.to(torch.int32)
    above = key > t
    tie = key == t
    room = need - above.sum(-1, keepdim=True)
    keep = above | (tie & (torch.cumsum(tie, -1) <= room))
    return keep & (x > float("-inf"))


def estimate_block_sparse_impl(
    q, k, top_k, block_size, backend: str = "torch", allocation: str = "query_block"
):
    return block_topk(q, k, int(top_k), block_size, backend=backend, allocation=allocation)


__all__ = [
    "KEEP_FIRST",
    "KEEP_LOCAL",
    "estimate_vertical_slash_impl",
    "estimate_block_sparse_impl",
    "block_topk",
    "BLOCK_SCORE_CHUNK_BYTES",
    "HEAD_ALLOCATION_CAP",
    "force_diagonal",
    "vs_scores_torch",
    "select_vertical_slash",
    "_BIG",
]
