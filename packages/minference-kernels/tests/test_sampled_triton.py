"""The fused Triton kernel of ``scoring="sampled"`` (:mod:`minference_kernels._sampled_triton`)
against the PyTorch reference (:func:`minference_kernels.ops.block_sampled.sampled_mass_chunks`) and a
float64 reference, on odd shapes (N not a multiple of 64, Nq < Nk, GQA 1 to 8, batch > 1, head
dims 64 to 128, softcap), and the blocks that block selection picks from its scores. Runs under
``TRITON_INTERPRET=1`` on CPU (float32 inputs: the interpreter's half-precision products are
wrong) or on a GPU."""

import logging
import math

import minference_kernels as mk
import pytest
import torch
from kernels_testlib import logit_bound
from minference_kernels._validate import interpreting
from minference_kernels.ops import block_sampled
from minference_kernels.ops.block_sampled import sampled_mass_chunks, sampled_rows
from minference_kernels.ops.block_sampled_triton import sampled_mass_chunks_triton
from minference_kernels.ops.block_select import block_topk

pytestmark = pytest.mark.triton

DEV = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"


def _qk(b, hq, hkv, nq, nk, d, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * spread
    k = torch.randn(b, hkv, nk, d, generator=g) * spread
    k[:, :, 3] *= 4.0  # one dominant key (a sink) in key block 0
    return q.to(DEV), k.to(DEV)


def _mass64(q, k, ids, kv, bs, rows, scale, softcap=None):
    """Float64 ``[B, H, MBq, MBk]``: per query block, the softmax mass its sampled rows give each key
    block (causal, diagonal at ``Nk - Nq``), summed over the rows."""
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    mbq, mbk = -(-nq // bs), -(-nk // bs)
    r = sampled_rows(mbq, nq, bs, rows, "cpu").reshape(-1)
    pos = r + nk - nq
    qs = q.double().cpu()[:, ids.cpu()][:, :, r]  # [B, H, R, D]
    ks = k.double().cpu()[:, kv.cpu()]  # [B, H, Nk, D]
    s = qs @ ks.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(torch.arange(nk)[None, :] > pos[:, None], float("-inf"))
    p = torch.nn.functional.pad(torch.softmax(s, -1), (0, mbk * bs - nk))
    return p.view(b, len(ids), mbq, rows, mbk, bs).sum((3, 5))


def _assemble(chunks, shape):
    """The chunks' ``[B, H, r1 - r0, width]`` values placed into one ``shape`` tensor (0 beyond)."""
    out = torch.zeros(shape, dtype=torch.float64)
    for r0, r1, width, m in chunks:
        out[:, :, r0:r1, :width] = m.double().cpu()
    return out


CASES = [
    # b, hq, hkv, nq, nk, d, bs, rows, softcap
    (1, 2, 2, 300, 300, 64, 64, 4, None),  # N not a multiple of 64, MHA
    (2, 4, 2, 150, 333, 80, 64, 4, 20.0),  # batch 2, Nq < Nk, GQA 2, softcap
    (1, 4, 1, 130, 130, 96, 64, 2, None),  # GQA 4, 2 rows
    (1, 8, 1, 97, 161, 128, 64, 4, 5.0),  # GQA 8, D 128, Nq < Nk (straddling), a tight cap
    (1, 2, 1, 260, 260, 64, 128, 3, None),  # block 128 (two key tiles per block), 3 rows
    (2, 2, 2, 1, 77, 64, 64, 4, None),  # one query row (duplicated sampled rows)
    (1, 2, 1, 64, 64, 64, 64, 1, None),  # one block, one row
]


@pytest.mark.parametrize(("b", "hq", "hkv", "nq", "nk", "d", "bs", "rows", "cap"), CASES)
def test_fused_mass_matches_the_references(b, hq, hkv, nq, nk, d, bs, rows, cap):
    q, k = _qk(b, hq, hkv, nq, nk, d, seed=nq + nk + d)
    ids = torch.arange(hq, device=DEV)
    kv = ids // (hq // hkv)
    scale = d**-0.5
    mbq, mbk = -(-nq // bs), -(-nk // bs)
    shape = (b, hq, mbq, mbk)
    # tile of 16 rows: several tiles per program row even at these sizes
    got = list(sampled_mass_chunks_triton(q, k, ids, kv, bs, scale, rows=rows, softcap=cap,
                                          cfg={"tile_m": 16}))  # fmt: skip
    ref = list(sampled_mass_chunks(q, k, ids, kv, bs, scale, rows=rows, softcap=cap))
    assert [c[:3] for c in got] == [c[:3] for c in ref]  # one chunk each at these sizes
    g, r = _assemble(got, shape), _assemble(ref, shape)
    want = _mass64(q, k, ids, kv, bs, rows, scale, cap)
    tol = 2e-6 + 1e-6 * logit_bound(q, k)
    assert (g - r).abs().max().item() < tol
    assert (g - want).abs().max().item() < tol
    assert torch.allclose(g.sum(-1), torch.full_like(g.sum(-1), rows), atol=1e-5)  # rows' mass


def test_fused_mass_chunks_and_head_subsets():
    """Several chunks (tiny ``chunk_bytes``: one tile of query blocks each, the last one partial),
    heads not in GQA order and not all of them: the same masses as the float64 reference."""
    q, k = _qk(2, 8, 2, 555, 600, 64, seed=3)
    ids = torch.tensor([7, 0, 5, 2], device=DEV)
    kv = ids // 4
    scale = 0.11
    chunks = list(sampled_mass_chunks_triton(q, k, ids, kv, 64, scale, chunk_bytes=1,
                                             cfg={"tile_m": 32}))  # fmt: skip
    assert len(chunks) == 2 and chunks[0][:2] == (0, 8)  # one tile (8 query blocks) per chunk
    assert [c[2] for c in chunks] == [9, 10]  # widths: causal for the chunk's last row
    g = _assemble(chunks, (2, 4, 9, 10))
    want = _mass64(q, k, ids, kv, 64, block_sampled.SAMPLED_ROWS, scale)
    assert (g - want).abs().max().item() < 2e-6 + 1e-6 * logit_bound(q, k, scale)


def test_ranked_output_is_what_block_topk_ranks():
    q, k = _qk(1, 4, 2, 200, 200, 64, seed=5)
    ids, kv = torch.arange(4, device=DEV), torch.tensor([0, 0, 1, 1], device=DEV)
    (_, _, _, m), = sampled_mass_chunks_triton(q, k, ids, kv, 64, 0.125)  # fmt: skip
    (_, _, _, r), = sampled_mass_chunks_triton(q, k, ids, kv, 64, 0.125, ranked=True)  # fmt: skip
    assert torch.allclose(r, m.add(1e-30).log().div(0.125), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    ("allocation", "cap"),
    [("query_block", None), ("query_block", 30.0), ("head", 30.0), ("layer", None)],
)
def test_triton_backend_selects_the_reference_blocks(allocation, cap):
    """``block_topk(backend="triton", scoring="sampled")`` (the fused kernel, then the Triton
    selection) picks the PyTorch path's blocks: batch 2, GQA 4, Nq < Nk, N not a multiple of 64.
    Random inputs have no ties closer than the float32 rounding of the masses. (The head and layer
    allocations' Triton ranking is slow under the interpreter: smaller there.)"""
    per_qb = allocation == "query_block"
    q, k = _qk(2, 8 if per_qb else 4, 2 if per_qb else 1, 400, 450, 64, seed=11, spread=1.5)
    for top_k in (2, 4) if per_qb else (3,):
        t = block_topk(q, k, top_k, 64, scoring="sampled", backend="triton",
                       allocation=allocation, softcap=cap)  # fmt: skip
        c = block_topk(q, k, top_k, 64, scoring="sampled", backend="torch",
                       allocation=allocation, softcap=cap)  # fmt: skip
        assert torch.equal(t.cpu(), c.cpu()), (allocation, cap, top_k)


def test_sparse_prefill_runs_sampled_heads_through_the_kernel(monkeypatch):
    """A layer of sampled block-sparse heads (and a pooled one) through ``sparse_prefill``: the
    Triton backend estimates with the fused kernel and gives the PyTorch backend's index."""
    from minference_kernels.ops import block_sampled_triton

    calls = []
    real = block_sampled_triton.sampled_mass_chunks_triton

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(block_sampled_triton, "sampled_mass_chunks_triton", spy)
    q, k = _qk(1, 4, 2, 300, 300, 64, seed=2, spread=1.5)
    heads = [mk.HeadPattern.block_sparse(3, scoring="sampled")] * 3 + [
        mk.HeadPattern.block_sparse(3)
    ]
    it = mk.build_index(q, k, heads, backend="triton")
    ic = mk.build_index(q, k, heads, backend="torch")
    assert calls
    from minference_kernels.ops.attention import index_mask

    assert torch.equal(index_mask(it).cpu(), index_mask(ic).cpu())


def test_unsupported_rows_fall_back_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(block_sampled, "SAMPLED_ROWS", 65)
    q, k = _qk(1, 2, 1, 130, 130, 64)
    with caplog.at_level(logging.WARNING, logger="minference_kernels"):
        t = block_topk(q, k, 2, 128, scoring="sampled", backend="triton")
    assert "using the PyTorch path" in caplog.text
    assert torch.equal(t.cpu(), block_topk(q, k, 2, 128, scoring="sampled").cpu())


def test_blocks_past_the_diagonal_get_no_mass():
    """Tiles visit keys only up to their last row; every key block past a query block's diagonal
    (visited by the tile or not) gets mass 0, and each query block's rows give away all their mass."""
    q, k = _qk(1, 1, 1, 640, 640, 64, seed=9)
    ids = torch.zeros(1, dtype=torch.long, device=DEV)
    (_, _, w, m), = sampled_mass_chunks_triton(q, k, ids, ids, 64, 0.125, cfg={"tile_m": 16})  # fmt: skip
    assert w == 10
    upper = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    assert m[0, 0].cpu()[upper].abs().max() == 0
    assert math.isclose(float(m[0, 0].sum()), 10 * block_sampled.SAMPLED_ROWS, rel_tol=1e-5)
