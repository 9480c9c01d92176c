"""Full budget equals dense; masks contain every named pair; estimators find planted structure;
determinism; strided and expanded inputs."""

import math

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import DEVICE, reference, rel_err
from minference_kernels.index import BLOCK
from minference_kernels.masks import greedy_slash_tiles
from minference_kernels.ops.attention import index_mask


def qkv(b=2, hq=4, hkv=2, n=150, d=64, extra=0, seed=0, dt=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, n, d, generator=g).to(dt),
        torch.randn(b, hkv, n + extra, d, generator=g).to(dt),
        torch.randn(b, hkv, n + extra, d, generator=g).to(dt),
    )


@pytest.mark.parametrize("extra", [0, 37])
def test_full_budget_equals_dense(extra):
    q, k, v = qkv(n=173, extra=extra)
    b, hq, n, _ = q.shape
    nk = k.shape[2]
    dense = reference(q, k, v, mk.dense_mask(n, n_kv=nk))
    # every slash offset: the tiles cover everything causal
    si = torch.arange(nk).expand(b, hq, nk)
    vi = torch.zeros(b, hq, 1, dtype=torch.long)
    assert rel_err(mk.vertical_slash_attention(q, k, v, vi, si), dense) < 1e-5
    # every vertical column
    vi = torch.arange(nk).expand(b, hq, nk)
    si = torch.zeros(b, hq, 1, dtype=torch.long)
    assert rel_err(mk.vertical_slash_attention(q, k, v, vi, si), dense) < 1e-5
    # every key block
    nkb = -(-nk // 64)
    bi = torch.arange(nkb).expand(b, hq, -(-n // 64), nkb)
    assert rel_err(mk.block_sparse_attention(q, k, v, bi), dense) < 1e-5
    assert rel_err(mk.streaming_attention(q, k, v, 0, nk), dense) < 1e-5
    heads = [
        mk.HeadPattern.vertical_slash(10**6, 10**6),
        mk.HeadPattern.block_sparse(10**4),
        mk.HeadPattern.a_shape(0, 10**6),
        mk.HeadPattern.dense(),
    ]
    assert rel_err(mk.sparse_prefill(q, k, v, heads), dense) < 1e-5
    assert bool(mk.sparse_prefill_mask(q, k, heads).eq(mk.dense_mask(n, n_kv=nk)).all())
    # vertical-block: every key block (with or without every column: columns counted once)
    heads = [
        mk.HeadPattern.vertical_block(10**6, 10**4),
        mk.HeadPattern.vertical_block(0, 10**4),
        mk.HeadPattern.vertical_block(7, 10**4),
        mk.HeadPattern.dense(),
    ]
    assert rel_err(mk.sparse_prefill(q, k, v, heads), dense) < 1e-5
    assert bool(mk.sparse_prefill_mask(q, k, heads).eq(mk.dense_mask(n, n_kv=nk)).all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_vertical_block_counts_a_column_inside_a_tile_once(backend):
    """A heavy key inside key block 0 (always kept) is also a column: the kernel attends it once
    (the column pass), so the output equals float64 attention over the mask; counting it twice
    would double its weight and fail. The tiles holding a column are flagged, only those."""
    q, k, v = (x.to(DEVICE) for x in qkv(b=2, hq=4, hkv=2, n=200, seed=3))
    k[:, :, 5] *= 6
    k[:, :, 130] *= 4  # and one in a later block
    heads = [mk.HeadPattern.vertical_block(4, 2)] * 4
    out, idx = mk.sparse_prefill(q, k, v, heads, backend=backend, return_index=True)
    assert idx.masks_columns
    cols = set(idx.cols[0, 0, : int(idx.col_count[0, 0, -1])].tolist())
    assert 5 in cols
    for m in range(idx.num_blocks):
        for t in range(int(idx.abs_count[0, 0, m])):
            st = int(idx.abs_tiles[0, 0, m, t])
            holds = any(st <= c < st + BLOCK for c in cols)
            assert int(idx.abs_flag[0, 0, m, t]) == int(holds)
    mask = mk.sparse_prefill_mask(q, k, heads)
    assert torch.equal(mask, index_mask(idx))
    assert rel_err(out, reference(q, k, v, mask)) < 1e-5
    # the pairs counted once: the index's density is the mask's
    causal = mk.dense_mask(200).sum((-1, -2)).to(mask.device)
    torch.testing.assert_close(
        mk.index_density(idx), mask.sum((-1, -2)).double() / causal.double(), rtol=0, atol=0
    )


def _packed(n=130):
    return tuple(x[0].transpose(0, 1).contiguous() for x in qkv(b=1, hq=4, hkv=2, n=n))


@pytest.mark.triton
def test_vertical_block_is_refused_by_the_varlen_kernel():
    q, k, v = (x.to(DEVICE) for x in _packed())
    cu = torch.tensor([0, 60, 130], dtype=torch.int32)
    with pytest.raises(ValueError, match="vertical_block heads are not supported by the"):
        mk.sparse_prefill_varlen(
            q, k, v, cu, cu, [mk.HeadPattern.vertical_block(4, 2)] * 4, backend="triton"
        )


def test_vertical_block_varlen_reference_is_each_sequence_alone():
    """The PyTorch varlen path runs each sequence alone through ``sparse_prefill``."""
    q, k, v = _packed()
    cu = torch.tensor([0, 60, 130], dtype=torch.int32)
    heads = [mk.HeadPattern.vertical_block(4, 1)] * 4
    out = mk.sparse_prefill_varlen(q, k, v, cu, cu, heads, backend="torch", dense_below=1)
    for a, b in ((0, 60), (60, 130)):
        one = mk.sparse_prefill(
            *(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), heads, backend="torch"
        )
        torch.testing.assert_close(out[a:b], one[0].transpose(0, 1))


def test_vertical_block_pattern_checks():
    h = mk.HeadPattern.vertical_block(512, 64)
    assert (h.kind, h.num_vertical, h.top_k, h.block_size) == ("vertical_block", 512, 64, 64)
    assert h.describe() == "vertical_block(v=512, top_k=64)"
    with pytest.raises(ValueError, match="vertical_block needs top_k >= 1"):
        mk.HeadPattern.vertical_block(8, 0)
    with pytest.raises(ValueError, match="64 keys"):
        mk.HeadPattern("vertical_block", num_vertical=8, top_k=2, block_size=128)
    with pytest.raises(ValueError, match="block_sparse only"):
        mk.HeadPattern("vertical_block", num_vertical=8, top_k=2, scoring="sampled")


def test_masks_contain_named_pairs():
    g = torch.Generator().manual_seed(3)
    n, nk = 200, 230
    vi = torch.randint(0, nk, (2, 3, 11), generator=g)
    si = torch.randint(0, nk, (2, 3, 7), generator=g)
    m = mk.vertical_slash_mask(vi, si, n, n_kv=nk)
    i = torch.arange(n)[:, None] + (nk - n)
    j = torch.arange(nk)[None, :]
    causal = j <= i
    for b in range(2):
        for h in range(3):
            named = torch.isin(j, vi[b, h]).expand(n, nk) | torch.isin(i - j, si[b, h])
            assert bool((m[b, h] | ~(named & causal)).all())
            assert not bool((m[b, h] & ~causal).any())
    bi = torch.randint(-1, 4, (2, 3, 4, 2), generator=g)
    mb = mk.block_sparse_mask(bi, n, n_kv=nk)
    for b in range(2):
        for h in range(3):
            for qb in range(4):
                for kb in bi[b, h, qb].tolist():
                    if kb < 0:
                        continue
                    blk = mb[b, h, qb * 64 : (qb + 1) * 64, kb * 64 : (kb + 1) * 64]
                    cz = causal[qb * 64 : (qb + 1) * 64, kb * 64 : (kb + 1) * 64]
                    assert bool(blk.eq(cz).all())


def test_single_slash_tile_shape():
    # one slash s: each 64-row query block attends to the 64 keys [a0 - s, a0 - s + 63], causal
    n, s = 256, 100
    m = mk.vertical_slash_mask(torch.zeros(1, 1, 0, dtype=torch.long), torch.tensor([[[s]]]), n)[
        0, 0
    ]
    for i in range(n):
        a0 = (i // 64) * 64
        expect = [j for j in range(max(0, a0 - s), a0 - s + 64) if j <= i]
        assert m[i].nonzero().flatten().tolist() == expect
    # 200 and 201 span 65 keys per block: two tiles (the fewest 64-wide tiles that cover them)
    assert greedy_slash_tiles([0, 1, 2, 70, 200, 201]) == [0, -64, -128, -200, -264]


def test_duplicates_and_order_do_not_matter():
    q, k, v = qkv(n=140)
    vi = torch.tensor([5, 5, 90, 3, 90]).expand(2, 4, 5)
    si = torch.tensor([0, 40, 0, 7]).expand(2, 4, 4)
    a = mk.vertical_slash_attention(q, k, v, vi, si)
    vu = torch.tensor([90, 5, 3]).expand(2, 4, 3)
    b = mk.vertical_slash_attention(q, k, v, vu, si.unique().flip(0).expand(2, 4, 3))
    assert torch.equal(a, b)
    bi = torch.tensor([[1, 0, 1, -1]]).expand(2, 4, 3, 4)
    x = mk.block_sparse_attention(q, k, v, bi)
    y = mk.block_sparse_attention(q, k, v, torch.tensor([[0, 1]]).expand(2, 4, 3, 2))
    assert torch.equal(x, y)


def test_empty_rows_give_zeros():
    q, k, v = qkv(n=130)
    bi = torch.full((2, 4, 3, 1), -1)
    out = mk.block_sparse_attention(q, k, v, bi)
    assert torch.equal(out, torch.zeros_like(out))


def _planted(n=400, d=64, verticals=(37, 150, 260), slashes=(130, 210), seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, n, d, generator=g) * 0.3
    q = torch.randn(1, 1, n, d, generator=g) * 0.3
    u = torch.randn(d, generator=g)
    u = u / u.norm() * 4
    for j in verticals:
        k[0, 0, j] += u
    q[0, 0] += u  # every query likes the vertical direction
    keys = torch.randn(n, d, generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True) * 3.5
    k[0, 0] += keys
    for s in slashes:  # query i points at key i - s
        q[0, 0, s:] += keys[: n - s] * 1.2
    return q, k


def test_vertical_slash_estimator_finds_planted():
    q, k = _planted()
    vi, si = mk.estimate_vertical_slash(q, k, 40, 110)
    assert vi.shape == (1, 1, 40) and si.shape == (1, 1, 110)
    assert set(range(30)) <= set(vi[0, 0].tolist())  # sinks always kept
    assert {37, 150, 260} <= set(vi[0, 0].tolist())
    assert set(range(100)) <= set(si[0, 0].tolist())  # local window always kept
    assert {130, 210} <= set(si[0, 0].tolist())
    # budgets larger than N are clipped
    vi, si = mk.estimate_vertical_slash(q[..., :10, :], k[..., :10, :], 50, 50)
    assert vi.shape[-1] == 10 and si.shape[-1] == 10


def test_block_sparse_estimator_finds_planted_topics():
    g = torch.Generator().manual_seed(1)
    n, d = 512, 64
    topics = torch.randn(4, d, generator=g) * 2
    # key block kb has topic kb % 4; query block qb asks for topic (qb + 1) % 4
    k = torch.randn(1, 1, n, d, generator=g) * 0.2
    q = torch.randn(1, 1, n, d, generator=g) * 0.2
    for b in range(8):
        k[0, 0, b * 64 : (b + 1) * 64] += topics[b % 4]
        q[0, 0, b * 64 : (b + 1) * 64] += topics[(b + 1) % 4]
    bi = mk.estimate_block_sparse(q, k, 3)
    assert bi.shape == (1, 1, 8, 3)
    for qb in range(8):
        got = set(bi[0, 0, qb].tolist()) - {-1}
        assert qb in got  # diagonal always kept
        want = {kb for kb in range(qb + 1) if kb % 4 == (qb + 1) % 4}
        assert want <= got or len(want) > 2, (qb, got, want)
    assert bi[0, 0, 0].tolist() == [0, -1, -1]  # only one causal key block


def test_deterministic():
    q, k, v = qkv(n=333, hq=8, hkv=2)
    heads = [mk.HeadPattern.vertical_slash(20, 40), mk.HeadPattern.block_sparse(2)] * 4
    a = mk.sparse_prefill(q, k, v, heads)
    b = mk.sparse_prefill(q, k, v, heads)
    assert torch.equal(a, b)
    va, sa = mk.estimate_vertical_slash(q, k, 20, 40)
    vb, sb = mk.estimate_vertical_slash(q, k, 20, 40)
    assert torch.equal(va, vb) and torch.equal(sa, sb)


def test_strided_and_expanded_inputs():
    q, k, v = qkv(b=1, hq=4, hkv=2, n=130, d=64)
    ref = mk.sparse_prefill(q, k, v, [mk.HeadPattern.vertical_slash(10, 20)] * 4)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] storage
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = mk.sparse_prefill(qt, kt, v, [mk.HeadPattern.vertical_slash(10, 20)] * 4)
    assert torch.allclose(out, ref, atol=1e-6)
    # K/V expanded over the batch (stride 0) work too
    k1, v1 = k[:1], v[:1]
    q2 = torch.cat([q, q])
    out2 = mk.dense_attention(q2, k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1))
    assert torch.allclose(out2[0], out2[1])
    assert rel_err(out2[:1], reference(q, k, v, mk.dense_mask(130))) < 1e-5


def test_index_density_counts_exact_pairs():
    q, k, v = qkv(b=1, hq=2, hkv=1, n=200)
    heads = [mk.HeadPattern.vertical_slash(5, 8), mk.HeadPattern.a_shape(3, 50)]
    _, idx = mk.sparse_prefill(q, k, v, heads, return_index=True)
    dens = mk.index_density(idx)
    mask = mk.sparse_prefill_mask(q, k, heads)
    expect = mask.sum((-1, -2)).double() / (200 * 201 / 2)
    assert torch.allclose(dens, expect)


@pytest.mark.triton
def test_triton_estimator_matches_torch():
    from minference_kernels.ops import vs_scores_triton
    from minference_kernels.ops.vs_scores import vs_scores_torch

    q, k = (x.to(DEVICE) for x in _planted(n=300))
    q = torch.cat([q, q * 0.5], 1)
    k = k.expand(1, 1, -1, -1)
    vt, st = vs_scores_triton.vs_scores(q, k, 64, 64**-0.5)
    vr, sr = vs_scores_torch(q, k, 64, 64**-0.5)
    assert torch.allclose(vt, vr, atol=1e-5) and torch.allclose(st, sr, atol=1e-5)
    a = mk.estimate_vertical_slash(q, k, 40, 110, backend="triton")
    b = mk.estimate_vertical_slash(q, k, 40, 110, backend="torch")
    assert all(set(x.flatten().tolist()) == set(y.flatten().tolist()) for x, y in zip(a, b))


@pytest.mark.triton
def test_score_window_limits(monkeypatch, caplog):
    """The score pass's shared memory: pipeline depth per window size, and the PyTorch score pass
    (with a log line) for windows over the limit, e.g. fp32 with last_q = 128 and D = 128."""
    import logging

    from minference_kernels.ops import vs_scores_triton
    from minference_kernels.ops.vs_scores import vs_scores_torch

    vst = vs_scores_triton
    assert vst._score_stages(64, 128, 2) == 3  # the tuned default: bf16, last_q = 64, D = 128
    assert vst._score_stages(128, 128, 2) == 2  # 3 stages asked 240 KiB on an H200
    assert vst._score_window(128, 128, 2) <= vst.VS_SCORE_WINDOW_MAX
    assert vst._score_window(128, 128, 4) > vst.VS_SCORE_WINDOW_MAX

    q, k = (x.to(DEVICE) for x in _planted(n=300))
    calls = []
    monkeypatch.setattr(vs_scores_triton, "VS_SCORE_WINDOW_MAX", 1)
    monkeypatch.setattr(vs_scores_triton, "_warned", set())
    monkeypatch.setattr(
        "minference_kernels.ops.vs_scores.vs_scores_torch",
        lambda *a, **kw: calls.append(a) or vs_scores_torch(*a, **kw),
    )
    with caplog.at_level(logging.WARNING, logger="minference_kernels"):
        vt, st = vs_scores_triton.vs_scores(q, k, 32, 64**-0.5)
        vs_scores_triton.vs_scores(q, k, 32, 64**-0.5)
    vr, sr = vs_scores_torch(q, k, 32, 64**-0.5)
    # the slash sums are a scatter-add: unordered on CUDA, so equal there only to rounding
    assert len(calls) == 2 and torch.equal(vt, vr) and torch.allclose(st, sr, rtol=1e-5, atol=1e-8)
    logged = [r for r in caplog.records if "PyTorch score pass" in r.getMessage()]
    assert len(logged) == 1  # once per (dtype, last_q bucket, head dim bucket)


@pytest.mark.triton
def test_launch_steps_down_stages_when_shared_memory_is_short(monkeypatch, caplog):
    """A GPU with less shared memory (~100 KiB on sm_86/sm_89) rejects the tuned pipeline depth
    with OutOfResources: the launch retries with fewer stages, logs it, and remembers the depth."""
    import logging

    import triton
    from minference_kernels.ops import (
        _triton_common,
        attention_triton,
    )

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 150, 64, generator=g).to(DEVICE) for h in (4, 2, 2))
    heads = [mk.HeadPattern.vertical_slash(8, 40)] * 4
    want = mk.sparse_prefill(q, k, v, heads, backend="triton")

    class SmallSmem:  # the real kernel behind a launcher that refuses more than one stage
        def __init__(self, real):
            self.real, self.fn, self.stages = real, real.fn, []

        def __getitem__(self, grid):
            def launch(*args, num_stages, **meta):
                self.stages.append(num_stages)
                if num_stages > 1:
                    raise triton.OutOfResources(245760, 101376, "shared memory")
                return self.real[grid](*args, num_stages=num_stages, **meta)

            return launch

    fake = SmallSmem(attention_triton._sparse_attn_fwd)
    monkeypatch.setattr(attention_triton, "_sparse_attn_fwd", fake)
    monkeypatch.setattr(_triton_common, "_FIT_STAGES", {})
    with caplog.at_level(logging.WARNING, logger="minference_kernels"):
        got = mk.sparse_prefill(q, k, v, heads, backend="triton")
        again = mk.sparse_prefill(q, k, v, heads, backend="triton")
    assert fake.stages == [3, 2, 1, 1]  # the second call starts at the depth that fit
    assert torch.equal(got, want) and torch.equal(again, want)
    steps = [r.getMessage() for r in caplog.records if "does not fit this GPU" in r.getMessage()]
    assert len(steps) == 2 and "num_stages=3" in steps[0] and "retrying with 1" in steps[1]

    def never(*args, num_stages, **meta):
        raise triton.OutOfResources(1 << 20, 101376, "shared memory")

    monkeypatch.setattr(
        attention_triton,
        "_sparse_attn_fwd",
        type("K", (), {"fn": fake.fn, "__getitem__": lambda s, g: never})(),
    )
    with pytest.raises(triton.OutOfResources):  # nothing fits: the error reaches the caller
        mk.sparse_prefill(q, k, v, heads, backend="triton")


@pytest.mark.triton
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_tma_loads_match_pointer_loads(dt, layout, monkeypatch):
    """K/V tiles read through tensor descriptors (the Hopper path, on by default) give exactly the
    pointer loads' output: tiles reaching before key 0 or past Nk arrive as zeros, D = 80 is padded
    to the 128-wide tile, GQA 4, batch 2, Nq < Nk, the integrations' [B, N, H, D] memory layout."""
    from minference_kernels.ops import attention_triton

    g = torch.Generator().manual_seed(3)
    b, hq, hkv, n, nk, d = 2, 8, 2, 141, 203, 80
    shapes = [(b, hq, n, d), (b, hkv, nk, d), (b, hkv, nk, d)]
    if layout == "bhnd":
        q, k, v = (torch.randn(*s, generator=g).to(DEVICE, dt) for s in shapes)
    else:  # [B, H, N, D] views of [B, N, H, D] memory
        q, k, v = (
            torch.randn(s[0], s[2], s[1], s[3], generator=g).to(DEVICE, dt).transpose(1, 2)
            for s in shapes
        )
    heads = [
        mk.HeadPattern.vertical_slash(12, 40),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.a_shape(8, 70),
        mk.HeadPattern.dense(),
    ] * 2
    idx = mk.build_index(q, k, heads)
    made = []
    real = attention_triton._kv_descriptors
    monkeypatch.setattr(attention_triton, "_kv_descriptors", lambda *a: made.append(1) or real(*a))
    with_tma = attention_triton.attend(q, k, v, idx, d**-0.5, tma=True)
    assert made, "the descriptor path was not taken"
    pointers = attention_triton.attend(q, k, v, idx, d**-0.5, tma=False)
    assert torch.equal(with_tma, pointers)
    want = reference(q, k, v, mk.sparse_prefill_mask(q, k, heads))
    assert rel_err(with_tma, want) < 2e-2


@pytest.mark.triton
def test_tma_needs_aligned_half_precision(caplog):
    """Layouts TMA cannot read (fp32; a row stride that is not a multiple of 16 bytes) take pointer
    loads, say so once per layout at INFO, and still give the right answer."""
    import logging

    from minference_kernels.ops import attention_triton

    tma_ok = attention_triton._tma_ok

    def zeros(*shape, dtype=torch.bfloat16):  # on the device the kernels run on
        return torch.zeros(*shape, dtype=dtype, device=DEVICE)

    assert not tma_ok(zeros(1, 2, 8, 64, dtype=torch.float32))  # fp32
    assert not tma_ok(zeros(1, 2, 8, 20))  # 40-byte rows
    assert not tma_ok(zeros(1028)[4:].view(1, 2, 8, 64))  # 8-byte base
    assert not tma_ok(zeros(1, 2, 64, 8).transpose(2, 3))  # D stride 8
    assert tma_ok(zeros(1, 2, 8, 64)[..., :60])  # D 60 of 64: zero-fill
    assert not tma_ok(zeros(1, 1, 8, 64).expand(1, 4, 8, 64))  # stride 0
    one = zeros(1, 2, 1, 64).expand(3, 2, 1, 64)[:1]  # size-1 dims: any stride
    assert attention_triton._tma_ok(one) and attention_triton._desc_strides(one) == [128, 64, 64, 1]
    assert attention_triton._desc_strides(zeros(1, 2, 1, 64).transpose(0, 2)) == [128, 64, 64, 1]
    assert attention_triton._tma_ok(zeros(1, 2, 8, 64).transpose(1, 2))
    q, k, v = (x.to(DEVICE) for x in qkv(b=1, hq=2, hkv=1, n=90, d=20, dt=torch.bfloat16))
    heads = [mk.HeadPattern.vertical_slash(8, 30)] * 2
    attention_triton._TMA_NOTED.clear()
    with caplog.at_level(logging.INFO, logger="minference_kernels"):
        got = mk.sparse_prefill(q, k, v, heads, backend="triton")
        mk.sparse_prefill(q, k, v, heads, backend="triton")
    said = [r.getMessage() for r in caplog.records if "tensor descriptors" in r.getMessage()]
    assert len(said) == 1 and "pointer loads" in said[0]
    want = reference(q, k, v, mk.sparse_prefill_mask(q, k, heads))
    assert rel_err(got, want) < 2e-2


def test_adaptive_coverage_budgets():
    from minference_kernels.synthetic import structured_qkv

    q, k, v = structured_qkv(2, 4, 2, 700, 64, kind="vertical_slash", seed=4)
    heads = [mk.HeadPattern.vertical_slash(120, 300)] * 4
    fixed = mk.sparse_prefill_mask(q, k, heads)
    adapt = mk.sparse_prefill_mask(q, k, heads, coverage=0.9)
    assert adapt.sum() < fixed.sum()  # fewer pairs
    assert bool((fixed | ~adapt).all())  # and a subset of the fixed budget's pairs
    out = mk.sparse_prefill(q, k, v, heads, coverage=0.9)
    assert rel_err(out, reference(q, k, v, adapt)) < 1e-5
    with pytest.raises(ValueError, match="coverage must be in"):
        mk.sparse_prefill(q, k, v, heads, coverage=1.5)


def test_dense_below_takes_dense_path():
    q, k, v = qkv(n=100)
    heads = [mk.HeadPattern.vertical_slash(1, 1)] * 4
    out = mk.sparse_prefill(q, k, v, heads, dense_below=128)
    assert rel_err(out, reference(q, k, v, mk.dense_mask(100))) < 1e-5


def test_max_density_falls_back_to_dense_on_unstructured_inputs():
    q, k, v = qkv(b=1, n=1500, seed=9)  # random heads: 120 scattered slashes keep ~80% of pairs
    heads = [mk.HeadPattern.vertical_slash(60, 120)] * 4
    sparse = mk.sparse_prefill(q, k, v, heads)
    dense = reference(q, k, v, mk.dense_mask(1500))
    assert rel_err(sparse, dense) > 1e-3  # the sparse result differs from dense ...
    out = mk.sparse_prefill(q, k, v, heads, max_density=0.6)
    assert rel_err(out, dense) < 1e-5  # ... but above max_density the layer runs dense
    # a sparse enough index (~13% of the pairs) keeps the sparse path
    few = [mk.HeadPattern.vertical_slash(4, 8)] * 4
    out = mk.sparse_prefill(q, k, v, few, max_density=0.6)
    assert torch.equal(out, mk.sparse_prefill(q, k, v, few))
    with pytest.raises(ValueError, match="max_density must be in"):
        mk.sparse_prefill(q, k, v, few, max_density=0.0)


def test_budget_forms_select_the_same_indices():
    """Int budgets, per-head tensors and a caller-given maximum (the sync-free path) agree."""
    from minference_kernels.api import _head_index
    from minference_kernels.ops.vs_scores import select_vertical_slash

    g = torch.Generator().manual_seed(0)
    vert, sl = torch.rand(2, 3, 50, generator=g), torch.rand(2, 3, 50, generator=g)
    a = select_vertical_slash(vert, sl, 7, 60)  # slash budget clips to Nk = 50
    b = select_vertical_slash(vert, sl, torch.tensor([7, 7, 7]), torch.tensor([60, 60, 60]))
    c = select_vertical_slash(vert, sl, 7, 60, budget_max=(7, 60))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    mixed = select_vertical_slash(vert, sl, torch.tensor([2, 7, 4]), 9, budget_max=(7, 9))
    assert mixed[1].sum(-1).tolist() == [[2, 7, 4], [2, 7, 4]]
    assert _head_index([2, 3, 4], torch.device("cpu")) == slice(2, 5)
    assert torch.equal(_head_index([0, 2], torch.device("cpu")), torch.tensor([0, 2]))


@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,bs,top_k",
    [(2, 4, 2, 700, 700, 64, 3), (1, 8, 1, 333, 1000, 128, 5), (1, 2, 2, 130, 130, 192, 40)],
)
def test_block_estimation_chunks_change_nothing(monkeypatch, b, hq, hkv, nq, nk, bs, top_k):
    """Scoring query blocks in bounded chunks against only their causal key blocks selects the
    same blocks as scoring every block pair at once (and memory no longer grows as N^2)."""
    from minference_kernels.ops import block_select

    g = torch.Generator().manual_seed(nq)
    q = torch.randn(b, hq, nq, 64, generator=g)
    k = torch.randn(b, hkv, nk, 64, generator=g)
    # the unchunked reference: every block pair, ranked, one top-k
    scores, forced = block_select.block_scores(q, k, bs)
    ranked = block_select.force_diagonal(scores, forced)
    kk = min(top_k, ranked.shape[-1])
    order = torch.topk(ranked, kk, -1).indices
    ok = torch.gather(ranked, -1, order) > float("-inf")
    want = torch.full((b, hq, ranked.shape[2], top_k), -1, dtype=torch.int64)
    picked = torch.where(ok, order, 2**40).sort(-1).values  # ascending ids, -1 padding last
    want[..., :kk] = torch.where(picked == 2**40, -1, picked)
    whole = mk.estimate_block_sparse(q, k, top_k, bs)
    monkeypatch.setattr(block_select, "BLOCK_SCORE_CHUNK_BYTES", 1)  # one query block per chunk
    chunked = mk.estimate_block_sparse(q, k, top_k, bs)
    assert torch.equal(whole, want)
    assert torch.equal(chunked, want)
    # a subset of query heads (slice or index) estimates exactly those heads, with their KV heads
    pick = torch.tensor([hq - 1, 0])
    assert torch.equal(block_select.block_topk(q, k, top_k, bs, heads=pick), want[:, pick])
    assert torch.equal(block_select.block_topk(q, k, top_k, bs, heads=slice(1, hq)), want[:, 1:])
    # per-head budgets through the layer entry, chunked: the same blocks per head
    heads = [mk.HeadPattern.block_sparse(top_k if i % 2 else 1, bs) for i in range(hq)]
    idx = mk.build_index(q, k, heads)
    monkeypatch.setattr(block_select, "BLOCK_SCORE_CHUNK_BYTES", 1 << 40)
    again = mk.build_index(q, k, heads)
    assert torch.equal(idx.abs_tiles, again.abs_tiles) and torch.equal(
        idx.abs_count, again.abs_count
    )


@pytest.mark.triton
@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,bs,top_k",
    [
        (2, 4, 2, 300, 300, 64, 3),
        (1, 8, 1, 191, 254, 64, 1),
        (1, 4, 4, 333, 400, 128, 2),
        (2, 2, 1, 250, 250, 192, 40),  # budget above the causal count: -1 padding
        (1, 4, 2, 1, 1, 64, 2),
    ],
)
def test_triton_block_selection_matches_torch(monkeypatch, caplog, b, hq, hkv, nq, nk, bs, top_k):
    """The Triton top-k (bisection over the scores, no sort) picks exactly the blocks of the
    PyTorch stable sort: per-head budgets, head subsets, chunked rows, continuation, exact ties,
    and rows too wide for it (PyTorch top-k, logged)."""
    import logging

    from minference_kernels.ops import (
        block_select,
        block_select_triton,
    )

    q, k, _ = qkv(b=b, hq=hq, hkv=hkv, n=nq, d=64, extra=nk - nq, seed=nq + bs)
    q, k = q.to(DEVICE), k.to(DEVICE)
    want = mk.estimate_block_sparse(q, k, top_k, bs, backend="torch")
    got = mk.estimate_block_sparse(q, k, top_k, bs, backend="triton")
    assert torch.equal(got, want)
    limits = torch.tensor([1 + i % max(1, top_k) for i in range(hq)])
    pick = torch.tensor([hq - 1, 0])
    for kw in ({}, {"heads": pick}, {"heads": slice(1, hq)}):
        t = limits if "heads" not in kw else limits[kw["heads"]]
        a = block_select.block_topk(q, k, t, bs, top_k_max=top_k, backend="torch", **kw)
        monkeypatch.setattr(block_select, "BLOCK_SCORE_CHUNK_BYTES", 1)  # one query block per chunk
        c = block_select.block_topk(q, k, t, bs, top_k_max=top_k, backend="triton", **kw)
        monkeypatch.undo()
        assert torch.equal(a, c), kw
    # exact ties everywhere: the lowest block ids win on both paths
    qt, kt, _ = _tied_qk(b, hq, hkv, nq, nk)
    qt, kt = qt.to(DEVICE), kt.to(DEVICE)
    tied = mk.estimate_block_sparse(qt, kt, top_k, bs, backend="torch")
    assert torch.equal(mk.estimate_block_sparse(qt, kt, top_k, bs, backend="triton"), tied)
    # rows wider than the Triton selection holds: the PyTorch top-k, with one log line
    monkeypatch.setattr(block_select_triton, "BLOCK_SELECT_MAX", 1)
    monkeypatch.setattr(block_select, "_wide_logged", set())
    with caplog.at_level(logging.INFO, logger="minference_kernels"):
        wide = mk.estimate_block_sparse(q, k, top_k, bs, backend="triton")
    assert torch.equal(wide, want)
    assert -(-nk // bs) == 1 or "exceed the Triton selection" in caplog.text


def _tied_qk(b, hq, hkv, nq, nk, d=64):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, d, generator=g).expand(b, hq, nq, d).contiguous()
    k = torch.randn(1, 1, 1, d, generator=g).expand(b, hkv, nk, d).contiguous()
    return q, k, None


def test_block_selection_is_ascending_and_lowest_id_on_ties():
    """Ascending key-block ids, -1 padding last; equal scores go to the lowest id."""
    q, k, _ = _tied_qk(1, 2, 1, 640, 640)
    bi = mk.estimate_block_sparse(q, k, 3)
    # query block 9: the diagonal block 9, then blocks 0 and 1 (all scores tie)
    assert bi[0, 0, 9].tolist() == [0, 1, 9]
    assert bi[0, 0, 1].tolist() == [0, 1, -1]
    q, k, _ = qkv(b=1, hq=2, hkv=1, n=700, d=64)
    bi = mk.estimate_block_sparse(q, k, 4)
    for row in bi.reshape(-1, 4).tolist():
        valid = [j for j in row if j >= 0]
        assert valid == sorted(valid) and row[len(valid) :] == [-1] * (4 - len(valid))


@pytest.mark.parametrize(
    "nq,nk,bs", [(300, 300, 64), (191, 254, 64), (333, 400, 128), (250, 517, 192)]
)
def test_block_pieces_fast_path_equals_sorted_path(nq, nk, bs):
    """The estimator's ascending selections become tiles without a sort; the result equals the
    general path (sort + unique, for user indices in any order) tile for tile."""
    from minference_kernels.ops import index_build

    q, k, _ = qkv(b=2, hq=4, hkv=2, n=nq, d=64, extra=nk - nq, seed=bs)
    for top_k in (1, 2, 5, 40):
        bi = mk.estimate_block_sparse(q, k, top_k, bs)
        t_fast, c_fast = index_build.block_sparse_pieces(bi, bs, nq, nk, ascending=True)
        t_ref, c_ref = index_build.block_sparse_pieces(bi, bs, nq, nk)
        assert torch.equal(c_fast, c_ref)
        width = t_ref.shape[-1]
        keep = torch.arange(width) < c_ref[..., None]
        assert torch.equal(
            torch.where(keep, t_fast[..., :width].long(), 0), torch.where(keep, t_ref, 0)
        )


def _head_allocation_reference(q, k, limits, bs, scale, pooled=False):
    """``allocation="head"`` (``pooled``: ``"layer"``) from every block pair at once (no chunks, no
    head groups): per query block the ``HEAD_ALLOCATION_CAP * top_k`` best log-shares (forced
    blocks first), the first ``ceil(HEAD_ALLOCATION_FLOOR * top_k)`` of them raised to ``inf``
    (the guaranteed floor), then the head's (``pooled``: all heads') ``budget`` best of all by a
    stable sort, heads one after the other."""
    import math

    from minference_kernels.ops import block_select

    scores, forced = block_select.block_scores(q, k, bs)  # causal-masked pooled scores
    share = block_select.force_diagonal(torch.log_softmax(scores * scale, -1), forced)
    b, hq, mbq, mbk = share.shape
    nq, nk = q.shape[2], k.shape[2]
    rows = torch.arange(mbq)
    n_causal = torch.clamp((torch.clamp((rows + 1) * bs, max=nq) - 1 + nk - nq) // bs + 1, max=mbk)
    cap = min(mbk, block_select.HEAD_ALLOCATION_CAP * max(int(x) for x in limits))
    out = []
    for bi in range(b):
        orders, vals, budgets = [], [], []
        for h in range(hq):
            own = min(mbk, block_select.HEAD_ALLOCATION_CAP * int(limits[h]))
            order = torch.sort(share[bi, h], dim=-1, descending=True, stable=True).indices[:, :cap]
            val = torch.gather(share[bi, h], -1, order)
            floor = math.ceil(block_select.HEAD_ALLOCATION_FLOOR * int(limits[h]))
            top = val[:, :floor]
            val[:, :floor] = torch.where(top > float("-inf"), float("inf"), top)
            val[:, own:] = float("-inf")  # the head's own cap
            orders.append(order)
            vals.append(val)
            budgets.append(int(torch.clamp(n_causal, max=int(limits[h])).sum()))
        groups = [list(range(hq))] if pooled else [[h] for h in range(hq)]
        sel = torch.zeros(hq, mbq, cap, dtype=torch.bool)
        for g in groups:
            flat = torch.stack([vals[h] for h in g]).reshape(-1)
            budget = sum(budgets[h] for h in g)
            rank = torch.sort(flat, descending=True, stable=True).indices[:budget]
            pick = torch.zeros(flat.numel(), dtype=torch.bool)
            pick[rank] = True
            sel[g] = (pick & (flat > float("-inf"))).view(len(g), mbq, cap)
        out.append(
            [[sorted(orders[h][m][sel[h, m]].tolist()) for m in range(mbq)] for h in range(hq)]
        )
    return out


@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,bs,top_k",
    [(2, 4, 2, 700, 700, 64, 3), (1, 8, 1, 333, 1000, 128, 2), (1, 2, 2, 130, 130, 64, 40)],
)
def test_head_allocation_spreads_the_same_budget(
    monkeypatch, caplog, b, hq, hkv, nq, nk, bs, top_k
):
    """``block_allocation="head"``: per head exactly the pairs that top_k per query block would
    keep, every query block keeps its diagonal block and at most ``HEAD_ALLOCATION_CAP * top_k``
    blocks, ascending ids; the selection equals an unchunked reference, also in one-block chunks
    and one-head groups. ``"layer"``: the same pairs per layer, equal to its unchunked reference;
    in one-head groups it is ``"head"``. Per-head budgets agree between the layer entry and the
    mask, for both."""
    import logging

    from minference_kernels.ops import block_select

    q, k, _ = qkv(b=b, hq=hq, hkv=hkv, n=nq, d=64, extra=nk - nq, seed=nq + top_k)
    scale = 64**-0.5
    per_block = mk.estimate_block_sparse(q, k, top_k, bs)
    got = mk.estimate_block_sparse(q, k, top_k, bs, block_allocation="head")
    want = _head_allocation_reference(q, k, [top_k] * hq, bs, scale)
    mbk = -(-nk // bs)
    cap = block_select.HEAD_ALLOCATION_CAP
    assert got.shape[-1] == min(mbk, cap * top_k)
    for bi in range(b):
        for h in range(hq):
            rows = [[j for j in r if j >= 0] for r in got[bi, h].tolist()]
            assert rows == want[bi][h]
            # the same number of pairs as top_k per query block
            assert sum(map(len, rows)) == int((per_block[bi, h] >= 0).sum())
            for m, r in enumerate(rows):
                first = (m * bs + nk - nq) // bs  # the key block holding the row block's first row
                assert first in r and r == sorted(set(r)) and len(r) <= cap * top_k
    layer = mk.estimate_block_sparse(q, k, top_k, bs, block_allocation="layer")
    assert layer.shape == got.shape
    assert [[[[j for j in r if j >= 0] for r in hh] for hh in bb] for bb in layer.tolist()] == (
        _head_allocation_reference(q, k, [top_k] * hq, bs, scale, pooled=True)
    )
    assert torch.equal((layer >= 0).sum((1, 2, 3)), (got >= 0).sum((1, 2, 3)))  # the same work
    monkeypatch.setattr(block_select, "BLOCK_SCORE_CHUNK_BYTES", 1)
    assert torch.equal(mk.estimate_block_sparse(q, k, top_k, bs, block_allocation="layer"), layer)
    monkeypatch.setattr(block_select, "HEAD_RANK_BYTES", 1)
    assert torch.equal(mk.estimate_block_sparse(q, k, top_k, bs, block_allocation="head"), got)
    # one head per ranking group: each group pools only its own budget, which is "head"; said
    with caplog.at_level(logging.INFO, logger="minference_kernels"):
        assert torch.equal(mk.estimate_block_sparse(q, k, top_k, bs, block_allocation="layer"), got)
    assert any("ranked in groups of 1 heads" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    # per-head budgets: the layer entry and the mask agree pair for pair
    heads = [mk.HeadPattern.block_sparse(top_k if i % 2 else 1, bs) for i in range(hq)]
    limits = [top_k if i % 2 else 1 for i in range(hq)]
    for alloc in ("head", "layer"):
        mask = mk.sparse_prefill_mask(q, k, heads, block_allocation=alloc)
        idx = mk.build_index(q, k, heads, block_allocation=alloc)
        assert torch.equal(index_mask(idx), mask)
        want = _head_allocation_reference(q, k, limits, bs, scale, pooled=alloc == "layer")
        for h in range(hq):
            keys = mask[0, h].any(0)  # every key block chosen by some query block of the head
            chosen = sorted({j for r in want[0][h] for j in r})
            blocks = sorted({int(x) // bs for x in torch.nonzero(keys).flatten().tolist()})
            assert blocks == chosen
            # each query block: at most HEAD_ALLOCATION_CAP times its own head's top_k blocks
            assert int(idx.abs_count[0, h].max()) * BLOCK <= cap * limits[h] * bs


def test_head_allocation_gives_spread_blocks_more():
    """A query block whose scores are flat (every key block the same share) takes blocks from
    query blocks that put nearly all their mass on one key block: the head's budget follows the
    estimated mass, beyond each query block's guaranteed floor (``ceil(HEAD_ALLOCATION_FLOOR *
    top_k)`` of its own best blocks)."""
    d, nb = 64, 24
    k = torch.zeros(1, 1, 64 * nb, d)
    for j in range(nb):  # key block j points along dimension j
        k[0, 0, 64 * j : 64 * (j + 1), j] = 1.0
    q = torch.zeros(1, 1, 64 * nb, d)
    q[0, 0, :, 0] = 50.0  # every query block: one dominant key block (block 0), share ~1
    q[0, 0, 64 * 20 : 64 * 21] = 0.0  # block 20: zero scores, flat shares over its 21 blocks
    from minference_kernels.ops.block_select import HEAD_ALLOCATION_FLOOR

    top_k = 8
    floor = math.ceil(HEAD_ALLOCATION_FLOOR * top_k)
    assert floor < top_k  # some blocks per query block are pooled
    got = mk.estimate_block_sparse(q, k, top_k, block_allocation="head")[0, 0]
    counts = (got >= 0).sum(-1)
    per_block = (mk.estimate_block_sparse(q, k, top_k)[0, 0] >= 0).sum(-1)
    assert int(counts.sum()) == int(per_block.sum())  # the same kernel work
    from minference_kernels.ops.block_select import HEAD_ALLOCATION_CAP as cap

    assert int(counts[20]) == cap * top_k > int(per_block[20])  # the flat block gets its cap
    assert int(counts[23]) < top_k  # peaked blocks give theirs up (the latest first: ties)
    assert bool((counts >= torch.clamp(torch.arange(1, nb + 1), max=floor)).all())  # the floor
    # heads estimated together keep their own caps (cap times their own top_k)
    heads = [mk.HeadPattern.block_sparse(8), mk.HeadPattern.block_sparse(9)]
    idx = mk.build_index(q.expand(1, 2, -1, -1), k, heads, block_allocation="head")
    assert idx.abs_count[0, :, 20].tolist() == [min(21, cap * 8), min(21, cap * 9)]
    # "layer": a head whose every query block is flat takes blocks from a peaked head
    q2 = torch.cat([q[:, :, :] * 0 + q[:, :, :1], torch.zeros_like(q)], 1)  # peaked, flat
    lay = mk.estimate_block_sparse(q2, k.expand(1, 2, -1, -1), top_k, block_allocation="layer")[0]
    per = (mk.estimate_block_sparse(q2, k.expand(1, 2, -1, -1), top_k)[0] >= 0).sum((-1, -2))
    got = (lay >= 0).sum((-1, -2))
    assert int(got.sum()) == int(per.sum())  # the same kernel work per layer
    assert int(got[1]) > int(per[1]) and int(got[0]) < int(per[0])


@pytest.mark.parametrize("alloc", ["head", "layer"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_head_allocation_attention_matches_its_mask(backend, alloc):
    """sparse_prefill with ``block_allocation="head"`` or ``"layer"`` attends exactly to
    sparse_prefill_mask's pairs (mixed head kinds, GQA 2, batch 2, Nq < Nk); a full budget equals
    dense."""
    q, k, v = (x.to(DEVICE) for x in qkv(b=2, hq=4, hkv=2, n=200, d=64, extra=61, seed=11))
    heads = [
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.vertical_slash(8, 30),
        mk.HeadPattern.block_sparse(1),
        mk.HeadPattern.a_shape(8, 64),
    ]
    kw = dict(block_allocation=alloc)
    out = mk.sparse_prefill(q, k, v, heads, backend=backend, **kw)
    want = reference(q, k, v, mk.sparse_prefill_mask(q, k, heads, **kw))
    assert rel_err(out, want) < (2e-2 if backend == "triton" else 1e-5)
    full = [mk.HeadPattern.block_sparse(100)] * 4
    dense = reference(q, k, v, mk.dense_mask(200, n_kv=261))
    got = mk.sparse_prefill(q, k, v, full, backend=backend, **kw)
    assert rel_err(got, dense) < (2e-2 if backend == "triton" else 1e-5)


def test_block_allocation_is_checked():
    q, k, v = qkv()
    with pytest.raises(
        ValueError, match="block_allocation must be one of 'query_block', 'head', 'layer'"
    ):
        mk.sparse_prefill(q, k, v, [mk.HeadPattern.block_sparse(2)] * 4, block_allocation="row")
    with pytest.raises(ValueError, match="block_allocation"):
        mk.estimate_block_sparse(q, k, 2, block_allocation="global")


@pytest.mark.triton
@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,bs,top_k",
    [(2, 4, 2, 300, 300, 64, 2), (1, 4, 4, 333, 400, 128, 1), (1, 2, 1, 250, 517, 64, 40)],
)
@pytest.mark.parametrize("alloc", ["head", "layer"])
def test_head_allocation_triton_candidates_match_torch(
    monkeypatch, b, hq, hkv, nq, nk, bs, top_k, alloc
):
    """``allocation="head"`` and ``"layer"`` take each query block's candidates from the Triton
    selection on CUDA: the same blocks as the PyTorch path, with per-head budgets, chunked rows,
    one head per ranking group and exact ties."""
    from minference_kernels.ops import block_select

    q, k, _ = qkv(b=b, hq=hq, hkv=hkv, n=nq, d=64, extra=nk - nq, seed=nq + 7)
    q, k = q.to(DEVICE), k.to(DEVICE)
    kw = dict(allocation=alloc)  # block_topk's (private) name of block_allocation
    pooled = alloc == "layer"
    want = mk.estimate_block_sparse(q, k, top_k, bs, backend="torch", block_allocation=alloc)
    got = mk.estimate_block_sparse(q, k, top_k, bs, backend="triton", block_allocation=alloc)
    _assert_equally_good(got, want, q, k, bs, pooled)
    limits = torch.tensor([1 + i % max(1, top_k) for i in range(hq)])
    a = block_select.block_topk(q, k, limits, bs, backend="torch", **kw)
    got = block_select.block_topk(q, k, limits, bs, backend="triton", **kw)
    _assert_equally_good(got, a, q, k, bs, pooled)
    monkeypatch.setattr(block_select, "BLOCK_SCORE_CHUNK_BYTES", 1)
    monkeypatch.setattr(block_select, "HEAD_RANK_BYTES", 1)  # one head per ranking group
    a = block_select.block_topk(q, k, limits, bs, backend="torch", **kw)
    _assert_equally_good(
        block_select.block_topk(q, k, limits, bs, backend="triton", **kw), a, q, k, bs
    )
    qt, kt, _ = _tied_qk(b, hq, hkv, nq, nk)
    qt, kt = qt.to(DEVICE), kt.to(DEVICE)
    kw = dict(block_allocation=alloc)
    tied = mk.estimate_block_sparse(qt, kt, top_k, bs, backend="torch", **kw)
    assert torch.equal(mk.estimate_block_sparse(qt, kt, top_k, bs, backend="triton", **kw), tied)


def _assert_equally_good(got, want, q, k, bs, pooled=False):
    """The Triton head allocation computes the shares itself (its own exp and sum order), so a
    winner may swap with a loser whose share is equal to float32 rounding. Same blocks, or per
    head (``pooled``: per layer) the same count of winners with the same total float64 share (to
    1e-5 per swap)."""
    from minference_kernels.ops import block_select

    if torch.equal(got, want):
        return
    dims = (1, 2, 3) if pooled else (2, 3)
    assert torch.equal((got >= 0).sum(dims), (want >= 0).sum(dims))
    scores, forced = block_select.block_scores(q.double(), k.double(), bs)
    share = torch.log_softmax(scores * q.shape[-1] ** -0.5, -1).masked_fill(forced, 0.0)

    def total(sel):
        picked = torch.gather(share, -1, sel.clamp(min=0)).masked_fill(sel < 0, 0.0)
        return picked.sum((-1, -2))

    swaps = (got != want).sum((-1, -2)).double()
    diff = total(got) - total(want)
    if pooled:
        diff, swaps = diff.sum(1), swaps.sum(1)
    assert bool((diff.abs() <= 1e-5 * swaps + 1e-9).all())


def test_best_of_rows_equals_a_stable_sort():
    """The head allocation's sort-free ranking keeps exactly what a stable descending sort ranks
    first: random values, many exact ties, -inf slots, +inf (diagonal) entries, zero budgets."""
    from minference_kernels.ops.head_rank import _best_of_rows

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 300, generator=g)
    x[:, 1] = torch.randint(0, 4, (2, 300), generator=g).float() - 2.0  # ties everywhere
    x[:, 2, ::3] = float("-inf")
    x[:, 3, :7] = float("inf")
    x[:, 3, 7:20] = torch.finfo(torch.float32).max
    count = torch.tensor([0, 57, 199, 20, 300])
    x[:, 4, 250:] = float("-inf")  # fewer finite entries than the count: all of them
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(300).expand_as(order))
    want = (rank < count[None, :, None]) & (x > float("-inf"))
    assert torch.equal(_best_of_rows(x, count, "bisect"), want)  # the CUDA default
    assert torch.equal(_best_of_rows(x, count, "sort"), want)


@pytest.mark.triton
@pytest.mark.parametrize("chunk", [None, 128])
def test_head_keep_equals_a_stable_sort(monkeypatch, chunk):
    """The Triton ranking of the head allocation (8 counting passes over int32 share keys, a tie
    count per query block, then a compaction cutting ties by position) keeps what a stable descending sort ranks first: random shares, many
    exact ties, -inf slots, +inf and float32-max (diagonal) entries, zero budgets, budgets above
    the finite candidates, batch 2; the winners come out ascending per query block. ``chunk``:
    rows split over several counting programs, the last one holding a partial chunk."""
    from minference_kernels.ops import head_rank_triton
    from minference_kernels.ops.head_rank import _best_of_rows

    if chunk is not None:
        monkeypatch.setattr(head_rank_triton, "_RANK_CHUNK", chunk)

    g = torch.Generator().manual_seed(4)
    b, h, mb, cap = 2, 5, 30, 10
    x = torch.randn(b, h, mb * cap, generator=g)  # each head's candidates in ranking order
    x[:, 1] = torch.randint(0, 4, (b, mb * cap), generator=g).float() - 2.0  # ties everywhere
    x[:, 2, ::3] = float("-inf")
    x[:, 3, :7] = float("inf")
    x[:, 3, 7:20] = torch.finfo(torch.float32).max
    x[:, 4, 250:] = float("-inf")  # fewer finite entries than the count: all of them win
    x = x.view(b, h, mb, cap)
    ids = (torch.arange(cap) * 3 + 1).expand(b, h, mb, cap).clone()  # ascending key-block ids
    count = torch.tensor([0, 57, 199, 20, 300])
    x, ids, count = x.to(DEVICE), ids.to(DEVICE), count.to(DEVICE)
    got = head_rank_triton.head_keep(x, ids, count)
    keep = _best_of_rows(x.reshape(b, h, -1), count, "sort").view_as(ids)
    want = torch.where(keep, ids, 2**30).sort(-1).values
    assert torch.equal(got, torch.where(want == 2**30, -1, want))
    assert int((got >= 0).sum()) == b * (0 + 57 + 199 + 20 + 250)  # row 4: its 250 finite ones


def test_index_building_shortcuts_keep_the_same_selection():
    """build_index asks for top-k entries in no order and skips the duplicate pass of
    sorted_unique (top-k entries are distinct): the same columns and diagonals as the ordered
    selection followed by the full sorted_unique."""
    from minference_kernels.index import sorted_unique
    from minference_kernels.ops.vs_scores import select_vertical_slash

    g = torch.Generator().manual_seed(7)
    vert = torch.rand(2, 3, 500, generator=g)  # distinct scores: no ties at a budget's edge
    sl = torch.rand(2, 3, 500, generator=g)
    # per-head budgets (a head's entries are the first of the widest top-k) and one budget for all
    for nv, ns in ((torch.tensor([40, 7, 200]), torch.tensor([64, 150, 3])), (40, 150)):
        full = select_vertical_slash(vert, sl, nv, ns)
        fast = select_vertical_slash(vert, sl, nv, ns, ordered=False)
        for (i_full, ok_full), (i_fast, ok_fast) in ((full[:2], fast[:2]), (full[2:], fast[2:])):
            a, na = sorted_unique(i_full, ok_full)
            b, nb = sorted_unique(i_fast, ok_fast, distinct=True)
            assert torch.equal(a, b) and torch.equal(na, nb)
    x = torch.tensor([[5, 3, 9, 1], [2, 2, 8, 0]])
    vals, cnt = sorted_unique(x)  # duplicates need the full pass
    assert vals[1, :3].tolist() == [0, 2, 8] and cnt.tolist() == [4, 3]
