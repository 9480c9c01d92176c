"""GPU property suite (issue 9): the kernel property tests' core checks at long N, bf16, on CUDA.

    PYTHONPATH=packages/minference-kernels/src python benchmarks/gpu_properties.py --out $OUT
    # logic check without a GPU (PyTorch path, or the Triton kernels under the interpreter):
    python benchmarks/gpu_properties.py --device cpu --small --out /tmp/gp
    TRITON_INTERPRET=1 python benchmarks/gpu_properties.py --device cpu --small --backend triton \
        --out /tmp/gp

Random cases (seeded, reproducible with --seed): N from 1K to 16K including odd lengths and block
edges, half of them continuation (Nq < Nk), batch 1-2, GQA ratios 1-8, head dims 64/80/96/128,
input families (random, scaled, structured, exact ties, zero queries, spiky keys) and index modes
(empty, one, few, all, duplicates, edges, windows, tile edges). Each output is compared row by row
with float64 attention over the exact mask on sampled query rows (block edges, first/last rows,
random rows): rows with no key must be exactly zero, every other row within the dtype tolerance.

Checks: vertical_slash, block_sparse, streaming, dense, layer (sparse_prefill vs the index it ran;
agreement of that index with the PyTorch estimator's mask is recorded), estimate_vs (Triton scores vs
float64 definitions, valid top-k, forced entries), estimate_bs, determinism (bit-identical reruns,
ties), stability (near-overflow logits vs SDPA in the same dtype, empty rows, diagonal-only rows),
layouts (stride-0 K/V, [B, N, H, D] storage, strided head dim vs contiguous).

Prints a pass/fail table (cases, failures, worst error, tolerance); writes gpu_properties.json under
--out. Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import minference_kernels as mk
import torch
from _provenance import write_json
from minference_kernels.ops import attention
from minference_kernels.ops.block_select import HEAD_ALLOCATION_CAP
from minference_kernels.ops.vs_scores import KEEP_FIRST, KEEP_LOCAL
from minference_kernels.synthetic import structured_qkv

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
ROUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = ["randn", "scaled", "structured", "ties", "zero_q", "spiky"]


class Check:
    def __init__(self, name: str):
        self.name, self.cases, self.failed, self.worst, self.tol = name, 0, 0, 0.0, 0.0
        self.failures: list[dict] = []
        self.notes: dict = {}
        self.seconds = 0.0

    def record(self, ok: bool, err: float, tol: float, params: dict, why: str = ""):
        self.cases += 1
        self.worst = max(self.worst, err)
        self.tol = max(self.tol, tol)
        if not ok:
            self.failed += 1
            if len(self.failures) < 20:
                self.failures.append({**params, "err": err, "tol": tol, "why": why})


# ---------------------------------------------------------------------------------------------
# cases


def draw_geometry(rng: random.Random, small: bool, dtype):
    if small:
        n = rng.choice([1, 2, 63, 64, 65, 127, 129, 200, 333, rng.randint(1, 600)])
    else:
        n = rng.choice([1000, 1024, 2047, 2048, 4095, 4097, 8191, 8192, 12345, 16383, 16384])
    extra = rng.choice([0, 0, 0, 1, 63, 64, 65, rng.randint(1, 300)])
    hkv = rng.choice([1, 2])
    group = rng.choice([1, 2, 4] if hkv == 2 else [1, 2, 4, 8])
    b = rng.choice([1, 2]) if n + extra <= 8192 else 1
    d = rng.choice([64, 80, 96, 128])
    return dict(b=b, hq=hkv * group, hkv=hkv, nq=n, nk=n + extra, d=d, dtype=str(dtype)[6:])


def make_qkv(p, family: str, seed: int, dev, dtype):
    b, hq, hkv, nq, nk, d = p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["d"]
    g = torch.Generator().manual_seed(seed)
    if family == "structured":
        q, k, v = structured_qkv(b, hq, hkv, nk, d, seed=seed % 1000)
        q = q[:, :, nk - nq :]
    else:
        q = torch.randn(b, hq, nq, d, generator=g)
        k = torch.randn(b, hkv, nk, d, generator=g)
        v = torch.randn(b, hkv, nk, d, generator=g)
        if family == "scaled":
            q, k = q * 3, k * 3
        elif family == "ties":
            k = k[:, :, :1].expand(b, hkv, nk, d).clone()
        elif family == "zero_q":
            q = torch.zeros_like(q)
        elif family == "spiky":
            idx = torch.randint(0, nk, (3,), generator=g)
            k[:, :, idx] += q.mean((1, 2))[:, None, None, :].clamp(-2, 2) * 4
    return (x.to(device=dev, dtype=dtype).contiguous() for x in (q, k, v))


def positions(rng: random.Random, g, b, h, nk):
    mode = rng.choice(["empty", "one", "few", "all", "dups", "edges", "window", "tile_edges"])
    if mode == "empty":
        x = torch.zeros(b, h, 0, dtype=torch.int64)
    elif mode == "one":
        x = torch.randint(0, nk, (b, h, 1), generator=g)
    elif mode == "few":
        x = torch.randint(0, nk, (b, h, rng.randint(2, 60)), generator=g)
    elif mode == "all":
        x = torch.argsort(torch.rand(b, h, nk, generator=g), -1)
    elif mode == "dups":
        x = torch.randint(0, nk, (b, h, 8), generator=g).repeat(1, 1, 3)
    elif mode == "edges":
        x = torch.tensor([0, nk - 1, nk // 2, 0, nk - 1]).expand(b, h, 5)
    elif mode == "window":
        x = torch.arange(rng.randint(1, min(nk, 4096))).flip(0).expand(b, h, -1)
    else:
        vals = [s for s in (63, 64, 65, 127, 128, 129, 1023, 1024, 1025) if s < nk] or [0]
        x = torch.tensor(vals).expand(b, h, len(vals))
    return mode, x


def block_indices(rng: random.Random, g, b, h, nq, nk):
    bs = rng.choice([64, 64, 128, 256, 1024])
    n_qb, n_kb = -(-nq // bs), -(-nk // bs)
    mode = rng.choice(["random", "none", "all", "diag", "dups", "mixed", "empty"])
    if mode == "empty":
        bi = torch.zeros(b, h, n_qb, 0, dtype=torch.int64)
    elif mode == "none":
        bi = torch.full((b, h, n_qb, 2), -1)
    elif mode == "all" and n_kb <= 64:
        bi = torch.argsort(torch.rand(b, h, n_qb, n_kb, generator=g), -1)
    elif mode == "diag":
        first = (torch.arange(n_qb) * bs + nk - nq) // bs
        last = ((torch.arange(n_qb) * bs + bs).clamp(max=nq) - 1 + nk - nq) // bs
        bi = torch.stack([first, last], -1).expand(b, h, n_qb, 2)
    elif mode == "dups":
        bi = torch.randint(-1, n_kb, (b, h, n_qb, 3), generator=g).repeat(1, 1, 1, 2)
    elif mode == "mixed":
        bi = torch.randint(-1, n_kb, (b, h, n_qb, 6), generator=g)
        bi[torch.rand(b, h, n_qb, generator=g) < 0.3] = -1
    else:
        bi = torch.randint(-1, n_kb, (b, h, n_qb, rng.randint(1, 8)), generator=g)
    return mode, bs, bi


def sample_rows(rng: random.Random, nq: int, dev, n_random: int = 64):
    rows = set(range(min(64, nq))) | set(range(max(0, nq - 64), nq))
    rows |= {rng.randrange(nq) for _ in range(n_random)}
    for _ in range(4):  # block edges
        m = rng.randrange(-(-nq // 64))
        rows |= {r for r in (64 * m - 1, 64 * m, 64 * m + 1, 64 * m + 63) if 0 <= r < nq}
    return torch.tensor(sorted(rows), device=dev)


# ---------------------------------------------------------------------------------------------
# references


def ref_rows(q, k, v, mask, rows, scale=None):
    """Float64 attention for query ``rows`` over ``mask [B|1, H|1, R, Nk]`` (rows with no key: 0)."""
    g = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape[0], q.shape[1], rows.numel(), q.shape[-1], dtype=torch.float64,
                      device=q.device)  # fmt: skip
    for h in range(q.shape[1]):  # one head at a time: [B, R, Nk] float64 stays small
        kk, vv = k[:, h // g].double(), v[:, h // g].double()
        s = q[:, h, rows].double() @ kk.transpose(-1, -2) * scale
        m = mask[:, min(h, mask.shape[1] - 1)]
        s = s.masked_fill(~m, float("-inf"))
        out[:, h] = torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ vv
    return out


def logit_bound(q, k, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return float(scale * q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max())


def compare_rows(out_rows, ref, mask, dtype, bound=0.0):
    """(ok, worst row error, tolerance, why): empty rows exactly zero, others within tolerance."""
    if not bool(torch.isfinite(out_rows).all()):
        return False, float("inf"), 0.0, "non-finite output"
    empty = ~mask.any(-1).expand(out_rows.shape[:-1])
    if bool(empty.any()) and not bool((out_rows[empty] == 0).all()):
        return False, float("inf"), 0.0, "a row with no key is not zero"
    tol = 4 * (TOL[dtype] + 1e-6 * bound)
    o, r = out_rows.double()[~empty], ref[~empty]
    if o.numel() == 0:
        return True, 0.0, tol, ""
    den = r.norm(dim=-1).clamp_min(0.1 * r.norm(dim=-1).mean().clamp_min(1e-30))
    worst = float(((o - r).norm(dim=-1) / den).max())
    return worst < tol, worst, tol, "" if worst < tol else "row error above tolerance"


def ref_vs_scores(q, k, last_q, scale):
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    lq = min(last_q, nq)
    kk = k.double().repeat_interleave(hq // k.shape[1], 1)
    s = q[:, :, nq - lq :].double() @ kk.transpose(-1, -2) * scale
    p_t = nk - lq + torch.arange(lq, device=q.device)
    keys = torch.arange(nk, device=q.device)
    causal = keys[None, :] <= p_t[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    offs = (p_t[:, None] - keys[None, :]).clamp(min=0).expand(b, hq, lq, nk)
    slash = torch.zeros(b, hq, nk, dtype=torch.float64, device=q.device)
    slash.scatter_add_(-1, offs.reshape(b, hq, -1), p.reshape(b, hq, -1))
    return p.sum(-2), slash


def topk_ok(sel, score, n, forced, tol):
    """sel [B, H, n]: unique, forced first entries present, a top-n set of score (vectorised)."""
    b, h, nk = score.shape
    if sel.shape[-1] != n:
        return False, f"{sel.shape[-1]} entries, expected {n}"
    chosen = torch.zeros(b, h, nk, dtype=torch.int32, device=score.device)
    chosen.scatter_add_(-1, sel, torch.ones_like(sel, dtype=torch.int32))
    if bool((chosen > 1).any()):
        return False, "duplicate index"
    if forced and not bool(chosen[..., :forced].all()):
        return False, "forced entries missing"
    free = torch.arange(nk, device=score.device) >= forced
    a = torch.where((chosen > 0) & free, score, torch.full_like(score, float("inf"))).amin(-1)
    c = torch.where((chosen == 0) & free, score, torch.full_like(score, -float("inf"))).amax(-1)
    if not bool((a >= c - tol).all()):
        return False, f"not a top-{n} set (gap {float((c - a).max()):.2e})"
    return True, ""


# ---------------------------------------------------------------------------------------------
# checks (each: one random case)


def case_vs(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(FAMILIES), rng.randrange(2**31)
    q, k, v = make_qkv(p, fam, seed, dev, args.dtype)
    g = torch.Generator().manual_seed(seed)
    vm, vi = positions(rng, g, p["b"], p["hq"], p["nk"])
    sm, si = positions(rng, g, p["b"], p["hq"], p["nk"])
    vi, si = vi.to(dev), si.to(dev)
    out = mk.vertical_slash_attention(q, k, v, vi, si, backend=be)
    rows = sample_rows(rng, p["nq"], dev)
    mask = mk.vertical_slash_mask(vi, si, p["nq"], n_kv=p["nk"], query_rows=rows)
    ok, err, tol, why = compare_rows(out[:, :, rows], ref_rows(q, k, v, mask, rows), mask,
                                     args.dtype, logit_bound(q, k))  # fmt: skip
    ck.record(ok, err, tol, {**p, "family": fam, "seed": seed, "v": vm, "s": sm}, why)


def case_bs(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(FAMILIES), rng.randrange(2**31)
    q, k, v = make_qkv(p, fam, seed, dev, args.dtype)
    g = torch.Generator().manual_seed(seed)
    mode, bs, bi = block_indices(rng, g, p["b"], p["hq"], p["nq"], p["nk"])
    bi = bi.to(dev)
    out = mk.block_sparse_attention(q, k, v, bi, block_size=bs, backend=be)
    rows = sample_rows(rng, p["nq"], dev)
    mask = mk.block_sparse_mask(bi, p["nq"], bs, n_kv=p["nk"], query_rows=rows)
    ok, err, tol, why = compare_rows(out[:, :, rows], ref_rows(q, k, v, mask, rows), mask,
                                     args.dtype, logit_bound(q, k))  # fmt: skip
    ck.record(ok, err, tol, {**p, "family": fam, "seed": seed, "mode": mode, "bs": bs}, why)


def case_stream_dense(ck_s, ck_d, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(FAMILIES), rng.randrange(2**31)
    q, k, v = make_qkv(p, fam, seed, dev, args.dtype)
    nk, nq = p["nk"], p["nq"]
    sink = rng.choice([0, 1, 4, 64, rng.randint(0, nk), 10**9])
    window = rng.choice([1, 2, 64, 65, 1024, rng.randint(1, nk), 10**9])
    scale = rng.choice([None, None, 0.05, 0.5])
    rows = sample_rows(rng, nq, dev)
    params = {**p, "family": fam, "seed": seed, "sink": sink, "window": window, "scale": scale}
    out = mk.streaming_attention(q, k, v, sink, window, scale, backend=be)
    mask = mk.streaming_mask(sink, window, nq, n_kv=nk, query_rows=rows, device=dev)
    ok, err, tol, why = compare_rows(out[:, :, rows], ref_rows(q, k, v, mask, rows, scale), mask,
                                     args.dtype, logit_bound(q, k, scale))  # fmt: skip
    ck_s.record(ok, err, tol, params, why)
    out = mk.dense_attention(q, k, v, scale, backend=be)
    mask = mk.dense_mask(nq, n_kv=nk, query_rows=rows, device=dev)
    ok, err, tol, why = compare_rows(out[:, :, rows], ref_rows(q, k, v, mask, rows, scale), mask,
                                     args.dtype, logit_bound(q, k, scale))  # fmt: skip
    ck_d.record(ok, err, tol, params, why)


def random_heads(rng, hq):
    out = []
    for _ in range(hq):
        kind = rng.choice(["dense", "a_shape", "vs", "vs", "bs"])
        if kind == "dense":
            out.append(mk.HeadPattern.dense())
        elif kind == "a_shape":
            out.append(mk.HeadPattern.a_shape(rng.choice([0, 4, 64]), rng.choice([1, 256, 2048])))
        elif kind == "vs":
            nv, ns = rng.choice([0, 30, 500, 1000]), rng.choice([1, 100, 1000, 4096])
            out.append(mk.HeadPattern.vertical_slash(nv, ns))
        else:
            out.append(
                mk.HeadPattern.block_sparse(rng.choice([1, 2, 8, 16]), rng.choice([64, 128]))
            )
    return out


def case_layer(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(FAMILIES), rng.randrange(2**31)
    q, k, v = make_qkv(p, fam, seed, dev, args.dtype)
    heads = random_heads(rng, p["hq"])
    coverage = rng.choice([None, None, 0.9])
    last_q = rng.choice([16, 64, 128])
    alloc = rng.choice(["query_block", "head", "layer"])
    kw = dict(last_q=last_q, coverage=coverage, block_allocation=alloc)
    out, idx = mk.sparse_prefill(q, k, v, heads, backend=be, return_index=True, **kw)
    rows = sample_rows(rng, p["nq"], dev)
    mask = attention.index_mask(idx, rows)
    params = {**p, "family": fam, "seed": seed, "heads": [h.describe() for h in heads],
              "coverage": coverage, "last_q": last_q, "block_allocation": alloc}  # fmt: skip
    ok, err, tol, why = compare_rows(out[:, :, rows], ref_rows(q, k, v, mask, rows), mask,
                                     args.dtype, logit_bound(q, k))  # fmt: skip
    # the index agrees with the PyTorch estimator's mask (exact ties may be taken differently)
    indep = mk.sparse_prefill_mask(q, k, heads, query_rows=rows, **kw)
    agree = float((indep == mask).double().mean())
    ck.notes["min_mask_agreement"] = min(ck.notes.get("min_mask_agreement", 1.0), agree)
    ck.record(ok, err, tol, {**params, "mask_agreement": agree}, why)


def case_estimate_vs(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(FAMILIES), rng.randrange(2**31)
    q, k, _ = make_qkv(p, fam, seed, dev, args.dtype)
    nv, ns = rng.choice([0, 1, 31, 500, 10**6]), rng.choice([0, 1, 101, 1000, 10**6])
    last_q = rng.choice([1, 16, 64, 128])
    scale = p["d"] ** -0.5
    params = {**p, "family": fam, "seed": seed, "nv": nv, "ns": ns, "last_q": last_q}
    vr, sr = ref_vs_scores(q, k, last_q, scale)
    if be == "triton":
        from minference_kernels.ops import vs_scores_triton

        vt, st = vs_scores_triton.vs_scores(q, k, last_q, scale)
    else:
        from minference_kernels.ops.vs_scores import vs_scores_torch

        vt, st = vs_scores_torch(q, k, last_q, scale)
    # scores are sums of up to last_q probabilities: error relative to the largest score, plus the
    # float32 logit error (eps32 * largest logit) of any float32 computation
    big = max(1.0, float(vr.abs().max()), float(sr.abs().max()))
    err = max(float((vt.double() - vr).abs().max()), float((st.double() - sr).abs().max())) / big
    tol = 1e-4 + 2e-6 * logit_bound(q[:, :, -min(last_q, p["nq"]) :], k, scale)
    vi, si = mk.estimate_vertical_slash(q, k, nv, ns, last_q, backend=be)
    again = mk.estimate_vertical_slash(q, k, nv, ns, last_q, backend=be)
    nk = p["nk"]
    ok1, why1 = topk_ok(vi, vr, min(nv, nk), min(nv, nk, KEEP_FIRST), 2 * tol * big)
    ok2, why2 = topk_ok(si, sr, min(ns, nk), min(ns, nk, KEEP_LOCAL), 2 * tol * big)
    same = torch.equal(vi, again[0]) and torch.equal(si, again[1])
    ok = err < tol and ok1 and ok2 and same
    why = "; ".join(x for x in (why1, why2, "" if same else "rerun differs") if x)
    ck.record(ok, err, tol, params, why or ("" if err < tol else "scores differ from float64"))


def case_estimate_bs(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(FAMILIES), rng.randrange(2**31)
    q, k, _ = make_qkv(p, fam, seed, dev, args.dtype)
    top_k, bs = rng.choice([1, 2, 3, 8, 40]), rng.choice([64, 128, 256])
    nq, nk = p["nq"], p["nk"]
    bi = mk.estimate_block_sparse(q, k, top_k, bs, backend=be)
    same = torch.equal(bi, mk.estimate_block_sparse(q, k, top_k, bs, backend=be))
    n_qb, n_kb = -(-nq // bs), -(-nk // bs)
    off = nk - nq
    first = torch.arange(n_qb, device=dev) * bs + off
    last = (torch.arange(n_qb, device=dev) * bs + bs).clamp(max=nq) - 1 + off
    kstart = torch.arange(n_kb, device=dev) * bs
    causal = kstart[None, :] <= last[:, None]
    valid = bi >= 0
    why = []
    n_valid = valid.sum(-1)
    if not bool((n_valid == causal.sum(-1).clamp(max=top_k)).all()):
        why.append("valid count != min(top_k, causal blocks)")
    own = (first // bs)[None, None, :, None]
    if not bool((bi == own).any(-1).all()):
        why.append("block of the first row missing")
    safe = bi.clamp(min=0)
    if not bool((~valid | causal[torch.arange(n_qb, device=dev)[:, None], safe]).all()):
        why.append("non-causal block")
    rows = sample_rows(rng, nq, dev)
    if not bool(mk.block_sparse_mask(bi, nq, bs, n_kv=nk, query_rows=rows).any(-1).all()):
        why.append("a row attends to nothing")
    if not same:
        why.append("rerun differs")
    # block_allocation="head" / "layer": the same pairs per head / per layer, spread by share
    for alloc, dims in (("head", (-1, -2)), ("layer", (1, 2, 3))):
        hi = mk.estimate_block_sparse(q, k, top_k, bs, backend=be, block_allocation=alloc)
        if not torch.equal(
            hi, mk.estimate_block_sparse(q, k, top_k, bs, backend=be, block_allocation=alloc)
        ):
            why.append(f"{alloc}: rerun differs")
        hv = hi >= 0
        if hi.shape[-1] != min(n_kb, HEAD_ALLOCATION_CAP * top_k):
            why.append(f"{alloc}: {hi.shape[-1]} columns")
        if not torch.equal(hv.sum(dims), valid.sum(dims)):
            why.append(f"{alloc}: block count per {alloc} != per-query-block budget's")
        if not bool((hi == own).any(-1).all()):
            why.append(f"{alloc}: block of the first row missing")
        rows_ = torch.arange(n_qb, device=dev)[:, None]
        if not bool((~hv | causal[rows_, hi.clamp(min=0)]).all()):
            why.append(f"{alloc}: non-causal block")
        nxt = torch.where(hv[..., 1:], hi[..., 1:], torch.full_like(hi[..., 1:], 2**30))
        if not bool((nxt > hi[..., :-1]).all()) or not bool((hv[..., :-1] | ~hv[..., 1:]).all()):
            why.append(f"{alloc}: ids not strictly ascending with the padding last")
        if not bool((hv.sum(-1) <= causal.sum(-1)).all()):
            why.append(f"{alloc}: more blocks than causal ones")
        if be != "torch":  # the PyTorch ranking on this device: exact ties may be taken otherwise
            ht = mk.estimate_block_sparse(q, k, top_k, bs, backend="torch", block_allocation=alloc)
            agree = float((ht == hi).double().mean())
            key = f"{alloc}_torch_agreement"
            ck.notes[key] = min(ck.notes.get(key, 1.0), agree)
    params = {**p, "family": fam, "seed": seed, "top_k": top_k, "bs": bs}
    ck.record(not why, 0.0, 0.0, params, "; ".join(why))


def case_determinism(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    fam, seed = rng.choice(["ties", "zero_q", "randn", "structured"]), rng.randrange(2**31)
    q, k, v = make_qkv(p, fam, seed, dev, args.dtype)
    g = torch.Generator().manual_seed(seed)
    _, vi = positions(rng, g, p["b"], p["hq"], p["nk"])
    _, si = positions(rng, g, p["b"], p["hq"], p["nk"])
    _, bs, bi = block_indices(rng, g, p["b"], p["hq"], p["nq"], p["nk"])
    vi, si, bi = vi.to(dev), si.to(dev), bi.to(dev)
    heads = random_heads(rng, p["hq"])
    calls = {
        "vertical_slash": lambda: mk.vertical_slash_attention(q, k, v, vi, si, backend=be),
        "block_sparse": lambda: mk.block_sparse_attention(q, k, v, bi, bs, backend=be),
        "streaming": lambda: mk.streaming_attention(q, k, v, 4, 1000, backend=be),
        "dense": lambda: mk.dense_attention(q, k, v, backend=be),
        "layer": lambda: mk.sparse_prefill(q, k, v, heads, backend=be),
        "estimate_vs": lambda: torch.cat(
            mk.estimate_vertical_slash(q, k, 300, 700, backend=be), -1
        ),
        "estimate_bs": lambda: mk.estimate_block_sparse(q, k, 4, backend=be),
    }
    bad = [name for name, f in calls.items() if not torch.equal(f(), f())]
    ck.record(not bad, float(len(bad)), 0.0, {**p, "family": fam, "seed": seed},
              "not bit-identical: " + ", ".join(bad) if bad else "")  # fmt: skip


def sdpa_rows(q, k, v, rows):
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True
    )
    return out[:, :, rows]


def case_stability(ck, rng, args, dev, be):
    n = rng.choice([300, 600] if args.small else [4096, 8192, 16384])
    dtype = rng.choice([torch.bfloat16, torch.float16])
    magnitude = rng.choice([1e2, 1e4, 6e4])
    seed = rng.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    d, hq, hkv = 128, 4, 2
    q = torch.randn(1, hq, n, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g).to(dev, dtype)
    rows = sample_rows(rng, n, torch.device("cpu"))
    s = (q[:, :, rows] @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)).abs().max()
    c = (magnitude / float(s)) ** 0.5
    q, k = (q * c).to(dev, dtype), (k * c).to(dev, dtype)
    rows = rows.to(dev)
    params = {"n": n, "dtype": str(dtype)[6:], "magnitude": magnitude, "seed": seed}
    full = mk.dense_mask(n, query_rows=rows, device=dev)
    ref = ref_rows(q, k, v, full, rows)
    e_sdpa = float((sdpa_rows(q, k, v, rows).double() - ref).norm() / ref.norm())
    ours = {
        "vertical_slash(all slashes)": mk.vertical_slash_attention(
            q, k, v, torch.zeros(1, hq, 0, dtype=torch.long, device=dev),
            torch.arange(n, device=dev).expand(1, hq, n), backend=be),
        "streaming(window=n)": mk.streaming_attention(q, k, v, 0, n, backend=be),
        "layer(VS full)": mk.sparse_prefill(
            q, k, v, [mk.HeadPattern.vertical_slash(10**6, 10**6)] * hq, backend=be),
    }  # fmt: skip
    why, worst = [], 0.0
    for name, o in ours.items():
        o = o[:, :, rows]
        if not bool(torch.isfinite(o).all()):
            why.append(f"{name}: non-finite")
            continue
        e = float((o.double() - ref).norm() / ref.norm())
        worst = max(worst, e)
        if e > max(2 * e_sdpa, ROUND[dtype]):
            why.append(f"{name}: {e:.2e} vs SDPA {e_sdpa:.2e}")
    # rows with no key are exactly zero, rows that keep only the diagonal are exactly v
    nb = -(-n // 64)
    bi = torch.full((1, hq, nb, 2), -1, device=dev)
    bi[:, :, ::2, 0] = torch.arange(0, nb, 2, device=dev)
    out = mk.block_sparse_attention(q, k, v, bi, backend=be)
    empty_rows = (torch.arange(n, device=dev) // 64) % 2 == 1
    if not (torch.isfinite(out).all() and bool((out[:, :, empty_rows] == 0).all())):
        why.append("empty rows not exactly zero")
    out = mk.streaming_attention(q, k, v, 0, 1, backend=be)
    if not torch.equal(out, v.repeat_interleave(hq // hkv, 1)):
        why.append("diagonal-only rows differ from v")
    ck.notes.setdefault("sdpa_vs_ours", []).append(
        {**params, "sdpa_err": e_sdpa, "our_worst_err": worst}
    )
    ck.record(not why, worst, max(2 * e_sdpa, ROUND[dtype]), params, "; ".join(why))


def case_layouts(ck, rng, args, dev, be):
    p = draw_geometry(rng, args.small, args.dtype)
    p["b"] = 2
    if p["nk"] > 8192:
        p.update(nq=p["nq"] // 2, nk=p["nk"] // 2)
    seed = rng.randrange(2**31)
    q, k, v = make_qkv(p, "randn", seed, dev, args.dtype)
    how = rng.choice(["expand_heads", "expand_batch", "bnhd", "strided_d"])
    if how == "expand_heads":
        ks, vs = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
        qs = q
    elif how == "expand_batch":
        ks, vs = k[:1].expand_as(k), v[:1].expand_as(v)
        qs = q
    elif how == "bnhd":
        qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    else:
        qs, ks, vs = (torch.stack([x, x], -1)[..., 0] for x in (q, k, v))
    g = torch.Generator().manual_seed(seed)
    _, vi = positions(rng, g, p["b"], p["hq"], p["nk"])
    _, si = positions(rng, g, p["b"], p["hq"], p["nk"])
    vi, si = vi.to(dev), si.to(dev)
    heads = random_heads(rng, p["hq"])
    calls = {
        "vertical_slash": lambda q, k, v: mk.vertical_slash_attention(q, k, v, vi, si, backend=be),
        "streaming": lambda q, k, v: mk.streaming_attention(q, k, v, 4, 500, backend=be),
        "dense": lambda q, k, v: mk.dense_attention(q, k, v, backend=be),
        "layer": lambda q, k, v: mk.sparse_prefill(q, k, v, heads, backend=be),
    }
    worst, identical, why = 0.0, 0, []
    for name, f in calls.items():
        a = f(qs, ks, vs)
        c = f(qs.contiguous(), ks.contiguous(), vs.contiguous())
        identical += int(torch.equal(a, c))
        e = float((a.double() - c.double()).norm() / c.double().norm().clamp_min(1e-30))
        worst = max(worst, e)
        if e > TOL[args.dtype]:
            why.append(f"{name}: {e:.2e}")
    ck.notes["bit_identical"] = ck.notes.get("bit_identical", 0) + identical
    ck.notes["compared"] = ck.notes.get("compared", 0) + len(calls)
    ck.record(not why, worst, TOL[args.dtype], {**p, "layout": how, "seed": seed}, "; ".join(why))


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--small", action="store_true", help="N <= 600 (logic check on CPU)")
    ap.add_argument("--cases", type=int, default=40, help="cases per check (upper bound)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all checks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.dtype = DTYPES[args.dtype]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --small", file=sys.stderr)
        return 2
    be = args.backend
    torch.manual_seed(args.seed)
    names = ["vertical_slash", "block_sparse", "streaming", "dense", "layer", "estimate_vs",
             "estimate_bs", "determinism", "stability", "layouts"]  # fmt: skip
    checks = {n: Check(n) for n in names}
    plan = [
        (("vertical_slash",), case_vs, 1.0),
        (("block_sparse",), case_bs, 1.0),
        (("streaming", "dense"), case_stream_dense, 1.0),
        (("layer",), case_layer, 1.0),
        (("estimate_vs",), case_estimate_vs, 0.6),
        (("estimate_bs",), case_estimate_bs, 0.6),
        (("determinism",), case_determinism, 0.4),
        (("stability",), case_stability, 0.3),
        (("layouts",), case_layouts, 0.4),
    ]
    share = args.budget / len(plan)
    t_all = time.monotonic()
    for i, (cks, fn, frac) in enumerate(plan):
        rng = random.Random(args.seed * 1000 + i)
        t0 = time.monotonic()
        n_cases = max(1, round(args.cases * frac))
        for _ in range(n_cases):
            state = rng.getstate()
            try:
                fn(*(checks[c] for c in cks), rng, args, dev, be)
            except Exception as exc:  # a crash is a failure of every check of the plan entry
                for c in cks:
                    checks[c].record(False, float("inf"), 0.0, {"rng_state_hash": hash(state)},
                                     f"{type(exc).__name__}: {exc}"[:300])  # fmt: skip
            if time.monotonic() - t0 > share:
                break
        for c in cks:
            checks[c].seconds = time.monotonic() - t0
    total = time.monotonic() - t_all

    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\ngpu_properties on {dev_name}, backend={be}, dtype={str(args.dtype)[6:]}, "
          f"small={args.small}, seed={args.seed}, {total:.0f} s")  # fmt: skip
    hdr = f"{'check':<16}{'cases':>7}{'failed':>8}{'worst err':>12}{'tol':>10}{'s':>7}  notes"
    print(hdr)
    print("-" * len(hdr))
    for c in checks.values():
        notes = {k: v for k, v in c.notes.items() if not isinstance(v, list)}
        note = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in notes.items())  # fmt: skip
        print(f"{c.name:<16}{c.cases:>7}{c.failed:>8}{c.worst:>12.2e}{c.tol:>10.1e}"
              f"{c.seconds:>7.0f}  {'PASS' if not c.failed else 'FAIL'} {note}")  # fmt: skip
    n_cases = sum(c.cases for c in checks.values())
    n_failed = sum(c.failed for c in checks.values())
    print(f"total: {n_cases} cases, {n_failed} failed")
    for c in checks.values():
        for f in c.failures[:3]:
            print(f"  FAIL {c.name}: {f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_properties.json")
    write_json(
        path,
        {
            "device": dev_name,
            "torch": torch.__version__,
            "backend": be,
            "dtype": str(args.dtype),
            "small": args.small,
            "seed": args.seed,
            "seconds": total,
            "total_cases": n_cases,
            "total_failed": n_failed,
            "checks": {
                c.name: {
                    "cases": c.cases,
                    "failed": c.failed,
                    "worst_err": c.worst,
                    "tol": c.tol,
                    "seconds": c.seconds,
                    "notes": c.notes,
                    "failures": c.failures,
                }
                for c in checks.values()
            },
        },
        default=str,
    )
    print(f"wrote {path}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
