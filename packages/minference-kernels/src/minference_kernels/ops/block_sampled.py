"""Sampled block scoring: the attention mass a query block gives each key block, estimated from the
exact softmax attention of a few of its rows (``HeadPattern.block_sparse(..., scoring="sampled")``).

For query block ``m`` (rows ``m * bs .. (m + 1) * bs - 1`` of q, absolute positions shifted by
``Nk - Nq``) the sampled rows are ``SAMPLED_ROWS`` rows spread evenly over the block, the last of
them the block's last row (clipped to the sequence in a partial last block, duplicates allowed).
Each sampled row's causal softmax attention over all keys (float32, the attention scale; with
``softcap`` the logits are soft-capped first, ``softcap * tanh(logit / softcap)``, as the attention
kernels do) is summed per key block and over the sampled rows: ``mass [B, H, MBq, MBk]``, the
estimated share of the block's attention in each key block, times ``SAMPLED_ROWS``. Unlike mean pooling it sees single
dominant keys (attention sinks, anchors), so the ranking follows the real attention, and the
selection does not force key block 0 (``block_select.forces_sink``): on the real heads of
SmolLM2-135M and Gemma-3-270M at 8K it keeps at least 0.93 of the block oracle's recall on every
head at 4 / 8 / 16 of 128 key blocks (benchmarks/block_scoring.py).

The work is about ``SAMPLED_ROWS / bs`` of a dense attention's score computation, in chunks of
query blocks bounded by ``chunk_bytes``; K is read per KV head (never repeated per query head).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._common import softcap_

#: Query rows sampled per query block by ``scoring="sampled"``. Its recall against the block oracle
#: on real heads per rows value: benchmarks/results/block_scoring_smollm2_8k.json (key block 0 not
#: forced); through the whole model: benchmarks/results/eval_sampled_rows*_cpu.json, where 1 and 2
#: rows score worse than pooled scoring at the same density and 4 rows better.
SAMPLED_ROWS = 4
#: Scratch bytes of one chunk of query blocks (one KV group's float32 scores and probabilities).
SAMPLED_CHUNK_BYTES = 1 << 30


def sampled_rows(mbq: int, nq: int, block_size: int, rows: int, device) -> torch.Tensor:
    """``[mbq, rows]`` local query rows sampled in each query block (see the module doc)."""
    step = max(1, block_size // rows)
    local = torch.arange(rows, device=device) * step + (block_size - 1 - (rows - 1) * step)
    r = torch.arange(mbq, device=device)[:, None] * block_size + local[None, :]
    return r.clamp_(max=nq - 1)


def sampled_mass_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    q_heads: torch.Tensor,
    kv_of_q: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    rows: int = SAMPLED_ROWS,
    chunk_bytes: int = SAMPLED_CHUNK_BYTES,
    softcap: float | None = None,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Yield ``(r0, r1, width, mass)`` over chunks of query blocks: ``mass [B, H, r1 - r0, width]``
    float32 for the query heads ``q_heads [H]`` of ``q [B, Hq, Nq, D]`` (their KV heads
    ``kv_of_q [H]`` in ``k [B, Hkv, Nk, D]``), ``width`` the key blocks causal for the chunk's last
    row. One chunk's temporaries stay under ``chunk_bytes`` (at least one query block).
    ``softcap``: the logits ``scale * q.k`` become ``softcap * tanh(logit / softcap)`` before the
    causal mask and the softmax."""

    b, _, nq, d = q.shape
    nk = k.shape[2]
    off = nk - nq
    dev = q.device
    mbq = -(-nq // block_size)
    mbk = -(-nk // block_size)
    h = int(q_heads.numel())
    kv_list = kv_of_q.tolist()
    groups: dict[int, list[int]] = {}
    for i, j in enumerate(kv_list):
        groups.setdefault(int(j), []).append(i)
    # bytes per query block of one KV group at a time: its heads' scores and probabilities
    g_max = max(len(hs) for hs in groups.values())
    per_block = max(1, b * g_max * rows * mbk * block_size * 8)
    blocks_per = max(1, chunk_bytes // per_block)
    for r0 in range(0, mbq, blocks_per):
        r1 = min(mbq, r0 + blocks_per)
        local = sampled_rows(mbq, nq, block_size, rows, dev)[r0:r1].reshape(-1)  # [R]
        pos = local + off
        last = int(min(r1 * block_size, nq) - 1 + off)
        width = min(mbk, last // block_size + 1)
        nkw = min(nk, width * block_size)
        causal = torch.arange(nkw, device=dev)[None, :] <= pos[:, None]  # [R, nkw]
        mass = torch.zeros((b, h, r1 - r0, width), dtype=torch.float32, device=dev)
        for j, hs in groups.items():
            hsel = q_heads[torch.tensor(hs, device=dev)]
            qs = q.index_select(1, hsel).index_select(2, local).float()  # [B, g, R, D]
            s = torch.matmul(qs, k[:, j : j + 1, :nkw].float().transpose(-1, -2)) * scale
            softcap_(s, softcap)
            s.masked_fill_(~causal, float("-inf"))
            p = torch.softmax(s, dim=-1)
            if nkw < width * block_size:
                p = torch.nn.functional.pad(p, (0, width * block_size - nkw))
            pb = p.view(b, len(hs), r1 - r0, rows, width, block_size).sum((3, 5))
            mass[:, torch.tensor(hs, device=dev)] = pb
        yield r0, r1, width, mass
