"""Sliding-window (local) layers: exact through the streaming kernel, on tiny models of each
family that has them (Gemma-3 and Gemma-2 ``layer_types``, Mistral's all-layer window, Qwen2's
``max_window_layers``), against the model's own SDPA attention."""

from __future__ import annotations

import logging

import minference_hf
import pytest
import torch
from conftest import HEAD_DIM, HEADS, KV_HEADS, VOCAB, make_model, padded_batch
from minference_hf.attention import minference_mask
from minference_hf.caches import cache_kwarg
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig
from transformers import DynamicCache
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
    sliding_window_overlay,
)

WINDOW = 48
ATOL = 2e-5
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        max_position_embeddings=4096,
        pad_token_id=0,
        attn_implementation="sdpa",
        **kw,
    )
    return Gemma3ForCausalLM(cfg)


def _gemma2(**kw):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        max_position_embeddings=4096,
        pad_token_id=0,
        attn_logit_softcapping=2.0,  # low, so that the cap bites (see _model)
        attn_implementation="eager",  # Gemma-2 refuses SDPA: soft-capping
        **kw,
    )
    return Gemma2ForCausalLM(cfg)


def _model(family: str, seed: int = 0) -> tuple[torch.nn.Module, list[int]]:
    """A tiny random model of ``family`` and the indices of its sliding-window layers."""
    torch.manual_seed(seed)
    if family == "gemma3":
        m = _gemma3()
    elif family == "gemma2":
        m = _gemma2()
    elif family == "mistral":
        return make_model("mistral", seed, sliding_window=WINDOW), [0, 1]
    elif family == "qwen2":  # layers >= max_window_layers slide
        m = make_model(
            "qwen2",
            seed,
            sliding_window=WINDOW,
            use_sliding_window=True,
            max_window_layers=1,
        )
        return m, [1]
    else:
        raise AssertionError(family)
    m = m.eval()
    if family == "gemma2":  # random-init logits are ~0.1: scale q and k so the cap of 2 bites
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(12.0)
                layer.self_attn.k_proj.weight.mul_(12.0)
    return m, [i for i, t in enumerate(LAYER_TYPES) if t == "sliding_attention"]


def _config(model: torch.nn.Module) -> PatternConfig:
    """Sparse patterns everywhere (the sliding layers' are overridden by patch)."""
    n = model.config.num_hidden_layers
    full = HeadPattern.vertical_slash(4096, 4096)  # covers every pair: global layers exact
    return PatternConfig.uniform(n, HEADS, full, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


FAMILIES = ["gemma3", "gemma2", "mistral", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_local_layers_are_exact_through_the_streaming_kernel(family, side, caplog):
    model, sliding = _model(family)
    batch = padded_batch([230, 170], side)
    ref = _logits(model, batch)
    with caplog.at_level(logging.WARNING, logger="minference_hf"):
        minference_hf.patch(model, _config(model), min_sparse_len=16, min_sparse_query=8)
        out = _logits(model, batch)
    stats = model.minference_plan.stats
    n_global = model.config.num_hidden_layers - len(sliding)
    # padded batch: one call per sample and layer
    assert stats.local_calls == 2 * len(sliding), stats
    assert stats.sparse_calls == 2 * n_global and stats.fallback_calls == 0
    assert not caplog.records, [r.message for r in caplog.records]  # the intended path is quiet
    for i in sliding:
        assert all(h.kind == "dense" for h in model.minference_plan.config.layers[i])
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_chunked_prefill_and_decode_over_a_sliding_cache(family, caplog):
    """The first chunk goes through the streaming kernel; a second pre-fill chunk over the
    sliding cache (``kv_offset > 0`` in newer transformers: only the last ``W - 1`` keys are
    kept) gets transformers' window mask and SDPA, quietly (it is exact, not a fallback); then
    decode steps. Logits equal one forward of the whole text."""
    model, sliding = _model(family)
    ids = torch.randint(3, VOCAB, (1, 260), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, {"input_ids": ids})
    minference_hf.patch(model, _config(model), min_sparse_len=16, min_sparse_query=8)
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model)  # ``past_key_values`` before transformers 5.25: ``cache`` is ignored
    parts = []
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="minference_hf"):
        for a, b in ((0, 150), (150, 255), (255, 256), (256, 257), (257, 260)):
            parts.append(model(input_ids=ids[:, a:b], **{kw: cache}, use_cache=True).logits)
    out = torch.cat(parts, 1)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    stats = model.minference_plan.stats
    assert stats.local_calls == len(sliding)  # the first chunk
    assert stats.fallback_calls == 0 and not caplog.records, [r.message for r in caplog.records]
    assert cache.get_seq_length() == 260


def test_window_longer_than_the_prompt_is_plain_causal():
    model, sliding = _model("gemma3")
    batch = padded_batch([40, 30], "left")  # shorter than the window: nothing to slide
    ref = _logits(model, batch)
    minference_hf.patch(model, _config(model), min_sparse_len=16, min_sparse_query=8)
    out = _logits(model, batch)
    stats = model.minference_plan.stats
    assert stats.local_calls == 0 and stats.fallback_calls == 0
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=1e-4)


def test_padding_with_holes_falls_back_with_a_log_line(caplog):
    model, sliding = _model("gemma3")
    batch = padded_batch([200], "left")
    batch["attention_mask"][0, 100:110] = 0  # a hole: windows count positions, holes included
    ref = _logits(model, batch)
    minference_hf.patch(model, _config(model), min_sparse_len=16, min_sparse_query=8)
    with caplog.at_level(logging.WARNING, logger="minference_hf"):
        out = _logits(model, batch)
    stats = model.minference_plan.stats
    assert stats.fallback_calls == len(sliding)
    assert any("holes" in r.message for r in caplog.records)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=1e-4)


def test_sliding_mask_is_compact_and_carries_its_window():
    kw = dict(batch_size=2, q_length=100, kv_length=100, local_size=WINDOW)
    pad = torch.ones(2, 100, dtype=torch.bool)
    pad[1, :7] = False
    m = minference_mask(**kw, mask_function=sliding_window_causal_mask_function(WINDOW))
    assert m.shape == (2, 1, 1, 100) and m.dtype == torch.int32 and bool((m == WINDOW).all())
    m = minference_mask(
        **kw, mask_function=sliding_window_causal_mask_function(WINDOW), attention_mask=pad
    )
    assert torch.equal(m[:, 0, 0] != 0, pad) and int(m.max()) == WINDOW
    # the window does not bite: the plain causal form
    short = dict(batch_size=1, q_length=30, kv_length=30, local_size=WINDOW)
    assert (
        minference_mask(**short, mask_function=sliding_window_causal_mask_function(WINDOW)) is None
    )


@pytest.mark.parametrize(
    "mask_function",
    [
        chunked_causal_mask_function(WINDOW, torch.zeros(2, dtype=torch.long)),  # Llama-4 chunks
        sliding_window_causal_mask_function(WINDOW - 1),  # a window other than local_size
        and_masks(sliding_window_overlay(WINDOW), causal_mask_function, lambda b, h, q, k: k != 5),
    ],
    ids=["chunked", "other-window", "overlay"],
)
def test_other_local_masks_get_transformers_own_mask(mask_function):
    kw = dict(batch_size=2, q_length=100, kv_length=100, local_size=WINDOW)
    m = minference_mask(**kw, mask_function=mask_function)
    ref = sdpa_mask(**kw, mask_function=mask_function)
    assert m.dtype == torch.bool and m.shape == (2, 1, 100, 100)
    assert torch.equal(m, ref)


def test_overlays_flagged_by_transformers_are_not_compacted():
    # create_sliding_window_causal_mask turns allow_is_causal_skip off for or/and overlays and
    # packed sequences: never compact those, whatever the probe says
    kw = dict(batch_size=1, q_length=100, kv_length=100, local_size=WINDOW)
    fn = sliding_window_causal_mask_function(WINDOW)
    m = minference_mask(**kw, mask_function=fn, allow_is_causal_skip=False)
    assert m.dtype == torch.bool and m.shape == (1, 1, 100, 100)
