"""Hostile inputs at every public entry point: each gives a clear error that names the argument
(documented in docs/troubleshooting.md), huge sizes are clipped instead of exhausting memory, and
non-contiguous / expanded tensors work. Complements test_errors.py."""

from __future__ import annotations

import minference_kernels as mk
import numpy as np
import pytest
import torch
from kernels_testlib import reference, rel_err

q = torch.randn(1, 4, 70, 64)
k = torch.randn(1, 2, 70, 64)
v = torch.randn(1, 2, 70, 64)
VI = torch.zeros(1, 4, 3, dtype=torch.long)
SI = torch.zeros(1, 4, 2, dtype=torch.long)
BI = torch.zeros(1, 4, 2, 1, dtype=torch.long)
DENSE = [mk.HeadPattern.dense()] * 4

ATTENTION = {
    "dense": lambda q, k, v: mk.dense_attention(q, k, v),
    "vertical_slash": lambda q, k, v: mk.vertical_slash_attention(q, k, v, VI, SI),
    "block_sparse": lambda q, k, v: mk.block_sparse_attention(q, k, v, BI),
    "streaming": lambda q, k, v: mk.streaming_attention(q, k, v, 4, 16),
    "sparse_prefill": lambda q, k, v: mk.sparse_prefill(q, k, v, DENSE),
}
QK_ONLY = {
    "estimate_vertical_slash": lambda q, k: mk.estimate_vertical_slash(q, k, 4, 4),
    "estimate_block_sparse": lambda q, k: mk.estimate_block_sparse(q, k, 2),
    "sparse_prefill_mask": lambda q, k: mk.sparse_prefill_mask(q, k, DENSE),
    "build_index": lambda q, k: mk.build_index(q, k, DENSE),
}

QKV_CASES = [
    ("v is None", (q, k, None), TypeError, "v must be a torch.Tensor"),
    ("q 5-D", (q[None], k, v), ValueError, "q must be 4-D"),
    ("k 3-D", (q, k[0], v), ValueError, "k must be 4-D"),
    ("bool", (q.bool(), k, v), TypeError, "q must be float16, bfloat16 or float32"),
    ("complex", (q.to(torch.complex64), k, v), TypeError, "q must be float16"),
    ("float64 v", (q, k, v.double()), TypeError, "v must be float16"),
    ("fp16 v", (q, k, v.half()), TypeError, "v has dtype torch.float16 but q has"),
    ("k on meta", (q, k.to("meta"), v.to("meta")), ValueError, "k is on meta but q is on cpu"),
    ("batch 0", (q[:0], k[:0], v[:0]), ValueError, "empty dimension"),
    ("head dim 0", (q[..., :0], k[..., :0], v[..., :0]), ValueError, "empty dimension"),
    ("Nq 0", (q[:, :, :0], k, v), ValueError, "sequence lengths must be >= 1"),
    ("Nk 0", (q, k[:, :, :0], v[:, :, :0]), ValueError, "sequence lengths must be >= 1"),
    ("heads 4 over 3", (q, k[:, :1].expand(1, 3, 70, 64), v[:, :1].expand(1, 3, 70, 64)),
     ValueError, "multiple of key/value heads"),
    ("Nq > Nk", (q, k[:, :, :69], v[:, :, :69]), ValueError, "last Nq <= Nk"),
    ("v length", (q, k, v[:, :, :69]), ValueError, "v shape"),
    ("list", (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
    ("numpy", (q, k.numpy(), v), TypeError, "k must be a torch.Tensor"),
]  # fmt: skip


@pytest.mark.parametrize("fn", list(ATTENTION), ids=list(ATTENTION))
@pytest.mark.parametrize(
    "args,exc,words", [c[1:] for c in QKV_CASES], ids=[c[0] for c in QKV_CASES]
)
def test_attention_rejects_bad_qkv(fn, args, exc, words):
    with pytest.raises(exc, match=words):
        ATTENTION[fn](*args)


QK_CASES = [c for c in QKV_CASES if c[0] not in ("v is None", "float64 v", "fp16 v", "v length")]


@pytest.mark.parametrize("fn", list(QK_ONLY), ids=list(QK_ONLY))
@pytest.mark.parametrize("args,exc,words", [c[1:] for c in QK_CASES], ids=[c[0] for c in QK_CASES])
def test_estimators_reject_bad_qk(fn, args, exc, words):
    with pytest.raises(exc, match=words):
        QK_ONLY[fn](*args[:2])


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: mk.vertical_slash_attention(q, k, v, VI.bool(), SI), TypeError, "integer tensor"),
        (lambda: mk.vertical_slash_attention(q, k, v, VI.double(), SI), TypeError, "integer"),
        (lambda: mk.vertical_slash_attention(q, k, v, [[[0]]], SI), TypeError, "a torch.Tensor"),
        (lambda: mk.vertical_slash_attention(q, k, v, VI + 2**40, SI), ValueError, "1099511627776"),
        (lambda: mk.vertical_slash_attention(q, k, v, VI, SI + 70), ValueError, r"\[0, 69\]"),
        (lambda: mk.vertical_slash_attention(q, k, v, VI.to("meta"), SI), ValueError, "on meta"),
        (lambda: mk.vertical_slash_attention(q, k, v, VI[None], SI), ValueError, "must be 3-D"),
        (lambda: mk.block_sparse_attention(q, k, v, BI.float()), TypeError, "integer tensor"),
        (lambda: mk.block_sparse_attention(q, k, v, BI[0]), ValueError, "must be 4-D"),
        (lambda: mk.block_sparse_attention(q, k, v, BI[:, :3]), ValueError, r"\[B=1, Hq=4\]"),
        (lambda: mk.block_sparse_attention(q, k, v, BI, 0), ValueError, "block_size must be >= 1"),
        (lambda: mk.block_sparse_attention(q, k, v, BI, 64.0), TypeError, "block_size must be"),
        (lambda: mk.block_sparse_attention(q, k, v, BI, True), TypeError, "block_size must be"),
        (lambda: mk.streaming_attention(q, k, v, -1, 4), ValueError, "sink_tokens must be >= 0"),
        (lambda: mk.streaming_attention(q, k, v, 1, 2.5), TypeError, "window_tokens must be an"),
        (lambda: mk.dense_attention(q, k, v, scale=0.0), ValueError, "scale must be a positive"),
        (lambda: mk.dense_attention(q, k, v, float("nan")), ValueError, "scale must be a positive"),
        (lambda: mk.dense_attention(q, k, v, float("inf")), ValueError, "scale must be a positive"),
        (lambda: mk.dense_attention(q, k, v, "0.1"), TypeError, "scale must be a float or None"),
        (lambda: mk.dense_attention(q, k, v, True), TypeError, "scale must be a float or None"),
        (
            lambda: mk.dense_attention(q, k, v, torch.tensor(0.1)),
            TypeError,
            "scale must be a float",
        ),
        (lambda: mk.dense_attention(q, k, v, backend=None), ValueError, "backend must be one of"),
        (lambda: mk.dense_attention(q, k, v, backend="Triton"), ValueError, "backend must be one"),
        (lambda: mk.estimate_vertical_slash(q, k, 4, 4, 0), ValueError, "last_q must be >= 1"),
        (lambda: mk.estimate_vertical_slash(q, k, 4, 4, 129), ValueError, "last_q must be <= 128"),
        (lambda: mk.estimate_vertical_slash(q, k, -1, 4), ValueError, "num_vertical must be >= 0"),
        (lambda: mk.estimate_vertical_slash(q, k, 4, 4.0), TypeError, "num_slash must be an int"),
        (lambda: mk.estimate_block_sparse(q, k, 0), ValueError, "top_k must be >= 1"),
        (lambda: mk.estimate_block_sparse(q, k, 2, 96), ValueError, "multiple of 64"),
        (lambda: mk.sparse_prefill(q, k, v, None), TypeError, "heads must be a sequence"),
        (lambda: mk.sparse_prefill(q, k, v, "dense"), TypeError, "heads must be a sequence"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE[:3]), ValueError, "heads has 3 patterns"),
        (lambda: mk.sparse_prefill(q, k, v, ["dense"] * 4), TypeError, r"heads\[0\] must be a"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, coverage=0.0), ValueError, "coverage must be"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, coverage="0.9"), TypeError, "coverage must be"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, coverage=float("nan")), ValueError, "coverage"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, dense_below=-1), ValueError, "dense_below"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, max_density=0.0), ValueError, "max_density"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, max_density="1"), TypeError, "max_density"),
        (lambda: mk.sparse_prefill(q, k, v, DENSE, last_q=0), ValueError, "last_q must be >= 1"),
        (lambda: mk.HeadPattern.vertical_slash(0, 0), ValueError, "num_vertical \\+ num_slash"),
        (lambda: mk.HeadPattern.vertical_slash(1.0, 2), TypeError, "num_vertical must be an int"),
        (lambda: mk.HeadPattern.a_shape(True, 2), TypeError, "sink_tokens must be an int"),
        (lambda: mk.HeadPattern.a_shape(4, 0), ValueError, "window_tokens >= 1"),
        (lambda: mk.HeadPattern.block_sparse(0), ValueError, "top_k >= 1"),
        (lambda: mk.HeadPattern.block_sparse(2, 0), ValueError, "multiple of 64"),
        (lambda: mk.HeadPattern("stream_llm"), ValueError, "kind must be one of"),
        (lambda: mk.index_density("index"), TypeError, "index must be a SparseIndex"),
    ],
)
def test_argument_errors(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: mk.vertical_slash_mask(VI - 1, SI, 70), ValueError, "vertical_indices holds -1"),
        (lambda: mk.vertical_slash_mask(VI + 70, SI, 70), ValueError, "vertical_indices holds 70"),
        (lambda: mk.vertical_slash_mask(VI, SI - 5, 70), ValueError, "slash_indices holds -5"),
        (lambda: mk.vertical_slash_mask(VI, SI + 700, 70), ValueError, "slash_indices holds 700"),
        (lambda: mk.vertical_slash_mask(VI.float(), SI, 70), TypeError, "integer tensor"),
        (lambda: mk.vertical_slash_mask(VI[0], SI, 70), ValueError, "must be 3-D"),
        (lambda: mk.vertical_slash_mask(VI, SI[:, :2], 70), ValueError, r"\[B=1, Hq=4\]"),
        (lambda: mk.block_sparse_mask(BI - 2, 70), ValueError, "block_indices holds -2"),
        (lambda: mk.block_sparse_mask(BI + 2, 70), ValueError, "block_indices holds 2"),
        (lambda: mk.block_sparse_mask(BI[:, :, :1], 70), ValueError, "dim 2 must be 2"),
        (lambda: mk.block_sparse_mask(BI, 70, 48), ValueError, "multiple of 64"),
        (lambda: mk.block_sparse_mask(BI.float(), 70), TypeError, "integer tensor"),
        (lambda: mk.streaming_mask(-1, 4, 70), ValueError, "sink_tokens must be >= 0"),
        (lambda: mk.streaming_mask(0, 0, 70), ValueError, "window_tokens must be >= 1"),
        (lambda: mk.dense_mask(0), ValueError, "need 1 <= n <= n_kv"),
        (lambda: mk.dense_mask(10, n_kv=5), ValueError, "need 1 <= n <= n_kv"),
        (lambda: mk.dense_mask(10, n_kv=12.5), TypeError, "n_kv must be an int"),
        (lambda: mk.dense_mask(10, query_rows=torch.tensor([1.5])), TypeError, "query_rows"),
        (lambda: mk.dense_mask(10, query_rows=torch.tensor([10])), ValueError, "query_rows"),
        (lambda: mk.sparse_prefill_mask(q, k, DENSE, query_rows=torch.tensor([0.5])), TypeError,
         "query_rows must be an integer tensor"),
    ],
)  # fmt: skip
def test_mask_argument_errors(call, exc, words):
    """The mask functions (public, the tests' ground truth) check their indices like the kernels."""
    with pytest.raises(exc, match=words):
        call()


def test_huge_sizes_are_clipped_not_allocated():
    """Budgets and sizes beyond the sequence mean 'everything' and cost nothing extra (no
    overflow from Python ints beyond int64, no allocation proportional to the number)."""
    dense = reference(q, k, v, mk.dense_mask(70))
    huge = 2**70
    out = mk.streaming_attention(q, k, v, huge, huge)
    assert rel_err(out, dense) < 1e-5
    vi, si = mk.estimate_vertical_slash(q, k, huge, huge)
    assert vi.shape == si.shape == (1, 4, 70)
    heads = [
        mk.HeadPattern.vertical_slash(huge, huge),
        mk.HeadPattern.a_shape(huge, huge),
        mk.HeadPattern.block_sparse(10**12),
        mk.HeadPattern.block_sparse(10**12, 2**40),
    ]
    assert rel_err(mk.sparse_prefill(q, k, v, heads), dense) < 1e-5
    assert bool(mk.sparse_prefill_mask(q, k, heads).eq(mk.dense_mask(70)).all())
    # a block larger than the sequence: one block
    assert rel_err(mk.block_sparse_attention(q, k, v, BI[:, :, :1], 2**40), dense) < 1e-5
    assert mk.estimate_block_sparse(q, k, 1, 2**40).tolist() == [[[[0]]] * 4]


LAYOUTS = {
    "bnhd storage": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    "strided head dim": lambda x: torch.stack([x, x], -1)[..., 0],
    "expanded over batch": lambda x: x[:1].expand(2, *x.shape[1:]),
    "expanded over heads": lambda x: x[:, :1].expand(x.shape[0], 2, *x.shape[2:]),
    "sliced sequence": lambda x: torch.cat([x, x], 2)[:, :, 3 : 3 + x.shape[2]],
}


def _layout_case(name, backend):
    """Every public function on a non-contiguous / stride-0 layout equals the contiguous result."""
    g = torch.Generator().manual_seed(0)
    b = 2
    q0 = torch.randn(b, 4, 130, 64, generator=g)
    k0 = torch.randn(1 if "batch" in name else b, 2, 150, 64, generator=g)
    v0 = torch.randn(1 if "batch" in name else b, 2, 150, 64, generator=g)
    if "heads" in name:
        k0, v0 = k0[:, :1], v0[:, :1]
    f = LAYOUTS[name]
    ks, vs = f(k0), f(v0)
    qs = q0 if "expanded" in name else f(q0)
    kc, vc, qc = ks.contiguous(), vs.contiguous(), qs.contiguous()
    vi = torch.randint(0, 150, (1, 1, 9), generator=g).expand(b, 4, 9)  # expanded indices too
    si = torch.randint(0, 150, (b, 4, 5), generator=g)
    bi = torch.randint(-1, 3, (b, 4, 3, 3), generator=g).transpose(2, 3)  # strided
    heads = [
        mk.HeadPattern.vertical_slash(10, 20),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.a_shape(4, 30),
        mk.HeadPattern.dense(),
    ]
    calls = [
        lambda q, k, v: mk.dense_attention(q, k, v, backend=backend),
        lambda q, k, v: mk.vertical_slash_attention(q, k, v, vi, si, backend=backend),
        lambda q, k, v: mk.block_sparse_attention(q, k, v, bi, backend=backend),
        lambda q, k, v: mk.streaming_attention(q, k, v, 3, 40, backend=backend),
        lambda q, k, v: mk.sparse_prefill(q, k, v, heads, backend=backend),
        lambda q, k, v: mk.estimate_vertical_slash(q, k, 20, 30, backend=backend),
        lambda q, k, v: mk.estimate_block_sparse(q, k, 2, backend=backend),
        lambda q, k, v: mk.sparse_prefill_mask(q, k, heads),
    ]
    if backend == "triton":  # these two have no Triton path
        calls = calls[:-2]
    for i, call in enumerate(calls):
        a, c = call(qs, ks, vs), call(qc, kc, vc)
        for x, y in zip(a if isinstance(a, tuple) else (a,), c if isinstance(c, tuple) else (c,)):
            assert x.shape == y.shape, (name, i)
            if x.dtype.is_floating_point:
                assert torch.allclose(x, y, atol=1e-6, rtol=1e-5), (name, i)
            else:
                assert torch.equal(x, y), (name, i)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_noncontiguous_and_expanded_inputs_work(name):
    _layout_case(name, "torch")


@pytest.mark.triton
@pytest.mark.parametrize("name", ["expanded over heads", "strided head dim"])
def test_noncontiguous_and_expanded_inputs_work_triton(name):
    _layout_case(name, "triton")


def test_narrow_index_dtypes_equal_int64():
    """int32 / int16 / uint8 / int8 index tensors give the same output as int64."""
    vi = torch.tensor([0, 5, 69, 33]).expand(1, 4, 4)
    si = torch.tensor([0, 1, 64, 65]).expand(1, 4, 4)
    bi = torch.tensor([[0, -1], [1, 0]]).expand(1, 4, 2, 2)
    want_vs = mk.vertical_slash_attention(q, k, v, vi, si)
    want_bs = mk.block_sparse_attention(q, k, v, bi)
    for dt in (torch.int32, torch.int16, torch.uint8, torch.int8):
        got = mk.vertical_slash_attention(q, k, v, vi.to(dt), si.to(dt))
        assert torch.equal(got, want_vs), dt
        if dt != torch.uint8:  # -1 does not fit uint8
            assert torch.equal(mk.block_sparse_attention(q, k, v, bi.to(dt)), want_bs), dt


def test_numpy_float64_scale_is_accepted():
    out = mk.dense_attention(q, k, v, scale=np.float64(0.1))
    assert torch.equal(out, mk.dense_attention(q, k, v, scale=0.1))
