"""PyTorch execution of a :class:`SparseIndex` (the CPU path and the reference for the kernels).

Query blocks of 64 rows are processed one at a time; for each, the candidate keys of every head are
gathered (K/V stay ``[B, Hkv, N, D]``; the gather picks rows per KV head for its group of query heads,
so K/V are never repeated per query head). Peak memory is ``O(B * H * (keys per block) * D)``.
Arithmetic is float32 (float64 inputs are not accepted by the public API).
"""

from __future__ import annotations

import torch

from .index import BLOCK, SparseIndex


def _gather_rows(x: torch.Tensor, pos: torch.Tensor, group: int) -> torch.Tensor:
    """``x [B, Hkv, N, D]``, ``pos [B, Hq, L]`` -> ``[B, Hq, L, D]`` without repeating ``x``."""
    b, hkv, n, d = x.shape
    hq, length = pos.shape[1], pos.shape[2]
    p = pos.reshape(b, hkv, group * length, 1).expand(b, hkv, group * length, d)
    out = torch.gather(x, 2, p)
    return out.reshape(b, hq, length, d)


def block_keep(index: SparseIndex, m: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Candidate keys of query block ``m`` and which pairs are attended.

    Returns ``pos [B, H, L]`` (key positions, clamped into range) and ``keep [B, H, R, L]`` (pairs
    attended, exact: causal, in range, not covered twice, A-shape window applied), or ``None`` when no
    head of the block has any candidate key.
    """
    nq, nk = index.n_q, index.n_kv
    off = nk - nq
    r0, r1 = m * BLOCK, min((m + 1) * BLOCK, nq)
    a0 = r0 + off
    qpos = torch.arange(r0, r1, device=device) + off  # [R]
    ar = torch.arange(BLOCK, device=device)
    parts_pos, parts_ok, parts_rel = [], [], []

    t_end = index.rel_end[:, :, m].long()  # [B, H]
    t_max = int(t_end.max()) if t_end.numel() else 0
    if t_max:
        r = index.rel_tiles[:, :, :t_max].long()  # [B, H, T]
        pos = (a0 + r)[..., None] + ar  # [B, H, T, 64]
        ok = (torch.arange(t_max, device=device)[None, None, :] < t_end[..., None])[..., None]
        ok = ok & (pos >= 0) & (pos < nk)
        parts_pos.append(pos.flatten(2))
        parts_ok.append(ok.flatten(2))
        parts_rel.append(torch.ones_like(ok.flatten(2)))

    c_cnt = index.col_count[:, :, m].long()
    c_max = int(c_cnt.max()) if c_cnt.numel() else 0
    if c_max:
        c = index.cols[:, :, :c_max].long()
        ok = torch.arange(c_max, device=device)[None, None, :] < c_cnt[..., None]
        cov_idx = (c - a0 + nk + BLOCK).clamp(0, index.cov.shape[-1] - 1)
        covered = torch.gather(index.cov, 2, cov_idx) > 0
        parts_pos.append(c)
        parts_ok.append(ok & ~covered)
        parts_rel.append(torch.zeros_like(ok))

    a_cnt = index.abs_count[:, :, m].long()
    a_max = int(a_cnt.max()) if a_cnt.numel() else 0
    if a_max:
        s = index.abs_tiles[:, :, m, :a_max].long()
        pos = s[..., None] + ar
        ok = (torch.arange(a_max, device=device)[None, None, :] < a_cnt[..., None])[..., None]
        ok = ok & (pos < nk)
        parts_pos.append(pos.flatten(2))
        parts_ok.append(ok.flatten(2))
        parts_rel.append(torch.zeros_like(ok.flatten(2)))

    if not parts_pos:
        return None
    pos = torch.cat(parts_pos, -1)
    ok = torch.cat(parts_ok, -1)
    in_rel = torch.cat(parts_rel, -1)
    keep = ok[:, :, None, :] & (pos[:, :, None, :] <= qpos[None, None, :, None])
    win = index.window.long()[..., None, None]
    sink = index.sink.long()[..., None, None]
    a_shape_ok = (
        (win <= 0)
        | (pos[:, :, None, :] < sink)
        | (qpos[None, None, :, None] - pos[:, :, None, :] < win)
    )
    keep = keep & (~in_rel[:, :, None, :] | a_shape_ok)
    return torch.where(ok, pos, torch.zeros_like(pos)).clamp(0, nk - 1), keep


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    out = torch.empty_like(q)
    for m in range(index.num_blocks):
        r0, r1 = m * BLOCK, min((m + 1) * BLOCK, nq)
        cand = block_keep(index, m, q.device)
        if cand is None:
            out[:, :, r0:r1] = 0
            continue
        pos, keep = cand
        kg = _gather_rows(k, pos, group).to(compute_dtype)
        vg = _gather_rows(v, pos, group).to(compute_dtype)
        s = torch.matmul(q[:, :, r0:r1].to(compute_dtype), kg.transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - mx)
        denom = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vg) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, :, r0:r1] = o.to(q.dtype)
    return out


def index_mask(index: SparseIndex, query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The pairs a :class:`SparseIndex` attends to, as ``bool [B, H, R, n_kv]``."""
    b, h = index.sink.shape
    dev = index.sink.device
    rows = torch.arange(index.n_q, device=dev) if query_rows is None else query_rows.to(dev).long()
    out = torch.zeros((b, h, rows.numel(), index.n_kv), dtype=torch.bool, device=dev)
    blocks = torch.unique(rows // BLOCK).tolist()
    for m in blocks:
        cand = block_keep(index, m, dev)
        if cand is None:
            continue
        pos, keep = cand
        sel = torch.nonzero(rows // BLOCK == m).flatten()
        local = rows[sel] - m * BLOCK
        kp = keep[:, :, local]  # [B, H, r, L]
        out[:, :, sel] = _scatter_or(pos, kp, index.n_kv)
    return out


def _scatter_or(pos: torch.Tensor, keep: torch.Tensor, n_kv: int) -> torch.Tensor:
    # scatter_ keeps an arbitrary one of duplicate targets; OR-reduce through an integer sum instead
    acc = torch.zeros((*keep.shape[:-1], n_kv), dtype=torch.int32, device=keep.device)
    acc.scatter_add_(3, pos[:, :, None, :].expand_as(keep), keep.to(torch.int32))
    return acc > 0


def count_pairs(index: SparseIndex, blocks: list[int] | None = None) -> torch.Tensor:
    """Exact number of attended pairs per head, ``int64 [B, H]`` (over all, or the given, blocks)."""
    b, h = index.sink.shape
    total = torch.zeros((b, h), dtype=torch.int64, device=index.sink.device)
    for m in range(index.num_blocks) if blocks is None else blocks:
        cand = block_keep(index, m, index.sink.device)
        if cand is not None:
            total += cand[1].sum((-1, -2))
    return total


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int = 1024):
    """Causal attention with the diagonal aligned bottom-right, in query chunks (memory
    ``O(chunk * Nk)``), through PyTorch's SDPA with GQA (no K/V repeat)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    off = nk - nq
    out = torch.empty_like(q)
    kpos = torch.arange(nk, device=q.device)
    for r0 in range(0, nq, chunk):
        r1 = min(r0 + chunk, nq)
        qpos = torch.arange(r0, r1, device=q.device) + off
        last = int(qpos[-1]) + 1  # keys beyond the chunk's last position are never attended
        mask = kpos[None, :last] <= qpos[:, None]
        out[:, :, r0:r1] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, r0:r1],
            k[:, :, :last],
            v[:, :, :last],
            attn_mask=mask,
            scale=scale,
            enable_gqa=hq != hkv,
        )
    return out
