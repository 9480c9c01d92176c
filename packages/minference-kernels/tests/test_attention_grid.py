"""Every attention function vs float64 attention over its exact mask, on odd shapes (PyTorch path),
and the same (smaller) grid through the Triton kernels under TRITON_INTERPRET=1."""

import itertools

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import TOL, reference, rel_err

NS = [1, 17, 63, 64, 65, 200, 333]
GQA = [(4, 4), (4, 2), (4, 1)]
DIMS = [64, 80, 128]
DTYPES = [torch.float32, torch.float16]

GRID = [
    (n, hq, hkv, d, dt, 1 + i % 3, (i % 4 == 1) * 41)
    for i, (n, (hq, hkv), d, dt) in enumerate(itertools.product(NS, GQA, DIMS, DTYPES))
]


def make(b, hq, hkv, n, extra, d, dt, seed):
    g = torch.Generator().manual_seed(seed)
    nk = n + extra
    q = torch.randn(b, hq, n, d, generator=g).to(dt)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dt)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dt)
    return q, k, v, g


def run_all(q, k, v, g, backend):
    b, hq, n, _ = q.shape
    nk = k.shape[2]
    vi = torch.randint(0, nk, (b, hq, 9), generator=g)
    si = torch.randint(0, nk, (b, hq, 6), generator=g)
    bi = torch.randint(-1, -(-nk // 64), (b, hq, -(-n // 64), 3), generator=g)
    kinds = [
        mk.HeadPattern.vertical_slash(12, 20),
        mk.HeadPattern.a_shape(4, 70),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.dense(),
    ]
    heads = [kinds[i % 4] for i in range(hq)]
    yield (
        "vertical_slash",
        mk.vertical_slash_attention(q, k, v, vi, si, backend=backend),
        (mk.vertical_slash_mask(vi, si, n, n_kv=nk)),
    )
    yield (
        "block_sparse",
        mk.block_sparse_attention(q, k, v, bi, backend=backend),
        (mk.block_sparse_mask(bi, n, n_kv=nk)),
    )
    yield (
        "streaming",
        mk.streaming_attention(q, k, v, 5, 70, backend=backend),
        (mk.streaming_mask(5, 70, n, n_kv=nk)),
    )
    yield "dense", mk.dense_attention(q, k, v, backend=backend), mk.dense_mask(n, n_kv=nk)
    yield (
        "layer",
        mk.sparse_prefill(q, k, v, heads, backend=backend),
        (mk.sparse_prefill_mask(q, k, heads)),
    )
    # vertical-block heads beside the others: columns inside kept tiles are attended once
    vb = [
        mk.HeadPattern.vertical_block(6, 2),
        mk.HeadPattern.vertical_block(0, 1),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.vertical_slash(12, 20),
    ]
    heads = [vb[i % 4] for i in range(hq)]
    yield (
        "layer with vertical_block",
        mk.sparse_prefill(q, k, v, heads, backend=backend),
        (mk.sparse_prefill_mask(q, k, heads)),
    )


@pytest.mark.parametrize("n,hq,hkv,d,dt,b,extra", GRID)
def test_grid_torch(n, hq, hkv, d, dt, b, extra):
    q, k, v, g = make(b, hq, hkv, n, extra, d, dt, seed=n * 1000 + d + hkv)
    for name, out, mask in run_all(q, k, v, g, "torch"):
        assert out.shape == q.shape and out.dtype == q.dtype, name
        assert torch.isfinite(out).all(), name
        err = rel_err(out, reference(q, k, v, mask))
        assert err < TOL[dt], f"{name}: rel err {err:.2e}"


TRITON_GRID = [
    (n, hq, hkv, d, dt, 1 + i % 2, (i % 3 == 1) * 29)
    for i, (n, (hq, hkv), d, dt) in enumerate(
        itertools.product(
            [1, 65, 200], [(4, 4), (4, 2), (4, 1)], [64, 80], [torch.float32, torch.float16]
        )
    )
    if i % 2 == 0 or n == 65
]


@pytest.mark.triton
@pytest.mark.parametrize("n,hq,hkv,d,dt,b,extra", TRITON_GRID)
def test_grid_triton_interpreter(n, hq, hkv, d, dt, b, extra):
    q, k, v, g = make(b, hq, hkv, n, extra, d, dt, seed=n * 7 + d + hkv)
    for name, out, mask in run_all(q, k, v, g, "triton"):
        assert torch.isfinite(out).all(), name
        err = rel_err(out, reference(q, k, v, mask))
        assert err < TOL[dt], f"{name}: rel err {err:.2e}"


@pytest.mark.triton
@pytest.mark.parametrize("d", [96, 128])
def test_triton_head_dims(d):
    q, k, v, g = make(2, 8, 1, 130, 0, d, torch.float32, seed=d)
    for name, out, mask in run_all(q, k, v, g, "triton"):
        assert rel_err(out, reference(q, k, v, mask)) < 1e-5, name


def test_gqa_ratio_8_and_bf16():
    q, k, v, g = make(2, 8, 1, 150, 20, 96, torch.bfloat16, seed=5)
    for name, out, mask in run_all(q, k, v, g, "torch"):
        assert rel_err(out, reference(q, k, v, mask)) < TOL[torch.bfloat16], name


@pytest.mark.triton
def test_triton_output_is_token_major():
    """The Triton output is a [B, Hq, Nq, D] view of [B, Nq, Hq, D] memory (no copy for HF/vLLM)."""
    q, k, v, g = make(2, 4, 2, 70, 0, 64, torch.float32, seed=11)
    heads = [mk.HeadPattern.vertical_slash(4, 8)] * 2 + [mk.HeadPattern.dense()] * 2
    out = mk.sparse_prefill(q, k, v, heads, backend="triton")
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    ref = reference(q, k, v, mk.sparse_prefill_mask(q, k, heads))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("n,lq,per", [(1, 64, 1), (65, 64, 3), (200, 17, 4), (333, 100, 2)])
def test_triton_vs_scores_match_float64(n, lq, per):
    """Both estimation passes vs the PyTorch estimator, with several key windows per program
    (``score_per``), odd lengths and GQA."""
    from minference_kernels.ops import vs_scores_triton
    from minference_kernels.ops.vs_scores import vs_scores_torch

    q, k, _, _ = make(2, 4, 2, n, 0, 64, torch.float32, seed=n + lq)
    vt, st = vs_scores_torch(q, k, lq, 0.125)
    vx, sx = vs_scores_triton.vs_scores(q, k, lq, 0.125, score_per=per)
    torch.testing.assert_close(vx, vt, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sx, st, atol=2e-5, rtol=1e-4)
