"""Attention-logit soft-capping (Gemma 2, ``softcap``): logits ``softcap * tanh(scale * q.k /
softcap)`` before the causal mask and the softmax. Every attention function against float64
attention with the cap over its exact mask, on odd shapes (the PyTorch path, and the Triton kernels
under TRITON_INTERPRET=1); the cap is really applied; full budgets equal dense; the estimators take
it (their scores are those of the capped softmax, deterministic, Triton == PyTorch); one validator
rejects bad values in every public function."""

import inspect

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import check_rows, reference, rel_err
from minference_kernels._validate import check_softcap
from minference_kernels.ops import attention
from minference_kernels.ops.block_sampled import SAMPLED_ROWS, sampled_mass_chunks, sampled_rows
from minference_kernels.ops.block_select import block_topk
from minference_kernels.ops.vs_scores import select_vertical_slash, vs_scores_torch

# (b, hq, hkv, nq, extra keys, d, dtype): GQA 1/2/4/8, N not a multiple of 64, batch > 1,
# head dims 64/80/96/128/256, q holding only the last Nq positions
SHAPES = [
    (1, 2, 2, 1, 0, 64, torch.float32),
    (2, 4, 2, 65, 0, 80, torch.float32),
    (1, 4, 1, 130, 41, 96, torch.float32),
    (2, 8, 1, 70, 0, 128, torch.float16),
    (1, 2, 1, 100, 7, 256, torch.bfloat16),
    (1, 4, 4, 200, 0, 64, torch.float32),
]
CAP = 2.0  # with q scaled by 3 the logits' spread is ~3: the cap changes every row


def make(b, hq, hkv, nq, extra, d, dt, seed, q_gain=3.0):
    g = torch.Generator().manual_seed(seed)
    nk = nq + extra
    q = (torch.randn(b, hq, nq, d, generator=g) * q_gain).to(dt)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dt)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dt)
    return q, k, v, g


def run_all(q, k, v, g, backend, softcap):
    """Each attention function with ``softcap`` and the exact mask of the pairs it attends to."""
    b, hq, n, _ = q.shape
    nk = k.shape[2]
    vi = torch.randint(0, nk, (b, hq, 9), generator=g).to(q.device)
    si = torch.randint(0, nk, (b, hq, 6), generator=g).to(q.device)
    bi = torch.randint(-1, -(-nk // 64), (b, hq, -(-n // 64), 3), generator=g).to(q.device)
    kinds = [
        mk.HeadPattern.vertical_slash(12, 20),
        mk.HeadPattern.a_shape(4, 70),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.block_sparse(2, scoring="sampled"),
    ]
    heads = [kinds[i % 4] for i in range(hq)]
    kw = dict(backend=backend, softcap=softcap)
    yield "dense", mk.dense_attention(q, k, v, **kw), mk.dense_mask(n, n_kv=nk)
    yield (
        "a_shape",
        mk.streaming_attention(q, k, v, 5, 70, **kw),
        mk.streaming_mask(5, 70, n, n_kv=nk),
    )
    yield (
        "vertical_slash",
        mk.vertical_slash_attention(q, k, v, vi, si, **kw),
        mk.vertical_slash_mask(vi, si, n, n_kv=nk),
    )
    yield (
        "block_sparse",
        mk.block_sparse_attention(q, k, v, bi, **kw),
        mk.block_sparse_mask(bi, n, n_kv=nk),
    )
    yield (
        "layer",
        mk.sparse_prefill(q, k, v, heads, **kw),
        mk.sparse_prefill_mask(q, k, heads, softcap=softcap),
    )


# ---------------------------------------------------------------------------------------------
# the validator, and every public function using it


def test_check_softcap_accepts_none_and_positive_numbers():
    assert check_softcap(None) is None
    for x, want in ((30, 30.0), (50.0, 50.0), (0.25, 0.25), (1e-3, 1e-3)):
        got = check_softcap(x)
        assert type(got) is float and got == want


@pytest.mark.parametrize(
    "bad,exc",
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1, ValueError),
        (-0.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (float("-inf"), ValueError),
        (10**400, ValueError),
        (True, TypeError),
        (False, TypeError),
        ("30", TypeError),
        ([30.0], TypeError),
        (torch.tensor(30.0), TypeError),
    ],
)
def test_check_softcap_rejects(bad, exc):
    with pytest.raises(exc, match="softcap") as err:
        check_softcap(bad)
    if exc is ValueError or isinstance(bad, (bool, str)):
        assert repr(bad)[:20] in str(err.value)  # names the value


q0 = torch.randn(1, 4, 70, 64)
k0 = torch.randn(1, 2, 70, 64)
v0 = torch.randn(1, 2, 70, 64)
HEADS0 = [mk.HeadPattern.vertical_slash(4, 8), mk.HeadPattern.block_sparse(2)] * 2
PUBLIC = {
    "dense_attention": lambda **kw: mk.dense_attention(q0, k0, v0, **kw),
    "vertical_slash_attention": lambda **kw: mk.vertical_slash_attention(
        q0,
        k0,
        v0,
        torch.zeros(1, 4, 2, dtype=torch.long),
        torch.ones(1, 4, 2, dtype=torch.long),
        **kw,
    ),
    "block_sparse_attention": lambda **kw: mk.block_sparse_attention(
        q0, k0, v0, torch.zeros(1, 4, 2, 1, dtype=torch.long), **kw
    ),
    "streaming_attention": lambda **kw: mk.streaming_attention(q0, k0, v0, 4, 16, **kw),
    "sparse_prefill": lambda **kw: mk.sparse_prefill(q0, k0, v0, HEADS0, **kw),
    "sparse_prefill_mask": lambda **kw: mk.sparse_prefill_mask(q0, k0, HEADS0, **kw),
    "build_index": lambda **kw: mk.build_index(q0, k0, HEADS0, **kw),
    "estimate_vertical_slash": lambda **kw: mk.estimate_vertical_slash(q0, k0, 4, 8, **kw),
    "estimate_block_sparse": lambda **kw: mk.estimate_block_sparse(q0, k0, 2, **kw),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_function_takes_and_checks_softcap(name):
    """One name, one default (None), keyword-only, one validator."""
    p = inspect.signature(getattr(mk, name)).parameters["softcap"]
    assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None
    call = PUBLIC[name]
    call(softcap=None)
    call(softcap=30)  # an int is a number
    for bad, exc in ((0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                     (float("inf"), ValueError), (True, TypeError), ("30", TypeError)):  # fmt: skip
        with pytest.raises(exc, match="softcap"):
            call(softcap=bad)


# ---------------------------------------------------------------------------------------------
# attention: the PyTorch path


@pytest.mark.parametrize("b,hq,hkv,nq,extra,d,dt", SHAPES)
def test_capped_attention_matches_float64(b, hq, hkv, nq, extra, d, dt):
    q, k, v, g = make(b, hq, hkv, nq, extra, d, dt, seed=nq * 31 + d + hkv)
    for name, out, mask in run_all(q, k, v, g, "torch", CAP):
        assert out.shape == q.shape and out.dtype == q.dtype, name
        check_rows(out, reference(q, k, v, mask, softcap=CAP), mask, dt, name)


def test_the_cap_is_applied():
    """softcap=1 with large logits: far from uncapped attention, equal to the capped reference;
    a huge cap is uncapped attention (tanh(x) ~ x)."""
    q, k, v, g = make(2, 4, 2, 90, 10, 64, torch.float32, seed=3, q_gain=6.0)
    for name, out, mask in run_all(q, k, v, g, "torch", 1.0):
        capped, plain = reference(q, k, v, mask, softcap=1.0), reference(q, k, v, mask)
        assert rel_err(out, capped) < 1e-5, name
        assert rel_err(out, plain) > 0.2, name
    q, k, v, g = make(2, 4, 2, 90, 10, 64, torch.float32, seed=3)
    for name, out, mask in run_all(q, k, v, g, "torch", 1e5):
        assert rel_err(out, reference(q, k, v, mask)) < 1e-5, name


def test_dense_softcap_in_chunks(monkeypatch):
    """The PyTorch dense path with the cap (SDPA has none): chunks of query rows bounded by rows
    and by bytes, GQA groups in one matmul each."""
    q, k, v, _ = make(2, 8, 2, 150, 20, 64, torch.float32, seed=9)
    want = reference(q, k, v, mk.dense_mask(150, n_kv=170), softcap=CAP)
    for chunk in (1, 16, 64, 1024):
        out = attention.dense(q, k, v, 0.125, chunk=chunk, softcap=CAP)
        assert rel_err(out, want) < 1e-5, chunk
    monkeypatch.setattr(attention, "DENSE_SOFTCAP_CHUNK_BYTES", 4 * 2 * 8 * 170 * 7)
    assert rel_err(attention.dense(q, k, v, 0.125, softcap=CAP), want) < 1e-5


@pytest.mark.parametrize("nq,extra", [(130, 0), (100, 37)])
def test_full_budget_equals_dense_with_softcap(nq, extra):
    q, k, v, _ = make(2, 4, 2, nq, extra, 80, torch.float32, seed=nq + extra)
    b, hq, nk = 2, 4, nq + extra
    dense = mk.dense_attention(q, k, v, softcap=CAP)
    assert rel_err(dense, reference(q, k, v, mk.dense_mask(nq, n_kv=nk), softcap=CAP)) < 1e-5
    every_col = torch.arange(nk).expand(b, hq, nk)
    every_blk = torch.arange(-(-nk // 64)).expand(b, hq, -(-nq // 64), -1)
    full = [
        mk.vertical_slash_attention(q, k, v, every_col, every_col[..., :1], softcap=CAP),
        mk.vertical_slash_attention(q, k, v, every_col[..., :1], every_col, softcap=CAP),
        mk.block_sparse_attention(q, k, v, every_blk, softcap=CAP),
        mk.streaming_attention(q, k, v, 0, nk, softcap=CAP),
        mk.sparse_prefill(q, k, v, [mk.HeadPattern.vertical_slash(nk, nk)] * hq, softcap=CAP),
        mk.sparse_prefill(q, k, v, [mk.HeadPattern.block_sparse(nk)] * hq, softcap=CAP),
        mk.sparse_prefill(q, k, v, [mk.HeadPattern.dense()] * hq, softcap=CAP),
    ]
    for i, out in enumerate(full):
        assert rel_err(out, dense) < 1e-5, i


def test_sparse_prefill_dense_fallbacks_keep_the_cap():
    q, k, v, _ = make(1, 4, 2, 130, 0, 64, torch.float32, seed=4)
    want = reference(q, k, v, mk.dense_mask(130), softcap=CAP)
    heads = [mk.HeadPattern.vertical_slash(4, 8)] * 4
    for kw in ({"dense_below": 1000}, {"max_density": 0.01}):
        out = mk.sparse_prefill(q, k, v, heads, softcap=CAP, **kw)
        assert rel_err(out, want) < 1e-5, kw


# ---------------------------------------------------------------------------------------------
# estimation


def _capped_probs(q, k, lq, softcap, scale=None):
    """Float64 capped softmax of the last ``lq`` queries ``[B, Hq, lq, Nk]`` and offsets i - j."""
    nk = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q[:, :, -lq:].double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    off = (nk - lq + torch.arange(lq))[:, None] - torch.arange(nk)[None, :]
    return torch.softmax(s.masked_fill(off < 0, float("-inf")), -1), off


@pytest.mark.parametrize("nq,extra,lq", [(65, 0, 64), (200, 33, 17)])
def test_vs_scores_are_those_of_the_capped_softmax(nq, extra, lq):
    q, k, _, _ = make(2, 4, 2, nq, extra, 64, torch.float32, seed=nq)
    p, off = _capped_probs(q, k, lq, CAP)
    vert, sl = vs_scores_torch(q, k, lq, 0.125, softcap=CAP)
    want_s = torch.zeros(sl.shape, dtype=torch.float64)
    want_s.scatter_add_(-1, off.clamp(min=0).expand_as(p).reshape(2, 4, -1), p.reshape(2, 4, -1))
    torch.testing.assert_close(vert.double(), p.sum(-2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sl.double(), want_s, atol=2e-5, rtol=1e-4)
    plain, _ = vs_scores_torch(q, k, lq, 0.125)
    assert (plain - vert).abs().max() > 0.05  # the cap moved the scores


def test_estimate_vertical_slash_with_softcap_is_deterministic_and_finds_planted_entries():
    """A planted far column and a planted diagonal stay in the index under a cap that flattens
    the rest of the row (recall of the planted entries), run to run the same."""
    g = torch.Generator().manual_seed(0)
    n, d = 700, 64
    q = torch.randn(1, 2, n, d, generator=g) * 0.3
    k = torch.randn(1, 1, n, d, generator=g) * 0.3
    u = torch.randn(d, generator=g)
    u /= u.norm()
    k[0, 0, 401] += u * 8.0  # column 401
    q[0, 0, -64:] += u * 8.0
    keys = torch.randn(n, d, generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True) * 4.0
    k[0, 0] += keys * 0.5
    q[0, 1, 250:] += keys[: n - 250] * 3.0  # diagonal 250
    a = mk.estimate_vertical_slash(q, k, 40, 110, softcap=5.0)
    b = mk.estimate_vertical_slash(q, k, 40, 110, softcap=5.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert 401 in a[0][0, 0].tolist()
    assert 250 in a[1][0, 1].tolist()
    for cov in (0.5, 0.9):  # coverage selections too
        x = mk.build_index(q, k, [mk.HeadPattern.vertical_slash(40, 110)] * 2, softcap=5.0,
                           coverage=cov)  # fmt: skip
        y = mk.build_index(q, k, [mk.HeadPattern.vertical_slash(40, 110)] * 2, softcap=5.0,
                           coverage=cov)  # fmt: skip
        assert torch.equal(attention.index_mask(x), attention.index_mask(y))


def _kept_pairs(cols, diags, off):
    named = torch.zeros(off.shape[1], dtype=torch.bool)
    named[diags] = True
    m = named[off.clamp(min=0)] & (off >= 0)
    m[:, cols] |= off[:, cols] >= 0
    return m


def test_coverage_counts_the_capped_mass():
    """``coverage=γ`` with ``softcap``: the capped attention mass of the estimation rows inside the
    kept columns and diagonals reaches γ (the mass the kernel's capped softmax gives them). The
    capped rows are flatter: more entries than the uncapped selection keeps."""
    q, k, _, _ = make(1, 4, 2, 600, 0, 64, torch.float32, seed=12, q_gain=2.0)
    p, off = _capped_probs(q, k, 64, CAP)
    vert, sl = vs_scores_torch(q, k, 64, 0.125, softcap=CAP)
    for gamma in (0.3, 0.6):
        vi, vok, si, sok = select_vertical_slash(
            vert, sl, 300, 300, coverage=gamma, q=q, k=k, softcap=CAP
        )
        _, vok0, _, sok0 = select_vertical_slash(vert, sl, 300, 300, coverage=gamma, q=q, k=k)
        for h in range(4):
            cols, diags = vi[0, h][vok[0, h]], si[0, h][sok[0, h]]
            mass = float((p[0, h] * _kept_pairs(cols, diags, off)).sum()) / 64
            assert mass >= gamma - 1e-4, (gamma, h, mass)
            assert len(cols) + len(diags) < 600  # a real selection, not the whole budget
            assert len(cols) + len(diags) > int(vok0[0, h].sum() + sok0[0, h].sum())


def test_sampled_mass_is_the_capped_softmax_of_the_sampled_rows():
    q, k, _, _ = make(1, 2, 1, 300, 0, 64, torch.float32, seed=2)
    scale = 0.125
    chunks = list(
        sampled_mass_chunks(q, k, torch.arange(2), torch.zeros(2, dtype=torch.long), 64, scale,
                            chunk_bytes=1, softcap=CAP)  # one query block per chunk
    )  # fmt: skip
    rows = sampled_rows(5, 300, 64, SAMPLED_ROWS, "cpu")
    s = (q[0, 1].double() @ k[0, 0].double().T) * scale
    s = CAP * torch.tanh(s / CAP)
    causal = torch.arange(300)[None, :] <= torch.arange(300)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    p = torch.nn.functional.pad(p, (0, 20)).view(300, 5, 64).sum(-1)
    for r0, _r1, width, mass in chunks:
        want = p[rows[r0]].sum(0)[:width].float()
        torch.testing.assert_close(mass[0, 1, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("allocation", ["query_block", "head", "layer"])
@pytest.mark.parametrize("scoring", ["pooled", "sampled"])
def test_block_estimation_takes_softcap(allocation, scoring):
    """Deterministic, the same budget as without the cap; pooled per query block: the same blocks
    (tanh is monotone); the masks of the layer entry are the blocks that run."""
    q, k, v, _ = make(2, 4, 2, 300, 20, 64, torch.float32, seed=6)
    kw = dict(block_allocation=allocation, scoring=scoring)
    a = mk.estimate_block_sparse(q, k, 3, softcap=CAP, **kw)
    b = mk.estimate_block_sparse(q, k, 3, softcap=CAP, **kw)
    plain = mk.estimate_block_sparse(q, k, 3, **kw)
    assert torch.equal(a, b)
    assert int((a >= 0).sum()) == int((plain >= 0).sum())
    if scoring == "pooled" and allocation == "query_block":
        assert torch.equal(a, plain)
    heads = [mk.HeadPattern.block_sparse(3, scoring=scoring)] * 4
    mask = mk.sparse_prefill_mask(q, k, heads, softcap=CAP, block_allocation=allocation)
    idx = mk.build_index(q, k, heads, softcap=CAP, block_allocation=allocation)
    assert torch.equal(mask, attention.index_mask(idx) & mk.dense_mask(300, n_kv=320))
    out = mk.sparse_prefill(q, k, v, heads, softcap=CAP, block_allocation=allocation)
    assert rel_err(out, reference(q, k, v, mask, softcap=CAP)) < 1e-5


def test_pooled_scores_are_capped_like_logits():
    """The pooled proxy ``s`` is ranked, and shared out by the allocations, as the capped logit
    ``softcap * tanh(scale * s / softcap)`` (in ``s``'s units)."""
    from minference_kernels.ops.block_select import _pool_blocks, _score_chunks

    q, k, _, _ = make(1, 2, 2, 200, 0, 64, torch.float32, seed=8, q_gain=20.0)
    pq, pk = _pool_blocks(q, 200, 4, 64), _pool_blocks(k, 200, 4, 64)
    raw = list(_score_chunks(pq, pk, 200, 200, 64, 4))
    capped = list(_score_chunks(pq, pk, 200, 200, 64, 4, scale=0.125, softcap=0.5))
    for (_, _, _, s), (_, _, _, c) in zip(raw, capped):
        want = 0.5 * torch.tanh(0.125 * s.double() / 0.5) / 0.125
        torch.testing.assert_close(c.double(), want, atol=1e-6, rtol=1e-5)
        assert float(c.abs().max()) <= 0.5 / 0.125 + 1e-6
    # allocation="head" ranks shares of the capped logits: on a head with large pooled logits
    # and query blocks of different peakedness the cap moves blocks between query blocks, while
    # each query block's own ranking (tanh is monotone) stays
    q, k = _peaked_blocks(24)
    kw = dict(scale=1.0)
    top_k = 8  # ceil(HEAD_ALLOCATION_FLOOR * 8) = 7 guaranteed: one block per query block pooled
    head_cap = block_topk(q, k, top_k, 64, allocation="head", softcap=2.0, **kw)
    head = block_topk(q, k, top_k, 64, allocation="head", **kw)
    assert int((head_cap != head).sum()) > 10
    assert int((head_cap >= 0).sum()) == int((head >= 0).sum())
    assert torch.equal(
        block_topk(q, k, top_k, 64, softcap=2.0, **kw), block_topk(q, k, top_k, 64, **kw)
    )


def _peaked_blocks(m_blocks=12, seed=0):
    """One head whose key block ``j`` is the unit vector ``e_j`` (every row) and whose query block
    ``m`` (every row) scores key block ``j`` by a random ``w[m, j]`` in ``[0, alpha_m)``, the
    peakedness ``alpha_m`` random in ``[0, 12)``: pooled logits (scale 1) are exactly ``w``."""
    g = torch.Generator().manual_seed(seed)
    n = 64 * m_blocks
    k = torch.zeros(1, 1, n, 64)
    q = torch.zeros(1, 1, n, 64)
    for j in range(m_blocks):
        k[0, 0, j * 64 : (j + 1) * 64, j] = 1.0
    for m in range(m_blocks):
        alpha = float(torch.rand(1, generator=g)) * 12
        q[0, 0, m * 64 : (m + 1) * 64, :m_blocks] = torch.rand(m_blocks, generator=g) * alpha
    return q, k


# ---------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (tiny shapes)

TRITON_SHAPES = [
    (1, 4, 2, 65, 0, 64, torch.float32),
    (2, 4, 1, 70, 29, 80, torch.float32),
    (1, 2, 2, 130, 0, 64, torch.float16),  # fp16: the tensor-descriptor loads
]


@pytest.mark.triton
@pytest.mark.parametrize("b,hq,hkv,nq,extra,d,dt", TRITON_SHAPES)
def test_triton_capped_attention_matches_float64(b, hq, hkv, nq, extra, d, dt):
    q, k, v, g = make(b, hq, hkv, nq, extra, d, dt, seed=nq * 7 + d)
    for name, out, mask in run_all(q, k, v, g, "triton", CAP):
        check_rows(out, reference(q, k, v, mask, softcap=CAP), mask, dt, name)
        if dt == torch.float32 and k.shape[2] > 1:
            assert rel_err(out, reference(q, k, v, mask)) > 0.05, name  # the cap was applied


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # interpreter
def test_triton_softcap_saturates_without_nan():
    """Logits far beyond the cap: exp2 in the kernel's tanh overflows to inf / underflows to 0,
    which must give tanh = +-1, not NaN."""
    q, k, v, _ = make(1, 2, 1, 70, 0, 64, torch.float32, seed=1, q_gain=400.0)
    mask = mk.dense_mask(70)
    for cap in (0.05, 1.0):
        out = mk.dense_attention(q, k, v, backend="triton", softcap=cap)
        assert torch.isfinite(out).all()
        assert rel_err(out, reference(q, k, v, mask, softcap=cap)) < 1e-5, cap


@pytest.mark.triton
@pytest.mark.parametrize("nq,extra,lq", [(65, 0, 64), (200, 33, 17)])
def test_triton_vs_scores_with_softcap_match_torch(nq, extra, lq):
    from minference_kernels.ops import vs_scores_triton

    q, k, _, _ = make(2, 4, 2, nq, extra, 64, torch.float32, seed=nq + lq)
    vt, st = vs_scores_torch(q, k, lq, 0.125, softcap=CAP)
    vx, sx = vs_scores_triton.vs_scores(q, k, lq, 0.125, score_per=2, softcap=CAP)
    torch.testing.assert_close(vx, vt, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sx, st, atol=2e-5, rtol=1e-4)


@pytest.mark.triton
def test_triton_estimation_with_softcap_selects_like_torch():
    q, k, _, _ = make(1, 4, 2, 300, 0, 64, torch.float32, seed=5)
    heads = [
        mk.HeadPattern.vertical_slash(20, 60),
        mk.HeadPattern.block_sparse(3),
        mk.HeadPattern.vertical_slash(20, 60),
        mk.HeadPattern.block_sparse(3, scoring="sampled"),
    ]
    for alloc in ("query_block", "head"):
        kw = dict(softcap=CAP, block_allocation=alloc)
        want = mk.build_index(q, k, heads, backend="torch", **kw)
        got = mk.build_index(q, k, heads, backend="triton", **kw)
        assert torch.equal(attention.index_mask(got), attention.index_mask(want)), alloc
    for alloc in ("query_block", "head"):
        t = mk.estimate_block_sparse(q, k, 3, backend="triton", block_allocation=alloc, softcap=CAP)
        c = mk.estimate_block_sparse(q, k, 3, backend="torch", block_allocation=alloc, softcap=CAP)
        assert torch.equal(t, c), alloc
    q, k = _peaked_blocks(24)  # where the cap changes the head allocation's shares
    kw = dict(block_allocation="head", scale=1.0, softcap=2.0)
    t = mk.estimate_block_sparse(q, k, 8, backend="triton", **kw)
    assert torch.equal(t, mk.estimate_block_sparse(q, k, 8, backend="torch", **kw))


# ---------------------------------------------------------------------------------------------
# CUDA (not run by CI): SDPA has no cap, so dense attention takes the Triton kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nq,extra", [(1000, 0), (777, 300)])
def test_cuda_capped_attention(dt, nq, extra):
    q, k, v, g = make(2, 8, 2, nq, extra, 128, dt, seed=nq)
    cuda = [x.cuda() for x in (q, k, v)]
    for name, out, mask in run_all(*cuda, g, "auto", CAP):
        mask = mask.cpu()
        check_rows(out.cpu(), reference(q, k, v, mask, softcap=CAP), mask, dt, name)
