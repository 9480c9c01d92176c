"""Synthetic attention heads with one planted structure each (for the search tests).

Every generator returns ``q, k, v`` of shape ``[1, H, n, d]`` (same number of query and KV
heads) whose *scaled* scores ``q . k / sqrt(d)`` have the designed form, so the dense attention
of every head shows exactly the planted structure:

* ``a_shape_heads``: a bounded bump around ``i - j = 0`` (cosines of ``i - j`` with low
  frequencies: a local window) plus ``beta`` on the first ``sink`` keys;
* ``vertical_slash_heads``: a sharp main diagonal and a second diagonal at offset ``offset``
  (sums of cosines of ``i - j`` with random frequencies, i.e. rotary-style relative position
  terms), plus ``gamma`` on a few anchor key columns that every query sees;
* ``topic_block_heads``: the prompt is cut into segments of ``segment`` tokens cycling through
  ``topics`` orthogonal topic vectors; a query scores ``gamma`` on keys of its own topic.
"""

from __future__ import annotations

import math

import torch


def _pack(parts_q, parts_k, d, gen):
    """Concatenate feature blocks, pad to ``d`` with zeros, fold in sqrt(d)."""
    q = torch.cat(parts_q, -1)
    k = torch.cat(parts_k, -1)
    used = q.shape[-1]
    assert used <= d, (used, d)
    pad = d - used
    q = torch.nn.functional.pad(q, (0, pad)) * math.sqrt(math.sqrt(d))
    k = torch.nn.functional.pad(k, (0, pad)) * math.sqrt(math.sqrt(d))
    return q, k


def _v(h, n, d, gen):
    return torch.randn(1, h, n, d, generator=gen)


def a_shape_heads(
    n=1024, heads=2, d=64, *, m=24, max_freq=0.08, temp=0.5, sink=4, beta=None, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float64)
    beta = temp * m - 1.0 if beta is None else beta
    qs, ks = [], []
    for _ in range(heads):
        # score(i, j) = temp * sum_m cos(f_m (i - j)), low frequencies: a bounded local bump
        f = torch.rand(m, generator=gen, dtype=torch.float64) * max_freq
        fq = _cos_features(pos, f) * temp
        fk = _cos_features(pos, f)
        sq = torch.ones(n, 1, dtype=torch.float64) * beta
        sk = (pos < sink).double()[:, None]
        q, k = _pack([fq, sq], [fk, sk], d, gen)
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None].float(), torch.stack(ks)[None].float(), _v(heads, n, d, gen)


def _cos_features(pos, freqs):
    ang = pos[:, None] * freqs[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1)


def vertical_slash_heads(
    n=2048, heads=2, d=128, *, offset=40, anchors=6, m=20, temp=0.8, gamma=None, seed=0
):
    """Sharp main diagonal + a slash band around ``offset`` + ``anchors`` vertical columns."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float64)
    qs, ks = [], []
    for _ in range(heads):
        f1 = 0.4 + torch.rand(m, generator=gen, dtype=torch.float64) * 2.7  # sharp peak
        f2 = 0.02 + torch.rand(m, generator=gen, dtype=torch.float64) * 0.2  # a band of slashes
        q1 = _cos_features(pos, f1) * temp
        k1 = _cos_features(pos, f1)
        q2 = _cos_features(pos - offset, f2) * temp
        k2 = _cos_features(pos, f2)
        anchor_cols = torch.randperm(n - 256, generator=gen)[:anchors] + 128
        g = temp * m if gamma is None else gamma
        qa = torch.ones(n, 1, dtype=torch.float64) * g
        ka = torch.zeros(n, 1, dtype=torch.float64)
        ka[anchor_cols] = 1.0
        q, k = _pack([q1, q2, qa], [k1, k2, ka], d, gen)
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None].float(), torch.stack(ks)[None].float(), _v(heads, n, d, gen)


def topic_block_heads(n=1024, heads=2, d=64, *, segment=128, topics=8, gamma=8.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for h in range(heads):
        basis = torch.linalg.qr(torch.randn(topics, topics, generator=gen, dtype=torch.float64))[0]
        seg_topic = (torch.arange(math.ceil(n / segment)) + h) % topics
        tok_topic = seg_topic.repeat_interleave(segment)[:n]
        t = basis[tok_topic]  # [n, topics]
        q, k = _pack([t * gamma], [t], d, gen)
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None].float(), torch.stack(ks)[None].float(), _v(heads, n, d, gen)
