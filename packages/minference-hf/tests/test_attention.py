"""The registered attention and mask functions, called directly."""

from __future__ import annotations

import pytest
import torch
from minference_hf.attention import (
    _key_padding_from_full_mask,
    minference_attention,
    minference_mask,
)
from minference_hf.plan import SparsePrefillPlan
from minference_kernels import HeadPattern, PrefillOptions, dense_attention, sparse_prefill
from minference_patterns import PatternConfig
from transformers.masking_utils import (
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

HQ, HKV, D = 4, 2, 64
HEADS = (
    HeadPattern.vertical_slash(16, 64),
    HeadPattern.a_shape(16, 64),
    HeadPattern.block_sparse(top_k=3),
    HeadPattern.dense(),
)


def _module(plan: SparsePrefillPlan, layer: int = 0) -> torch.nn.Module:
    m = torch.nn.Module()
    m.layer_idx = layer
    m.is_causal = True
    m.num_key_value_groups = HQ // HKV
    m._minference_plan = plan
    return m


def _plan(min_sparse_len: int = 64, heads=HEADS) -> SparsePrefillPlan:
    cfg = PatternConfig(model_id="t", num_layers=1, num_heads=HQ, layers=(heads,))
    opts = PrefillOptions(min_sparse_len=min_sparse_len, min_sparse_query=8)
    return SparsePrefillPlan(config=cfg, options=opts)


def _qkv(b: int, nq: int, nk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HQ, nq, D, generator=g)
    k = torch.randn(b, HKV, nk, D, generator=g)
    v = torch.randn(b, HKV, nk, D, generator=g)
    return q, k, v


def _mask(batch, q_length, kv_length, attention_mask=None):
    kw = dict(batch_size=batch, q_length=q_length, kv_length=kv_length)
    kw |= dict(q_offset=kv_length - q_length, kv_offset=0, attention_mask=attention_mask)
    kw |= dict(mask_function=causal_mask_function)
    return minference_mask(**kw), sdpa_mask(**kw, allow_is_causal_skip=False)


def test_mask_function_compact_form_and_fallback():
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    compact, full = _mask(2, 6, 6, pad)
    assert compact.shape == (2, 1, 1, 6) and compact.dtype == torch.bool
    assert torch.equal(compact[:, 0, 0], pad)
    assert _key_padding_from_full_mask(full, 6) is not None
    # no padding, no cache: nothing to mask (SDPA's is_causal)
    assert _mask(2, 6, 6)[0] is None
    # continuation over a cache without padding: a compact all-true mask, never None
    compact, _ = _mask(1, 4, 10)
    assert compact.shape == (1, 1, 1, 10) and bool(compact.all())
    # decode steps and non-causal overlays get transformers' own mask
    pad7 = torch.tensor([[0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    decode = minference_mask(1, 1, 7, q_offset=6, attention_mask=pad7)
    assert decode.shape == (1, 1, 1, 7)
    assert torch.equal(decode, sdpa_mask(1, 1, 7, q_offset=6, attention_mask=pad7))
    # a sliding window that bites: compact too, carrying the window (see test_sliding.py)
    window = minference_mask(
        1, 6, 6, mask_function=sliding_window_causal_mask_function(3), local_size=3
    )
    assert (
        window.shape == (1, 1, 1, 6)
        and window.dtype == torch.int32
        and int(window[0, 0, 0, 5]) == 3
    )


def test_full_mask_check_rejects_windows_and_accepts_causal_padding():
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[0, :5] = False
    _, full = _mask(2, 40, 40, pad)
    kv = _key_padding_from_full_mask(full, 40)
    assert kv is not None and torch.equal(kv, pad)
    windowed = full.clone()
    windowed[:, :, 30:, :10] = False  # a sliding window that bites
    assert _key_padding_from_full_mask(windowed, 40) is None
    assert _key_padding_from_full_mask(full.float(), 40) is None


@pytest.mark.parametrize("padded", [False, True])
def test_continuation_uses_query_offset(padded):
    """q holds the last 96 of 256 positions (a cache of 160): the output must equal the kernels'
    own sparse_prefill on the same (valid) tensors, i.e. query offset = cached length."""
    plan = _plan()
    b, nq, nk = 2, 96, 256
    q, k, v = _qkv(b, nq, nk)
    pad = torch.ones(b, nk, dtype=torch.bool)
    if padded:
        pad[1, :37] = False  # left padding of sample 1
    mask, _ = _mask(b, nq, nk, pad)
    out, _ = minference_attention(_module(plan), q, k, v, mask, scaling=D**-0.5)
    assert out.shape == (b, nq, HQ, D)
    out = out.transpose(1, 2)
    assert plan.stats.sparse_calls == (2 if padded else 1)
    heads = plan.heads_for_layer(0, nk)
    # batched vs one sample: the CPU path pads each block's candidate keys to the batch's longest
    # list, so fp32 sums run in another order (a CI machine saw 3.8e-5); a wrong query offset
    # moves the causal edge and errs by O(0.1)
    tol = dict(atol=2e-4, rtol=2e-4)
    ref0 = sparse_prefill(q[:1], k[:1], v[:1], heads, D**-0.5)
    torch.testing.assert_close(out[:1], ref0, **tol)
    s = 37 if padded else 0
    heads1 = plan.heads_for_layer(0, nk - s)
    ref1 = sparse_prefill(q[1:], k[1:, :, s:], v[1:, :, s:], heads1, D**-0.5)
    torch.testing.assert_close(out[1:], ref1, **tol)
    # the same check fails for a query offset of 0 (the causal diagonal aligned top-left)
    wrong = sparse_prefill(
        q[:1], k[:1, :, :nq], v[:1, :, :nq], plan.heads_for_layer(0, nq), D**-0.5
    )
    assert (out[:1] - wrong).abs().max() > 100 * tol["atol"]


def test_holes_in_padding_are_gathered():
    """Padding in the middle (e.g. a right-padded turn followed by a new turn): the valid tokens
    are gathered, with dense heads the result equals masked dense attention."""
    plan = _plan(heads=(HeadPattern.dense(),) * HQ)
    q, k, v = _qkv(1, 80, 200)
    pad = torch.ones(1, 200, dtype=torch.bool)
    pad[0, 90:110] = False
    mask, full = _mask(1, 80, 200, pad)
    out, _ = minference_attention(_module(plan), q, k, v, mask, scaling=D**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=full
    )
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    assert plan.stats.sparse_calls == 1


def test_structured_heads_close_to_dense():
    """Synthetic structured attention (strong sink columns + a local diagonal band): the sparse
    heads recover dense attention closely."""
    plan = _plan(heads=(HeadPattern.vertical_slash(8, 64),) * 2 + (HeadPattern.a_shape(8, 64),) * 2)
    g = torch.Generator().manual_seed(3)
    n = 512
    pos = torch.arange(n, dtype=torch.float32)
    freqs = 1.0 / (200.0 ** (torch.arange(D // 2) / (D // 2)))
    ang = pos[:, None] * freqs[None]
    base = torch.cat([ang.cos(), ang.sin()], -1) * 3.0  # scores peak at small offsets
    q = base[None, None].repeat(1, HQ, 1, 1) + 0.1 * torch.randn(1, HQ, n, D, generator=g)
    k = base[None, None].repeat(1, HKV, 1, 1) + 0.1 * torch.randn(1, HKV, n, D, generator=g)
    k[:, :, :4] = q[:, :1, -1:].mean(2, keepdim=True) * 2.0  # sinks every query attends to
    v = torch.randn(1, HKV, n, D, generator=g)
    out, _ = minference_attention(_module(plan), q, k, v, None, scaling=D**-0.5)
    ref = dense_attention(q, k, v, D**-0.5)
    rel = float((out.transpose(1, 2) - ref).norm() / ref.norm())
    assert rel < 0.05
    assert plan.stats.sparse_calls == 1


def test_decode_and_short_calls_are_dense():
    plan = _plan(min_sparse_len=1000)
    q, k, v = _qkv(1, 1, 300)
    minference_attention(_module(plan), q, k, v, None)
    q, k, v = _qkv(1, 200, 200)
    minference_attention(_module(plan), q, k, v, None)
    assert plan.stats.dense_calls == 2 and plan.stats.sparse_calls == 0


def test_plan_thresholds_validated():
    with pytest.raises(ValueError, match="min_sparse_len"):
        _plan(min_sparse_len=0)
    plan = _plan(min_sparse_len=100)
    assert not plan.wants_sparse(1, 10_000)
    assert not plan.wants_sparse(500, 99)
    assert plan.wants_sparse(100, 100)


def test_dropout_in_training_is_rejected():
    plan = _plan()
    m = _module(plan)
    m.training = True
    q, k, v = _qkv(1, 128, 128)
    with pytest.raises(ValueError, match="inference-only"):
        minference_attention(m, q, k, v, None, dropout=0.1)


def test_plan_is_per_model_not_global():
    a, b = _plan(), _plan(min_sparse_len=10_000)
    q, k, v = _qkv(1, 128, 128)
    minference_attention(_module(a), q, k, v, None)
    minference_attention(_module(b), q, k, v, None)
    assert (a.stats.sparse_calls, b.stats.sparse_calls) == (1, 0)


def test_coverage_is_passed_to_the_kernels():
    q, k, v = _qkv(1, 256, 256)
    heads = (HeadPattern.vertical_slash(64, 128),) * HQ
    plan = _plan(heads=heads)
    plan.coverage = 0.5
    out, _ = minference_attention(_module(plan), q, k, v, None, scaling=D**-0.5)
    ref = sparse_prefill(q, k, v, heads, D**-0.5, coverage=0.5)
    torch.testing.assert_close(out.transpose(1, 2), ref)
    with pytest.raises(ValueError, match="coverage"):
        plan.coverage = 1.5
    with pytest.raises(TypeError, match="coverage"):  # a string is not silently converted
        plan.coverage = "0.5"
    assert plan.options.coverage == 0.5


def test_block_allocation_is_passed_to_the_kernels():
    """``block_allocation="head"`` reaches sparse_prefill: block-sparse heads spread their blocks
    by estimated share (a different output from the per-query-block default on these inputs)."""
    q, k, v = _qkv(1, 1280, 1280)
    # top_k 8: each query block keeps ceil(7/8 * 8) = 7 of its own blocks, one is shared out
    heads = (HeadPattern.block_sparse(top_k=8),) * HQ
    plan = _plan(heads=heads)
    plan.block_allocation = "head"
    out, _ = minference_attention(_module(plan), q, k, v, None, scaling=D**-0.5)
    ref = sparse_prefill(q, k, v, heads, D**-0.5, block_allocation="head")
    torch.testing.assert_close(out.transpose(1, 2), ref)
    per_block = sparse_prefill(q, k, v, heads, D**-0.5)
    assert (ref - per_block).abs().max() > 1e-3
