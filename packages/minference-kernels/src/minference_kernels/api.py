"""Public functions. Layout: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``
(K/V are never repeated per query head), causal with the diagonal aligned bottom-right: query row
``i`` is at absolute position ``i + Nk - Nq`` (q may hold only the last ``Nq <= Nk`` positions).

Every function runs on CPU tensors (PyTorch, float32 arithmetic) and CUDA tensors (Triton), in
float32, float16 and bfloat16. ``backend="auto"`` picks Triton on CUDA and PyTorch on CPU;
``backend="triton"`` on CPU tensors runs the Triton kernels under ``TRITON_INTERPRET=1``.
A query row that attends to no key (possible only with user-given empty index sets) outputs zeros.
Outputs are ``[B, Hq, Nq, D]``; the Triton path returns a view of ``[B, Nq, Hq, D]`` memory (so
``out.transpose(1, 2)``, the layout transformers and vLLM want, is contiguous without a copy).

Attention-logit soft-capping (Gemma 2): every function that computes attention or estimates an
index takes a keyword ``softcap: float | None = None`` (checked by
:func:`minference_kernels._validate.check_softcap`). With it each logit ``scale * q.k`` becomes
``softcap * tanh(logit / softcap)`` before the causal mask and the softmax, in the attention
kernels and in the online estimation alike (:mod:`minference_kernels.estimate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import masks as _masks
from ._device import on_input_device
from ._validate import (
    Shape,
    _check_tensor,
    check_index,
    check_int,
    check_layer_settings,
    check_qkv,
    check_scale,
    check_softcap,
    resolve_backend,
)
from ._validate import check_allocation as _check_allocation
from ._validate import check_coverage as _check_coverage
from ._validate import check_last_q as _check_last_q
from .estimate import estimate_block_sparse_impl, estimate_vertical_slash_impl
from .index import BLOCK, SparseIndex, sorted_unique
from .ops import attention as _torch_attn  # the PyTorch path
from .ops import index_build as _index
from .ops._dispatch import pick
from .ops.block_select import block_topk, check_block_scoring
from .ops.vs_scores import select_vertical_slash, vs_scores, vs_scores_torch
from .options import DEFAULT_BACKEND, DEFAULT_BLOCK_ALLOCATION, DEFAULT_LAST_Q
from .patterns import HeadPattern, check_heads

_log = logging.getLogger("minference_kernels")


def _attend(
    q, k, v, idx: SparseIndex, scale: float, backend: str, softcap: float | None = None
) -> torch.Tensor:
    attend = pick(backend, _torch_attn.attend, "attention_triton.attend")
    return attend(q, k, v, idx, scale, softcap=softcap)


@on_input_device
def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dense causal attention (the reference and the fallback). Returns ``[B, Hq, Nq, D]``.

    CUDA with ``Nq == Nk``: PyTorch SDPA (cuDNN / flash) with native GQA. CUDA with ``Nq < Nk``: the
    Triton kernel with every key tile. CPU: SDPA in chunks of 1024 query rows (memory
    ``O(1024 * Nk)``), or the Triton kernel under the interpreter with ``backend="triton"``.

    ``softcap`` (keyword, default ``None``): attention-logit soft-capping (Gemma 2): each logit
    ``scale * q.k`` becomes ``softcap * tanh(logit / softcap)`` before the causal mask and the
    softmax; a positive finite number, or ``None`` for none. SDPA has no soft-capping: with
    ``softcap`` the Triton backend (CUDA by default) runs the Triton kernel with every key tile,
    the PyTorch backend (CPU by default) chunked float32 matmuls with the cap (per KV head group,
    no K/V repeat).
    """
    shape = check_qkv(q, k, _check_tensor(v, "v"))
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    be = resolve_backend(backend, q.device)
    if softcap is not None:
        if be == "triton":
            return _attend(q, k, v, _dense_index(shape, q.device), scale, "triton", softcap)
        return _torch_attn.dense(q, k, v, scale, softcap=softcap)
    if be == "triton" and (q.device.type != "cuda" or shape.n_q != shape.n_kv):
        return _attend(q, k, v, _dense_index(shape, q.device), scale, "triton")
    if q.device.type == "cuda" and shape.n_q == shape.n_kv:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=shape.heads_q != shape.heads_kv
        )
    return _torch_attn.dense(q, k, v, scale)


def _dense_index(shape: Shape, device) -> SparseIndex:
    b, h = shape.batch, shape.heads_q
    t = _index.n_window_tiles(shape.n_kv)
    win = torch.full((b * h,), shape.n_kv, dtype=torch.int64, device=device)
    tiles, n = _index.window_tiles(win, t)
    return _index.assemble(
        batch=b,
        heads=h,
        n_q=shape.n_q,
        n_kv=shape.n_kv,
        device=device,
        rel_tiles=tiles.reshape(b, h, t),
        rel_count=n.reshape(b, h),
    )


def vertical_slash_index(
    vertical_indices: torch.Tensor,
    slash_indices: torch.Tensor,
    n_q: int,
    n_kv: int,
    *,
    backend: str = "torch",
) -> SparseIndex:
    """Build the kernel index for vertical-slash heads (no validation; see the attention function)."""
    b, h = vertical_indices.shape[:2]
    tiles, n_tiles, cols, col_total = _index.vertical_slash_pieces(
        vertical_indices, slash_indices, backend
    )
    return _index.assemble(
        batch=b,
        heads=h,
        n_q=n_q,
        n_kv=n_kv,
        device=vertical_indices.device,
        rel_tiles=tiles,
        rel_count=n_tiles,
        cols=cols,
        col_total=col_total,
    )


@on_input_device
def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vertical_indices: torch.Tensor,
    slash_indices: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over key columns and diagonals. Returns ``[B, Hq, Nq, D]``.

    ``vertical_indices [B, Hq, NV]``: key positions in ``[0, Nk)``. ``slash_indices [B, Hq, NS]``:
    diagonal offsets ``i - j`` in ``[0, Nk)`` (absolute positions). Any order; duplicates allowed.
    Slashes are computed at 64-key tile granularity: the exact attended set (a superset of the named
    pairs) is :func:`vertical_slash_mask`.

    ``softcap`` (keyword, default ``None``): attention-logit soft-capping (Gemma 2): each logit
    ``scale * q.k`` becomes ``softcap * tanh(logit / softcap)`` before the causal mask and the
    softmax; a positive finite number, or ``None`` for none.
    """
    shape = check_qkv(q, k, _check_tensor(v, "v"))
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    be = resolve_backend(backend, q.device)
    for name, x in (("vertical_indices", vertical_indices), ("slash_indices", slash_indices)):
        check_index(x, name, shape, ndim=3, low=0, high=shape.n_kv)
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    idx = vertical_slash_index(vertical_indices, slash_indices, shape.n_q, shape.n_kv, backend=be)
    return _attend(q, k, v, idx, scale, be, softcap)


def block_sparse_index(
    block_indices: torch.Tensor, block_size: int, n_q: int, n_kv: int
) -> SparseIndex:
    b, h = block_indices.shape[:2]
    tiles, count = _index.block_sparse_pieces(block_indices, block_size, n_q, n_kv)
    return _index.assemble(
        batch=b,
        heads=h,
        n_q=n_q,
        n_kv=n_kv,
        device=block_indices.device,
        abs_tiles=tiles,
        abs_count=count,
    )


def _check_block_size(block_size: int) -> int:
    check_int(block_size, "block_size", low=1)
    if block_size % BLOCK:
        raise ValueError(f"block_size must be a positive multiple of {BLOCK}, got {block_size}")
    return block_size


@on_input_device
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int = 64,
    scale: float | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over listed key blocks. Returns ``[B, Hq, Nq, D]``.

    ``block_indices [B, Hq, ceil(Nq / block_size), K]``: for each query block (rows
    ``qb * block_size ..`` of q), key-block ids (key block ``kb`` = keys ``kb * block_size ..``), ``-1``
    for none; any order, duplicates allowed. Causal masking applies inside blocks. ``block_size`` is a
    multiple of 64. Exact set: :func:`block_sparse_mask`.

    ``softcap`` (keyword, default ``None``): attention-logit soft-capping (Gemma 2): each logit
    ``scale * q.k`` becomes ``softcap * tanh(logit / softcap)`` before the causal mask and the
    softmax; a positive finite number, or ``None`` for none.
    """
    shape = check_qkv(q, k, _check_tensor(v, "v"))
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    _check_block_size(block_size)
    be = resolve_backend(backend, q.device)
    n_qb = -(-shape.n_q // block_size)
    n_kb = -(-shape.n_kv // block_size)
    check_index(block_indices, "block_indices", shape, ndim=4, low=-1, high=n_kb, dim2=n_qb)
    if block_indices.device != q.device:
        raise ValueError(f"block_indices is on {block_indices.device} but q is on {q.device}")
    idx = block_sparse_index(block_indices, block_size, shape.n_q, shape.n_kv)
    return _attend(q, k, v, idx, scale, be, softcap)


def streaming_index(
    batch: int, heads: int, n_q: int, n_kv: int, sink: torch.Tensor, window: torch.Tensor, device
) -> SparseIndex:
    """A-shape index for per-head ``sink``/``window`` ``[B, H]`` int64 (window >= 1)."""
    w = window.clamp(max=n_kv)
    t_max = _index.n_window_tiles(int(w.max()))
    tiles, n = _index.window_tiles(w.reshape(-1), t_max)
    s = sink.clamp(max=n_kv)
    c_max = max(int(s.max()), 1)
    cols = torch.arange(c_max, device=device).expand(batch, heads, c_max)
    return _index.assemble(
        batch=batch,
        heads=heads,
        n_q=n_q,
        n_kv=n_kv,
        device=device,
        rel_tiles=tiles.reshape(batch, heads, t_max),
        rel_count=n.reshape(batch, heads),
        cols=cols,
        col_total=s,
        sink=s,
        window=w,
    )


@on_input_device
def streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_tokens: int,
    window_tokens: int,
    scale: float | None = None,
    *,
    backend: str = DEFAULT_BACKEND,
    softcap: float | None = None,
) -> torch.Tensor:
    """A-shape (StreamingLLM) attention: each query attends to the first ``sink_tokens`` keys and to
    the keys with ``0 <= i - j < window_tokens``. Exact (:func:`streaming_mask`). ``[B, Hq, Nq, D]``.

    ``softcap`` (keyword, default ``None``): attention-logit soft-capping (Gemma 2): each logit
    ``scale * q.k`` becomes ``softcap * tanh(logit / softcap)`` before the causal mask and the
    softmax; a positive finite number, or ``None`` for none.
    """
    shape = check_qkv(q, k, _check_tensor(v, "v"))
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    check_int(sink_tokens, "sink_tokens", low=0)
    check_int(window_tokens, "window_tokens", low=1)
    be = resolve_backend(backend, q.device)
    nk = shape.n_kv  # clip: beyond the keys means every key (and Python ints may exceed int64)
    if be == "torch":  # chunked over the window's keys: O(N * window), not per-block gathers
        sink, window = min(sink_tokens, nk), min(window_tokens, nk)
        return _torch_attn.streaming(q, k, v, sink, window, scale, softcap=softcap)
    b, h = shape.batch, shape.heads_q
    full = lambda x: torch.full((b, h), x, dtype=torch.int64, device=q.device)
    idx = streaming_index(
        b, h, shape.n_q, nk, full(min(sink_tokens, nk)), full(min(window_tokens, nk)), q.device
    )
    return _attend(q, k, v, idx, scale, be, softcap)


@on_input_device
def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    num_vertical: int,
    num_slash: int,
    last_q: int = DEFAULT_LAST_Q,
    *,
    scale: float | None = None,
    backend: str = DEFAULT_BACKEND,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate each query head's columns and diagonals from its last ``last_q`` queries.

    Returns ``(vertical_indices [B, Hq, NV], slash_indices [B, Hq, NS])`` int64 with
    ``NV = min(num_vertical, Nk)``, ``NS = min(num_slash, Nk)``, ordered by score (highest first).
    Definitions (MInference 1.0): see :mod:`minference_kernels.estimate`. ``last_q`` in [1, 128].
    With the Triton backend, a ``last_q`` / head dim / dtype whose key window would exceed 64 KiB of
    shared memory (e.g. float32 with ``last_q > 64`` and D > 64) is scored by the PyTorch pass
    instead: same scores, a warning on the ``minference_kernels`` logger.

    ``softcap``: the last queries' logits ``scale * q.k`` become ``softcap * tanh(logit /
    softcap)`` before their causal softmax, as in the attention (``None``: none).
    """
    shape = check_qkv(q, k, None)
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    check_int(num_vertical, "num_vertical")
    check_int(num_slash, "num_slash")
    _check_last_q(last_q)
    be = resolve_backend(backend, q.device)
    nv, ns = min(num_vertical, shape.n_kv), min(num_slash, shape.n_kv)  # budgets clip to Nk
    v, _, s, _ = estimate_vertical_slash_impl(q, k, nv, ns, last_q, scale, be, softcap=softcap)
    return v, s


@on_input_device
def estimate_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    block_size: int = 64,
    *,
    backend: str = DEFAULT_BACKEND,
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION,
    scoring: str = "pooled",
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Estimate each query block's ``top_k`` key blocks from mean-pooled Q and K
    (``scoring="pooled"``) or from the attention mass of a few sampled rows of each query block
    (``"sampled"``; see :data:`minference_kernels.patterns.BLOCK_SCORINGS`).

    Returns ``block_indices [B, Hq, ceil(Nq / block_size), top_k]`` int64, key-block ids in
    ascending order, ``-1`` padding after them where a query block has fewer than ``top_k`` causal
    key blocks. Forced inside the budget: the diagonal key blocks, then (``"pooled"`` only) key
    block 0 (the first tokens: attention sinks); equal scores go to the lowest block id, so both backends select the
    same blocks. Definitions: see :mod:`minference_kernels.estimate`.

    ``block_allocation`` (the setting of the same name in :class:`~minference_kernels.PrefillOptions`
    and :func:`sparse_prefill`): ``"query_block"`` (default) keeps ``top_k`` per query block;
    ``"head"``: the same number of (query block, key block) pairs per head, spread over
    the query blocks by estimated attention share; ``"layer"``: the same number for all ``Hq``
    heads, spread over heads and query blocks. Either way each query block keeps at least its own
    best ``ceil(ops.block_select.HEAD_ALLOCATION_FLOOR * top_k)`` blocks (7/8). The last dimension is then
    ``HEAD_ALLOCATION_CAP * top_k`` (at most the key blocks), ``-1``-padded per query block.

    ``scale``: the attention scale (default ``D ** -0.5``) of the sampled rows' softmax, the
    allocations' shares and the cap. ``softcap``: the sampled rows' logits ``scale * q.k`` become
    ``softcap * tanh(logit / softcap)`` before their softmax; the pooled scores ``s`` (a proxy
    of the logits, ``scale * s``) are capped the same way: ``softcap * tanh(scale * s / softcap)``.
    That keeps each query block's ranking (tanh is monotone) but changes the allocations' shares.
    """
    shape = check_qkv(q, k, None)
    check_int(top_k, "top_k", low=1)
    _check_block_size(block_size)
    _check_allocation(block_allocation)
    check_block_scoring(scoring)
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    be = resolve_backend(backend, q.device)
    return estimate_block_sparse_impl(
        q, k, top_k, block_size, backend=be, allocation=block_allocation, scoring=scoring, scale=scale,
        softcap=softcap,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# the layer entry: every head its own pattern kind and budget, one attention launch


def _small_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device`` without a host sync (pinned staging on CUDA;
    a plain ``torch.tensor(..., device=cuda)`` waits for the stream)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _block_sparse_groups(heads: Sequence[HeadPattern]) -> dict[tuple[int, str], list[int]]:
    """The heads with per-block tiles (block-sparse, and vertical-block's 64-key pooled blocks) by
    block size and scoring: ``{(block_size, scoring): head ids}``. Each group is estimated in one
    call (``block_allocation="layer"`` pools a group's budgets)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, p in enumerate(heads):
        if p.kind in ("block_sparse", "vertical_block"):  # vertical-block: its tiles
            groups.setdefault((p.block_size, p.scoring), []).append(i)
    return groups


def _head_index(hid: list[int], device: torch.device) -> slice | torch.Tensor:
    """Index of the heads ``hid`` along dim 1: a slice when they are consecutive (no copy)."""
    if hid == list(range(hid[0], hid[0] + len(hid))):
        return slice(hid[0], hid[0] + len(hid))
    return _small_tensor(hid, device)


def _take_heads(x: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    return x[:, index] if isinstance(index, slice) else x.index_select(1, index)


@on_input_device
def build_index(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: Sequence[HeadPattern],
    *,
    scale: float | None = None,
    last_q: int = DEFAULT_LAST_Q,
    backend: str = DEFAULT_BACKEND,
    validate: bool = True,
    coverage: float | None = None,
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION,
    softcap: float | None = None,
) -> SparseIndex:
    """Estimate every head's index (per its pattern) and assemble the layer's :class:`SparseIndex`.
    ``block_allocation``, ``softcap``: see :func:`sparse_prefill` (the estimation caps the logits
    as the attention does)."""
    return _build_index(
        q,
        k,
        heads,
        scale=scale,
        last_q=last_q,
        backend=backend,
        validate=validate,
        coverage=coverage,
        block_allocation=block_allocation,
        softcap=softcap,
    )


def _build_index(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: Sequence[HeadPattern],
    *,
    scale: float | None = None,
    last_q: int = 64,
    backend: str = "auto",
    validate: bool = True,
    coverage: float | None = None,
    block_allocation: str = "query_block",
    softcap: float | None = None,
    scores: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SparseIndex:
    """:func:`build_index`; ``scores``: this input's vertical-slash scores ``(vertical,
    slash)`` ``[B, Hq, Nk]`` already computed (by the varlen pass), instead of scoring here."""
    shape = check_qkv(q, k, None, check_values=validate)
    heads = check_heads(heads, shape.heads_q)
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    _check_last_q(last_q)
    _check_coverage(coverage)
    _check_allocation(block_allocation)
    be = resolve_backend(backend, q.device)
    dev = q.device
    b, h, nq, nk = shape.batch, shape.heads_q, shape.n_q, shape.n_kv
    kinds = [p.kind for p in heads]
    ids = {kind: [i for i, x in enumerate(kinds) if x == kind] for kind in set(kinds)}

    rel_parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    col_parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    sink = torch.zeros((b, h), dtype=torch.int64, device=dev)
    window = torch.zeros((b, h), dtype=torch.int64, device=dev)
    abs_tiles = abs_count = None

    if ("vertical_slash" in ids or "vertical_block" in ids) and scores is None:
        # all heads at once (on Triton: one launch each pass)
        scores = vs_scores(q, k, last_q, scale, be, softcap=softcap)

    if "vertical_block" in ids:
        # the columns of a vertical-slash estimate (its slashes unused); tiles: below
        assert scores is not None
        hid = ids["vertical_block"]
        hs = _head_index(hid, dev)
        cols, ctot = _vertical_block_columns(
            scores, heads, hid, hs, q=q, k=k, scale=scale, last_q=last_q, softcap=softcap
        )
        col_parts.append((hid, cols, ctot))

    if "vertical_slash" in ids:
        hid = ids["vertical_slash"]
        hs = _head_index(hid, dev)
        # budgets clip to Nk (a config's huge number means 'everything', may exceed int64)
        nv_l = [min(heads[i].num_vertical, nk) for i in hid]
        ns_l = [min(heads[i].num_slash, nk) for i in hid]
        nv = nv_l[0] if len(set(nv_l)) == 1 else _small_tensor(nv_l, dev)
        ns = ns_l[0] if len(set(ns_l)) == 1 else _small_tensor(ns_l, dev)
        assert scores is not None
        vert, sl = scores
        v_idx, v_ok, s_idx, s_ok = select_vertical_slash(
            _take_heads(vert, hs),
            _take_heads(sl, hs),
            nv,
            ns,
            coverage=coverage,
            budget_max=(max(nv_l), max(ns_l)),
            q=q,
            k=k,
            scale=scale,
            last_q=last_q,
            heads=hs,
            softcap=softcap,
            ordered=False,
        )
        v_ok = v_ok.expand(b, -1, -1)
        s_ok = s_ok.expand(b, -1, -1)
        # top-k entries of a row are distinct (coverage keeps a subset of them)
        tiles, n_t, cols, ctot = _index.vertical_slash_pieces(
            v_idx, s_idx, be, v_ok, s_ok, distinct=True
        )
        rel_parts.append((hid, tiles, n_t))
        col_parts.append((hid, cols, ctot))

    if "a_shape" in ids:
        hid = ids["a_shape"]
        w_l = [min(heads[i].window_tokens, nk) for i in hid]
        s_l = [min(heads[i].sink_tokens, nk) for i in hid]
        w, s = _small_tensor(w_l, dev), _small_tensor(s_l, dev)
        t_max = _index.n_window_tiles(max(w_l))
        tiles, n_t = _index.window_tiles(w, t_max)
        rel_parts.append((hid, tiles.expand(b, -1, -1), n_t.expand(b, -1)))
        c_max = max(max(s_l), 1)
        cols = torch.arange(c_max, device=dev).expand(b, len(hid), c_max)
        col_parts.append((hid, cols, s.expand(b, -1)))
        hs = _head_index(hid, dev)
        sink[:, hs] = s
        window[:, hs] = w

    if "dense" in ids:
        hid = ids["dense"]
        t_max = _index.n_window_tiles(nk)
        tiles, n_t = _index.window_tiles(torch.full((len(hid),), nk, device=dev), t_max)
        rel_parts.append((hid, tiles.expand(b, -1, -1), n_t.expand(b, -1)))

    if "block_sparse" in ids or "vertical_block" in ids:
        mb = -(-nq // BLOCK)
        pieces = []
        for (bs, scoring), hl in _block_sparse_groups(heads).items():
            # estimation on the selected query heads (block_topk pairs them with their own KV
            # heads); no host syncs
            tk_l = [min(heads[i].top_k, -(-nk // bs)) for i in hl]
            bi = block_topk(
                q,
                k,
                _small_tensor(tk_l, dev),
                bs,
                heads=_head_index(hl, dev),
                top_k_max=max(tk_l),
                backend=be,
                allocation=block_allocation,
                scale=scale,
                scoring=scoring,
                softcap=softcap,
            )
            pieces.append((hl, *_index.block_sparse_pieces(bi, bs, nq, nk, ascending=True)))
        a_max = max(p[1].shape[-1] for p in pieces)
        abs_tiles = torch.zeros((b, h, mb, a_max), dtype=torch.int32, device=dev)
        abs_count = torch.zeros((b, h, mb), dtype=torch.int64, device=dev)
        for hl, tl_, cnt in pieces:
            hs = _head_index(hl, dev)
            abs_tiles[:, hs, :, : tl_.shape[-1]] = tl_
            abs_count[:, hs] = cnt

    rel_tiles = rel_count = cols_all = col_total = None
    if rel_parts:
        t_max = max(p[1].shape[-1] for p in rel_parts)
        rel_tiles = torch.full((b, h, t_max), -(2**30), dtype=torch.int64, device=dev)
        rel_count = torch.zeros((b, h), dtype=torch.int64, device=dev)
        for hid, tiles, n_t in rel_parts:
            hs = _head_index(hid, dev)
            rel_tiles[:, hs, : tiles.shape[-1]] = tiles
            rel_count[:, hs] = n_t
    if col_parts:
        c_max = max(p[1].shape[-1] for p in col_parts)
        cols_all = torch.full((b, h, c_max), 2**30, dtype=torch.int64, device=dev)
        col_total = torch.zeros((b, h), dtype=torch.int64, device=dev)
        for hid, cols, ctot in col_parts:
            hs = _head_index(hid, dev)
            cols_all[:, hs, : cols.shape[-1]] = cols
            col_total[:, hs] = ctot
    return _index.assemble(
        batch=b,
        heads=h,
        n_q=nq,
        n_kv=nk,
        device=dev,
        rel_tiles=rel_tiles,
        rel_count=rel_count,
        cols=cols_all,
        col_total=col_total,
        abs_tiles=abs_tiles,
        abs_count=abs_count,
        sink=sink,
        window=window,
        mask_columns="vertical_block" in ids,
    )


def _vertical_block_columns(
    scores: tuple[torch.Tensor, torch.Tensor],
    heads: Sequence[HeadPattern],
    hid: list[int],
    hs: slice | torch.Tensor,
    **select,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical-block heads' columns: each head's ``num_vertical`` best columns by the
    vertical-slash column scores, none forced (key block 0, the sinks, is a forced tile).
    ``(cols [B, len(hid), C]`` sorted, ``col_total [B, len(hid)])``."""
    vert, sl = scores
    b, nk = vert.shape[0], vert.shape[-1]
    nv_l = [min(heads[i].num_vertical, nk) for i in hid]
    if max(nv_l) == 0:  # tiles only
        return (
            torch.full((b, len(hid), 1), 2**30, dtype=torch.int64, device=vert.device),
            torch.zeros((b, len(hid)), dtype=torch.int64, device=vert.device),
        )
    v_idx, v_ok, _, _ = select_vertical_slash(
        _take_heads(vert, hs),
        _take_heads(sl, hs),
        nv_l[0] if len(set(nv_l)) == 1 else _small_tensor(nv_l, vert.device),
        1,
        keep_first=0,  # no forced sink columns: the pooled tiles keep key block 0
        budget_max=(max(nv_l), 1),
        heads=hs,
        ordered=False,
        **select,
    )
    return sorted_unique(v_idx.expand(b, -1, -1), v_ok.expand(b, -1, -1), distinct=True)


@on_input_device
def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: Sequence[HeadPattern],
    scale: float | None = None,
    *,
    last_q: int = DEFAULT_LAST_Q,
    backend: str = DEFAULT_BACKEND,
    validate: bool = True,
    return_index: bool = False,
    coverage: float | None = None,
    dense_below: int = 0,
    max_density: float | None = None,
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION,
    softcap: float | None = None,
):
    """One layer of sparse pre-fill: estimate each head's index per its :class:`HeadPattern`, then run
    every head in one attention launch.

    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``, ``heads``: ``Hq`` patterns. Returns
    ``[B, Hq, Nq, D]`` (and the :class:`SparseIndex` with ``return_index=True``). With
    ``validate=False`` the NaN/Inf scan of q/k/v is skipped (shapes are still checked).
    If every head is ``dense``, or ``Nq < dense_below`` (below the length where sparse pays off; the
    benchmarks report the crossover), this is :func:`dense_attention`.
    ``coverage`` (e.g. 0.95) turns vertical-slash budgets adaptive: each head keeps only the columns
    and diagonals needed for the attention mass of its estimation rows (the last ``last_q``
    queries) inside the kept set -- each (query, key) pair counted once -- to reach that share, at
    most its budget (heads whose budget stays below the target are logged at INFO; see
    :mod:`minference_kernels.estimate`).
    ``max_density`` (e.g. 0.6): after estimation, if the index would visit more than this share of
    the layer's causal pairs (inputs without sparse structure: every tile is kept), run
    :func:`dense_attention` instead — cheaper than a sparse kernel at that density. Costs one
    device-to-host read. The decision is logged at DEBUG level (logger ``minference_kernels``).
    ``block_allocation="head"``: each block-sparse head keeps as many key blocks in all as
    ``top_k`` per query block would, spread over its query blocks by estimated attention share
    (more where attention is spread, fewer where it is peaked; at most
    ``ops.block_select.HEAD_ALLOCATION_CAP * top_k`` per query block, at least its own best
    ``ceil(ops.block_select.HEAD_ALLOCATION_FLOOR * top_k)``); ``"layer"``: the block-sparse heads
    (of one block size) pool those budgets, so heads whose attention is spread take blocks from
    peaked ones; ``"query_block"`` (default) keeps ``top_k`` per query block. At equal recall
    ``"layer"`` needs fewer blocks than ``"query_block"`` and its estimation costs more, so it
    pays where the budget is large enough for recall to matter: the measured speed-ups, densities
    and recalls of the three allocations at 128K are the equal-recall rows of
    ``benchmarks/RESULTS.md`` (generated from the ``interleaved`` result file).

    ``softcap`` (keyword, default ``None``): attention-logit soft-capping (Gemma 2): each logit
    ``scale * q.k`` becomes ``softcap * tanh(logit / softcap)`` before the causal mask and the
    softmax; a positive finite number, or ``None`` for none. The online estimation caps its
    logits the same way (:mod:`minference_kernels.estimate`), and so do the dense fallbacks.
    """
    shape = check_qkv(q, k, _check_tensor(v, "v"), check_values=validate)
    heads = check_heads(heads, shape.heads_q)
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    be = resolve_backend(backend, q.device)
    check_layer_settings(coverage, max_density, last_q, block_allocation, dense_below)
    if not return_index and (all(p.kind == "dense" for p in heads) or shape.n_q < dense_below):
        return dense_attention(q, k, v, scale, backend=backend, softcap=softcap)
    idx = build_index(
        q,
        k,
        heads,
        scale=scale,
        last_q=last_q,
        backend=be,
        validate=False,
        coverage=coverage,
        block_allocation=block_allocation,
        softcap=softcap,
    )
    if max_density is not None and not return_index:
        visited = (
            float(idx.candidate_keys().sum()) * BLOCK
        )  # upper bound of pairs the kernel visits
        causal = shape.batch * shape.heads_q * shape.n_q * (shape.n_q + 1) / 2
        causal += shape.batch * shape.heads_q * shape.n_q * shape.q_offset
        if visited > max_density * causal:
            _log.debug(
                "index visits %.2f of the causal pairs > max_density: dense", visited / causal
            )
            return dense_attention(q, k, v, scale, backend=backend, softcap=softcap)
    out = _attend(q, k, v, idx, scale, be, softcap)
    return (out, idx) if return_index else out


@on_input_device
def sparse_prefill_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: Sequence[HeadPattern],
    *,
    scale: float | None = None,
    last_q: int = DEFAULT_LAST_Q,
    query_rows: torch.Tensor | None = None,
    coverage: float | None = None,
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION,
    softcap: float | None = None,
) -> torch.Tensor:
    """The exact pairs :func:`sparse_prefill` attends to: ``bool [B, Hq, R, Nk]`` for the given local
    ``query_rows`` (default all). Runs the same online estimation (PyTorch path; ``softcap`` as
    there), then builds each head's mask with the independent ``*_mask`` functions."""
    shape = check_qkv(q, k, None)
    heads = check_heads(heads, shape.heads_q)
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    _check_last_q(last_q)
    _check_coverage(coverage)
    _check_allocation(block_allocation)
    nq, nk = shape.n_q, shape.n_kv
    rows, _, _ = _masks.check_rows(nq, nk, query_rows, q.device)
    out = torch.zeros(
        (shape.batch, shape.heads_q, rows.numel(), nk), dtype=torch.bool, device=q.device
    )
    vs = [i for i, p in enumerate(heads) if p.kind == "vertical_slash"]
    vb = [i for i, p in enumerate(heads) if p.kind == "vertical_block"]
    if vs or vb:
        vert, sl = vs_scores_torch(q, k, last_q, scale, softcap=softcap)
    if vb:  # the columns here, the tiles with the block-sparse heads below
        hsel = torch.tensor(vb, device=q.device)
        cols, ctot = _vertical_block_columns(
            (vert, sl), heads, vb, hsel, q=q, k=k, scale=scale, last_q=last_q, softcap=softcap
        )
        none = torch.zeros((1, 1, 0), dtype=torch.int64, device=q.device)
        for j, hi in enumerate(vb):
            for bi in range(shape.batch):
                cc = cols[bi, j, : int(ctot[bi, j])][None, None]
                out[bi : bi + 1, hi : hi + 1] = _masks.vertical_slash_mask(
                    cc, none, nq, n_kv=nk, query_rows=rows
                )
    if vs:
        hsel = torch.tensor(vs, device=q.device)
        nv = torch.tensor([min(heads[i].num_vertical, nk) for i in vs], device=q.device)
        ns = torch.tensor([min(heads[i].num_slash, nk) for i in vs], device=q.device)
        v_idx, v_ok, s_idx, s_ok = select_vertical_slash(
            vert.index_select(1, hsel),
            sl.index_select(1, hsel),
            nv,
            ns,
            coverage=coverage,
            q=q,
            k=k,
            scale=scale,
            last_q=last_q,
            heads=hsel,
            softcap=softcap,
        )
        for j, hi in enumerate(vs):
            for bi in range(shape.batch):
                vv = v_idx[bi : bi + 1, j : j + 1][v_ok[bi : bi + 1, j : j + 1]][None, None]
                ss = s_idx[bi : bi + 1, j : j + 1][s_ok[bi : bi + 1, j : j + 1]][None, None]
                out[bi : bi + 1, hi : hi + 1] = _masks.vertical_slash_mask(
                    vv, ss, nq, n_kv=nk, query_rows=rows
                )
    for i, p in enumerate(heads):
        if p.kind == "dense":
            out[:, i] = _masks.dense_mask(nq, n_kv=nk, query_rows=rows, device=q.device)[:, 0]
        elif p.kind == "a_shape":
            out[:, i] = _masks.streaming_mask(
                p.sink_tokens, p.window_tokens, nq, n_kv=nk, query_rows=rows, device=q.device
            )[:, 0]
    for (bs, scoring), hl in _block_sparse_groups(heads).items():  # as in build_index
        blocks = block_topk(
            q,
            k,
            torch.tensor([min(heads[i].top_k, -(-nk // bs)) for i in hl], device=q.device),
            bs,
            heads=torch.tensor(hl, device=q.device),
            allocation=block_allocation,
            scale=scale,
            scoring=scoring,
            softcap=softcap,
        )
        for j, i in enumerate(hl):  # (vertical-block heads: with their columns)
            out[:, i : i + 1] |= _masks.block_sparse_mask(
                blocks[:, j : j + 1], nq, bs, n_kv=nk, query_rows=rows
            )
    return out


def index_density(index: SparseIndex, blocks: list[int] | None = None) -> torch.Tensor:
    """Fraction of causal (query, key) pairs an index attends to, ``float64 [B, H]`` (exact; over
    the given query blocks only if ``blocks`` is set)."""
    if not isinstance(index, SparseIndex):
        raise TypeError(f"index must be a SparseIndex, got {type(index).__name__}")
    kept = _torch_attn.count_pairs(index, blocks).double()
    off = index.q_offset
    rows = (
        range(index.n_q)
        if blocks is None
        else [r for m in blocks for r in range(m * BLOCK, min((m + 1) * BLOCK, index.n_q))]
    )
    causal = float(sum(r + off + 1 for r in rows))
    return kept / causal
