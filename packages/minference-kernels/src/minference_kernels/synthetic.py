"""Structured synthetic attention heads, for tests and benchmarks.

Random Q/K have no structure: every pattern keeps ~ the same mass and sparse methods look either
useless or free. :func:`structured_qkv` builds heads with the shapes trained heads show:

* **slashes**: queries and keys share a per-head content vector and are rotated by rotary position
  embeddings (RoPE), so ``q_i . k_j`` depends on ``i - j``: a strong local window plus periodic
  diagonals from the low-frequency rotary components;
* **verticals**: a few anchor keys (position 0, plus ``num_anchors`` random positions) carry a
  direction that every query also carries, so all queries attend to them (sinks, delimiters);
* **blocks**: the sequence is cut into topics; queries and keys of a topic share a topic vector, so
  query blocks attend to the key blocks of their own topic (and of recalled earlier topics).

Each head mixes the three with its own weights (``kind``: ``"mixed"``, ``"vertical_slash"``,
``"block"``, ``"local"``). Deterministic for a given ``seed``.
"""

from __future__ import annotations

import torch


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    if d % 2:
        out = torch.cat([out, x[..., -1:]], -1)
    return out


def structured_qkv(
    batch: int = 1,
    heads_q: int = 4,
    heads_kv: int = 2,
    n: int = 1024,
    head_dim: int = 64,
    *,
    kind: str = "mixed",
    num_anchors: int = 8,
    topic_len: int = 512,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``q [B, Hq, n, D]``, ``k, v [B, Hkv, n, D]`` with planted structure (see module doc)."""
    if kind not in ("mixed", "vertical_slash", "block", "local"):
        raise ValueError(f"unknown kind {kind!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    d = head_dim
    scale_noise = 0.3
    pos = torch.arange(n)
    w_slash, w_vert, w_block = {
        "mixed": (1.0, 1.0, 1.0),
        "vertical_slash": (1.2, 1.2, 0.0),
        "block": (0.3, 0.4, 1.6),
        "local": (1.4, 0.0, 0.0),
    }[kind]
    # per KV head content; queries of the group share it (GQA heads look alike, as in real models)
    content = r(batch, heads_kv, 1, d) * 0.9
    anchor_dir = r(batch, heads_kv, 1, d)
    anchor_dir = anchor_dir / anchor_dir.norm(dim=-1, keepdim=True) * d**0.5
    anchors = torch.cat(
        [torch.zeros(1, dtype=torch.long), torch.randperm(n, generator=g)[:num_anchors]]
    )
    n_topics = max(1, -(-n // topic_len))
    topics = r(batch, heads_kv, n_topics, d)
    topics = topics / topics.norm(dim=-1, keepdim=True) * d**0.5
    topic_of = (pos // topic_len).clamp(max=n_topics - 1)
    # queries of a late topic recall one earlier topic
    recall = (topic_of - 1 - (topic_of * 7) % 3).clamp(min=0)

    k = content + scale_noise * r(batch, heads_kv, n, d)
    k = w_slash * _rope(k, pos)
    k = k + w_block * 0.35 * topics[:, :, topic_of]
    k[:, :, anchors] = k[:, :, anchors] + w_vert * 0.6 * anchor_dir

    grp = heads_q // heads_kv
    qc = content.repeat_interleave(grp, 1) + scale_noise * r(batch, heads_q, n, d)
    q = w_slash * _rope(qc, pos)
    tq = topics.repeat_interleave(grp, 1)
    q = q + w_block * 0.35 * (tq[:, :, topic_of] + 0.8 * tq[:, :, recall])
    q = q + w_vert * 0.6 * anchor_dir.repeat_interleave(grp, 1)
    v = r(batch, heads_kv, n, d)
    # temperature: scores ~ O(d) before the 1/sqrt(d) scale; keep softmax peaked but finite
    q = q * temperature
    return (
        q.to(device=device, dtype=dtype).contiguous(),
        k.to(device=device, dtype=dtype).contiguous(),
        v.to(device=device, dtype=dtype).contiguous(),
    )
