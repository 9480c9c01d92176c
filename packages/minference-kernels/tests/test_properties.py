"""Property-based tests (hypothesis) of every public kernel and estimator.

Each property draws a geometry (batch, GQA ratio, Nq <= Nk, head dim, dtype), an input family
(random, scaled, structured, exact ties, zero queries, spiky keys), a memory layout (contiguous,
[B, N, H, D] storage, K/V expanded with stride 0, strided last dim, offset slices) and the index
arguments (empty, one, all, duplicates, unsorted, boundary values, narrow integer dtypes, expanded),
then compares with float64 attention over the exact mask (:mod:`minference_kernels.masks`), row by
row. The estimators are checked against float64 scores computed here from their definitions.

``MINFERENCE_HYPOTHESIS_PROFILE=fuzz`` (``nox -s fuzz``) runs many more examples; the default ``ci``
profile is small and derandomized. Tests marked ``triton`` run the same properties through the Triton
kernels under ``TRITON_INTERPRET=1`` (a separate pytest process, smaller N).
"""

from __future__ import annotations

import minference_kernels as mk
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernels_testlib import FUZZ, TOL, check_rows, checked, examples, logit_bound, reference
from minference_kernels.index import sorted_unique
from minference_kernels.masks import greedy_slash_tiles
from minference_kernels.ops import attention
from minference_kernels.ops.index_build import slash_tiles_torch
from minference_kernels.ops.vs_scores import KEEP_FIRST, KEEP_LOCAL, vs_scores_torch
from minference_kernels.synthetic import structured_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 40, 64, 80, 96, 128, 256]
FAMILIES = ["randn", "scaled", "structured", "ties", "zero_q", "spiky"]
LAYOUTS = ["contiguous", "bnhd", "expand_batch", "expand_heads", "strided_d", "offset"]
EDGE_N = [1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 193]

# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def geometries(draw, max_n: int, max_heads: int = 8, max_extra: int = 130, dims=None):
    """(b, hq, hkv, nq, nk, d, dtype)."""
    # edges of the 64-row blocks, anywhere, and the upper half (hypothesis favours small integers)
    nq = draw(
        st.one_of(
            st.sampled_from([x for x in EDGE_N if x <= max_n]),
            st.integers(1, max_n),
            st.integers(max_n // 2, max_n),
        )
    )
    extra = draw(st.one_of(st.just(0), st.sampled_from([1, 63, 64, 65]), st.integers(1, max_extra)))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([g for g in (1, 2, 3, 4, 8) if g * hkv <= max_heads]))
    b = draw(st.integers(1, 2))
    d = draw(st.sampled_from(dims or HEAD_DIMS))
    dt = draw(st.sampled_from(DTYPES))
    return b, hkv * group, hkv, nq, nq + extra, d, dt


def _layout(x: torch.Tensor, layout: str, kv: bool, g: torch.Generator) -> torch.Tensor:
    b, h, n, d = x.shape
    if layout == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided_d":
        y = torch.zeros(b, h, n, 2 * d, dtype=x.dtype)
        y[..., ::2] = x
        return y[..., ::2]
    if layout == "offset":
        y = torch.randn(b, h, n + 7, d, generator=g).to(x.dtype)
        y[:, :, 5 : 5 + n] = x
        return y[:, :, 5 : 5 + n]
    if kv and layout == "expand_batch":
        return x[:1].expand(b, h, n, d)
    if kv and layout == "expand_heads":
        return x[:, :1].expand(b, h, n, d)
    return x


def make_qkv(geom, family: str, layout: str, seed: int):
    """q, k, v in the given family and memory layout (the values are what the reference sees)."""
    b, hq, hkv, nq, nk, d, dt = geom
    g = torch.Generator().manual_seed(seed)
    if family == "structured":
        q, k, v = structured_qkv(b, hq, hkv, nk, d, kind="mixed", seed=seed % 1000)
        q = q[:, :, nk - nq :]
    else:
        q = torch.randn(b, hq, nq, d, generator=g)
        k = torch.randn(b, hkv, nk, d, generator=g)
        v = torch.randn(b, hkv, nk, d, generator=g)
        if family == "scaled":  # large logits: softmax rows close to one-hot
            q, k = q * 3, k * 3
        elif family == "ties":  # every key of a head equal: exact ties in every score
            k = k[:, :, :1].expand(b, hkv, nk, d).clone()
        elif family == "zero_q":  # uniform attention, exact ties
            q = torch.zeros_like(q)
        elif family == "spiky":  # a few keys every query strongly prefers
            idx = torch.randint(0, nk, (3,), generator=g)
            k[:, :, idx] += q.mean((1, 2))[:, None, None, :].clamp(-2, 2) * 4
    q, k, v = (_layout(x.to(dt), layout, i > 0, g) for i, x in enumerate((q, k, v)))
    return q, k, v


@st.composite
def inputs(draw, max_n: int, max_heads: int = 8, dims=None):
    geom = draw(geometries(max_n, max_heads, dims=dims))
    family = draw(st.sampled_from(FAMILIES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    return geom, make_qkv(geom, family, layout, seed), seed


def _index_dtype(draw, high: int, low: int = 0):
    ok = [torch.int64, torch.int32]
    if high <= 2**15:
        ok.append(torch.int16)
    if low >= 0 and high <= 256:
        ok.append(torch.uint8)
    if high <= 128:
        ok.append(torch.int8)
    return draw(st.sampled_from(ok))


def _index_layout(draw, x: torch.Tensor) -> torch.Tensor:
    """Contiguous, expanded from one head (stride 0), or transposed storage."""
    how = draw(st.sampled_from(["contiguous", "expanded", "transposed"]))
    if how == "expanded":
        return x[:1, :1].expand(x.shape)
    if how == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def _positions(draw, g, b, h, nk, *, slash: bool) -> torch.Tensor:
    """``[b, h, L]`` key positions / diagonal offsets in [0, nk), drawn by a mode."""
    mode = draw(
        st.sampled_from(
            ["empty", "one", "few", "all", "dups", "edges", "window", "tile_edges", "huge_list"]
        )
    )
    if mode == "empty":
        return torch.zeros(b, h, 0, dtype=torch.int64)
    if mode == "one":
        return torch.randint(0, nk, (b, h, 1), generator=g)
    if mode == "few":
        return torch.randint(0, nk, (b, h, draw(st.integers(2, 20))), generator=g)
    if mode == "all":  # every position, shuffled per row
        return torch.argsort(torch.rand(b, h, nk, generator=g), -1)
    if mode == "dups":
        base = torch.randint(0, nk, (b, h, 4), generator=g)
        return base.repeat(1, 1, 3)[..., torch.randperm(12, generator=g)]
    if mode == "edges":
        return torch.tensor([0, nk - 1, nk // 2, 0, nk - 1]).clamp(0, nk - 1).expand(b, h, 5)
    if mode == "window":
        w = draw(st.integers(1, nk))
        return torch.arange(w).flip(0).expand(b, h, w)
    if mode == "tile_edges":
        vals = [x for x in (63, 64, 65, 127, 128, 129) if x < nk] or [0]
        return torch.tensor(vals).expand(b, h, len(vals))
    # more entries than positions (duplicates guaranteed)
    return torch.randint(0, nk, (b, h, min(2 * nk + 1, 400)), generator=g)


@st.composite
def vs_indices(draw, b, h, nk, seed):
    g = torch.Generator().manual_seed(seed + 1)
    vi = _positions(draw, g, b, h, nk, slash=False)
    si = _positions(draw, g, b, h, nk, slash=True)
    vi = _index_layout(draw, vi.to(_index_dtype(draw, nk)))
    si = _index_layout(draw, si.to(_index_dtype(draw, nk)))
    return vi, si


@st.composite
def block_indices(draw, b, h, nq, nk, seed):
    bs = draw(st.sampled_from([64, 64, 128, 192, 256, 1024]))
    g = torch.Generator().manual_seed(seed + 2)
    n_qb, n_kb = -(-nq // bs), -(-nk // bs)
    mode = draw(st.sampled_from(["random", "empty", "none", "all", "diag", "dups", "mixed"]))
    if mode == "empty":  # K = 0
        bi = torch.zeros(b, h, n_qb, 0, dtype=torch.int64)
    elif mode == "none":  # only -1: every row attends to nothing
        bi = torch.full((b, h, n_qb, draw(st.integers(1, 3))), -1)
    elif mode == "all":
        bi = torch.argsort(torch.rand(b, h, n_qb, n_kb, generator=g), -1)
    elif mode == "diag":  # the key blocks holding each query block's own positions
        first = (torch.arange(n_qb) * bs + nk - nq) // bs
        last = ((torch.arange(n_qb) * bs + bs).clamp(max=nq) - 1 + nk - nq) // bs
        bi = torch.stack([first, last], -1).expand(b, h, n_qb, 2)
    elif mode == "dups":
        bi = torch.randint(-1, n_kb, (b, h, n_qb, 2), generator=g).repeat(1, 1, 1, 3)
    elif mode == "mixed":  # some query blocks empty, others full
        bi = torch.arange(n_kb).expand(b, h, n_qb, n_kb).clone()
        bi[torch.rand(b, h, n_qb, generator=g) < 0.5] = -1
    else:
        kk = draw(st.integers(1, max(1, min(n_kb + 2, 6))))
        bi = torch.randint(-1, n_kb, (b, h, n_qb, kk), generator=g)
    bi = _index_layout(draw, bi.to(_index_dtype(draw, n_kb, low=-1)))
    return bs, bi


# ---------------------------------------------------------------------------------------------
# attention kernels vs float64 over the exact mask


def _vs_case(data, backend, max_n, max_heads=8, dims=None):
    geom, (q, k, v), seed = data.draw(inputs(max_n, max_heads, dims=dims))
    b, hq, _, nq, nk, _, dt = geom
    vi, si = data.draw(vs_indices(b, hq, nk, seed))
    out = mk.vertical_slash_attention(q, k, v, vi, si, backend=backend)
    mask = mk.vertical_slash_mask(vi.long(), si.long(), nq, n_kv=nk)
    check_rows(out, reference(q, k, v, mask), mask, dt, "vertical_slash", logit_bound(q, k))
    assert out.dtype == q.dtype


def _bs_case(data, backend, max_n, max_heads=8, dims=None):
    geom, (q, k, v), seed = data.draw(inputs(max_n, max_heads, dims=dims))
    b, hq, _, nq, nk, _, dt = geom
    bs, bi = data.draw(block_indices(b, hq, nq, nk, seed))
    out = mk.block_sparse_attention(q, k, v, bi, block_size=bs, backend=backend)
    mask = mk.block_sparse_mask(bi.long(), nq, bs, n_kv=nk)
    check_rows(out, reference(q, k, v, mask), mask, dt, "block_sparse", logit_bound(q, k))


def _stream_dense_case(data, backend, max_n, max_heads=8, dims=None):
    geom, (q, k, v), _ = data.draw(inputs(max_n, max_heads, dims=dims))
    _, _, _, nq, nk, d, dt = geom
    sink = data.draw(st.one_of(st.sampled_from([0, 1, 64, nk, 10**6]), st.integers(0, nk)))
    window = data.draw(st.one_of(st.sampled_from([1, 2, 64, 65, nk, 10**6]), st.integers(1, nk)))
    scale = data.draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    out = mk.streaming_attention(q, k, v, sink, window, scale, backend=backend)
    mask = mk.streaming_mask(sink, window, nq, n_kv=nk)
    check_rows(
        out, reference(q, k, v, mask, scale), mask, dt, "streaming", logit_bound(q, k, scale)
    )
    out = mk.dense_attention(q, k, v, scale, backend=backend)
    mask = mk.dense_mask(nq, n_kv=nk)
    check_rows(out, reference(q, k, v, mask, scale), mask, dt, "dense", logit_bound(q, k, scale))


@examples(25, 600)
@given(st.data())
def test_vertical_slash_attention(data):
    _vs_case(data, "torch", 600)
    checked("vertical_slash")


@examples(25, 500)
@given(st.data())
def test_block_sparse_attention(data):
    _bs_case(data, "torch", 600)
    checked("block_sparse")


@examples(15, 300)
@given(st.data())
def test_streaming_and_dense_attention(data):
    _stream_dense_case(data, "torch", 600)
    checked("streaming_dense")


@st.composite
def head_patterns(draw, hq):
    one = st.one_of(
        st.just(mk.HeadPattern.dense()),
        st.builds(mk.HeadPattern.a_shape, st.integers(0, 300), st.integers(1, 700)),
        st.tuples(st.integers(0, 700), st.integers(0, 700))
        .filter(lambda t: t[0] + t[1] >= 1)
        .map(lambda t: mk.HeadPattern.vertical_slash(*t)),
        st.builds(mk.HeadPattern.block_sparse, st.integers(1, 12), st.sampled_from([64, 128])),
    )
    return [draw(one) for _ in range(hq)]


def _layer_args(data, hq):
    heads = data.draw(head_patterns(hq))
    coverage = data.draw(st.sampled_from([None, None, 0.5, 0.9, 1.0]))
    last_q = data.draw(st.sampled_from([1, 7, 64, 128]))
    scale = data.draw(st.one_of(st.none(), st.floats(0.02, 1.0)))
    return heads, coverage, last_q, scale


@examples(20, 400)
@given(st.data())
def test_sparse_prefill_layer(data):
    geom, (q, k, v), _ = data.draw(inputs(500))
    b, hq, _, nq, nk, _, dt = geom
    heads, coverage, last_q, scale = _layer_args(data, hq)
    out, idx = mk.sparse_prefill(
        q, k, v, heads, scale, last_q=last_q, coverage=coverage, return_index=True
    )
    mask = mk.sparse_prefill_mask(q, k, heads, scale=scale, last_q=last_q, coverage=coverage)
    check_rows(
        out, reference(q, k, v, mask, scale), mask, dt, "sparse_prefill", logit_bound(q, k, scale)
    )
    # the index the kernel ran is exactly the independent mask, and its density is exact
    assert torch.equal(attention.index_mask(idx), mask)
    causal = nq * (nq + 1) / 2 + nq * (nk - nq)
    assert torch.allclose(mk.index_density(idx), mask.sum((-1, -2)).double() / causal)
    # without return_index the layer takes the same path (or dense when every head is dense)
    again = mk.sparse_prefill(q, k, v, heads, scale, last_q=last_q, coverage=coverage)
    assert torch.equal(again, out) or all(p.kind == "dense" for p in heads)
    checked("sparse_prefill")


# ---------------------------------------------------------------------------------------------
# invariances: duplicates and order of index entries change nothing (bit for bit)


@examples(15, 120)
@given(st.data())
def test_index_order_and_duplicates_invariance(data):
    geom, (q, k, v), seed = data.draw(inputs(400))
    b, hq, _, nq, nk, _, _ = geom
    g = torch.Generator().manual_seed(seed)
    vi, si = (
        torch.randint(0, nk, (b, hq, data.draw(st.integers(1, 30))), generator=g) for _ in "vs"
    )
    shuffled = [
        x.repeat(1, 1, 2)[..., torch.randperm(2 * x.shape[-1], generator=g)] for x in (vi, si)
    ]
    a = mk.vertical_slash_attention(q, k, v, vi, si)
    assert torch.equal(a, mk.vertical_slash_attention(q, k, v, *shuffled))
    n_qb, n_kb = -(-nq // 64), -(-nk // 64)
    bi = torch.randint(-1, n_kb, (b, hq, n_qb, 4), generator=g)
    perm = torch.cat([bi, bi, torch.full_like(bi, -1)], -1)[..., torch.randperm(12, generator=g)]
    assert torch.equal(
        mk.block_sparse_attention(q, k, v, bi), mk.block_sparse_attention(q, k, v, perm)
    )
    checked("invariance")


# ---------------------------------------------------------------------------------------------
# masks and index pieces


@examples(25, 200)
@given(st.data())
def test_vertical_slash_mask_bounds(data):
    """The mask holds every named causal pair, nothing non-causal, and its block-granular extras stay
    within 63 keys of a named diagonal (the tile that carries it)."""
    nq = data.draw(st.integers(1, 300))
    nk = nq + data.draw(st.integers(0, 100))
    seed = data.draw(st.integers(0, 2**31 - 1))
    vi, si = data.draw(vs_indices(1, 2, nk, seed))
    m = mk.vertical_slash_mask(vi, si, nq, n_kv=nk)
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    a0 = (torch.arange(nq)[:, None] // 64) * 64 + (nk - nq)
    for h in range(2):
        vs, ss = vi[0, h].long(), si[0, h].long()
        named = torch.isin(j, vs) | torch.isin(i - j, ss)
        assert bool((m[0, h] | ~(named & (j <= i))).all()), "a named causal pair is missing"
        assert not bool((m[0, h] & (j > i)).any()), "a non-causal pair"
        near = torch.zeros(nq, nk, dtype=torch.bool)
        for s in ss.unique().tolist():
            near |= (j - a0 + s).abs() <= 63
        assert bool((~m[0, h] | near | torch.isin(j, vs)).all()), "an extra pair far from any slash"
    checked("vs_mask")


@examples(15, 150)
@given(st.data())
def test_masks_for_query_rows_are_rows_of_the_full_mask(data):
    """Every mask function (and sparse_prefill_mask) restricted to ``query_rows`` -- any order,
    duplicates -- equals those rows of the full mask."""
    geom, (q, k, _), seed = data.draw(inputs(300, max_heads=4))
    b, hq, _, nq, nk, _, _ = geom
    rows = torch.tensor(data.draw(st.lists(st.integers(0, nq - 1), min_size=1, max_size=20)))
    vi, si = data.draw(vs_indices(b, hq, nk, seed))
    bs, bi = data.draw(block_indices(b, hq, nq, nk, seed))
    pairs = [
        (lambda r: mk.vertical_slash_mask(vi, si, nq, n_kv=nk, query_rows=r)),
        (lambda r: mk.block_sparse_mask(bi, nq, bs, n_kv=nk, query_rows=r)),
        (lambda r: mk.streaming_mask(3, 70, nq, n_kv=nk, query_rows=r)),
        (lambda r: mk.dense_mask(nq, n_kv=nk, query_rows=r)),
    ]
    heads = data.draw(head_patterns(hq))
    pairs.append(lambda r: mk.sparse_prefill_mask(q, k, heads, query_rows=r))
    for f in pairs:
        assert torch.equal(f(rows), f(None)[:, :, rows])
    checked("query_rows")


@examples(40, 300)
@given(st.lists(st.integers(0, 2000), max_size=60), st.integers(0, 8))
def test_slash_tiles_match_greedy(offsets, pad):
    """The vectorised tile cover equals the plain-Python greedy cover (any order, duplicates)."""
    x = torch.tensor(offsets + [offsets[0]] * pad if offsets else [], dtype=torch.int64)
    s, cnt = sorted_unique(x[None, :] if x.numel() else torch.zeros(1, 0, dtype=torch.int64))
    tiles, n = slash_tiles_torch(s, cnt)
    want = greedy_slash_tiles(offsets)
    assert int(n[0]) == len(want) and tiles[0, : len(want)].tolist() == want
    # the cover is the fewest 64-wide tiles: tiles never overlap, each slash is covered
    for o in offsets:
        assert any(t <= -o <= t + 63 for t in want)
    for a, b_ in zip(want, want[1:]):
        assert b_ + 63 < a
    checked("slash_tiles")


# ---------------------------------------------------------------------------------------------
# estimators vs float64 scores from their definitions


def ref_vs_scores(q, k, last_q, scale):
    """Float64 vertical / slash scores from the estimator's documented definition."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    lq = min(last_q, nq)
    kk = k.double().repeat_interleave(hq // k.shape[1], 1)
    s = q[:, :, nq - lq :].double() @ kk.transpose(-1, -2) * scale
    p_t = nk - lq + torch.arange(lq)
    causal = torch.arange(nk)[None, :] <= p_t[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    vert = p.sum(-2)
    slash = torch.zeros(b, hq, nk, dtype=torch.float64)
    for t in range(lq):
        o = p_t[t] - torch.arange(int(p_t[t]) + 1)
        slash[..., o] += p[..., t, : int(p_t[t]) + 1]
    return vert, slash


def _check_topk(sel, score, n, forced, name):
    """``sel [L]`` unique, forced first entries present, and the rest a top-``n`` set of ``score``."""
    sel = sel.tolist()
    assert len(sel) == n and len(set(sel)) == n, f"{name}: {n} unique indices expected"
    assert set(range(forced)) <= set(sel), f"{name}: forced entries missing"
    free = torch.ones_like(score, dtype=torch.bool)
    free[:forced] = False
    chosen = torch.zeros_like(free)
    chosen[sel] = True
    a, b_ = score[chosen & free], score[~chosen & free]
    if a.numel() and b_.numel():
        assert float(a.min()) >= float(b_.max()) - 2e-5, f"{name}: not a top-{n} set"
    rest = score[torch.tensor(sel[forced:], dtype=torch.long)] if n > forced else score[:0]
    assert bool((rest[1:] <= rest[:-1] + 2e-5).all()), f"{name}: not ordered by score"


@examples(20, 300)
@given(st.data())
def test_estimate_vertical_slash(data):
    geom, (q, k, _), _ = data.draw(inputs(400))
    b, hq, _, nq, nk, d, dt = geom
    nv = data.draw(st.sampled_from([0, 1, 5, 31, 64, 10**6]))
    ns = data.draw(st.sampled_from([0, 1, 7, 100, 101, 10**6]))
    last_q = data.draw(st.sampled_from([1, 16, 64, 128]))
    scale = d**-0.5
    vr, sr = ref_vs_scores(q, k, last_q, scale)
    vt, st_ = vs_scores_torch(q, k, last_q, scale)
    assert torch.allclose(vt.double(), vr, atol=1e-5) and torch.allclose(
        st_.double(), sr, atol=1e-5
    )
    vi, si = mk.estimate_vertical_slash(q, k, nv, ns, last_q)
    assert vi.dtype == si.dtype == torch.int64
    assert vi.shape == (b, hq, min(nv, nk)) and si.shape == (b, hq, min(ns, nk))
    for bi in range(b):
        for h in range(hq):
            _check_topk(vi[bi, h], vr[bi, h], min(nv, nk), min(nv, nk, KEEP_FIRST), "vertical")
            _check_topk(si[bi, h], sr[bi, h], min(ns, nk), min(ns, nk, KEEP_LOCAL), "slash")
    checked("estimate_vertical_slash")


def ref_block_scores(q, k, bs):
    b, hq, nq, d = q.shape
    nk = k.shape[2]

    def pool(x, n):
        return torch.stack([x[:, :, i : i + bs].double().mean(2) for i in range(0, n, bs)], 2)

    kk = pool(k, nk).repeat_interleave(hq // k.shape[1], 1)
    s = pool(q, nq) @ kk.transpose(-1, -2)
    off = nk - nq
    first = torch.arange(s.shape[2]) * bs + off
    last = (torch.arange(s.shape[2]) * bs + bs).clamp(max=nq) - 1 + off
    kstart = torch.arange(s.shape[3]) * bs
    causal = kstart[None, :] <= last[:, None]
    own_first = kstart[None, :] == (first // bs * bs)[:, None]
    forced = (kstart[None, :] + bs > first[:, None]) & causal
    return s.masked_fill(~causal, float("-inf")), causal, forced, own_first


@examples(20, 300)
@given(st.data())
def test_estimate_block_sparse(data):
    geom, (q, k, v), _ = data.draw(inputs(500))
    b, hq, _, nq, nk, d, dt = geom
    top_k = data.draw(st.sampled_from([1, 2, 3, 5, 40]))
    bs = data.draw(st.sampled_from([64, 128, 192]))
    bi = mk.estimate_block_sparse(q, k, top_k, bs)
    n_qb = -(-nq // bs)
    assert bi.shape == (b, hq, n_qb, top_k) and bi.dtype == torch.int64
    score, causal, forced, own_first = ref_block_scores(q, k, bs)
    for x in range(b):
        for h in range(hq):
            for m in range(n_qb):
                row = bi[x, h, m].tolist()
                valid = [j for j in row if j >= 0]
                n_causal = int(causal[m].sum())
                assert len(valid) == min(top_k, n_causal) and len(set(valid)) == len(valid)
                assert row[len(valid) :] == [-1] * (top_k - len(valid)), "-1 only as padding"
                assert all(bool(causal[m, j]) for j in valid), "a non-causal key block"
                f = forced[m].nonzero().flatten().tolist()
                # the block of the query block's first row always; every diagonal block when
                # the budget allows (so every row attends at least to its own position); then
                # key block 0 (the attention sinks) when the budget allows
                assert int(own_first[m].nonzero()) in valid, (m, row, f)
                if top_k >= len(f):
                    assert set(f) <= set(valid), (m, row, f)
                if top_k > len(f):
                    assert 0 in valid, (m, row, f)
                free = [j for j in range(score.shape[-1]) if causal[m, j] and j not in f + [0]]
                got = [score[x, h, m, j] for j in valid if j in free]
                left = [score[x, h, m, j] for j in free if j not in valid]
                tol = 1e-4 * (1 + float(score[x, h, m][causal[m]].abs().max()))
                if got and left:
                    assert float(min(got)) >= float(max(left)) - tol, "not a top-k set"
    # no query row is left without keys
    mask = mk.block_sparse_mask(bi, nq, bs, n_kv=nk)
    assert bool(mask.any(-1).all()), "an estimated block-sparse row attends to nothing"
    checked("estimate_block_sparse")


# ---------------------------------------------------------------------------------------------
# determinism: the same inputs give bit-identical outputs run to run


@examples(10, 100)
@given(st.data())
def test_deterministic_run_to_run(data):
    geom, (q, k, v), seed = data.draw(inputs(400))
    b, hq, _, nq, nk, _, _ = geom
    heads, coverage, last_q, scale = _layer_args(data, hq)
    vi, si = data.draw(vs_indices(b, hq, nk, seed))
    runs = [
        (
            mk.sparse_prefill(q, k, v, heads, scale, last_q=last_q, coverage=coverage),
            mk.vertical_slash_attention(q, k, v, vi, si),
            *mk.estimate_vertical_slash(q, k, 50, 120, last_q),
            mk.estimate_block_sparse(q, k, 3),
        )
        for _ in range(2)
    ]
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    checked("determinism")


def _tied_inputs(nq=300, nk=330, d=64, seed=0):
    """Every key of a head equal and constant queries: all logits of a row tie exactly, so the
    vertical scores of the columns every estimation row sees tie, and every pooled block score ties."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, d, generator=g).expand(2, 4, nq, d).contiguous()
    k = torch.randn(1, 1, 1, d, generator=g).expand(2, 2, nk, d).contiguous()
    v = torch.randn(2, 2, nk, d, generator=g)
    return q, k, v


def test_estimation_ties_are_broken_deterministically():
    """Exact ties: the selection is the same run to run, the same for every head and batch entry
    holding the same data (it depends on the head's scores only), a valid top-k of the float64
    scores, and the layer runs exactly the selection that sparse_prefill_mask reports."""
    q, k, v = _tied_inputs()
    vr, sr = ref_vs_scores(q, k, 64, 64**-0.5)
    nq, nk = q.shape[2], k.shape[2]
    assert int((vr[0, 0] == vr[0, 0, 100]).sum()) > 200  # the ties are real
    runs = [mk.estimate_vertical_slash(q, k, 60, 150) for _ in range(3)]
    for vi, si in runs:
        assert torch.equal(vi, runs[0][0]) and torch.equal(si, runs[0][1])
        assert bool((vi == vi[:1, :1]).all()) and bool((si == si[:1, :1]).all())
        _check_topk(vi[0, 0], vr[0, 0], 60, KEEP_FIRST, "vertical")
        _check_topk(si[0, 0], sr[0, 0], 150, KEEP_LOCAL, "slash")
    bis = [mk.estimate_block_sparse(q, k, 3) for _ in range(3)]
    assert all(torch.equal(b_, bis[0]) for b_ in bis)
    assert bool((bis[0] == bis[0][:1, :1]).all())
    heads = [mk.HeadPattern.vertical_slash(60, 150), mk.HeadPattern.block_sparse(3)] * 2
    outs = [mk.sparse_prefill(q, k, v, heads, return_index=True) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0])
    mask = mk.sparse_prefill_mask(q, k, heads)
    assert torch.equal(attention.index_mask(outs[0][1]), mask)
    check_rows(outs[0][0], reference(q, k, v, mask), mask, torch.float32, "tied layer")
    assert nq < nk


@pytest.mark.triton
def test_estimation_ties_triton():
    """Under the Triton score kernel the tied scores match float64 and the selection is
    deterministic run to run and a valid top-k. (Which of exactly tied entries is taken is not
    promised to agree with the PyTorch path: the two sum in different orders.)"""
    q, k, v = _tied_inputs(nq=200, nk=220)
    vr, sr = ref_vs_scores(q, k, 64, 64**-0.5)
    runs = [mk.estimate_vertical_slash(q, k, 60, 150, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    vi, si = runs[0]
    for x in range(2):
        for h in range(4):
            _check_topk(vi[x, h], vr[x, h], 60, KEEP_FIRST, "vertical")
            _check_topk(si[x, h], sr[x, h], 150, KEEP_LOCAL, "slash")
    heads = [mk.HeadPattern.vertical_slash(60, 150)] * 4
    a = mk.sparse_prefill(q, k, v, heads, backend="triton")
    assert torch.equal(a, mk.sparse_prefill(q, k, v, heads, backend="triton"))


# ---------------------------------------------------------------------------------------------
# the same properties through the Triton kernels under the interpreter (smaller N)

TRITON_N = 300 if FUZZ else 200
TRITON_DIMS = [16, 64, 80, 96, 128]


@pytest.mark.triton
@examples(6, 120)
@given(st.data())
def test_triton_vertical_slash_attention(data):
    _vs_case(data, "triton", TRITON_N, max_heads=4, dims=TRITON_DIMS)
    checked("triton_vertical_slash")


@pytest.mark.triton
@examples(6, 100)
@given(st.data())
def test_triton_block_sparse_attention(data):
    _bs_case(data, "triton", TRITON_N, max_heads=4, dims=TRITON_DIMS)
    checked("triton_block_sparse")


@pytest.mark.triton
@examples(4, 60)
@given(st.data())
def test_triton_streaming_and_dense_attention(data):
    _stream_dense_case(data, "triton", TRITON_N, max_heads=4, dims=TRITON_DIMS)
    checked("triton_streaming_dense")


@pytest.mark.triton
@examples(5, 60)
@given(st.data())
def test_triton_sparse_prefill_layer(data):
    """The Triton layer estimates with its own score kernel: its scores match the float64 ones, and
    its output matches float64 attention over the index it ran (whose mask the CPU tests pin to the
    independent masks)."""
    geom, (q, k, v), _ = data.draw(inputs(TRITON_N, max_heads=4, dims=TRITON_DIMS))
    b, hq, _, nq, nk, d, dt = geom
    heads, coverage, last_q, scale = _layer_args(data, hq)
    from minference_kernels.ops import vs_scores_triton

    sc = d**-0.5 if scale is None else scale
    vt, st_ = vs_scores_triton.vs_scores(q, k, last_q, sc)
    vr, sr = ref_vs_scores(q, k, last_q, sc)
    assert torch.allclose(vt.double(), vr, atol=1e-5) and torch.allclose(
        st_.double(), sr, atol=1e-5
    )
    out, idx = mk.sparse_prefill(
        q, k, v, heads, scale, last_q=last_q, coverage=coverage, backend="triton", return_index=True
    )
    mask = attention.index_mask(idx)
    check_rows(
        out,
        reference(q, k, v, mask, scale),
        mask,
        dt,
        "triton sparse_prefill",
        logit_bound(q, k, scale),
    )
    checked("triton_sparse_prefill")


@pytest.mark.triton
@examples(15, 150)
@given(st.lists(st.integers(0, 2000), max_size=40), st.integers(0, 1000))
def test_triton_slash_tiles_match_greedy(offsets, extra):
    from minference_kernels.ops import index_build_triton

    rows = [offsets, offsets[::-1] + [extra]]
    width = max(len(r) for r in rows) or 1
    s = torch.stack(
        [sorted_unique(torch.tensor(r + [r[0] if r else 0] * (width - len(r))))[0] for r in rows]
    )
    cnt = torch.tensor([len(set(r)) for r in rows])
    tiles, n = index_build_triton.slash_tiles(s, cnt)
    for i, r in enumerate(rows):
        want = greedy_slash_tiles(r)
        assert int(n[i]) == len(want) and tiles[i, : len(want)].tolist() == want
    checked("triton_slash_tiles")


@pytest.mark.triton
@examples(4, 50)
@given(st.data())
def test_triton_deterministic_and_matches_torch_index(data):
    """Bit-identical run to run under the interpreter; the kernel executes the same index as the
    PyTorch path (same user indices -> same mask)."""
    geom, (q, k, v), seed = data.draw(inputs(TRITON_N, max_heads=4, dims=TRITON_DIMS))
    b, hq, _, nq, nk, _, dt = geom
    vi, si = data.draw(vs_indices(b, hq, nk, seed))
    a = mk.vertical_slash_attention(q, k, v, vi, si, backend="triton")
    assert torch.equal(a, mk.vertical_slash_attention(q, k, v, vi, si, backend="triton"))
    ref = mk.vertical_slash_attention(q, k, v, vi, si, backend="torch")
    assert float((a.double() - ref.double()).abs().max()) <= 4 * TOL[dt] * max(
        1.0, float(ref.double().abs().max())
    )
    checked("triton_determinism")


# ---------------------------------------------------------------------------------------------
# regressions found by the properties above (minimal cases)


@pytest.mark.parametrize("nq,nk,bs", [(200, 201, 64), (191, 254, 64), (300, 400, 128)])
def test_block_sparse_estimate_top1_keeps_every_row(nq, nk, bs):
    """Continuation (Nq < Nk, offset not a multiple of the block): a query block straddles two key
    blocks, both 'diagonal'. With top_k = 1 only one fits; it must be the one holding the query
    block's first row, else the rows before the second block attend to nothing (zero output).
    Found by test_estimate_block_sparse (fuzz profile)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, nq, 64, generator=g)
    k = torch.randn(1, 1, nk, 64, generator=g)
    v = torch.randn(1, 1, nk, 64, generator=g)
    bi = mk.estimate_block_sparse(q, k, 1, bs)
    first = (torch.arange(bi.shape[2]) * bs + nk - nq) // bs
    assert torch.equal(bi[..., 0], first.expand(1, 2, -1))
    assert bool(mk.block_sparse_mask(bi, nq, bs, n_kv=nk).any(-1).all())
    heads = [mk.HeadPattern.block_sparse(1, bs)] * 2
    out = mk.sparse_prefill(q, k, v, heads)
    mask = mk.sparse_prefill_mask(q, k, heads)
    assert bool(mask.any(-1).all())
    check_rows(out, reference(q, k, v, mask), mask, torch.float32, "layer", logit_bound(q, k))
