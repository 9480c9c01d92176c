"""sparse_prefill_varlen: a packed batch of different-length sequences equals each sequence alone
through sparse_prefill (same index, same output) and float64 attention over each sequence's exact
mask; odd lengths, sequences shorter than a block, empty ones, cached prefixes (Nq < Nk), GQA
1/2/4/8, head dims 64..256; per-sequence dense decisions; clear errors on bad cu_seqlens. The
Triton cases run under TRITON_INTERPRET=1 (tiny shapes)."""

import logging

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import DEVICE, TOL, reference, rel_err

KINDS = [
    mk.HeadPattern.vertical_slash(12, 20),
    mk.HeadPattern.a_shape(4, 70),
    mk.HeadPattern.block_sparse(2),
    mk.HeadPattern.dense(),
]


def heads_for(hq):
    return [KINDS[i % 4] for i in range(hq)]


def cu(lengths):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=DEVICE)


def make(lens_q, lens_k, hq, hkv, d, dt, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dt)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(dt)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(dt)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def seq(x, c, i):
    """Sequence i of a packed [total, H, D] tensor as [1, H, n, D]."""
    return x[int(c[i]) : int(c[i + 1])].transpose(0, 1).unsqueeze(0)


INDEX_FIELDS = ("rel_tiles", "rel_end", "cols", "col_count", "cov", "abs_tiles", "abs_count")


def check_against_each_sequence(q, k, v, lens_q, lens_k, heads, backend, **kw):
    cq, ck = cu(lens_q), cu(lens_k)
    out, indices = mk.sparse_prefill_varlen(
        q, k, v, cq, ck, heads, backend=backend, return_index=True, **kw
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert len(indices) == len(lens_q)
    for i, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq == 0:
            assert indices[i] is None
            continue
        qs, ks, vs = seq(q, cq, i), seq(k, ck, i), seq(v, ck, i)
        # (return_index=True: the same output as without it here, no dense decision is involved)
        alone, idx = mk.sparse_prefill(qs, ks, vs, heads, backend=backend, return_index=True, **kw)
        got = out[int(cq[i]) : int(cq[i + 1])].transpose(0, 1).unsqueeze(0)
        # the same kernel arithmetic per pair: equal to fp tolerance (bit-equal on CPU so far)
        tol = 1e-5 if q.dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got, alone, rtol=tol, atol=tol)
        assert indices[i] is not None, f"sequence {i} ran dense unexpectedly"
        for f in INDEX_FIELDS:
            assert torch.equal(getattr(indices[i], f), getattr(idx, f)), f"seq {i}: {f} differs"
        mask = mk.sparse_prefill_mask(
            qs,
            ks,
            heads,
            **{x: y for x, y in kw.items() if x in ("coverage", "block_allocation", "softcap")},
        )
        err = rel_err(got, reference(qs, ks, vs, mask, softcap=kw.get("softcap")))
        assert err < TOL[q.dtype], f"sequence {i} (Nq={nq}, Nk={nk}): rel err {err:.2e}"
    return out


# (lens_q, lens_k, hq, hkv, d, dtype): B = 1..4, odd lengths, shorter than a block, empty,
# cached prefixes (Nq < Nk), GQA 1/2/4/8, head dims 64/80/96/128/256
TORCH_CASES = [
    ([333], [333], 4, 4, 64, torch.float32),
    ([65, 200], [65, 241], 4, 2, 80, torch.float32),
    ([1, 130, 17], [30, 130, 80], 8, 2, 96, torch.float16),
    ([200, 0, 63, 129], [200, 5, 127, 129], 4, 1, 128, torch.float32),
    ([70, 141], [99, 141], 8, 1, 256, torch.bfloat16),
    ([64, 3, 190], [64, 3, 300], 8, 8, 64, torch.float32),
]


@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,d,dt", TORCH_CASES)
def test_torch_equals_each_sequence_alone(lens_q, lens_k, hq, hkv, d, dt):
    q, k, v = make(lens_q, lens_k, hq, hkv, d, dt, seed=sum(lens_q) + d)
    check_against_each_sequence(q, k, v, lens_q, lens_k, heads_for(hq), "torch")


def test_torch_options_per_sequence():
    """coverage, block_allocation and softcap apply per sequence as in sparse_prefill."""
    lens_q, lens_k = [150, 90], [150, 170]
    q, k, v = make(lens_q, lens_k, 8, 2, 64, torch.float32, seed=5)
    heads = [
        *[mk.HeadPattern.vertical_slash(30, 40)] * 4,
        *[mk.HeadPattern.block_sparse(2)] * 4,
    ]
    check_against_each_sequence(
        q, k, v, lens_q, lens_k, heads, "torch", coverage=0.9, block_allocation="layer", softcap=7.0
    )


TRITON_CASES = [
    ([65, 1, 130], [65, 30, 200], 4, 2, 64, torch.float32),
    ([17, 100], [80, 100], 8, 1, 80, torch.float16),
    ([0, 70], [10, 129], 4, 4, 128, torch.float32),
]


@pytest.mark.triton
@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,d,dt", TRITON_CASES)
def test_triton_equals_each_sequence_alone(lens_q, lens_k, hq, hkv, d, dt):
    q, k, v = make(lens_q, lens_k, hq, hkv, d, dt, seed=sum(lens_k) + d)
    check_against_each_sequence(q, k, v, lens_q, lens_k, heads_for(hq), "triton")


@pytest.mark.triton
def test_triton_softcap_and_torch_agree():
    lens_q, lens_k = [90, 40], [120, 40]
    q, k, v = make(lens_q, lens_k, 4, 2, 64, torch.float32, seed=11)
    heads = heads_for(4)
    a = mk.sparse_prefill_varlen(
        q, k, v, cu(lens_q), cu(lens_k), heads, backend="triton", softcap=5.0
    )
    b = mk.sparse_prefill_varlen(
        q, k, v, cu(lens_q), cu(lens_k), heads, backend="torch", softcap=5.0
    )
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def dense_reference(q, k, v, lens_q, lens_k):
    cq, ck = cu(lens_q), cu(lens_k)
    parts = []
    for i, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        qs, ks, vs = seq(q, cq, i), seq(k, ck, i), seq(v, ck, i)
        parts.append(reference(qs, ks, vs, mk.dense_mask(nq, n_kv=nk))[0].transpose(0, 1))
    return torch.cat(parts)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_full_budget_equals_dense(backend):
    lens_q, lens_k = [130, 7, 77], [130, 50, 200]
    q, k, v = make(lens_q, lens_k, 4, 2, 64, torch.float32, seed=3)
    heads = [mk.HeadPattern.vertical_slash(10**6, 10**6), mk.HeadPattern.block_sparse(10**6)] * 2
    out = mk.sparse_prefill_varlen(q, k, v, cu(lens_q), cu(lens_k), heads, backend=backend)
    assert rel_err(out, dense_reference(q, k, v, lens_q, lens_k)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_short_sequences_run_dense_and_say_so(backend, caplog):
    lens_q, lens_k = [40, 150, 100], [40, 150, 230]
    q, k, v = make(lens_q, lens_k, 4, 1, 64, torch.float32, seed=4)
    heads = [mk.HeadPattern.vertical_slash(1, 1)] * 4  # very sparse: dense is far from it
    with caplog.at_level(logging.DEBUG, logger="minference_kernels"):
        out, idx = mk.sparse_prefill_varlen(
            q, k, v, cu(lens_q), cu(lens_k), heads, backend=backend, dense_below=120,
            return_index=True,
        )  # fmt: skip
    assert idx[0] is None and idx[1] is not None and idx[2] is None
    assert "sequences [0, 2] ran dense" in caplog.text
    ref = dense_reference(q, k, v, lens_q, lens_k)
    for i in (0, 2):
        s = slice(int(cu(lens_q)[i]), int(cu(lens_q)[i + 1]))
        assert rel_err(out[s], ref[s]) < 1e-5
    s = slice(40, 190)
    assert rel_err(out[s], ref[s]) > 1e-3  # the long one really ran sparse


def test_max_density_is_decided_per_sequence():
    lens_q, lens_k = [64, 1000], [64, 1000]
    q, k, v = make(lens_q, lens_k, 2, 2, 64, torch.float32, seed=9)
    # one block's tile is all of the short sequence; a few tiles per block of the long one
    heads = [mk.HeadPattern.vertical_slash(1, 1)] * 2
    _, idx = mk.sparse_prefill_varlen(
        q, k, v, cu(lens_q), cu(lens_k), heads, backend="torch", max_density=0.9, return_index=True
    )
    assert idx[0] is None and idx[1] is not None


def test_all_dense_heads():
    lens_q, lens_k = [33, 90], [50, 90]
    q, k, v = make(lens_q, lens_k, 2, 1, 64, torch.float32, seed=1)
    out, idx = mk.sparse_prefill_varlen(
        q, k, v, cu(lens_q), cu(lens_k), [mk.HeadPattern.dense()] * 2, return_index=True
    )
    assert idx == [None, None]
    assert rel_err(out, dense_reference(q, k, v, lens_q, lens_k)) < 1e-5


def bad_call(**over):
    q, k, v = make([10, 20], [10, 30], 2, 1, 64, torch.float32, seed=0)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu([10, 20]), cu_seqlens_k=cu([10, 30]))
    args.update(over)
    heads = [mk.HeadPattern.vertical_slash(4, 4)] * 2
    return mk.sparse_prefill_varlen(heads=heads, backend="torch", **args)


@pytest.mark.parametrize(
    "over,err,match",
    [
        ({"cu_seqlens_q": torch.tensor([0, 20, 10, 30], dtype=torch.int32)}, ValueError,
         r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] = 10 < cu_seqlens_q\[1\] = 20"),
        ({"cu_seqlens_k": torch.tensor([0, 10, 40])}, TypeError, "cu_seqlens_k must be an int32"),
        ({"cu_seqlens_q": torch.tensor([0, 10, 29], dtype=torch.int32)}, ValueError,
         r"cu_seqlens_q\[-1\] = 29 must equal the packed length 30"),
        ({"cu_seqlens_k": torch.tensor([1, 10, 40], dtype=torch.int32)}, ValueError,
         r"cu_seqlens_k\[0\] must be 0"),
        ({"cu_seqlens_k": torch.tensor([0, 40], dtype=torch.int32)}, ValueError,
         "cu_seqlens_q has 2 sequences but cu_seqlens_k has 1"),
        ({"cu_seqlens_k": torch.tensor([0, 5, 40], dtype=torch.int32)}, ValueError,
         "sequence 0 has 10 queries but 5 keys"),
        ({"cu_seqlens_q": torch.tensor([[0, 10, 30]], dtype=torch.int32)}, ValueError,
         r"cu_seqlens_q must be 1-D"),
        ({"cu_seqlens_q": [0, 10, 30]}, TypeError, "cu_seqlens_q must be a torch.Tensor"),
        ({"q": torch.zeros(1, 2, 30, 64)}, ValueError, r"q must be 3-D \[total, H, D\]"),
        ({"v": torch.zeros(40, 1, 32)}, ValueError, "v shape"),
        ({"k": torch.zeros(40, 1, 64, dtype=torch.float16)}, TypeError, "k has dtype"),
        ({"q": torch.full((30, 2, 64), float("nan"))}, ValueError, "q contains NaN"),
    ],
)  # fmt: skip
def test_bad_input_raises_clearly(over, err, match):
    with pytest.raises(err, match=match):
        bad_call(**over)


@pytest.mark.triton
def test_triton_vs_scores_of_the_batch_are_each_sequences_own(monkeypatch):
    """The varlen score passes (one launch each for the batch) give each sequence exactly the
    scores of the equal-length passes on it alone, and sparse_prefill_varlen uses them instead of
    scoring per sequence."""
    from minference_kernels.ops import varlen_triton as _varlen_triton
    from minference_kernels.ops import vs_scores_triton

    lens_q, lens_k = [70, 100, 65], [90, 100, 300]
    q, k, v = make(lens_q, lens_k, 4, 2, 64, torch.float32, seed=21)
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    got = _varlen_triton.vs_scores_varlen(q, k, cq[:-1], ck[:-1], lens_q, lens_k, 64, 0.125)
    for i, (vert, sl) in enumerate(got):
        want_v, want_s = vs_scores_triton.vs_scores(
            seq(q, cu(lens_q), i), seq(k, cu(lens_k), i), 64, 0.125
        )
        assert torch.equal(vert, want_v) and torch.equal(sl, want_s), f"sequence {i}"
    # different last-query paddings (17 rows -> 32, 70 -> 64): not batched, the caller scores alone
    assert (
        _varlen_triton.vs_scores_varlen(q, k, [0, 17], [0, 20], [17, 70], [20, 70], 64, 0.1) is None
    )

    def per_sequence(*a, **kw):
        raise AssertionError("scored per sequence")

    monkeypatch.setattr(vs_scores_triton, "vs_scores", per_sequence)
    heads = [mk.HeadPattern.vertical_slash(8, 16)] * 4
    mk.sparse_prefill_varlen(q, k, v, cu(lens_q), cu(lens_k), heads, backend="triton")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_strided_inputs_give_a_contiguous_output(backend):
    """q/k/v as views of wider [total, H, 2D] buffers (e.g. a fused QKV projection)."""
    lens_q, lens_k = [70, 20], [70, 41]
    q, k, v = make(lens_q, lens_k, 2, 1, 64, torch.float32, seed=8)
    wide = lambda x: torch.cat([x, torch.zeros_like(x)], -1)[..., :64]  # noqa: E731
    heads = heads_for(2)
    out = mk.sparse_prefill_varlen(
        wide(q), wide(k), wide(v), cu(lens_q), cu(lens_k), heads, backend=backend
    )
    assert out.is_contiguous()
    want = mk.sparse_prefill_varlen(q, k, v, cu(lens_q), cu(lens_k), heads, backend=backend)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
def test_triton_tensor_descriptor_loads_equal_pointer_loads():
    """fp16 K/V go through tensor descriptors (TMA) over the packed rows, where a tile reaching
    past a sequence's keys also loads its neighbour's rows (masked): the same output as pointer
    loads. Sequences back to back with cached prefixes, so such tiles occur."""
    from minference_kernels.ops import varlen_triton as _varlen_triton
    from minference_kernels.ops.attention_triton import _tma_ok

    lens_q, lens_k = [70, 33, 100], [90, 33, 130]
    q, k, v = make(lens_q, lens_k, 4, 2, 80, torch.float16, seed=13)
    assert _tma_ok(k) and _tma_ok(v)
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    heads = heads_for(4)
    idx = [
        mk.build_index(seq(q, cu(lens_q), i), seq(k, cu(lens_k), i), heads, backend="triton")
        for i in range(3)
    ]
    args = (q, k, v, cq[:-1], ck[:-1], lens_q, lens_k, idx, 80**-0.5)
    a = _varlen_triton.attend_varlen(*args, tma=True)
    b = _varlen_triton.attend_varlen(*args, tma=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _block_table_definition(n_q, n_kv, order):
    """The program table by its definition: every (sequence, block) with its causal key count,
    sorted (stably) by the order's key."""
    rows = [
        (nk - nq + min((m + 1) * 64, nq), s, m)
        for s, (nq, nk) in enumerate(zip(n_q, n_kv))
        for m in range(-(-nq // 64))
    ]
    if order == "causal":
        rows.sort(key=lambda r: -r[0])
    else:
        rank = {s: i for i, s in enumerate(sorted(range(len(n_kv)), key=lambda s: -n_kv[s]))}
        rows.sort(key=lambda r: (rank[r[1]], -r[0]))
    return [[s, m] for _, s, m in rows]


@pytest.mark.triton
def test_program_orders_cover_every_block_once_and_agree():
    """Both program orders of the varlen launch list every (sequence, query block) exactly once;
    ``"sequence"`` keeps each sequence's blocks together, longest sequence first; the output does
    not depend on the order."""
    from minference_kernels.ops import varlen_triton as _varlen_triton

    lens_q, lens_k = [70, 300, 1, 129], [90, 300, 40, 129]
    want = {(s, m) for s, n in enumerate(lens_q) for m in range(-(-n // 64))}
    for order in _varlen_triton.BLOCK_ORDERS:
        rows = [tuple(r) for r in _varlen_triton.block_table(lens_q, lens_k, "cpu", order).tolist()]
        assert len(rows) == len(want) and set(rows) == want, order
    seqs = [s for s, _ in _varlen_triton.block_table(lens_q, lens_k, "cpu", "sequence").tolist()]
    assert seqs == sorted(seqs, key=lambda s: (-lens_k[s], seqs.index(s)))
    assert [s for i, s in enumerate(seqs) if i == 0 or seqs[i - 1] != s] == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="order must be one of"):
        _varlen_triton.block_table(lens_q, lens_k, "cpu", "random")
    # the vectorised table equals the plain definition (a stable sort of the block list)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        b = int(torch.randint(1, 7, (1,), generator=g))
        nq = [int(x) for x in torch.randint(0, 400, (b,), generator=g)]
        nk = [n + int(x) for n, x in zip(nq, torch.randint(0, 3, (b,), generator=g) * 64)]
        for order in _varlen_triton.BLOCK_ORDERS:
            got = _varlen_triton.block_table(nq, nk, "cpu", order).tolist()
            assert got == _block_table_definition(nq, nk, order), (nq, nk, order)

    q, k, v = make(lens_q, lens_k, 4, 2, 64, torch.float32, seed=5)
    heads = heads_for(4)
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    idx = [
        mk.build_index(seq(q, cu(lens_q), i), seq(k, cu(lens_k), i), heads, backend="triton")
        for i in range(4)
    ]
    args = (q, k, v, cq[:-1], ck[:-1], lens_q, lens_k, idx, 0.125)
    a = _varlen_triton.attend_varlen(*args, order="sequence")
    b = _varlen_triton.attend_varlen(*args, order="causal")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
