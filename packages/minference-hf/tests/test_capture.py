"""Hook-based capture of post-RoPE Q/K/V, and the search fed from it."""

from __future__ import annotations

import threading

import minference_hf
import pytest
import torch
from conftest import HEAD_DIM, HEADS, KV_HEADS, LAYERS, VOCAB, full_budget_config, make_model


def _ids(n: int = 96) -> torch.Tensor:
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(0))


def test_capture_yields_post_rope_qkv_in_layer_order():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_model("llama")
    ids = _ids()
    layers = list(minference_hf.capture_qkv(model, ids))
    assert [c.layer for c in layers] == list(range(LAYERS))
    for c in layers:
        assert c.q.shape == (1, HEADS, ids.shape[1], HEAD_DIM)
        assert c.k.shape == c.v.shape == (1, KV_HEADS, ids.shape[1], HEAD_DIM)
    # layer 0 by hand: norm -> projections -> RoPE
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(h, pos)
        q = attn.q_proj(h).view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)
        k = attn.k_proj(h).view(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = attn.v_proj(h).view(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(layers[0].q, q)
    torch.testing.assert_close(layers[0].k, k)
    torch.testing.assert_close(layers[0].v, v)


def test_capture_restores_implementation_and_plan():
    model = make_model("qwen2")
    minference_hf.patch(model, full_budget_config(), min_sparse_len=16)
    n = len(list(minference_hf.capture_qkv(model, _ids(), to_device="cpu")))
    assert n == LAYERS
    assert model.config._attn_implementation == "minference"
    assert all("_minference_capture_hook" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        model(input_ids=_ids())
    assert model.minference_plan.stats.sparse_calls == LAYERS


def test_closing_capture_early_stops_the_forward():
    model = make_model("llama")
    gen = minference_hf.capture_qkv(model, _ids())
    first = next(gen)
    assert first.layer == 0
    gen.close()
    assert not any(t.name == "minference-capture" for t in threading.enumerate())
    assert model.config._attn_implementation == "sdpa"


def test_capture_propagates_errors():
    model = make_model("llama")
    bad = torch.full((1, 8), 10_000)  # out of vocabulary
    try:
        list(minference_hf.capture_qkv(model, bad))
    except IndexError:
        pass
    else:
        raise AssertionError("expected the embedding's IndexError")
    assert model.config._attn_implementation == "sdpa"


def test_search_from_capture_produces_a_usable_config(tmp_path):
    model = make_model("phi3")
    cfg = minference_hf.search_model_config(model, _ids(256), budget=0.3, progress=False)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        LAYERS,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert cfg.context_length == 256
    path = cfg.save(tmp_path / "searched.json")
    minference_hf.patch(model, path, min_sparse_len=128)
    with torch.no_grad():
        out = model(input_ids=_ids(300)).logits
    assert torch.isfinite(out).all()
    assert model.minference_plan.stats.sparse_calls == LAYERS


def test_search_of_a_soft_capped_model_passes_the_cap(monkeypatch):
    """Gemma-2's attn_logit_softcapping reaches the search (which measures capped attention)."""
    import minference_patterns
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=HEAD_DIM, attn_logit_softcapping=7.5,
                       layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                       attn_implementation="eager")  # fmt: skip
    model = Gemma2ForCausalLM(cfg).eval()
    seen = {}
    real = minference_patterns.search_config

    def spy(layers, **kw):
        seen.update(kw)
        return real(layers, **kw)

    monkeypatch.setattr(minference_patterns, "search_config", spy)
    out = minference_hf.search_model_config(model, _ids(256), budget=0.3, progress=False)
    assert seen["softcap"] == 7.5 and set(seen["fixed"]) == {0}
    assert all(h.kind == "dense" for h in out.layers[0])


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("padded", [False, True])
def test_capture_runs_sliding_layers_exactly_through_the_streaming_kernel(
    monkeypatch, softcap, padded
):
    """A hybrid model's capture computes its local layers with the streaming kernel (O(N W), so
    long calibration prompts stay affordable) and captures the same Q/K/V as transformers' own
    full sliding-window mask with dense attention."""
    import minference_kernels
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from transformers.masking_utils import sdpa_mask

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=HEAD_DIM, attn_logit_softcapping=softcap, sliding_window=40,
                       layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0,
                       attn_implementation="eager")  # fmt: skip
    model = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 200), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :50] = 0  # left padding of the second sample
    calls = []
    real = minference_kernels.streaming_attention

    def spy(*a, **kw):
        calls.append(a[3:5])
        return real(*a, **kw)

    monkeypatch.setattr(minference_kernels, "streaming_attention", spy)
    got = list(minference_hf.capture_qkv(model, ids, attention_mask=mask))
    assert calls and all(c == (0, 40) for c in calls)
    assert len(calls) == 2 * (2 if padded else 1)  # two sliding layers, per sample when padded
    # the reference: transformers' own full sliding-window mask (register() re-registers ours)
    monkeypatch.setattr(minference_hf.patching, "minference_mask", sdpa_mask)
    ref = list(minference_hf.capture_qkv(model, ids, attention_mask=mask))
    assert len(calls) == 2 * (2 if padded else 1)  # the reference never streams
    valid = mask.bool()
    for a, b in zip(got, ref, strict=True):
        for x, y in ((a.q, b.q), (a.k, b.k), (a.v, b.v)):
            torch.testing.assert_close(
                x.transpose(1, 2)[valid], y.transpose(1, 2)[valid], atol=2e-5, rtol=1e-4
            )
