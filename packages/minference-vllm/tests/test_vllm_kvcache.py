"""Reading K/V back from a paged cache whose layout is learnt by probing (no vLLM needed).

The fake writers below mimic the layouts of vLLM's backends: FlashAttention's plain rows, the CPU
backend's per-block transposed keys, and a VNNI-style interleaving. The real CPU writer is tested
in ``test_vllm_backend.py``.
"""

from __future__ import annotations

import pytest
import torch
from minference_vllm.kvcache import gather_kv, probe_layout

BS, H, D = 16, 2, 8


def _split_rows(cache: torch.Tensor):
    """[blocks, H, bs, 2D] -> key/value [blocks, bs, H, D] views (FlashAttention style)."""
    k, v = cache.transpose(1, 2).split(D, dim=-1)
    return k, v


def write_rows(key, value, cache, slots):
    k, v = _split_rows(cache)
    for t, s in enumerate(slots.tolist()):
        k[s // BS, s % BS] = key[t]
        v[s // BS, s % BS] = value[t]


def write_transposed_keys(key, value, cache, slots):
    """Keys stored [D, bs] per (block, head), values [bs, D] (like vLLM's CPU 'vec' ISA)."""
    nb = cache.shape[0]
    kc, vc = cache.view(nb, H, 2 * BS, D).chunk(2, dim=2)
    for t, s in enumerate(slots.tolist()):
        b, o = divmod(s, BS)
        for h in range(H):
            kc[b, h].reshape(D, BS)[:, o] = key[t, h]
            vc[b, h, o] = value[t, h]


def write_interleaved(key, value, cache, slots):
    """Pairs of dims interleaved across pairs of slots (VNNI-like), both keys and values."""
    nb = cache.shape[0]
    kc, vc = cache.view(nb, H, 2 * BS, D).chunk(2, dim=2)
    for t, s in enumerate(slots.tolist()):
        b, o = divmod(s, BS)
        for h in range(H):
            for src, dst in ((key, kc), (value, vc)):
                flat = dst[b, h].reshape(BS // 2, D, 2)
                flat[o // 2, :, o % 2] = src[t, h]


def write_broken(key, value, cache, slots):
    """Drops the last slot of every block: not a permutation."""
    keep = slots % BS != BS - 1
    write_rows(key[keep], value[keep], cache, slots[keep])


def write_crossing(key, value, cache, slots):
    """Writes slot s into block (s // BS + 1) % blocks: data leaves its block."""
    nb = cache.shape[0]
    write_rows(key, value, cache, (slots + BS) % (nb * BS))


@pytest.mark.parametrize("writer", [write_rows, write_transposed_keys, write_interleaved])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probe_and_gather_roundtrip(writer, dtype) -> None:
    cache = torch.zeros(7, H, BS, 2 * D, dtype=dtype)
    layout = probe_layout(writer, cache, block_size=BS, num_kv_heads=H, head_size=D)
    n = 3 * BS + 5
    key = torch.randn(n, H, D).to(dtype)
    value = torch.randn(n, H, D).to(dtype)
    blocks = torch.tensor([5, 0, 6, 2], dtype=torch.int32)
    slots = blocks[torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
    writer(key, value, cache, slots)
    for m in (1, BS, n):
        k, v = gather_kv(cache, layout, blocks, m)
        assert k.shape == (H, m, D)
        assert torch.equal(k, key[:m].transpose(0, 1))
        assert torch.equal(v, value[:m].transpose(0, 1))


def test_probe_follows_physical_dim_order() -> None:
    # a cache whose logical [blocks, H, bs, 2D] view is backed by [blocks, bs, H, 2D] memory
    base = torch.zeros(4, BS, H, 2 * D)
    cache = base.permute(0, 2, 1, 3)
    layout = probe_layout(write_rows, cache, block_size=BS, num_kv_heads=H, head_size=D)
    key, value = torch.randn(BS, H, D), torch.randn(BS, H, D)
    write_rows(key, value, cache, torch.arange(BS) + 2 * BS)
    k, v = gather_kv(cache, layout, torch.tensor([2]), BS)
    assert torch.equal(k, key.transpose(0, 1)) and torch.equal(v, value.transpose(0, 1))


@pytest.mark.parametrize(
    ("writer", "match"), [(write_broken, "elements"), (write_crossing, "left its block")]
)
def test_probe_rejects_unknown_layouts(writer, match) -> None:
    cache = torch.zeros(3, H, BS, 2 * D)
    with pytest.raises(RuntimeError, match=match):
        probe_layout(writer, cache, block_size=BS, num_kv_heads=H, head_size=D)


def test_gather_needs_enough_blocks() -> None:
    cache = torch.zeros(3, H, BS, 2 * D)
    layout = probe_layout(write_rows, cache, block_size=BS, num_kv_heads=H, head_size=D)
    with pytest.raises(ValueError, match="need 2 blocks"):
        gather_kv(cache, layout, torch.tensor([0]), BS + 1)
