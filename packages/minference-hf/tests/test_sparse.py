"""The sparse path on ~2K-token prompts: it runs, it is close to dense where attention is
structured, decode stays dense, and continuing from a KV cache matches a single pass."""

from __future__ import annotations

import minference_hf
import pytest
import torch
from conftest import LAYERS, full_budget_config, make_model, padded_batch, sparse_config
from minference_hf.caches import cache_kwarg, new_cache
from minference_hf.generation import greedy_generate

N = 2048
THRESHOLD = 1024


def _attn_outputs(model, ids):
    """Per-layer attention outputs (the input of o_proj), via forward pre-hooks."""
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: outs.__setitem__(i, a[0].detach().clone())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _periodic(n: int, period: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (period,), generator=g).repeat(n // period + 1)[:n][None]


def _random(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sparse_path_runs_and_is_close_on_structured_input(arch):
    model = make_model(arch)
    structured, unstructured = _periodic(N, period=16), _random(N)
    ref_s, logits_ref_s = _attn_outputs(model, structured)
    ref_u, _ = _attn_outputs(model, unstructured)

    minference_hf.patch(model, sparse_config(), min_sparse_len=THRESHOLD)
    out_s, logits_s = _attn_outputs(model, structured)
    stats = model.minference_plan.stats
    assert stats.sparse_calls == LAYERS and stats.dense_calls == 0
    assert stats.sparse_layers == set(range(LAYERS))
    assert torch.isfinite(logits_s).all()
    # Periodic input: the scores of every head depend on the offset modulo the period, a shape
    # the vertical-slash / A-shape / block-sparse heads capture (measured rel. error 0.02-0.03).
    for i in range(LAYERS):
        assert _rel(out_s[i], ref_s[i]) < 0.1, i
    assert _rel(logits_s, logits_ref_s) < 0.1
    # The same config on i.i.d. random tokens (diffuse attention) is far from dense (~0.4), so the
    # check above measures the structure, not a vacuous tolerance.
    out_u, _ = _attn_outputs(model, unstructured)
    assert _rel(out_u[0], ref_u[0]) > 0.25


def test_generate_prefill_sparse_decode_dense():
    model = make_model("llama")
    minference_hf.patch(model, sparse_config(), min_sparse_len=THRESHOLD)
    ids = _periodic(N)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (1, N + 5)
    stats = model.minference_plan.stats
    assert stats.sparse_calls == LAYERS  # the pre-fill only
    assert stats.dense_calls == 4 * LAYERS  # each decode step, each layer
    stats.reset()
    res = greedy_generate(model, ids, max_new_tokens=5, eos_token_id=[])
    assert res.token_ids == out[0, N:].tolist()
    assert (res.sparse_calls, res.dense_calls) == (LAYERS, 4 * LAYERS)


def test_batched_generate_with_left_padding():
    model = make_model("qwen2")
    batch = padded_batch([N, N - 300], "left")
    ref = model.generate(**batch, max_new_tokens=4, do_sample=False)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=THRESHOLD)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert model.minference_plan.stats.sparse_calls == 2 * LAYERS
    assert torch.equal(out, ref)


def test_below_threshold_padded_batch_is_exact_sdpa():
    model = make_model("phi3")
    batch = padded_batch([300, 120], "right")
    with torch.no_grad():
        ref = model(**batch).logits
    minference_hf.patch(model, sparse_config(), min_sparse_len=THRESHOLD)
    with torch.no_grad():
        out = model(**batch).logits
    assert model.minference_plan.stats.sparse_calls == 0
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_continuation_with_kv_cache_matches_single_pass(arch):
    model = make_model(arch)
    ids = _random(N)
    single = greedy_generate(model, ids, max_new_tokens=6, eos_token_id=[])
    minference_hf.patch(model, full_budget_config(), min_sparse_len=THRESHOLD)
    # one pass over the whole prompt
    whole = greedy_generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert whole.token_ids == single.token_ids
    assert whole.sparse_calls == LAYERS
    # chunked pre-fill: the 2nd and 3rd chunks attend to a non-empty cache (query offset > 0)
    model.minference_plan.stats.reset()
    chunked = greedy_generate(model, ids, max_new_tokens=6, eos_token_id=[], chunk_size=700)
    assert chunked.token_ids == single.token_ids
    # chunk 1 has 700 keys (< threshold: dense), chunks 2 and 3 have 1400 / 2048 keys: sparse
    assert chunked.sparse_calls == 2 * LAYERS
    torch.testing.assert_close(chunked.first_logits, single.first_logits, atol=1e-4, rtol=1e-4)


def test_continuing_a_padded_conversation():
    model = make_model("mistral")
    full = padded_batch([N, N - 257], "left")
    cut = 1500
    ref = model.generate(**full, max_new_tokens=5, do_sample=False)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=THRESHOLD)
    cache = new_cache(model)
    with torch.no_grad():
        model(
            input_ids=full["input_ids"][:, :cut],
            attention_mask=full["attention_mask"][:, :cut],
            use_cache=True,
            **{cache_kwarg(model): cache},
        )
    assert model.minference_plan.stats.sparse_calls == 2 * LAYERS
    model.minference_plan.stats.reset()
    out = model.generate(**full, max_new_tokens=5, do_sample=False, **{cache_kwarg(model): cache})
    # the continuation pre-fills N - cut new tokens over N keys, per sample (padded batch)
    assert model.minference_plan.stats.sparse_calls == 2 * LAYERS
    assert torch.equal(out, ref)


def test_static_cache_generate_goes_sparse_and_matches():
    model = make_model("llama")
    batch = padded_batch([N, N - 200], "left")
    kw = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    ref = model.generate(**batch, **kw)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=THRESHOLD)
    out = model.generate(**batch, **kw)
    stats = model.minference_plan.stats
    assert stats.sparse_calls == 2 * LAYERS and stats.fallback_calls == 0
    assert torch.equal(out, ref)


def test_static_cache_threshold_counts_filled_positions_only():
    from transformers import StaticCache

    model = make_model("llama")
    batch = padded_batch([600, 500], "left")

    def run():
        # 600 filled positions of a 4096-slot buffer
        cache = StaticCache(config=model.config, max_cache_len=4096)
        return model.generate(
            **batch, max_new_tokens=3, do_sample=False, **{cache_kwarg(model): cache}
        )

    ref = run()
    minference_hf.patch(model, full_budget_config(), min_sparse_len=THRESHOLD)
    out = run()
    stats = model.minference_plan.stats
    assert (stats.sparse_calls, stats.dense_calls) == (0, 3 * LAYERS)  # below the threshold
    assert torch.equal(out, ref)
    model.minference_plan.min_sparse_len = 400
    stats.reset()
    assert torch.equal(run(), ref)  # and above it, on the filled part of the buffer
    assert stats.sparse_calls == 2 * LAYERS
