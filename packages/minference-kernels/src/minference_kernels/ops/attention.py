"""PyTorch execution of a :class:`SparseIndex` (the CPU path and the reference for the kernels).

Query blocks of 64 rows are processed one at a time; for each, the candidate keys of every head are
gathered (K/V stay ``[B, Hkv, N, D]``; the gather picks rows per KV head for its group of query heads,
so K/V are never repeated per query head). Peak memory is ``O(B * H * (keys per block) * D)``.
Arithmetic is float32 (float64 inputs are not accepted by the public API).

``softcap`` (Gemma 2's attention-logit soft-capping, :func:`softcap_`): every logit
``scale * q.k`` becomes ``softcap * tanh(logit / softcap)`` before the causal mask and the softmax.
"""

from __future__ import annotations

import torch

from ..index import BLOCK, SparseIndex
from ._common import softcap_


def _gather_rows(
    x: torch.Tensor, pos: torch.Tensor, group: int, out: torch.Tensor, raw: torch.Tensor | None
) -> torch.Tensor:
    """``x [B, Hkv, N, D]`` (contiguous), ``pos [B, Hq, L]`` -> ``[B, Hq, L, D]`` without repeating
    ``x``: whole rows through ``index_select`` into the preallocated flat ``out`` (the compute
    dtype; through ``raw``, x's dtype, when they differ). Fresh tensors of this size cost more in
    page faults than the copy itself on CPU."""
    b, hkv, n, d = x.shape
    hq, length = pos.shape[1], pos.shape[2]
    base = (torch.arange(b, device=x.device)[:, None] * hkv) + (
        torch.arange(hq, device=x.device)[None, :] // group
    )  # [B, Hq]: the row block of each query head's KV head
    rows = (base[..., None] * n + pos).reshape(-1)
    size = rows.numel() * d
    dst = out[:size].view(rows.numel(), d)
    if raw is None:
        torch.index_select(x.reshape(b * hkv * n, d), 0, rows, out=dst)
    else:
        dst.copy_(
            torch.index_select(x.reshape(b * hkv * n, d), 0, rows, out=raw[:size].view(-1, d))
        )
    return dst.view(b, hq, length, d)


def _candidates(index: SparseIndex, m: int, device):
    """Candidate keys of query block ``m``: ``pos [B, H, L]`` (raw, may be out of range), ``ok``
    (a real candidate: in range, inside the head's counts, not covered twice) and ``in_rel`` (from a
    relative tile, where the A-shape window applies), all ``[B, H, L]``; ``None`` when no head of
    the block has a candidate."""
    nk = index.n_kv
    a0 = m * BLOCK + nk - index.n_q  # absolute position of the block's first row
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
        if index.masks_columns:  # a column key inside a tile: the column pass attends it
            col = torch.gather(index.col_map, 2, pos.clamp(0, nk - 1).flatten(2)).view(pos.shape)
            ok = ok & (col == 0)
        parts_pos.append(pos.flatten(2))
        parts_ok.append(ok.flatten(2))
        parts_rel.append(torch.zeros_like(ok.flatten(2)))

    if not parts_pos:
        return None
    return torch.cat(parts_pos, -1), torch.cat(parts_ok, -1), torch.cat(parts_rel, -1)


def _qpos(index: SparseIndex, m: int, device) -> torch.Tensor:
    r0, r1 = m * BLOCK, min((m + 1) * BLOCK, index.n_q)
    return torch.arange(r0, r1, device=device) + (index.n_kv - index.n_q)  # [R]


def _pair_keep(index, pos, ok, in_rel, qpos) -> torch.Tensor:
    """Which pairs of rows ``qpos [R]`` and candidates ``pos/ok/in_rel [B, H, L]`` are attended:
    ``[B, H, R, L]`` (causal, and the A-shape window inside relative tiles)."""
    keep = ok[:, :, None, :] & (pos[:, :, None, :] <= qpos[None, None, :, None])
    win = index.window.long()[..., None, None]
    sink = index.sink.long()[..., None, None]
    a_shape_ok = (
        (win <= 0)
        | (pos[:, :, None, :] < sink)
        | (qpos[None, None, :, None] - pos[:, :, None, :] < win)
    )
    return keep & (~in_rel[:, :, None, :] | a_shape_ok)


def block_keep(index: SparseIndex, m: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Candidate keys of query block ``m`` and which pairs are attended.

    Returns ``pos [B, H, L]`` (key positions, clamped into range) and ``keep [B, H, R, L]`` (pairs
    attended, exact: causal, in range, not covered twice, A-shape window applied), or ``None`` when
    no head of the block has any candidate key.
    """
    cand = _candidates(index, m, device)
    if cand is None:
        return None
    pos, ok, in_rel = cand
    keep = _pair_keep(index, pos, ok, in_rel, _qpos(index, m, device))
    return torch.where(ok, pos, torch.zeros_like(pos)).clamp(0, index.n_kv - 1), keep


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over the index's pairs, a 64-row query block at a time (``softcap``: the logits
    ``scale * q.k`` become ``softcap * tanh(logit / softcap)`` before masking).

    Most candidate keys of a block are attended by all of its rows (keys before the block, outside
    any A-shape window edge); they get a per-key bias of 0 or ``-inf`` (``L`` values, not
    ``R x L``).
    Only the few keys whose status changes from row to row (the causal edge inside the block, the
    A-shape window's edge) get a per-pair mask, on a gathered ``[.., R, L_edge]`` slice. Gathered
    keys, values and scores live in buffers allocated once per call.
    """
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    k, v = k.contiguous(), v.contiguous()  # row gathers need [B, Hkv, N, D] rows
    out = torch.empty_like(q)
    win = index.window.long()[..., None]  # [B, H, 1]
    sink = index.sink.long()[..., None]
    # the most candidate keys any block has (an upper bound; one host read on the CPU path)
    l_max = int((index.rel_end.amax() + index.abs_count.amax()) * BLOCK + index.col_count.amax())
    kbuf = torch.empty(b * hq * l_max * d, dtype=compute_dtype, device=q.device)
    vbuf = torch.empty(b * hq * l_max * d, dtype=compute_dtype, device=q.device)
    sbuf = torch.empty(b * hq * BLOCK * l_max, dtype=compute_dtype, device=q.device)
    raw = None
    if k.dtype != compute_dtype:
        raw = torch.empty(b * hq * l_max * d, dtype=k.dtype, device=q.device)
    for m in range(index.num_blocks):
        r0, r1 = m * BLOCK, min((m + 1) * BLOCK, nq)
        cand = _candidates(index, m, q.device)
        if cand is None:
            out[:, :, r0:r1] = 0
            continue
        pos, ok, in_rel = cand
        qpos = _qpos(index, m, q.device)
        a0, a1 = int(qpos[0]), int(qpos[-1])
        # per key: attended by every row, by none, or row-dependent (the edge)
        windowed = in_rel & (win > 0) & (pos >= sink)  # the window applies to these keys
        none = ~ok | (windowed & (a0 - pos >= win))
        every = ok & (pos <= a0) & ~(windowed & (a1 - pos >= win))
        edge = ~none & ~every
        posc = torch.where(ok, pos, torch.zeros_like(pos)).clamp(0, index.n_kv - 1)
        kg = _gather_rows(k, posc, group, kbuf, raw)
        vg = _gather_rows(v, posc, group, vbuf, raw)
        qb = q[:, :, r0:r1].to(compute_dtype) * scale
        length = pos.shape[-1]
        s = sbuf[: b * hq * (r1 - r0) * length].view(b, hq, r1 - r0, length)
        torch.matmul(qb, kg.transpose(-1, -2), out=s)
        softcap_(s, softcap)  # the scale is folded into qb: s holds the logits
        bias = torch.zeros(pos.shape, dtype=compute_dtype, device=q.device).masked_fill_(
            ~every, -torch.inf
        )
        n_edge = int(edge.sum(-1).max())
        if n_edge:
            # the row-dependent keys of each head (padded with other keys, which stay as they are)
            e_idx = torch.topk(edge.to(torch.int8), n_edge, -1, sorted=False).indices
            e_ok = torch.gather(edge, -1, e_idx)
            keep_e = _pair_keep(
                index, torch.gather(pos, -1, e_idx), e_ok, torch.gather(in_rel, -1, e_idx), qpos
            )  # [B, H, R, E]
            idx4 = e_idx[:, :, None, :].expand(-1, -1, r1 - r0, -1)
            raw_e = torch.gather(s, -1, idx4)
            s.add_(bias[:, :, None, :])
            fixed = torch.where(keep_e, raw_e, -torch.inf)
            s.scatter_(-1, idx4, torch.where(e_ok[:, :, None, :], fixed, torch.gather(s, -1, idx4)))
        else:
            s.add_(bias[:, :, None, :])
        # softmax in place; a row with no attended key has max -inf -> exp 0 -> output 0
        mx = s.amax(-1, keepdim=True)
        s.sub_(torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))).exp_()
        denom = s.sum(-1, keepdim=True)
        o = torch.matmul(s, vg).div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
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


# Scratch bytes of one query chunk's float32 scores in :func:`dense` with ``softcap``
DENSE_SOFTCAP_CHUNK_BYTES = 256 << 20


def dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    chunk: int = 1024,
    *,
    softcap: float | None = None,
):
    """Causal attention with the diagonal aligned bottom-right, in query chunks (memory
    ``O(chunk * Nk)``), through PyTorch's SDPA with GQA (no K/V repeat).

    ``softcap`` (SDPA has none): the logits ``scale * q.k`` become ``softcap * tanh(logit /
    softcap)``, then the causal mask and the softmax, in float32 matmuls per KV head group (K/V
    are never repeated per query head); chunks of at most ``chunk`` rows whose scores stay under
    ``DENSE_SOFTCAP_CHUNK_BYTES``."""
    if softcap is not None:
        return _dense_softcap(q, k, v, scale, chunk, softcap)
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


def _dense_softcap(q, k, v, scale: float, chunk: int, softcap: float) -> torch.Tensor:
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    off = nk - nq
    out = torch.empty_like(q)
    kf, vf = k.float(), v.float()  # no-ops for float32
    kpos = torch.arange(nk, device=q.device)
    rows = max(1, min(chunk, DENSE_SOFTCAP_CHUNK_BYTES // (4 * b * hq * nk)))
    for r0 in range(0, nq, rows):
        r1 = min(r0 + rows, nq)
        qpos = torch.arange(r0, r1, device=q.device) + off
        last = int(qpos[-1]) + 1  # keys beyond the chunk's last position are never attended
        # [B, Hkv, g * R, D]: each KV head's query heads, one matmul against its keys
        qc = (q[:, :, r0:r1].float() * scale).reshape(b, hkv, g * (r1 - r0), d)
        s = softcap_(torch.matmul(qc, kf[:, :, :last].transpose(-1, -2)), softcap)
        s = s.view(b, hkv, g, r1 - r0, last)
        s.masked_fill_(kpos[None, :last] > qpos[:, None], float("-inf"))  # every row keeps a key
        p = torch.softmax(s, dim=-1).view(b, hkv, g * (r1 - r0), last)
        o = torch.matmul(p, vf[:, :, :last]).view(b, hq, r1 - r0, d)
        out[:, :, r0:r1] = o.to(q.dtype)
    return out


#: Query rows per chunk of :func:`streaming` (the keys of a chunk: its sink, its rows' windows).
STREAMING_CHUNK = 256


def streaming(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    chunk: int = STREAMING_CHUNK,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """A-shape attention (the first ``sink`` keys and the keys with ``0 <= i - j < window``), exact,
    in float32: per chunk of ``chunk`` query rows, one masked attention over the chunk's own keys
    only (its sink keys and ``[first row - window + 1, last row]``), so the work is
    ``O(Nq * (sink + window + chunk))`` instead of the general index path's per-block gathers.
    The same pairs as :func:`attend` over a streaming index. ``softcap`` as in :func:`attend`."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    off = nk - nq
    out = torch.empty_like(q)
    for r0 in range(0, nq, chunk):
        r1 = min(r0 + chunk, nq)
        p0, p1 = r0 + off, r1 - 1 + off  # absolute positions of the chunk's first and last row
        lo = max(0, p0 - window + 1)
        s_end = min(sink, lo)  # sink keys below the window range (the rest are inside it)
        if s_end:
            keys = torch.cat([torch.arange(s_end), torch.arange(lo, p1 + 1)]).to(q.device)
            kc, vc = k.index_select(2, keys), v.index_select(2, keys)
        else:
            keys = torch.arange(lo, p1 + 1, device=q.device)
            kc, vc = k[:, :, lo : p1 + 1], v[:, :, lo : p1 + 1]
        qpos = torch.arange(p0, p1 + 1, device=q.device)[:, None]
        allowed = (keys[None, :] <= qpos) & (
            (keys[None, :] < sink) | (qpos - keys[None, :] < window)
        )
        kc, vc = kc.float(), vc.float()
        if softcap is None:
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, r0:r1].float(), kc, vc, attn_mask=allowed, scale=scale, enable_gqa=g > 1
            )
        else:
            rows = r1 - r0
            qc = (q[:, :, r0:r1].float() * scale).reshape(b, hkv, g * rows, d)
            s = softcap_(torch.matmul(qc, kc.transpose(-1, -2)), softcap)
            s = s.view(b, hkv, g, rows, -1).masked_fill_(~allowed, float("-inf"))
            p = torch.softmax(s, dim=-1).view(b, hkv, g * rows, -1)
            o = torch.matmul(p, vc).view(b, hq, rows, -1)
        out[:, :, r0:r1] = o.to(q.dtype)
    return out
