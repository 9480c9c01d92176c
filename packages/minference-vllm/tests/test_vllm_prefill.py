"""One request's sparse pre-fill against a paged cache (no vLLM needed; CPU, and CUDA if present)."""

from __future__ import annotations

import pytest
import torch
from minference_kernels import HeadPattern as P
from minference_kernels import PrefillOptions, dense_attention, sparse_prefill
from minference_vllm.kvcache import probe_layout
from minference_vllm.prefill import prefill_request

DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param(
        "cuda",
        torch.float16,
        id="cuda-fp16",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
BS = 16


def _write(key, value, cache, slots):
    """FlashAttention-style rows: logical [blocks, H, bs, 2D] cache, [blocks, bs, H, D] halves."""
    d = key.shape[-1]
    kc, vc = cache.transpose(1, 2).split(d, dim=-1)
    kc[slots // BS, slots % BS] = key
    vc[slots // BS, slots % BS] = value


class Request:
    """A request of ``n`` tokens whose K/V sit in scattered blocks of a paged cache."""

    def __init__(self, n, hq, hkv, d, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(n, hq, d, generator=g).to(device, dtype)
        self.k = torch.randn(n, hkv, d, generator=g).to(device, dtype)
        self.v = torch.randn(n, hkv, d, generator=g).to(device, dtype)
        nblk = -(-n // BS)
        self.cache = torch.zeros(nblk + 3, hkv, BS, 2 * d, device=device, dtype=dtype)
        self.blocks = torch.randperm(nblk + 3, generator=g)[:nblk].to(device, torch.int32)
        slots = self.blocks.long()[torch.arange(n, device=device) // BS] * BS
        slots += torch.arange(n, device=device) % BS
        self.layout = probe_layout(_write, self.cache, block_size=BS, num_kv_heads=hkv, head_size=d)
        _write(self.k, self.v, self.cache, slots)
        self.n, self.d = n, d

    def chunk(self, start, heads, *, shared=False, **kw):
        """Sparse pre-fill of tokens ``start..n`` with ``start`` tokens already cached."""
        return prefill_request(
            self.q[start:],
            None if shared else self.k[start:],
            None if shared else self.v[start:],
            self.cache,
            lambda: self.layout,
            self.blocks,
            self.n,
            heads,
            scale=self.d**-0.5,
            options=PrefillOptions(**kw),
        )

    def reference(self, start, heads=None, **kw):
        """Dense attention (``heads=None``) or sparse_prefill on contiguous K/V, last rows."""
        q = self.q.transpose(0, 1)[None]
        k, v = self.k.transpose(0, 1)[None], self.v.transpose(0, 1)[None]
        if heads is None:
            out = dense_attention(q, k, v, self.d**-0.5)[:, :, start:]
        else:  # the layout prefill_request hands over, so estimation rounds the same way
            q, k, v = q[:, :, start:].contiguous(), k.contiguous(), v.contiguous()
            out = sparse_prefill(q, k, v, heads, self.d**-0.5, **kw)
        return out[0].transpose(0, 1)


FULL = [P.vertical_slash(4096, 4096), P.a_shape(4, 4096), P.block_sparse(4096), P.dense()]
SPARSE = [P.vertical_slash(8, 16), P.a_shape(4, 32), P.block_sparse(2), P.vertical_slash(32, 8)]


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
@pytest.mark.parametrize("start", [0, 1, 64, 150, 199])
def test_full_budget_chunk_equals_dense(device, dtype, start) -> None:
    req = Request(200, 4, 2, 64, device, dtype)
    got = req.chunk(start, FULL)
    assert got.shape == (200 - start, 4, 64)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, req.reference(start), atol=tol, rtol=tol)


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
@pytest.mark.parametrize("start", [0, 96, 250])
def test_sparse_chunk_reads_the_cache_exactly(device, dtype, start) -> None:
    """A chunk after cached tokens gives what sparse_prefill gives on contiguous K/V."""
    req = Request(300, 4, 2, 64, device, dtype, seed=1)
    got = req.chunk(start, SPARSE)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, req.reference(start, SPARSE), atol=tol, rtol=tol)


@pytest.mark.parametrize("alloc", ["head", "layer"])
def test_block_allocation_reaches_the_kernels(alloc) -> None:
    """``block_allocation`` (the plugin's setting) is what sparse_prefill gets."""
    req = Request(1400, 4, 2, 64, "cpu", torch.float32, seed=3)
    blocks = [P.block_sparse(8)] * 4  # >= 8: the allocation floor (7 of 8) leaves one to pool
    got = req.chunk(200, blocks, block_allocation=alloc)
    want = req.reference(200, blocks, block_allocation=alloc)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - req.reference(200, blocks)).abs().max() > 1e-3  # not the default's blocks


def test_coverage_reaches_the_kernels() -> None:
    """``coverage`` (the plugin's setting) is what sparse_prefill gets: adaptive vertical-slash
    budgets, so fewer pairs than the configured budget and another output."""
    req = Request(2000, 4, 2, 64, "cpu", torch.float32, seed=4)
    heads = [P.vertical_slash(64, 256)] * 4
    got = req.chunk(200, heads, coverage=0.1)
    torch.testing.assert_close(got, req.reference(200, heads, coverage=0.1), atol=1e-5, rtol=1e-5)
    assert (got - req.reference(200, heads)).abs().max() > 1e-3  # not the fixed budgets


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_shared_cache_layer(device, dtype) -> None:
    """A layer without its own K/V (KV sharing) reads everything from the cache: same result."""
    req = Request(130, 4, 2, 64, device, dtype, seed=2)
    torch.testing.assert_close(req.chunk(50, SPARSE, shared=True), req.chunk(50, SPARSE))


def test_chunk_longer_than_request() -> None:
    req = Request(20, 2, 1, 64, "cpu", torch.float32)
    with pytest.raises(ValueError, match="longer than its request"):
        prefill_request(
            req.q.repeat(2, 1, 1),
            None,
            None,
            req.cache,
            lambda: req.layout,
            req.blocks,
            20,
            [P.dense()] * 2,
            scale=0.125,
        )


def test_batched_requests_equal_each_alone() -> None:
    """prefill_requests (one sparse_prefill_varlen call) on requests of different lengths and cached
    prefixes in one paged cache gives each what prefill_request gives it alone."""
    from minference_vllm.prefill import prefill_requests

    hq, hkv, d = 4, 2, 64
    lens, starts = [300, 130, 70, 90], [96, 0, 50, 89]
    g = torch.Generator().manual_seed(7)
    nblk = [-(-n // BS) for n in lens]
    cache = torch.zeros(sum(nblk) + 2, hkv, BS, 2 * d)
    perm = torch.randperm(sum(nblk) + 2, generator=g)
    layout = probe_layout(_write, cache, block_size=BS, num_kv_heads=hkv, head_size=d)
    reqs, first = [], 0
    for n, nb in zip(lens, nblk):
        q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
        blocks = perm[first : first + nb].to(torch.int32)
        first += nb
        slots = blocks.long()[torch.arange(n) // BS] * BS + torch.arange(n) % BS
        _write(k, v, cache, slots)
        reqs.append((q, k, v, blocks, n))
    chunks = [
        (q[s:], None if i == 3 else k[s:], None if i == 3 else v[s:], b, n)  # 3: a shared layer
        for i, ((q, k, v, b, n), s) in enumerate(zip(reqs, starts))
    ]
    kw = dict(scale=d**-0.5)
    got = prefill_requests(chunks, cache, lambda: layout, SPARSE, **kw)
    for (q, k, v, b, n), out in zip(chunks, got):
        alone = prefill_request(q, k, v, cache, lambda: layout, b, n, SPARSE, **kw)
        assert out.shape == alone.shape
        torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
