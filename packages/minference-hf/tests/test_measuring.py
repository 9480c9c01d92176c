"""The accuracy harness's measuring devices, ``oracle:D`` and ``blockkeys:D[:G]``, against float64
attention over the masks they promise (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch
from minference_hf import evaluate as ev


def _qkv(n: int, hq: int = 4, hkv: int = 2, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (hq, hkv, hkv))
    # one heavy key far from the rows, as a sink or an anchor: every query leans towards it
    c = torch.randn(d, generator=g)
    q += c
    k[:, :, 5] = 2 * c
    return q, k, v


def _run(spec_density: float, groups: int, q, k, v) -> tuple[torch.Tensor, dict]:
    saved = dict(ev._ORACLE)
    try:
        ev._ORACLE.update(density=spec_density, groups=groups, kept=0.0, causal=0.0, calls=0)
        out, _ = ev.oracle_attention(None, q, k, v, None, scaling=q.shape[-1] ** -0.5)
        return out.transpose(1, 2), dict(ev._ORACLE)
    finally:
        ev._ORACLE.clear()
        ev._ORACLE.update(saved)


def _masked(q, k, v, keep: torch.Tensor) -> torch.Tensor:
    """float64 softmax attention over ``keep [1, H, N, N]`` (and causality)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = q.double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~(keep & causal), -math.inf), -1) @ vv


@pytest.mark.parametrize("n", [200, 700])
def test_full_density_is_dense_attention(n):
    q, k, v = _qkv(n)
    full = torch.ones(1, 4, n, n, dtype=torch.bool)
    for groups in (0, 1, 4):
        out, st = _run(1.0, groups, q, k, v)
        torch.testing.assert_close(out.double(), _masked(q, k, v, full), atol=1e-5, rtol=1e-5)
        assert st["kept"] == st["causal"] and st["calls"] == 1


@pytest.mark.parametrize("groups", [1, 4])
def test_blockkeys_is_attention_over_the_blocks_own_pooled_choice(groups):
    """Odd N (the last block partial, a chunk boundary at 512), GQA 2: the output is float64
    attention over an independently built mask, each 64-row block keeps exactly its own keys plus
    ``ceil(D * end) - rows`` earlier keys chosen by its pooled queries, and the density is counted
    from that mask."""
    n, density = 700, 0.3
    q, k, v = _qkv(n, seed=1)
    scale = q.shape[-1] ** -0.5
    kk = k.repeat_interleave(2, 1)
    keep = torch.zeros(1, 4, n, n, dtype=torch.bool)
    for s in range(0, n, 64):
        e = min(s + 64, n)
        keep[:, :, s:e, s:e] = True
        early = min(s, math.ceil(density * e) - (e - s))
        if early <= 0:
            continue
        for h in range(4):
            rows = q[0, h, s:e]
            parts = rows.chunk(groups)
            logits = torch.stack([p.mean(0) for p in parts]) @ kk[0, h, :s].T * scale
            score = logits[0] if groups == 1 else torch.softmax(logits, -1).sum(0)
            keep[0, h, s:e, score.topk(early).indices] = True
    out, st = _run(density, groups, q, k, v)
    torch.testing.assert_close(out.double(), _masked(q, k, v, keep), atol=1e-5, rtol=1e-5)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert st["kept"] == float((keep & causal).sum())
    assert st["causal"] == float(causal.sum() * 4)
    assert 0.25 < st["kept"] / st["causal"] < 0.45  # near the density asked for
    # every block that keeps earlier keys (from the 4th on, at this density) keeps the heavy one
    assert keep[0, :, 192:, 5].all() and not keep[0, :, 64:192, 5].any()


def test_blockkeys_differs_from_the_per_row_oracle():
    """Same density, different devices: per-row keys (oracle) are not the block's shared keys."""
    q, k, v = _qkv(400, seed=2)
    a, _ = _run(0.2, 0, q, k, v)
    b, _ = _run(0.2, 4, q, k, v)
    assert (a - b).abs().max() > 1e-3


def test_block_keys_mask_needs_whole_blocks():
    q = torch.zeros(1, 1, 64, 8)
    with pytest.raises(ValueError, match="multiple of 64"):
        ev.block_keys_mask(q, q, 32, 0.5, 4, 1.0)
