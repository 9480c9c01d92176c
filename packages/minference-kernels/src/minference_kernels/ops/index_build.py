"""Index building: slash offsets to relative tiles (the greedy cover of
:mod:`minference_kernels.index`; PyTorch reference here, Triton in
:mod:`minference_kernels.ops.index_build_triton`), windows, block-sparse pieces, and the assembly of
a :class:`~minference_kernels.index.SparseIndex`."""

from __future__ import annotations

import torch

from ..index import _BIG, BLOCK, SparseIndex, sorted_unique
from ._dispatch import pick


def slash_tiles_torch(
    slashes: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-to-left greedy cover of slash offsets by 64-wide relative tiles (PyTorch version).

    ``slashes [R, S]`` int64 sorted ascending (valid entries first, ``count [R]`` of them; duplicates
    allowed). Returns ``tiles [R, S]`` int64 (starts, descending, padded with ``-_BIG``) and
    ``n_tiles [R]``. Vectorised over rows, sequential over slashes.
    """
    rows, s_len = slashes.shape
    tiles = torch.full((rows, max(s_len, 1)), -_BIG, dtype=torch.int64, device=slashes.device)
    n = torch.zeros(rows, dtype=torch.int64, device=slashes.device)
    f = torch.full((rows,), _BIG, dtype=torch.int64, device=slashes.device)
    ar = torch.arange(rows, device=slashes.device)
    for j in range(s_len):
        x = -slashes[:, j]
        emit = (x < f) & (j < count)
        start = torch.where(x + (BLOCK - 1) < f, x, f - BLOCK)
        tiles[ar, n.clamp(max=tiles.shape[1] - 1)] = torch.where(
            emit, start, tiles[ar, n.clamp(max=tiles.shape[1] - 1)]
        )
        n = n + emit.to(torch.int64)
        f = torch.where(emit, start, f)
    return tiles, n


def slash_tiles(slashes: torch.Tensor, count: torch.Tensor, backend: str):
    """:func:`slash_tiles_torch` on ``backend`` (``"torch"`` or ``"triton"``): the same tiles."""
    return pick(backend, slash_tiles_torch, "index_build_triton.slash_tiles")(slashes, count)


def window_tiles(window: torch.Tensor, t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles covering slash offsets ``0 .. window-1`` (A-shape windows and dense heads): the greedy
    cover of consecutive offsets is ``0, -64, -128, ...``, ``ceil((window - 1) / 64) + 1`` tiles.
    ``window [R]`` int64 (>= 1). Returns ``tiles [R, t_max]`` and ``n [R]``."""
    n = torch.div(window - 1 + BLOCK - 1, BLOCK, rounding_mode="floor") + 1
    t = torch.arange(t_max, device=window.device)
    tiles = torch.where(t[None, :] < n[:, None], -BLOCK * t[None, :], torch.full_like(t, -_BIG))
    return tiles.to(torch.int64), n


def n_window_tiles(window: int) -> int:
    return (window - 1 + BLOCK - 1) // BLOCK + 1


def block_starts(n_q: int, n_kv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute first and last query position of each 64-row block: ``a0 [MB]``, ``a1 [MB]``."""
    off = n_kv - n_q
    m = torch.arange(-(-n_q // BLOCK), device=device, dtype=torch.int64)
    a0 = m * BLOCK + off
    a1 = torch.clamp((m + 1) * BLOCK, max=n_q) - 1 + off
    return a0, a1


def assemble(
    *,
    batch: int,
    heads: int,
    n_q: int,
    n_kv: int,
    device: torch.device,
    rel_tiles: torch.Tensor | None = None,
    rel_count: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    col_total: torch.Tensor | None = None,
    abs_tiles: torch.Tensor | None = None,
    abs_count: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    mask_columns: bool = False,
) -> SparseIndex:
    """Build a :class:`SparseIndex` from per-head pieces (any may be omitted = empty).

    ``rel_tiles [B, H, T]`` (descending, ``rel_count`` valid), ``cols [B, H, C]`` (sorted unique,
    ``col_total`` valid), ``abs_tiles [B, H, MB, A]`` (sorted, ``abs_count`` valid).
    ``mask_columns``: some head has both columns and absolute tiles (vertical-block); builds the
    column map and the tile flags so that a column key inside a tile counts once.
    """
    mb = -(-n_q // BLOCK)
    i32 = torch.int32
    a0, a1 = block_starts(n_q, n_kv, device)
    zeros_bh = torch.zeros((batch, heads), dtype=torch.int64, device=device)

    if rel_tiles is None or rel_tiles.shape[-1] == 0:
        rel_tiles = torch.full((batch, heads, 1), -_BIG, dtype=torch.int64, device=device)
        rel_count = zeros_bh
    elif rel_count is None:
        raise ValueError("assemble: rel_tiles needs rel_count (the valid tiles per head)")
    t_len = rel_tiles.shape[-1]
    tpos = torch.arange(t_len, device=device)
    rel_valid = tpos[None, None, :] < rel_count[..., None]
    # tiles reaching key >= 0 in block m: r + 63 >= -a0  <=>  -r <= a0 + 63 ; -r ascending
    neg = torch.where(rel_valid, -rel_tiles, torch.full_like(rel_tiles, _BIG)).contiguous()
    rel_end = torch.searchsorted(
        neg, (a0 + BLOCK - 1).expand(batch, heads, mb).contiguous(), right=True
    )

    # coverage of relative offsets by each head's tiles: cov[r + n_kv + 64] for r in [-n_kv - 64, 63]
    cov_len = n_kv + 2 * BLOCK
    diff = torch.zeros((batch, heads, cov_len + 1), dtype=torch.int32, device=device)
    start_idx = torch.where(
        rel_valid, rel_tiles + n_kv + BLOCK, torch.full_like(rel_tiles, cov_len)
    )
    start_idx = start_idx.clamp(0, cov_len)
    end_idx = torch.where(
        rel_valid, (start_idx + BLOCK).clamp(max=cov_len), torch.full_like(rel_tiles, cov_len)
    )
    one = torch.ones_like(start_idx, dtype=torch.int32)
    diff.scatter_add_(-1, start_idx, one)
    diff.scatter_add_(-1, end_idx, -one)
    cov = (torch.cumsum(diff, dim=-1)[..., :cov_len] > 0).to(torch.int8)

    if cols is None or cols.shape[-1] == 0:
        cols = torch.full((batch, heads, 1), _BIG, dtype=torch.int64, device=device)
        col_total = zeros_bh
    elif col_total is None:
        raise ValueError("assemble: cols needs col_total (the valid columns per head)")
    cpos = torch.arange(cols.shape[-1], device=device)
    cvalid = cpos[None, None, :] < col_total[..., None]
    cols_s = torch.where(cvalid, cols, torch.full_like(cols, _BIG)).contiguous()
    col_count = torch.searchsorted(cols_s, a1.expand(batch, heads, mb).contiguous(), right=True)

    if abs_tiles is None or abs_tiles.shape[-1] == 0:
        abs_tiles = torch.zeros((batch, heads, mb, 1), dtype=torch.int64, device=device)
        abs_count = torch.zeros((batch, heads, mb), dtype=torch.int64, device=device)
    elif abs_count is None:
        raise ValueError("assemble: abs_tiles needs abs_count (the valid tiles per block)")

    if sink is None:
        sink = zeros_bh
    if window is None:
        window = zeros_bh

    # heads with columns and absolute tiles (vertical-block, ``mask_columns``): which keys are
    # columns, and which absolute tiles hold one (those skip the column keys: the column pass
    # attends them). Decided by the caller, not from the tensors: no host sync.
    abs_flag = torch.zeros(abs_tiles.shape, dtype=torch.int8, device=device)
    if mask_columns and n_kv > 1:
        hits = torch.zeros((batch, heads, n_kv), dtype=torch.int32, device=device)
        hits.scatter_add_(
            2, torch.where(cvalid, cols, 0).clamp(0, n_kv - 1), cvalid.to(torch.int32)
        )
        col_map = (hits > 0).to(torch.int8)  # (invalid entries add 0: never a false column)
        nt = -(-n_kv // BLOCK)
        per_tile = torch.nn.functional.pad(col_map, (0, nt * BLOCK - n_kv))
        per_tile = per_tile.view(batch, heads, nt, BLOCK).amax(-1)  # [B, H, nt]
        a_valid = torch.arange(abs_tiles.shape[-1], device=device) < abs_count[..., None]
        t_idx = (abs_tiles.long() // BLOCK).clamp(0, nt - 1).flatten(2)
        abs_flag = per_tile.gather(2, t_idx).view(abs_tiles.shape) * a_valid.to(torch.int8)
    else:
        col_map = torch.zeros((batch, heads, 1), dtype=torch.int8, device=device)

    return SparseIndex(
        n_q=n_q,
        n_kv=n_kv,
        rel_tiles=torch.where(rel_valid, rel_tiles, torch.zeros_like(rel_tiles))
        .to(i32)
        .contiguous(),
        rel_end=rel_end.to(i32).contiguous(),
        cols=torch.where(cvalid, cols, torch.zeros_like(cols)).to(i32).contiguous(),
        col_count=col_count.to(i32).contiguous(),
        cov=cov.contiguous(),
        abs_tiles=abs_tiles.to(i32).contiguous(),
        abs_count=abs_count.to(i32).contiguous(),
        sink=sink.to(i32).contiguous(),
        window=window.to(i32).contiguous(),
        abs_flag=abs_flag.contiguous(),
        col_map=col_map.contiguous(),
    )


def vertical_slash_pieces(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    backend: str,
    v_valid: torch.Tensor | None = None,
    s_valid: torch.Tensor | None = None,
    *,
    distinct: bool = False,
):
    """Verticals ``[B, H, NV]`` and slashes ``[B, H, NS]`` -> (rel_tiles, rel_count, cols, col_total).
    ``distinct``: the valid entries of each row are already distinct (top-k indices;
    :func:`~minference_kernels.index.sorted_unique`)."""
    b, h = vertical.shape[:2]
    cols, col_total = sorted_unique(vertical, v_valid, distinct=distinct)
    # unique also shortens the greedy loop
    s_sorted, s_count = sorted_unique(slash, s_valid, distinct=distinct)
    tiles, n_tiles = slash_tiles(
        s_sorted.reshape(b * h, -1).contiguous(), s_count.reshape(b * h).contiguous(), backend
    )
    return tiles.reshape(b, h, -1), n_tiles.reshape(b, h), cols, col_total


def block_sparse_pieces(
    block_indices: torch.Tensor, block_size: int, n_q: int, n_kv: int, *, ascending: bool = False
):
    """``block_indices [B, H, ceil(n_q / bs), K]`` (key-block ids, -1 = none) -> absolute 64-key tiles
    per 64-row kernel block: ``(abs_tiles [B, H, MB, K * bs/64], abs_count [B, H, MB])``.

    ``ascending=True`` promises rows of causal, strictly ascending ids with the -1 padding last (the
    estimator's output): the tiles are then already sorted and unique, with the invalid ones (past
    the keys or the block's last row, only in the last id's block) at the end, so no sort is needed.
    """
    b, h, _, kk = block_indices.shape
    device = block_indices.device
    mb = -(-n_q // BLOCK)
    sub = min(block_size // BLOCK, -(-n_kv // BLOCK))  # tiles past the keys are never valid
    row = (torch.arange(mb, device=device) * BLOCK) // block_size
    bi = block_indices.index_select(2, row)  # [B, H, MB, K]
    if ascending and sub == 1:
        # block_size 64: one tile per block; a causal block of a 64-row block reaches its rows
        return (bi * BLOCK).to(torch.int32), (bi >= 0).sum(-1)
    bi = bi.to(torch.int64)
    starts = bi[..., None] * block_size + BLOCK * torch.arange(sub, device=device)  # [B,H,MB,K,sub]
    starts = starts.reshape(b, h, mb, kk * sub)
    _, a1 = block_starts(n_q, n_kv, device)
    valid = (bi >= 0)[..., None].expand(b, h, mb, kk, sub).reshape(b, h, mb, kk * sub)
    valid = valid & (starts <= a1[None, None, :, None]) & (starts < n_kv)
    if ascending:
        return torch.where(valid, starts, 0).to(torch.int32), valid.sum(-1)
    return sorted_unique(starts, valid)
