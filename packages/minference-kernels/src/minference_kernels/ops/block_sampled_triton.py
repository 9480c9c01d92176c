"""Fused Triton kernel of the sampled block scoring (``scoring="sampled"``; the PyTorch reference is
:func:`minference_kernels.ops.block_sampled.sampled_mass_chunks`, same rows, same masses).

One program per (query head, tile of ``TILE_M`` sampled rows, batch item): the sampled rows of
``TILE_M / ROWS_P`` consecutive query blocks (``ROWS_P`` the sampled rows per block rounded up to a
power of two; the extra slots are masked) stacked into one tile, so the score products have a real
M for the tensor cores. The program streams the keys causal for its last row in tiles of 64
(K read per KV head from ``kv_of_q``, never repeated per query head; the heads of one KV group are
neighbours in the grid, so they read the same key tiles from L2), once:

* per row and key block: the block's own log2-sum-exp ``lse_b`` (its max, then the sum of
  ``exp2(s - max)`` over the block's keys), written to a float32 scratch ``[key block, row]`` --
  one float per (row, key block), 1/``block_size`` of the scores, never ``[rows, N]``;
* per row: the running log2-sum-exp of all its causal keys (online, folded block by block).

An epilogue in the same program reads its scratch back and writes, per (query block, key block),
``mass = sum over the block's sampled rows of exp2(lse_b - lse_row)`` -- the softmax mass the
rows give the key block, exactly the reference's -- or, with ``RANKED``, what the block selection
consumes: ``log(mass + 1e-30) / scale``. So each score costs one ``q.k`` product and one ``exp2``,
against two of each for a two-pass (max, then normalised sums) kernel.

The logits are ``scale * q.k``, soft-capped first with ``softcap`` (:func:`._triton_common._softcap`,
the ``HAS_SOFTCAP`` flag), causal with the diagonal at ``Nk - Nq``. Inputs float16 / bfloat16
(float32 products accumulate in float32) or float32 (IEEE products, as under the interpreter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._triton_common import _launch, _load_rows, _qk, _softcap, _softcap_args, _upcast
from .block_sampled import SAMPLED_CHUNK_BYTES, SAMPLED_ROWS

_log = logging.getLogger("minference_kernels")

#: Launch settings: sampled rows per program, warps, pipeline depth of the key tiles. Tuned on an
#: H200 with benchmarks/bench_sampled_scoring.py (32 / 8 heads, D = 128, bf16, 32K, 4 rows): the
#: fastest rows-per-program / warps setting it timed; the setting's timings are in
#: benchmarks/results/bench_sampled_scoring_rows_h200.json (sources.json key
#: ``sampled_scoring_rows``).
SAMPLED_CONFIG = {"tile_m": 128, "num_warps": 4, "num_stages": 3}
#: Key blocks the epilogue reduces at once.
_KB_E = 32
_KEY_TILE = 64

_NO_SPEC = ["H", "Nq", "Nk", "off", "rows", "step", "lo", "bs", "r0", "R", "width", "n_tiles"]


@triton.jit
def _end_block(ptrs, m_i, l_i, m_b, l_b, TILE_M: tl.constexpr):
    """A key block ends: store its log2-sum-exp per row (-inf where none of its keys is causal for
    the row) at ``ptrs``, fold it into the rows' running ``(m_i, l_i)``, reset the block's."""
    m_bs = tl.where(m_b == float("-inf"), 0.0, m_b)
    tl.store(ptrs, tl.where(l_b > 0, m_bs + tl.math.log2(tl.where(l_b > 0, l_b, 1.0)), m_b))
    m_row = tl.maximum(m_i, m_b)
    m_rs = tl.where(m_row == float("-inf"), 0.0, m_row)
    l_i = l_i * tl.math.exp2(m_i - m_rs) + l_b * tl.math.exp2(m_b - m_rs)
    m_b = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
    return m_row, l_i, m_b, tl.zeros([TILE_M], dtype=tl.float32)


@triton.jit(do_not_specialize=_NO_SPEC)
def _sampled_mass_kernel(
    Q,
    K,
    QH,
    KVH,
    OUT,
    SCR,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    H,
    Nq,
    Nk,
    off,
    rows,
    step,
    lo,
    bs,
    r0,
    R,
    width,
    n_tiles,
    qk_scale,
    cap_in,
    out_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_M: tl.constexpr,
    ROWS_P: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KB_E: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RANKED: tl.constexpr,
):
    hi = tl.program_id(0)  # heads vary fastest: one KV group's heads share key tiles in L2
    tile = n_tiles - 1 - tl.program_id(1)  # the longest causal tiles start first
    b = tl.program_id(2).to(tl.int64)
    QB: tl.constexpr = TILE_M // ROWS_P
    qh = tl.load(QH + hi).to(tl.int64)
    kh = tl.load(KVH + hi).to(tl.int64)

    i = tl.arange(0, TILE_M)
    qb_loc = tile * QB + i // ROWS_P  # query block, counted from the chunk's first
    slot = i % ROWS_P
    slot_ok = (slot < rows) & (qb_loc < R)
    row = tl.minimum((r0 + qb_loc) * bs + slot * step + lo, Nq - 1)  # block_sampled.sampled_rows
    row = tl.where(slot_ok, row, Nq - 1)
    pos = row + off
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = _load_rows(Q + b * sqb + qh * sqh, row, slot_ok, sqn, offs_d, d_ok, sqd)
    if UPCAST:
        q = q.to(tl.float32)

    # the tile's causal key range: up to its last query block's last row
    qb_last = r0 + tl.minimum(tile * QB + QB, R) - 1
    last = tl.minimum((qb_last + 1) * bs, Nq) - 1 + off
    tile_w = last // bs + 1  # key blocks the tile visits (<= width)
    n_t = last // BLOCK_N + 1  # key tiles of BLOCK_N
    k_base = K + b * skb + kh * skh
    scr = SCR + ((b * H + hi) * n_tiles + tile) * width * TILE_M
    offs_n0 = tl.arange(0, BLOCK_N)

    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)  # the row's max (log2 units)
    l_i = tl.zeros([TILE_M], dtype=tl.float32)  # its sum of exp2(s - m_i)
    m_b = tl.full([TILE_M], float("-inf"), dtype=tl.float32)  # the key block's, likewise
    l_b = tl.zeros([TILE_M], dtype=tl.float32)
    first = tl.min(tl.where(slot_ok, pos, Nk), 0)  # the tile's first row's position
    for t in range(0, n_t):
        offs_n = t * BLOCK_N + offs_n0
        k = _load_rows(k_base, offs_n, offs_n < Nk, skn, offs_d, d_ok, skd)
        s = _softcap(_qk(q, k, UPCAST), cap_in, HAS_SOFTCAP)  # raw (capped): scaled in the exp
        if t * BLOCK_N + BLOCK_N - 1 > first:  # key tiles causal for every row need no mask
            s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))  # pos < Nk
        m_new = tl.maximum(m_b, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        l_b = l_b * tl.math.exp2(m_b - m_safe) + tl.sum(p, 1)
        m_b = m_new
        if SUB == 1:  # every key tile ends a key block
            m_i, l_i, m_b, l_b = _end_block(scr + t * TILE_M + i, m_i, l_i, m_b, l_b, TILE_M)
        elif ((t + 1) % SUB == 0) | (t == n_t - 1):
            kb_ptr = scr + (t // SUB) * TILE_M + i
            m_i, l_i, m_b, l_b = _end_block(kb_ptr, m_i, l_i, m_b, l_b, TILE_M)
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))
    tl.debug_barrier()  # the scratch rows written above by other threads of this program

    qbs = tile * QB + tl.arange(0, QB)
    out = OUT + ((b * H + hi) * R + qbs[:, None].to(tl.int64)) * width
    for e0 in range(0, width, KB_E):
        kb = e0 + tl.arange(0, KB_E)
        x = tl.load(scr + kb[None, :] * TILE_M + i[:, None], mask=(kb < tile_w)[None, :],
                    other=float("-inf"))  # fmt: skip
        p = tl.where(slot_ok[:, None], tl.math.exp2(x - lse[:, None]), 0.0)
        mass = tl.sum(tl.reshape(p, [QB, ROWS_P, KB_E]), 1)  # [QB, KB_E]
        if RANKED:
            mass = tl.log(mass + 1e-30) / out_scale
        tl.store(out + kb[None, :], mass, mask=(qbs < R)[:, None] & (kb < width)[None, :])


def unsupported(q: torch.Tensor, block_size: int, rows: int) -> str | None:
    """Why the fused kernel cannot score these blocks (the caller then uses the PyTorch path and
    says so), or ``None``."""
    if block_size % _KEY_TILE:
        return f"block_size {block_size} is not a multiple of {_KEY_TILE}"
    if not 1 <= rows <= min(block_size, 64):
        return f"{rows} sampled rows per block (1 to 64 supported)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def sampled_mass_chunks_triton(
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
    ranked: bool = False,
    per_score: int = 4,
    cfg: dict | None = None,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """:func:`minference_kernels.ops.block_sampled.sampled_mass_chunks` with the fused kernel: yields
    ``(r0, r1, width, mass [B, H, r1 - r0, width])`` float32, ``width`` the key blocks causal for
    the chunk's last row (key blocks causal for none of a query block's rows get mass 0). With
    ``ranked`` the values are ``log(mass + 1e-30) / scale``, the ranking of
    :func:`minference_kernels.ops.block_select.block_topk`. A chunk's output (``per_score`` bytes per
    value, the caller's share) and the kernel's scratch (4 bytes per sampled row and key block)
    stay under ``chunk_bytes``, at least one tile of query blocks. ``cfg`` overrides
    :data:`SAMPLED_CONFIG`."""
    why = unsupported(q, block_size, rows)
    if why is not None:
        raise ValueError(f"sampled scoring kernel: {why}")
    c = {**SAMPLED_CONFIG, **(cfg or {})}
    b, _, nq, d = q.shape
    nk = k.shape[2]
    off = nk - nq
    mbq = -(-nq // block_size)
    mbk = -(-nk // block_size)
    h = int(q_heads.numel())
    rows_p = triton.next_power_of_2(rows)
    tile_m = max(int(c["tile_m"]), rows_p)
    qb_per = tile_m // rows_p
    step = max(1, block_size // rows)
    lo = block_size - 1 - (rows - 1) * step
    qk_scale, cap_in = _softcap_args(scale, softcap)
    qh = q_heads.to(device=q.device, dtype=torch.int64).contiguous()
    kvh = kv_of_q.to(device=q.device, dtype=torch.int64).contiguous()
    per_block = max(1, b * h * mbk * (per_score + 4 * rows_p))
    blocks_per = max(qb_per, chunk_bytes // per_block // qb_per * qb_per)
    for r0 in range(0, mbq, blocks_per):
        r1 = min(mbq, r0 + blocks_per)
        rr = r1 - r0
        last = min(r1 * block_size, nq) - 1 + off
        width = min(mbk, last // block_size + 1)
        n_tiles = -(-rr // qb_per)
        out = torch.empty((b, h, rr, width), dtype=torch.float32, device=q.device)
        scr = torch.empty((b, h, n_tiles, width, tile_m), dtype=torch.float32, device=q.device)
        _launch(
            _sampled_mass_kernel,
            (h, n_tiles, b),
            (q, k, qh, kvh, out, scr, *q.stride(), *k.stride(), h, nq, nk, off, rows, step, lo,
             block_size, r0, rr, width, n_tiles, qk_scale, cap_in, float(scale)),
            num_stages=int(c["num_stages"]),
            HEAD_D=d,
            BLOCK_D=max(16, triton.next_power_of_2(d)),
            TILE_M=tile_m,
            ROWS_P=rows_p,
            SUB=block_size // _KEY_TILE,
            BLOCK_N=_KEY_TILE,
            KB_E=_KB_E,
            UPCAST=_upcast(q.dtype),
            HAS_SOFTCAP=softcap is not None,
            RANKED=ranked,
            num_warps=int(c["num_warps"]),
        )  # fmt: skip
        yield r0, r1, width, out


_fallback_logged: set[str] = set()


def log_fallback(why: str) -> None:
    """One log line per reason: the Triton backend scores these sampled blocks on the PyTorch
    path."""
    if why not in _fallback_logged:
        _fallback_logged.add(why)
        _log.warning("sampled block scoring: %s; using the PyTorch path", why)
