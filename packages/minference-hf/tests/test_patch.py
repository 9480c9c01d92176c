"""patch / unpatch, registration, and exactness of the full-budget sparse path per architecture."""

from __future__ import annotations

import logging
import subprocess
import sys

import minference_hf
import pytest
import torch
from conftest import (
    HEADS,
    KV_HEADS,
    LAYERS,
    full_budget_config,
    make_model,
    padded_batch,
    sparse_config,
)
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig

# float32 logits of the sparse path with full budgets vs transformers' SDPA: same math, different
# summation order (the kernels' blockwise online softmax), so rounding-level differences only.
ATOL_F32 = 2e-5


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def test_import_has_no_side_effects():
    code = (
        "import minference_hf\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'minference' not in AttentionInterface._global_mapping\n"
        "assert 'minference' not in AttentionMaskInterface._global_mapping\n"
        "minference_hf.register(); minference_hf.register()\n"
        "assert 'minference' in AttentionInterface._global_mapping\n"
        "assert 'minference' in AttentionMaskInterface._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_full_budget_matches_sdpa_batch2_padded(arch, side):
    model = make_model(arch)
    batch = padded_batch([200, 131], side)
    ref = _logits(model, batch)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    assert model.config._attn_implementation == "minference"
    out = _logits(model, batch)
    plan = model.minference_plan
    # padded batch: one sparse_prefill call per sample and layer
    assert plan.stats.sparse_calls == 2 * LAYERS
    assert plan.stats.sparse_layers == set(range(LAYERS))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL_F32, rtol=1e-4)
    minference_hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, batch), ref)


def test_full_budget_unpadded_batch_one_call_per_layer():
    model = make_model("llama")
    batch = padded_batch([180, 180], "left")
    ref = _logits(model, batch)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    out = _logits(model, batch)
    assert model.minference_plan.stats.sparse_calls == LAYERS
    torch.testing.assert_close(out, ref, atol=ATOL_F32, rtol=1e-4)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.bfloat16, 0.08), (torch.float16, 0.01)], ids=["bf16", "fp16"]
)
def test_full_budget_half_precision(dtype, atol):
    model = make_model("qwen2", dtype=dtype)
    batch = padded_batch([150, 97], "left")
    ref = _logits(model, batch)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    out = _logits(model, batch)
    assert model.minference_plan.stats.sparse_calls == 2 * LAYERS
    valid = batch["attention_mask"].bool()
    assert torch.isfinite(out[valid]).all()
    torch.testing.assert_close(out[valid], ref[valid], atol=atol, rtol=0.02)


def test_short_prompt_and_decode_take_dense_path():
    model = make_model("llama")
    minference_hf.patch(model, sparse_config())  # default threshold: far above 100 tokens
    batch = padded_batch([100], "left")
    with torch.no_grad():
        model(**batch)
    stats = model.minference_plan.stats
    assert stats.sparse_calls == 0 and stats.dense_calls == LAYERS


def test_no_forward_is_replaced():
    model = make_model("mistral")
    before = {name: type(m).forward for name, m in model.named_modules()}
    minference_hf.patch(model, full_budget_config())
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, name
        assert type(m).forward is before[name], name
    minference_hf.unpatch(model)
    assert not hasattr(model, "minference_plan")
    assert all("_minference_plan" not in m.__dict__ for m in model.modules())


def test_repatch_keeps_original_implementation():
    model = make_model("llama")
    minference_hf.patch(model, full_budget_config())
    minference_hf.patch(model, sparse_config())
    assert model.minference_plan.config.model_id == "test/sparse"
    minference_hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="not patched"):
        minference_hf.unpatch(model)


def test_config_from_path(tmp_path):
    model = make_model("llama")
    path = tmp_path / "cfg.json"
    full_budget_config().save(path)
    minference_hf.patch(model, path)
    assert model.minference_plan.config.model_id == "test/full-budget"
    minference_hf.patch(model, str(path))
    assert model.minference_plan.config.num_layers == LAYERS


# ---- bad cases ------------------------------------------------------------------------------


def test_config_for_another_model_is_rejected():
    model = make_model("llama")
    wrong_layers = PatternConfig.uniform(LAYERS + 2, HEADS, HeadPattern.dense())
    with pytest.raises(ValueError, match="num_layers: config has 4, model has 2"):
        minference_hf.patch(model, wrong_layers)
    wrong_heads = PatternConfig.uniform(LAYERS, HEADS * 2, HeadPattern.dense())
    with pytest.raises(ValueError, match="num_heads"):
        minference_hf.patch(model, wrong_heads)
    with pytest.raises(ValueError, match="Llama-3.1-8B-Instruct"):
        minference_hf.patch(model, "meta-llama/Llama-3.1-8B-Instruct")  # 32 layers x 32 heads
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "minference_plan")


def test_unknown_model_id_is_rejected():
    model = make_model("llama")
    with pytest.raises(KeyError, match="no shipped pattern config for 'acme/NoSuchModel-7B'"):
        minference_hf.patch(model, "acme/NoSuchModel-7B")


def test_model_without_id_needs_a_config():
    model = make_model("llama")
    with pytest.raises(ValueError, match="has no model id"):
        minference_hf.patch(model)
    model.config._name_or_path = "acme/NoSuchModel-7B"
    with pytest.raises(ValueError, match="no pattern config found for this model's id"):
        minference_hf.patch(model)


def test_architecture_without_attention_interface_is_rejected():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=64, n_layer=2, n_head=2))
    cfg = PatternConfig.uniform(2, 2, HeadPattern.dense())
    with pytest.raises(minference_hf.UnsupportedModelError, match="AttentionInterface"):
        minference_hf.patch(model, cfg)


def test_softcapping_runs_through_the_kernels():
    """Gemma-2's attention-logit soft-capping used to be refused; now the kernels cap the logits
    (every head kind, full budget): logits equal the model's own eager attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=64,
        layer_types=["full_attention", "full_attention"],
        attn_logit_softcapping=2.0,  # small: random-init logits reach it, so the cap matters
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # random-init logits are ~0.1: scale q and k so they reach the cap
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    batch = padded_batch([150, 120], "left", vocab=64)
    ref = _logits(model, batch)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    out = _logits(model, batch)
    assert model.minference_plan.stats.sparse_calls == 2 * LAYERS
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL_F32, rtol=1e-4)
    # the cap is applied: without it the logits differ
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = _logits(model, batch)
    assert (uncapped[valid] - ref[valid]).abs().max() > 100 * ATOL_F32


def test_non_causal_is_rejected():
    model = make_model("llama")
    model.config.is_causal = False
    with pytest.raises(minference_hf.UnsupportedModelError, match="non-causal"):
        minference_hf.patch(model, full_budget_config())


def test_runtime_unsupported_kwarg_is_an_error():
    model = make_model("llama")
    minference_hf.patch(model, full_budget_config())
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, HEADS, 4, 64)
    kv = torch.randn(1, 2, 4, 64)
    with pytest.raises(minference_hf.UnsupportedAttentionError, match="position_bias"):
        minference_hf.attention.minference_attention(attn, q, kv, kv, None, position_bias=q)


def test_implementation_without_patch_is_a_clear_error():
    model = make_model("llama")
    minference_hf.register()
    model.set_attn_implementation("minference")
    with pytest.raises(RuntimeError, match="no MInference plan"):
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))


def test_sliding_window_layers_stay_exact(caplog):
    # Mistral with a 64-token window on a 200-token prompt: the window bites, so every layer runs
    # exactly through the streaming kernel (window 64, no sink), never sparse without the window
    model = make_model("mistral", sliding_window=64)
    batch = padded_batch([200, 150], "left")
    ref = _logits(model, batch)
    with caplog.at_level(logging.INFO, logger="minference_hf"):
        minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
        out = _logits(model, batch)
    stats = model.minference_plan.stats
    assert stats.sparse_calls == 0 and stats.fallback_calls == 0
    assert stats.local_calls == 2 * LAYERS  # per sample (padded) and layer
    assert any("streaming kernel" in r.message for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL_F32, rtol=1e-4)


def test_sliding_window_longer_than_prompt_is_dense_and_exact():
    # every Mistral layer is a sliding-window layer: the config's patterns do not apply to them
    # (patch makes them dense), and a prompt shorter than the window is plain causal attention
    model = make_model("mistral", sliding_window=4096)
    batch = padded_batch([200, 150], "right")
    ref = _logits(model, batch)
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    out = _logits(model, batch)
    plan = model.minference_plan
    assert plan.config.kind_counts()["dense"] == LAYERS * HEADS
    assert plan.stats.local_calls == 0 and plan.stats.fallback_calls == 0
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL_F32, rtol=1e-4)


def test_patched_model_can_be_deep_copied():
    import copy

    model = make_model("llama")
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    batch = padded_batch([100, 80], "left")
    _logits(model, batch)
    twin = copy.deepcopy(model)
    assert twin.minference_plan is not model.minference_plan
    assert twin.model.layers[0].self_attn._minference_plan is twin.minference_plan
    twin.minference_plan.stats.reset()
    _logits(twin, batch)
    assert twin.minference_plan.stats.sparse_calls == 2 * LAYERS


def test_plan_settings_are_prefill_options_unchanged():
    """patch() embeds minference_kernels.PrefillOptions: its defaults without settings, the given
    object itself with options=, and a setting by name on top of it; the hf constants are the
    kernels' (one default per setting)."""
    from minference_kernels import PrefillOptions
    from minference_kernels import options as opt

    assert minference_hf.DEFAULT_MIN_SPARSE_LEN is opt.DEFAULT_MIN_SPARSE_LEN
    assert minference_hf.DEFAULT_MIN_SPARSE_QUERY is opt.DEFAULT_MIN_SPARSE_QUERY
    model = make_model("llama")
    minference_hf.patch(model, sparse_config())
    assert model.minference_plan.options == PrefillOptions()
    given = PrefillOptions(min_sparse_len=100, block_allocation="layer", coverage=0.9)
    minference_hf.patch(model, sparse_config(), options=given)
    assert model.minference_plan.options is given
    minference_hf.patch(model, sparse_config(), options=given, last_q=16)
    assert model.minference_plan.options == given.replace(last_q=16)
    plan = model.minference_plan
    plan.min_sparse_len = 200  # a validated copy replaces the options
    assert plan.options.min_sparse_len == 200 and plan.options.block_allocation == "layer"
    with pytest.raises(ValueError, match="min_sparse_len must be >= 1"):
        plan.min_sparse_len = 0
    with pytest.raises(TypeError, match="options must be a minference_kernels.PrefillOptions"):
        minference_hf.patch(model, sparse_config(), options={"last_q": 16})
