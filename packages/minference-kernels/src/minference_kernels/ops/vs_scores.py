"""Vertical-slash scores and selection, PyTorch (the reference), and the backend dispatch of the
scores (the Triton pass is :mod:`minference_kernels.ops.vs_scores_triton`). Definitions: see
:mod:`minference_kernels.estimate`."""

from __future__ import annotations

import logging

import torch

from ._common import softcap_
from ._dispatch import pick

KEEP_FIRST = 30
KEEP_LOCAL = 100

_log = logging.getLogger("minference_kernels")


def _topk_indices(score: torch.Tensor, k: int, ordered: bool = True) -> torch.Tensor:
    """Top-k along the last dim, int64 ``[..., k]``, highest first (``ordered``) or in no promised
    order (skips sorting the selected entries; the set is the same except which of several
    entries tied at the k-th score is taken). Deterministic run to run."""
    if k == 0:
        return score.new_zeros((*score.shape[:-1], 0), dtype=torch.int64)
    return torch.topk(score, k, dim=-1, largest=True, sorted=ordered).indices


def vs_scores_torch(
    q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, *, softcap: float | None = None
):
    """``(vertical [B, Hq, Nk], slash [B, Hq, Nk])`` float32 scores, chunked over KV heads.
    ``softcap``: the logits are soft-capped before the mask and the softmax (module doc)."""
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
        s = softcap_(torch.matmul(qs, kk.transpose(-1, -2)) * scale, softcap)
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
    *,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    last_q: int = 64,
    heads: slice | torch.Tensor | None = None,
    softcap: float | None = None,
    ordered: bool = True,
):
    """Scores -> indices with per-head budgets. Returns ``(v [B,H,NVmax], v_valid, s [B,H,NSmax],
    s_valid)``; entries beyond a head's budget are invalid (``valid == False``), and the valid
    entries of each head come first.

    Budgets are ints (every head) or ``[H]`` / ``[B, H]`` tensors. ``budget_max`` (the largest
    vertical and slash budget, when the caller knows them) avoids reading them back from the
    device (a host sync). Without ``coverage`` nothing is read back (no host sync at all).

    ``coverage`` (adaptive budgets, :func:`coverage_select`): keep index entries until the true
    attention mass of the estimation rows (the last ``last_q`` queries of ``q``) inside the kept
    columns and diagonals, each (query, key) pair counted once, reaches ``coverage`` of their total
    (always at least the forced sinks and local diagonals, never more than the budget). It needs
    ``q`` and ``k`` (``[B, Hq, Nq, D]`` / ``[B, Hkv, Nk, D]``, as given to the scoring pass; the
    attention ``scale``, default ``D ** -0.5``, and ``last_q`` as there too); ``heads`` (a slice or
    an index tensor) names the query heads of ``q`` that ``vertical``'s heads are (default all);
    ``softcap`` soft-caps those rows' logits as the scoring pass did (module doc).
    The valid entries are then ordered by that selection (the order in which they were taken), not
    by score. Both scoring backends select with this same function.

    ``ordered=False`` (index building, which sorts the entries by position anyway): without
    ``coverage``, and for a budget given as one int for every head, the valid entries come in no
    promised order (the same set, up to which of several entries tied at the budget's last score
    is kept). Per-head budgets keep the score order: a head's entries are the first of the
    widest top-k.
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
    # score order is needed by coverage (it walks the entries in that order) and wherever heads'
    # budgets differ (a head's budget is the first entries of the widest top-k)
    any_order = not ordered and coverage is None
    v_idx = _topk_indices(v_forced, nv_max, not (any_order and isinstance(num_vertical, int)))
    s_idx = _topk_indices(s_forced, ns_max, not (any_order and isinstance(num_slash, int)))
    if coverage is not None:
        if q is None or k is None:
            raise ValueError(
                "select_vertical_slash: coverage needs q and k (the estimation rows' attention)"
            )
        sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return coverage_select(
            q, k, v_idx, s_idx, nv, ns, fv, fs, coverage, sc, last_q, heads, softcap=softcap
        )
    v_valid = torch.arange(nv_max, device=dev)[None, None, :] < nv[..., None]
    s_valid = torch.arange(ns_max, device=dev)[None, None, :] < ns[..., None]
    return v_idx, v_valid, s_idx, s_valid


# Scratch bytes of one chunk of keys in :func:`coverage_select` (the estimation rows' scores of
# every query head, and the chunk's keys in float32)
COVERAGE_CHUNK_BYTES = 256 << 20


def _candidate_scores(
    q, k, v_idx, s_idx, heads, scale: float, last_q: int, softcap: float | None = None
):
    """The estimation rows' scaled scores (soft-capped with ``softcap``) at the candidate pairs,
    for :func:`coverage_select`:
    one pass of the last ``Lq`` queries over the keys in chunks (float32, grouped per KV head, K
    never repeated per query head). Returns ``(lq, lse [B, H, Lq], sv [B, H, Lq, NV], ss [B, H,
    Lq, NS], key_s [B, H, Lq, NS])``: the rows' log-sum-exp, the scores at the candidate columns
    ``v_idx`` and at the candidate diagonals ``s_idx`` (key ``key_s = i - o``), ``-inf`` where
    not causal."""
    b, hq_all, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq_all // hkv
    dev = q.device
    lq = min(last_q, nq)
    ids = torch.arange(hq_all, device=dev)
    if heads is not None:
        ids = ids[heads] if isinstance(heads, slice) else heads.to(dev)
    h, nvm, nsm = ids.shape[0], v_idx.shape[-1], s_idx.shape[-1]
    # every head's rows, per KV head, the scale folded in
    qg = (q[:, :, nq - lq :].float() * scale).reshape(b, hkv, g * lq, d)
    qpos = nk - lq + torch.arange(lq, device=dev)
    key_s = qpos[None, None, :, None] - s_idx[:, :, None, :]  # [B, H, Lq, NS]
    key_v = v_idx[:, :, None, :].expand(b, h, lq, nvm)
    lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=dev)
    sv = torch.full((b, h, lq, nvm), float("-inf"), dtype=torch.float32, device=dev)
    ss = torch.full((b, h, lq, nsm), float("-inf"), dtype=torch.float32, device=dev)
    width = max(64, COVERAGE_CHUNK_BYTES // (4 * b * (hq_all * lq + hkv * d)))
    # each candidate pair's chunk and place in it (a key < 0, not causal, is in no chunk)
    spots = [
        (torch.div(x, width, rounding_mode="floor"), x.remainder(width)) for x in (key_v, key_s)
    ]
    for c, j0 in enumerate(range(0, nk, width)):
        j1 = min(nk, j0 + width)
        s = softcap_(torch.matmul(qg, k[:, :, j0:j1].float().transpose(-1, -2)), softcap)
        s = s.view(b, hq_all, lq, j1 - j0)
        s = s.index_select(1, ids) if h != hq_all or heads is not None else s
        if j1 - 1 > nk - lq:  # keys after a row's own position
            late = torch.arange(j0, j1, device=dev)[None, :] > qpos[:, None]
            s = s.masked_fill_(late, float("-inf"))
        lse = torch.logaddexp(lse, torch.logsumexp(s, -1))
        for (chunk, place), dst in zip(spots, (sv, ss)):
            place = place if j1 - j0 == width else place.clamp(max=j1 - j0 - 1)  # a short chunk
            dst.copy_(torch.where(chunk == c, torch.gather(s, -1, place), dst))
    return lq, lse, sv, ss, key_s


def coverage_select(
    q, k, v_idx, s_idx, nv, ns, fv, fs, coverage, scale, last_q, heads=None, *, softcap=None
):
    """``coverage=`` selection (:func:`select_vertical_slash`): of the candidate columns
    ``v_idx [B, H, NV]`` and diagonals ``s_idx [B, H, NS]`` (the budget's top-k, the forced ones
    first: ``fv``/``fs`` of them, ``nv``/``ns`` valid, all ``[B, H]``), keep the forced ones, then
    the others in order of the estimation rows' attention mass they add beyond the forced set
    (columns before diagonals on equal mass, then by position), until the true mass of the kept
    set -- the union of its columns and diagonals, each (query, key) pair counted once -- reaches
    ``coverage`` of the rows' total (all of the valid candidates if it never does).

    Exact: the rows' softmax is evaluated at every candidate pair (one pass of the ``Lq`` rows
    over the keys for the scores and the log-sum-exp, :func:`_candidate_scores`); each pair is
    covered from the first position in that order of its column or its diagonal, and goes to
    that entry's bin; the running sum of the bins is the kept set's mass after each prefix. The
    kept sets are nested in ``coverage`` (a larger target keeps a superset). No host sync,
    unless logger ``minference_kernels`` is enabled for INFO: then heads whose whole budget stays
    below the target are counted and logged (one device-to-host read), so a target the budget
    cannot reach is never silent for whoever asks.

    Returns ``(v, v_valid, s, s_valid)`` as :func:`select_vertical_slash`, each list's kept
    entries first, in the order taken."""
    b, h, nvm = v_idx.shape
    nsm = s_idx.shape[-1]
    nk = k.shape[2]
    dev = v_idx.device
    lq, lse, sv, ss, key_s = _candidate_scores(q, k, v_idx, s_idx, heads, scale, last_q, softcap)
    pv = torch.exp(sv - lse[..., None])  # [B, H, Lq, NV]: 0 where not causal
    ps = torch.exp(ss - lse[..., None])  # [B, H, Lq, NS]
    off_v = (nk - lq + torch.arange(lq, device=dev))[None, None, :, None] - v_idx[:, :, None, :]
    # each candidate's mass not already covered by the forced columns and diagonals
    gain_v = (pv * (off_v >= fs[..., None, None])).sum(-2)
    gain_s = (ps * (key_s >= fv[..., None, None])).sum(-2)
    # the joint order: forced entries first, then by added mass; beyond the budget never
    iv = torch.arange(nvm, device=dev)[None, None, :]
    is_ = torch.arange(nsm, device=dev)[None, None, :]
    kv = torch.where(iv < fv[..., None], float("inf"), gain_v).masked_fill_(
        iv >= nv[..., None], -1.0
    )
    ks = torch.where(is_ < fs[..., None], float("inf"), gain_s).masked_fill_(
        is_ >= ns[..., None], -1.0
    )
    order = torch.sort(torch.cat([kv, ks], -1), dim=-1, descending=True, stable=True).indices
    n_all = nvm + nsm
    when = torch.empty_like(order)  # position of each entry in the joint order
    when.scatter_(-1, order, torch.arange(n_all, device=dev).expand_as(order))
    when_v = when[..., :nvm].masked_fill(iv >= nv[..., None], n_all)
    when_s = when[..., nvm:].masked_fill(is_ >= ns[..., None], n_all)
    # per key / per diagonal offset: the position of the entry naming it (n_all: none)
    col_at = torch.full((b, h, nk), n_all, dtype=torch.int32, device=dev)
    col_at.scatter_(-1, v_idx, when_v.to(torch.int32))
    diag_at = torch.full((b, h, nk), n_all, dtype=torch.int32, device=dev)
    diag_at.scatter_(-1, s_idx, when_s.to(torch.int32))
    # a pair goes to its column's bin unless its diagonal comes earlier, and the reverse
    other_v = torch.gather(diag_at, -1, off_v.clamp(min=0).reshape(b, h, -1)).view_as(pv)
    other_s = torch.gather(col_at, -1, key_s.clamp(min=0).reshape(b, h, -1)).view_as(ps)
    bin_v = (pv * (other_v > when_v[:, :, None, :])).sum(-2)
    bin_s = (ps * (other_s > when_s[:, :, None, :])).sum(-2)
    mass = torch.cumsum(torch.gather(torch.cat([bin_v, bin_s], -1), -1, order), -1)
    n_take = (mass < coverage * lq).sum(-1) + 1  # the first prefix reaching the target
    n_take = torch.maximum(n_take, fv + fs).minimum(nv + ns)
    if _log.isEnabledFor(logging.INFO):
        # the share of each head's estimation-row mass its kept set holds (one host read)
        at = torch.gather(mass, -1, (n_take - 1).clamp(min=0)[..., None])[..., 0]
        short = (at[at < coverage * lq] / lq).cpu()
        if short.numel():
            _log.info(
                "coverage=%g: %d of %d vertical-slash heads reach only %.3f-%.3f of their "
                "estimation rows' attention within their budgets (raise the budgets or lower "
                "coverage to keep the promise)",
                coverage, short.numel(), at.numel(), short.min(), short.max(),
            )  # fmt: skip
    kept_v = when_v < n_take[..., None]
    kept_s = when_s < n_take[..., None]
    # each list in the order taken (kept entries first, then the rest of the budget, then beyond)
    v_out = torch.gather(v_idx, -1, torch.sort(when_v, dim=-1, stable=True).indices)
    s_out = torch.gather(s_idx, -1, torch.sort(when_s, dim=-1, stable=True).indices)
    nv_eff, ns_eff = kept_v.sum(-1), kept_s.sum(-1)
    return v_out, iv < nv_eff[..., None], s_out, is_ < ns_eff[..., None]


def vs_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    last_q: int,
    scale: float,
    backend: str,
    *,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical [B, Hq, Nk], slash [B, Hq, Nk])`` float32 on ``backend`` (``"torch"``:
    :func:`vs_scores_torch`; ``"triton"``: the two-pass kernel of
    :mod:`minference_kernels.ops.vs_scores_triton`)."""
    impl = pick(backend, vs_scores_torch, "vs_scores_triton.vs_scores")
    return impl(q, k, last_q, scale, softcap=softcap)
