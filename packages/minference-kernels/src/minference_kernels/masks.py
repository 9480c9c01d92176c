"""Exact boolean masks of the (query, key) pairs each sparse attention function attends to.

Written independently of the index builders and kernels (plain loops over the definitions), so that
tests can compare a kernel's output with dense float64 attention restricted to these masks.
All masks are ``[B, H, R, n_kv]`` with ``R`` query rows (all ``n`` rows, or ``query_rows``) and the
causal diagonal aligned bottom-right: query row ``i`` sits at absolute position ``i + n_kv - n``.
"""

from __future__ import annotations

import torch

from ._validate import INDEX_DTYPES, Shape, _check_tensor, check_index, check_int
from .index import BLOCK


def check_rows(n: int, n_kv: int | None, query_rows: torch.Tensor | None, device):
    """Validate ``n``, ``n_kv`` and ``query_rows``; return ``(rows, n_kv, offset)``."""
    check_int(n, "n")
    n_kv = n if n_kv is None else check_int(n_kv, "n_kv")
    if n < 1 or n_kv < n:
        raise ValueError(f"need 1 <= n <= n_kv, got n={n}, n_kv={n_kv}")
    if query_rows is not None:
        _check_tensor(query_rows, "query_rows")
        if query_rows.dtype not in INDEX_DTYPES:
            raise TypeError(f"query_rows must be an integer tensor, got {query_rows.dtype}")
    rows = torch.arange(n, device=device) if query_rows is None else query_rows.to(device).long()
    if rows.dim() != 1:
        raise ValueError("query_rows must be a 1-D tensor of query row indices")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"query_rows must lie in [0, {n - 1}]")
    return rows, n_kv, n_kv - n


def _check_indices(x, name: str, like: torch.Tensor, *, ndim: int, low: int, high: int, dim2=None):
    """The kernels' index checks (dtype, rank, ``[B, H]`` of ``like``, value range)."""
    _check_tensor(like, name)
    if like.dim() < 2:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(like.shape)}")
    shape = Shape(like.shape[0], like.shape[1], like.shape[1], 1, 1, 1)
    check_index(x, name, shape, ndim=ndim, low=low, high=high, dim2=dim2)


def greedy_slash_tiles(offsets: list[int]) -> list[int]:
    """Relative starts of the 64-wide tiles covering slash ``offsets`` (see ``index`` module doc)."""
    tiles: list[int] = []
    f = None
    for s in sorted(set(int(o) for o in offsets)):
        x = -s
        if f is not None and x >= f:
            continue
        start = x if (f is None or x + BLOCK - 1 < f) else f - BLOCK
        tiles.append(start)
        f = start
    return tiles


def vertical_slash_mask(
    vertical_indices: torch.Tensor,
    slash_indices: torch.Tensor,
    n: int,
    *,
    n_kv: int | None = None,
    query_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact pairs :func:`vertical_slash_attention` attends to: ``bool [B, H, R, n_kv]``.

    Every causal pair named by the indices is included (key ``j`` in ``vertical_indices``, or
    ``i - j`` in ``slash_indices``), **and more**: slashes are computed at 64-key tile granularity.
    For query block ``m`` (rows ``64m .. 64m+63``, first absolute position ``a0``) a slash ``s``
    needs keys ``a0 - s .. a0 - s + 63``; the slashes of a head are covered by the fewest 64-wide
    tiles (greedy from the diagonal outwards), and every causal pair inside a tile is attended. So a
    lone slash costs (and includes) a 64x64 parallelogram per query block. Verticals are exact columns.
    """
    rows, n_kv, off = check_rows(n, n_kv, query_rows, getattr(vertical_indices, "device", None))
    for name, x in (("vertical_indices", vertical_indices), ("slash_indices", slash_indices)):
        _check_indices(x, name, vertical_indices, ndim=3, low=0, high=n_kv)
    b, h = vertical_indices.shape[:2]
    dev = vertical_indices.device
    qpos = rows + off
    a0 = (rows // BLOCK) * BLOCK + off
    keys = torch.arange(n_kv, device=dev)
    out = torch.zeros((b, h, rows.numel(), n_kv), dtype=torch.bool, device=dev)
    # offsets key - a0 of each pair; beyond 63 a key is past the block (non-causal), so clamp
    rel = (keys[None, :] - a0[:, None]).clamp(max=BLOCK - 1)
    for bi in range(b):
        for hi in range(h):
            # coverage of relative offsets by the head's tiles, looked up once per pair
            cov = torch.zeros(n_kv + 2 * BLOCK, dtype=torch.bool, device=dev)
            for t in greedy_slash_tiles(slash_indices[bi, hi].tolist()):
                lo = max(t + n_kv + BLOCK, 0)
                cov[lo : max(t + n_kv + 2 * BLOCK, 0)] = True
            m = cov[rel + n_kv + BLOCK]
            vert = torch.zeros(n_kv, dtype=torch.bool, device=dev)
            vert[vertical_indices[bi, hi].long()] = True
            m |= vert[None, :]
            out[bi, hi] = m & (keys[None, :] <= qpos[:, None])
    return out


def block_sparse_mask(
    block_indices: torch.Tensor,
    n: int,
    block_size: int = 64,
    *,
    n_kv: int | None = None,
    query_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact pairs :func:`block_sparse_attention` attends to: ``bool [B, H, R, n_kv]``.

    Query row ``i`` (local) is in query block ``i // block_size``; it attends to key ``j`` iff
    ``j // block_size`` is listed for that block (``-1`` entries ignored) and ``j`` is causal for it.
    Exact: nothing beyond the listed blocks.
    """
    check_int(block_size, "block_size", low=1)
    if block_size % BLOCK:
        raise ValueError(f"block_size must be a positive multiple of {BLOCK}, got {block_size}")
    rows, n_kv, off = check_rows(n, n_kv, query_rows, getattr(block_indices, "device", None))
    n_qb, n_kb = -(-n // block_size), -(-n_kv // block_size)
    _check_indices(
        block_indices, "block_indices", block_indices, ndim=4, low=-1, high=n_kb, dim2=n_qb
    )
    b, h = block_indices.shape[:2]
    dev = block_indices.device
    qpos = rows + off
    kb = torch.arange(n_kv, device=dev) // block_size
    n_kb = -(-n_kv // block_size)
    out = torch.zeros((b, h, rows.numel(), n_kv), dtype=torch.bool, device=dev)
    for bi in range(b):
        for hi in range(h):
            sel = torch.zeros((block_indices.shape[2], n_kb + 1), dtype=torch.bool, device=dev)
            ids = block_indices[bi, hi].long()
            ids = torch.where(ids < 0, torch.full_like(ids, n_kb), ids)
            sel.scatter_(1, ids, True)
            allowed = sel[rows // block_size][:, kb]  # [R, n_kv]
            out[bi, hi] = allowed & (torch.arange(n_kv, device=dev)[None, :] <= qpos[:, None])
    return out


def streaming_mask(
    sink_tokens: int,
    window_tokens: int,
    n: int,
    *,
    n_kv: int | None = None,
    query_rows: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The exact pairs :func:`streaming_attention` attends to: ``bool [1, 1, R, n_kv]``:
    causal and (``j < sink_tokens`` or ``i - j < window_tokens``). Exact at token granularity."""
    check_int(sink_tokens, "sink_tokens")
    check_int(window_tokens, "window_tokens", low=1)
    rows, n_kv, off = check_rows(n, n_kv, query_rows, device)
    sink_tokens, window_tokens = min(sink_tokens, n_kv), min(window_tokens, n_kv)  # may be > int64
    qpos = (rows + off)[:, None]
    keys = torch.arange(n_kv, device=rows.device)[None, :]
    m = (keys <= qpos) & ((keys < sink_tokens) | (qpos - keys < window_tokens))
    return m[None, None]


def dense_mask(
    n: int,
    *,
    n_kv: int | None = None,
    query_rows: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Causal pairs, bottom-right aligned: ``bool [1, 1, R, n_kv]``."""
    rows, n_kv, off = check_rows(n, n_kv, query_rows, device)
    keys = torch.arange(n_kv, device=rows.device)[None, :]
    return (keys <= (rows + off)[:, None])[None, None]
