"""``HeadPattern.block_sparse(..., scoring="sampled")``: the attention mass of sampled rows per key
block, against the pooled estimate and the block oracle, through every layer of the API."""

import math

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import reference, rel_err
from minference_kernels.ops.block_sampled import SAMPLED_ROWS, sampled_mass_chunks, sampled_rows
from minference_kernels.ops.block_select import block_topk


def _spiky(n=1024, d=64, hq=2, hkv=1, seed=0):
    """Heads whose later rows put most of their mass on single keys far back (anchors at 203 and
    517, in key blocks 3 and 8, whose other keys point away) plus decoy blocks (5, 10) whose keys
    all lean a little towards the queries: mean pooling ranks the decoys above the anchors' blocks,
    the attention itself goes to the anchors."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g) * 0.3
    k = torch.randn(1, hkv, n, d, generator=g) * 0.3
    v = torch.randn(1, hkv, n, d, generator=g)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    for anchor in (203, 517):
        if anchor < n:
            blk = slice(anchor // 64 * 64, anchor // 64 * 64 + 64)
            k[0, :, blk] -= direction * 0.5
            k[0, :, anchor] = direction * 12.0
    for decoy in (5, 10):
        if decoy * 64 < n:
            k[0, :, decoy * 64 : decoy * 64 + 64] += direction * 1.5
    q[0, :, min(700, n // 2) :] += direction * 4.0  # later rows look for the anchors
    return q, k, v


def _block_recall(q, k, blocks, bs=64):
    """Attention mass of every row inside the kept key blocks (one KV head per query group)."""
    n = q.shape[2]
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    s = (q.double() @ kk.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    mask = mk.block_sparse_mask(blocks, n, bs)
    return float((p * mask).sum(-1).mean())


def test_sampled_rows_are_spread_and_end_on_the_block_end():
    r = sampled_rows(3, 150, 64, 4, "cpu")
    assert r.tolist() == [[15, 31, 47, 63], [79, 95, 111, 127], [143, 149, 149, 149]]


def test_sampled_mass_is_the_exact_softmax_of_the_sampled_rows():
    q, k, _ = _spiky(n=300, hq=2, hkv=1)
    scale = 64**-0.5
    chunks = list(
        sampled_mass_chunks(q, k, torch.arange(2), torch.zeros(2, dtype=torch.long), 64, scale,
                            chunk_bytes=1)  # one query block per chunk
    )  # fmt: skip
    assert len(chunks) == 5
    rows = sampled_rows(5, 300, 64, SAMPLED_ROWS, "cpu")
    s = (q[0, 1].double() @ k[0, 0].double().T) * scale
    causal = torch.arange(300)[None, :] <= torch.arange(300)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    for r0, _r1, width, mass in chunks:
        want = torch.zeros(width)
        for r in rows[r0].tolist():
            want += (
                torch.nn.functional.pad(p[r], (0, width * 64 - 300))
                .view(width, 64)
                .sum(-1)[:width]
                .float()
            )
        assert torch.allclose(mass[0, 1, 0], want, atol=1e-5)
        assert mass[0, 1, 0].sum() == pytest.approx(SAMPLED_ROWS, rel=1e-5)


def test_sampled_scoring_finds_single_dominant_keys_that_pooling_misses():
    q, k, _ = _spiky()
    pooled = block_topk(q, k, 4, 64)  # the diagonal, key block 0 and two more
    sampled = block_topk(q, k, 4, 64, scoring="sampled")
    r_pooled, r_sampled = _block_recall(q, k, pooled), _block_recall(q, k, sampled)
    assert r_sampled > r_pooled + 0.1, (r_pooled, r_sampled)
    # the anchors' blocks (203 -> 3, 517 -> 8) are kept by the late query blocks, not the decoys
    late = sampled[0, 0, 14].tolist()
    assert 3 in late and 8 in late, late
    assert not {3, 8} <= set(pooled[0, 0, 14].tolist())


@pytest.mark.parametrize("allocation", ["query_block", "head", "layer"])
def test_sampled_full_budget_equals_dense(allocation):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 173, 64, generator=g)
    k = torch.randn(2, 2, 173, 64, generator=g)
    v = torch.randn(2, 2, 173, 64, generator=g)
    heads = [mk.HeadPattern.block_sparse(3, scoring="sampled")] * 4
    out = mk.sparse_prefill(q, k, v, heads, block_allocation=allocation)
    assert rel_err(out, reference(q, k, v, mk.dense_mask(173))) < 1e-5


def test_sampled_heads_mask_matches_what_runs():
    """sparse_prefill_mask (the search's view) and build_index (the kernel's) agree, with pooled
    and sampled heads of the same block size in one layer."""
    q, k, v = _spiky(n=700, hq=4, hkv=2)
    heads = [
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.block_sparse(2, scoring="sampled"),
        mk.HeadPattern.block_sparse(4, scoring="sampled"),
        mk.HeadPattern.vertical_slash(30, 100),
    ]
    from minference_kernels.ops.attention import index_mask

    mask = mk.sparse_prefill_mask(q, k, heads)
    idx = mk.build_index(q, k, heads)
    assert torch.equal(mask, index_mask(idx) & mk.dense_mask(700))
    out = mk.sparse_prefill(q, k, v, heads)
    assert rel_err(out, reference(q, k, v, mask)) < 1e-5


def test_estimate_block_sparse_takes_scoring():
    q, k, _ = _spiky()
    a = mk.estimate_block_sparse(q, k, 3, scoring="sampled")
    assert torch.equal(a, block_topk(q, k, 3, 64, scoring="sampled"))
    with pytest.raises(ValueError, match="scoring must be one of"):
        mk.estimate_block_sparse(q, k, 3, scoring="mean")


@pytest.mark.triton
def test_triton_selection_of_sampled_scores_matches_torch():
    q, k, _ = _spiky(n=700, hq=4, hkv=2)
    for allocation in ("query_block", "head"):
        t = block_topk(q, k, 3, 64, scoring="sampled", backend="triton", allocation=allocation)
        c = block_topk(q, k, 3, 64, scoring="sampled", backend="torch", allocation=allocation)
        assert torch.equal(t, c), allocation


def _far_anchor_blocks(b=2, hq=4, hkv=2, n=64 * 13 + 37, d=64, seed=0):
    """A head like SmolLM2-135M's layer-5 heads at 8K (benchmarks/block_scoring.py): from row 256
    on, every row puts most of its attention on key blocks 1 to 3 (keys that lean towards the
    queries), the rest spread thin; key block 0 holds little (no sink). Odd shape: N not a
    multiple of 64, GQA 2, batch 2."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g) * 0.3
    k = torch.randn(b, hkv, n, d, generator=g) * 0.3
    v = torch.randn(b, hkv, n, d, generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    k[:, :, 64:256] += u * 5.0
    q[:, :, 256:] += u * 5.0
    return q, k, v


def _of_oracle(q, k, blocks, top_k, bs=64):
    """Attention mass of all rows inside ``blocks`` as a share of the block oracle's at the same
    budget (per query block, the diagonal block and the ``top_k - 1`` key blocks of most true
    mass), float64, worst (batch, head)."""
    n = q.shape[2]
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    mb = -(-n // bs)
    pad = torch.nn.functional.pad(p, (0, mb * bs - n, 0, mb * bs - n))
    mass = pad.unflatten(-1, (mb, bs)).sum(-1).unflatten(-2, (mb, bs)).sum(-2)  # [B, H, MB, MB]
    rank = mass.clone().masked_fill_(~(torch.arange(mb)[None, :] <= torch.arange(mb)[:, None]), -1)
    rank[..., torch.arange(mb), torch.arange(mb)] = float("inf")
    top = rank.topk(min(top_k, mb), -1).indices
    oracle = torch.gather(mass, -1, top).clamp_min(0).sum((-1, -2))
    kept = (p * mk.block_sparse_mask(blocks, n, bs)).sum((-1, -2))
    return float((kept / oracle).min())


@pytest.mark.parametrize("top_k", [4, 6])
def test_sampled_scoring_reaches_the_oracle_where_a_forced_sink_block_misses(top_k):
    """Issue 20's target, >= 0.85 of the block oracle on every head: the old sampled selection
    forced key block 0 (as pooled scoring does) and lost one of the three blocks that hold the
    attention at 4 key blocks; sampled scoring forces only the diagonal."""
    q, k, _ = _far_anchor_blocks()
    sampled = block_topk(q, k, top_k, 64, scoring="sampled")
    pooled = block_topk(q, k, top_k, 64)
    assert (sampled[..., 5:, :] != 0).all() or top_k > 4  # block 0 not kept at 4 blocks
    assert _of_oracle(q, k, sampled, top_k) >= 0.95
    # what forcing block 0 costs here: the pooled selection (which forces it) falls short
    if top_k == 4:
        assert _of_oracle(q, k, pooled, top_k) < 0.85


@pytest.mark.triton
@pytest.mark.parametrize("allocation", ["query_block", "head", "layer"])
def test_triton_sampled_selection_without_sink_matches_torch(allocation):
    """The Triton selection with key block 0 not forced picks the PyTorch reference's blocks on
    the anchor head (odd N, GQA 2, batch 2), and ``sparse_prefill`` over them matches float64
    attention over the same mask."""
    q, k, v = _far_anchor_blocks(n=64 * 7 + 21)
    t = block_topk(q, k, 4, 64, scoring="sampled", backend="triton", allocation=allocation)
    c = block_topk(q, k, 4, 64, scoring="sampled", backend="torch", allocation=allocation)
    assert torch.equal(t, c), allocation
    heads = [mk.HeadPattern.block_sparse(4, scoring="sampled")] * 4
    out = mk.sparse_prefill(q, k, v, heads, backend="triton", block_allocation=allocation)
    mask = mk.sparse_prefill_mask(q, k, heads, block_allocation=allocation)
    assert rel_err(out, reference(q, k, v, mask)) < 1e-5
