"""Numerical stability: large-magnitude logits (float16 near overflow), rows whose kept set is only
the diagonal, rows with no key at all (padding), very long rows. Each error is measured against
float64 attention over the exact mask and compared with PyTorch's dense SDPA in the same dtype:
ours must be no worse than about twice SDPA's (plus a floor at the dtype's rounding)."""

from __future__ import annotations

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import TOL, rel_err
from minference_kernels.ops.vs_scores import vs_scores_torch

# the dtype's output rounding: a correctly rounded result is within this of float64
ROUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def ref_chunked(q, k, v, keep, scale=None, chunk=512):
    """Float64 attention over ``keep(rows) -> bool [R, Nk]`` in row chunks (long rows, low memory)."""
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    for r0 in range(0, nq, chunk):
        rows = torch.arange(r0, min(r0 + chunk, nq))
        s = (q[:, :, rows].double() @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~keep(rows), float("-inf"))
        out[:, :, rows] = torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ vv
    return out


def causal_keep(nq, nk):
    return lambda rows: torch.arange(nk)[None, :] <= (rows + nk - nq)[:, None]


def sdpa(q, k, v, scale=None):
    """PyTorch SDPA, same dtype, causal (Nq == Nk), GQA through repeat (the baseline's own path)."""
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True, scale=scale
    )


def assert_no_worse_than_sdpa(ours, base, ref, dt, name):
    e_ours, e_base = rel_err(ours, ref), rel_err(base, ref)
    assert torch.isfinite(ours).all(), f"{name}: non-finite output"
    assert e_ours <= max(2 * e_base, ROUND[dt]), f"{name}: {e_ours:.2e} vs SDPA {e_base:.2e}"
    return e_ours, e_base


def big_logits(n, d, magnitude, dt, seed=0, hq=2, hkv=1):
    """q, k with max |q . k| (before the 1/sqrt(d) scale) about ``magnitude``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    s = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)).abs().max()
    c = (magnitude / float(s)) ** 0.5
    v = torch.randn(1, hkv, n, d, generator=g)
    return (q * c).to(dt), (k * c).to(dt), v.to(dt)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e2, 1e4, 6e4])
def test_large_logits_near_fp16_overflow(dt, magnitude):
    """Scores up to ~1e4 (and 6e4, next to float16's max 65504) before scaling: softmax rows are
    nearly one-hot; every path stays finite and as accurate as SDPA in the same dtype."""
    n, d = 300, 64
    q, k, v = big_logits(n, d, magnitude, dt)
    ref = ref_chunked(q, k, v, causal_keep(n, n))
    base = sdpa(q, k, v)
    assert_no_worse_than_sdpa(mk.dense_attention(q, k, v), base, ref, dt, "dense")
    full = torch.arange(n).expand(1, 2, n)  # every slash: the full causal mask
    vs = mk.vertical_slash_attention(q, k, v, full[..., :1] * 0, full)
    assert_no_worse_than_sdpa(vs, base, ref, dt, "vertical_slash (full)")
    bi = torch.arange(5).expand(1, 2, 5, 5)
    assert_no_worse_than_sdpa(mk.block_sparse_attention(q, k, v, bi), base, ref, dt, "block")
    heads = [mk.HeadPattern.vertical_slash(10**6, 10**6), mk.HeadPattern.dense()]
    assert_no_worse_than_sdpa(mk.sparse_prefill(q, k, v, heads), base, ref, dt, "layer")
    # the estimator's softmax is stable too: each of the last_q rows sums to one
    vert, sl = vs_scores_torch(q, k, 64, d**-0.5)
    assert torch.isfinite(vert).all() and torch.isfinite(sl).all()
    assert torch.allclose(vert.sum(-1), torch.full((1, 2), 64.0), atol=1e-3)
    assert torch.allclose(sl.sum(-1), torch.full((1, 2), 64.0), atol=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
# the score kernel evaluates exp2 on masked (non-causal) lanes before discarding them: numpy warns
# under the interpreter, the values never reach the result (asserted finite below)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_large_logits_triton(dt):
    from minference_kernels.ops import vs_scores_triton

    n, d = 200, 64
    q, k, v = big_logits(n, d, 6e4, dt, seed=1)
    ref = ref_chunked(q, k, v, causal_keep(n, n))
    base = sdpa(q, k, v)
    out = mk.dense_attention(q, k, v, backend="triton")
    assert_no_worse_than_sdpa(out, base, ref, dt, "triton dense")
    out = mk.sparse_prefill(
        q, k, v, [mk.HeadPattern.vertical_slash(10**6, 10**6)] * 2, backend="triton"
    )
    assert_no_worse_than_sdpa(out, base, ref, dt, "triton layer")
    vert, sl = vs_scores_triton.vs_scores(q, k, 64, d**-0.5)
    assert torch.isfinite(vert).all() and torch.isfinite(sl).all()
    assert torch.allclose(vert.sum(-1), torch.full((1, 2), 64.0), atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_diagonal_only_rows(backend, dt):
    """A-shape with no sink and a window of 1: every row attends only to itself, so the output is
    exactly v (bit for bit, whatever the logits). Vertical-slash with the single slash 0 and no
    vertical: the first row of every 64-row block keeps only its diagonal, so it is exactly v too."""
    g = torch.Generator().manual_seed(2)
    n, nk = 150, 170
    q = (torch.randn(1, 4, n, 64, generator=g) * 30).to(dt)
    k = (torch.randn(1, 2, nk, 64, generator=g) * 30).to(dt)
    v = torch.randn(1, 2, nk, 64, generator=g).to(dt)
    v_rows = v.repeat_interleave(2, 1)[:, :, nk - n :]
    out = mk.streaming_attention(q, k, v, 0, 1, backend=backend)
    assert torch.equal(out, v_rows)
    empty = torch.zeros(1, 4, 0, dtype=torch.long)
    out = mk.vertical_slash_attention(q, k, v, empty, torch.zeros(1, 4, 1, dtype=torch.long))
    assert torch.isfinite(out).all()
    for r0 in range(0, n, 64):
        assert torch.equal(out[:, :, r0], v_rows[:, :, r0])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
def test_rows_without_keys_are_zero(backend, dt):
    """Padding-like rows that attend to nothing output exactly zero (no NaN from 0/0 or
    inf - inf), even next to rows with near-overflow logits."""
    n = 200
    q, k, v = big_logits(n, 64, 6e4, dt, seed=3, hq=4, hkv=2)
    # block-sparse: query blocks 1 and 3 have no key block at all
    bi = torch.tensor([[0, -1], [-1, -1], [2, 1], [-1, -1]]).expand(1, 4, 4, 2)
    out = mk.block_sparse_attention(q, k, v, bi, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 64:128], torch.zeros_like(out[:, :, 64:128]))
    assert torch.equal(out[:, :, 192:], torch.zeros_like(out[:, :, 192:]))
    assert bool((out[:, :, :64].abs().sum(-1) > 0).all())
    # vertical-slash with only the last key as a column: every earlier row attends to nothing
    vi = torch.full((1, 4, 1), n - 1)
    out = mk.vertical_slash_attention(q, k, v, vi, torch.zeros(1, 4, 0, dtype=torch.long))
    assert torch.equal(out[:, :, :-1], torch.zeros_like(out[:, :, :-1]))
    assert torch.equal(out[:, :, -1], v.repeat_interleave(2, 1)[:, :, -1])
    # every row empty
    out = mk.block_sparse_attention(q, k, v, torch.full((1, 4, 4, 3), -1), backend=backend)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
def test_very_long_rows(dt):
    """N = 4096 on CPU (rows of up to 4096 keys): dense, full vertical-slash, a wide A-shape and
    all-block block-sparse are as accurate as SDPA in the same dtype."""
    n, d = 4096, 64
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, n, d, generator=g).to(dt)
    k = torch.randn(1, 1, n, d, generator=g).to(dt)
    v = torch.randn(1, 1, n, d, generator=g).to(dt)
    ref = ref_chunked(q, k, v, causal_keep(n, n))
    base = sdpa(q, k, v)
    e_dense, e_sdpa = assert_no_worse_than_sdpa(mk.dense_attention(q, k, v), base, ref, dt, "dense")
    assert e_dense < TOL[dt]
    # every diagonal: full causal
    si = torch.arange(n).expand(1, 2, n)
    vi = torch.zeros(1, 2, 0, dtype=torch.long)
    out = mk.vertical_slash_attention(q, k, v, vi, si)
    assert_no_worse_than_sdpa(out, base, ref, dt, "vertical_slash (full)")
    out = mk.streaming_attention(q, k, v, 4, n)
    assert_no_worse_than_sdpa(out, base, ref, dt, "streaming (full window)")
    bi = torch.arange(n // 64).expand(1, 2, n // 64, n // 64)
    out = mk.block_sparse_attention(q, k, v, bi)
    assert_no_worse_than_sdpa(out, base, ref, dt, "block_sparse (all blocks)")


@pytest.mark.triton
def test_long_rows_triton():
    """Rows of 1024 keys through the Triton kernel (interpreter): as accurate as SDPA."""
    n, d, dt = 1024, 64, torch.bfloat16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, n, d, generator=g).to(dt)
    k = torch.randn(1, 1, n, d, generator=g).to(dt)
    v = torch.randn(1, 1, n, d, generator=g).to(dt)
    ref = ref_chunked(q, k, v, causal_keep(n, n))
    out = mk.dense_attention(q, k, v, backend="triton")
    assert_no_worse_than_sdpa(out, sdpa(q, k, v), ref, dt, "triton dense")


def test_long_rows_continuation():
    """Nq = 64 queries over Nk = 4096 keys (continuation): the last rows are as accurate as SDPA
    over the full prompt (compared on the same rows)."""
    n, nq, d, dt = 4096, 64, 64, torch.bfloat16
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, n, d, generator=g).to(dt)
    k = torch.randn(1, 1, n, d, generator=g).to(dt)
    v = torch.randn(1, 1, n, d, generator=g).to(dt)
    base = sdpa(q, k, v)[:, :, -nq:]
    ql = q[:, :, -nq:]
    ref = ref_chunked(ql, k, v, causal_keep(nq, n))
    assert_no_worse_than_sdpa(mk.dense_attention(ql, k, v), base, ref, dt, "dense")
    heads = [mk.HeadPattern.vertical_slash(10**6, 10**6), mk.HeadPattern.a_shape(0, n)]
    assert_no_worse_than_sdpa(mk.sparse_prefill(ql, k, v, heads), base, ref, dt, "layer")
