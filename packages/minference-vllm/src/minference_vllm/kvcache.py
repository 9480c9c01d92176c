"""Read one request's keys and values back out of vLLM's paged KV cache.

Backends store the cache in their own layouts, and some pack it for their kernels: vLLM's CPU
backend keeps keys transposed per block (and VNNI-interleaved for AMX), FlashAttention keeps
``[block, slot, head, dim]`` rows. Rather than hard-coding each layout, :func:`probe_layout` writes
known values through the backend's *own* cache-write routine into a two-block scratch cache and
reads back where every (slot, head, dim) landed. :func:`gather_kv` then undoes that permutation for
the blocks of a request. The only assumption, checked by the probe, is that the cache's first
dimension indexes blocks and that a slot's data stays inside its block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["CacheLayout", "CacheWriter", "gather_kv", "probe_layout"]

#: ``write(key, value, kv_cache, slot_mapping)``: the backend's cache write, with key/value
#: ``[tokens, kv_heads, head_size]`` and ``slot_mapping`` ``[tokens]`` (int64).
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

_BASE = 16  # digits 1..16 are exact in fp16, bf16 and fp32


@dataclass(frozen=True)
class CacheLayout:
    """Where each key/value element of a cache block lives.

    ``key_index[s, h, d]`` is the position, in one block of the cache flattened in logical order,
    of the key of slot ``s``, head ``h``, dim ``d``; ``value_index`` likewise.
    """

    block_size: int
    num_kv_heads: int
    head_size: int
    key_index: torch.Tensor
    value_index: torch.Tensor


def _scratch_like(kv_cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A zeroed cache of ``num_blocks`` blocks with the same dtype, device and dim order."""
    shape = (num_blocks, *kv_cache.shape[1:])
    order = sorted(range(kv_cache.dim()), key=lambda i: (-kv_cache.stride()[i], i))
    base = torch.zeros([shape[i] for i in order], dtype=kv_cache.dtype, device=kv_cache.device)
    inverse = [order.index(i) for i in range(kv_cache.dim())]
    return base.permute(inverse)


def _digits(n: int) -> int:
    return max(1, math.ceil(math.log(max(n, 2), _BASE)))


def probe_layout(
    write: CacheWriter,
    kv_cache: torch.Tensor,
    *,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
) -> CacheLayout:
    """Learn the layout of ``kv_cache`` by writing probes through ``write``.

    Raises ``RuntimeError`` when the layout is not a per-block permutation of the keys and values
    (then the sparse path cannot read the cache and the plugin refuses to run).
    """
    if kv_cache.is_floating_point() is False:
        raise RuntimeError(f"cannot read a KV cache of dtype {kv_cache.dtype} (quantised?)")
    device = kv_cache.device
    nblk = 2
    ntok = nblk * block_size
    slots = torch.arange(ntok, dtype=torch.int64, device=device)
    tok = torch.arange(ntok, device=device).view(ntok, 1, 1).expand(ntok, num_kv_heads, head_size)
    head = torch.arange(num_kv_heads, device=device).view(1, -1, 1).expand_as(tok)
    dim = torch.arange(head_size, device=device).view(1, 1, -1).expand_as(tok)

    def run(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = _scratch_like(kv_cache, nblk)
        write(k.to(kv_cache.dtype).contiguous(), v.to(kv_cache.dtype).contiguous(), cache, slots)
        return cache.reshape(nblk, -1).to(torch.int64)  # logical order, per block

    ones = torch.ones(tok.shape, device=device)
    marker = run(ones, ones * 2)  # 0: unused, 1: key, 2: value
    decoded = {}
    for name, coord in (("tok", tok), ("head", head), ("dim", dim)):
        total = torch.zeros_like(marker)
        for i in range(_digits(int(coord.max()) + 1)):
            digit = (coord // _BASE**i) % _BASE
            got = run(digit.float() + 1, digit.float() + 1)
            if bool(((got == 0) != (marker == 0)).any()):
                raise RuntimeError("KV cache probe: the cache write is not deterministic")
            total += (got - 1).clamp(min=0) * _BASE**i
        decoded[name] = total

    per_block = marker.shape[1]
    pos = torch.arange(per_block, device=device).expand(nblk, per_block)
    blk = torch.arange(nblk, device=device).view(-1, 1).expand(nblk, per_block)
    layouts = []
    for kind in (1, 2):
        sel = marker == kind
        t, h, d = decoded["tok"][sel], decoded["head"][sel], decoded["dim"][sel]
        expected = ntok * num_kv_heads * head_size
        if t.numel() != expected:
            raise RuntimeError(
                f"KV cache probe: found {t.numel()} {'key' if kind == 1 else 'value'} elements "
                f"for {expected} written; unsupported cache layout"
            )
        if bool((t // block_size != blk[sel]).any()):
            raise RuntimeError("KV cache probe: a slot's data left its block; unsupported layout")
        flat = ((t % block_size) * num_kv_heads + h) * head_size + d
        index = torch.full((block_size * num_kv_heads * head_size,), -1, dtype=torch.int64)
        first = blk[sel] == 0
        index[flat[first].cpu()] = pos[sel][first].cpu()
        if bool((index < 0).any()):
            raise RuntimeError("KV cache probe: the layout is not a permutation; unsupported")
        layouts.append(index.view(block_size, num_kv_heads, head_size).to(device))
    return CacheLayout(block_size, num_kv_heads, head_size, layouts[0], layouts[1])


def gather_kv(
    kv_cache: torch.Tensor, layout: CacheLayout, block_ids: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first ``num_tokens`` tokens stored in blocks ``block_ids``.

    Returns two ``[num_kv_heads, num_tokens, head_size]`` tensors (the layout sparse pre-fill takes
    per request). ``block_ids`` lists the request's blocks in order (a row of vLLM's block table).
    """
    nblk = -(-num_tokens // layout.block_size)
    if nblk > block_ids.numel():
        raise ValueError(f"{num_tokens} tokens need {nblk} blocks, got {block_ids.numel()}")
    blocks = kv_cache[block_ids[:nblk].to(torch.int64)].reshape(nblk, -1)
    shape = (nblk * layout.block_size, layout.num_kv_heads, layout.head_size)
    keys = blocks[:, layout.key_index.view(-1)].view(shape)[:num_tokens]
    values = blocks[:, layout.value_index.view(-1)].view(shape)[:num_tokens]
    return keys.transpose(0, 1), values.transpose(0, 1)
