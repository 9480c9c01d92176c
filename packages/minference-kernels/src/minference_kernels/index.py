"""The unified sparse index that every attention kernel (Triton and PyTorch) executes.

Query rows are processed in blocks of ``BLOCK = 64`` rows. For query block ``m`` of a head, with
``a0`` the absolute position of its first row and ``a1`` of its last, the kernel visits:

* **relative tiles** (vertical-slash, A-shape and dense heads): per head a list of starts ``r <= 0``
  (sorted descending); in block ``m`` tile ``r`` covers keys ``[a0 + r, a0 + r + 64)``. The list is the
  same for every block, so it costs ``O(#tiles)`` per head, not per block. Block ``m`` uses the first
  ``rel_end[m]`` tiles (those that reach key ``>= 0``).
* **columns** (vertical-slash and A-shape heads): per head a sorted list of unique key positions; block
  ``m`` uses the first ``col_count[m]`` (those ``<= a1``) and skips a column already inside one of its
  relative tiles (looked up in the per-head coverage map ``cov``).
* **absolute tiles** (block-sparse and vertical-block heads): per head and block a sorted list of
  key-tile starts. A head with both columns and absolute tiles (vertical-block) has a column map
  ``col_map`` (which keys are its columns) and a flag per absolute tile (``abs_flag``: the tile
  holds one of them); a flagged tile skips its column keys, which the column pass attends.

Every candidate pair is finally masked by causality (key ``<=`` query position) and, for A-shape heads,
by ``key < sink or query - key < window`` inside relative tiles. The tiles of a head never overlap and
the columns exclude covered keys, so no pair is counted twice.

Slash offsets become relative tiles by a right-to-left greedy cover (see :func:`~minference_kernels.ops.index_build.slash_tiles`): each
slash ``s`` needs keys ``[a0 - s, a0 - s + 63]`` in every block; walking the slashes from the
diagonal outwards, a slash already inside the covered range costs nothing, one that overlaps it
extends the cover by one tile right below it, and one past it opens a tile at its own start. This is
the fewest 64-wide tiles that cover every slash, and it keeps the diagonal tile aligned with the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64  # query rows per block and keys per tile; the index granularity
_BIG = 2**30


@dataclass
class SparseIndex:
    """Device tensors describing which (query, key) pairs each head of a layer attends to.

    Shapes (``B`` batch, ``H`` query heads, ``MB = ceil(n_q / 64)``):
    ``rel_tiles [B, H, T]`` int32, ``rel_end [B, H, MB]`` int32, ``cols [B, H, C]`` int32,
    ``col_count [B, H, MB]`` int32, ``cov [B, H, n_kv + 128]`` int8, ``abs_tiles [B, H, MB, A]``
    int32, ``abs_count [B, H, MB]`` int32, ``sink [B, H]`` and ``window [B, H]`` int32 (``window == 0``:
    no A-shape restriction), ``abs_flag [B, H, MB, A]`` int8 (1: the absolute tile holds a key of
    ``col_map``) and ``col_map [B, H, n_kv]`` int8 (1: the key is one of the head's columns and
    the head has absolute tiles), or ``[B, H, 1]`` zeros when no head has both
    (:attr:`masks_columns` is then ``False``).
    """

    n_q: int
    n_kv: int
    rel_tiles: torch.Tensor
    rel_end: torch.Tensor
    cols: torch.Tensor
    col_count: torch.Tensor
    cov: torch.Tensor
    abs_tiles: torch.Tensor
    abs_count: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    abs_flag: torch.Tensor
    col_map: torch.Tensor

    @property
    def q_offset(self) -> int:
        return self.n_kv - self.n_q

    @property
    def masks_columns(self) -> bool:
        """Whether some head has columns inside its absolute tiles to skip (``col_map`` is per
        key, not the ``[B, H, 1]`` placeholder)."""
        return self.col_map.shape[-1] == self.n_kv and self.n_kv > 1

    @property
    def num_blocks(self) -> int:
        return -(-self.n_q // BLOCK)

    def candidate_keys(self) -> torch.Tensor:
        """Upper bound of keys visited per (b, h, block): ``[B, H, MB]`` (64 per tile + columns)."""
        return (self.rel_end + self.abs_count) * BLOCK + self.col_count


def _pad_last(x: torch.Tensor, size: int, value: int) -> torch.Tensor:
    if x.shape[-1] >= size:
        return x
    pad = x.new_full((*x.shape[:-1], size - x.shape[-1]), value)
    return torch.cat([x, pad], dim=-1)


def sorted_unique(
    x: torch.Tensor, valid: torch.Tensor | None = None, fill: int = _BIG, *, distinct: bool = False
):
    """Sort each row ascending and drop duplicates. Returns ``(values, count)`` with invalid and
    duplicate entries replaced by ``fill`` at the end of each row. ``x [..., L]`` integer.
    ``distinct=True``: the caller guarantees the valid entries of a row are already distinct
    (top-k indices), so the duplicate pass and its second sort are skipped."""
    x = x.to(torch.int64)
    if valid is not None:
        x = torch.where(valid, x, torch.full_like(x, fill))
    x, _ = torch.sort(x, dim=-1)
    if x.shape[-1] > 1 and not distinct:
        dup = torch.zeros_like(x, dtype=torch.bool)
        dup[..., 1:] = x[..., 1:] == x[..., :-1]
        x = torch.where(dup, torch.full_like(x, fill), x)
        x, _ = torch.sort(x, dim=-1)
    count = (x < fill).sum(-1)
    return x, count
