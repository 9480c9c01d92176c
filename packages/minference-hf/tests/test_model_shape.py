"""The model-shape reader minference-hf shares with minference-vllm
(:func:`minference_patterns.read_model_shape`), on real transformers configs: what it reads must
be what the model's own attention modules were built with."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS, make_model
from minference_hf.inspection import _inspect
from minference_hf.patching import (
    UnsupportedModelError,
    _sliding_layer_ids,
    _sliding_layers,
    attention_shape,
    full_attention_layers,
)
from minference_patterns import ModelShape, read_model_shape


def _module_facts(model: torch.nn.Module) -> tuple[int, int, int, list[int]]:
    """(layers, KV groups, head dim, sliding layers) as the attention modules hold them."""
    attns = [layer.self_attn for layer in model.model.layers]
    sliding = [i for i, a in enumerate(attns) if getattr(a, "sliding_window", None)]
    return len(attns), attns[0].num_key_value_groups, attns[0].head_dim, sliding


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shape_matches_the_attention_modules(arch):
    model = make_model(arch)
    shape = attention_shape(model)
    layers, groups, head_dim, _ = _module_facts(model)
    assert (shape.num_layers, shape.num_heads // shape.num_kv_heads, shape.head_dim) == (
        layers,
        groups,
        head_dim,
    )
    m = _inspect(model)  # the layer-by-layer pre-fill reads the same shape
    assert (m.num_heads, m.num_kv_heads, m.head_dim) == (
        shape.num_heads,
        shape.num_kv_heads,
        shape.head_dim,
    )


def test_no_kv_heads_in_the_config_is_multi_head_attention():
    model = make_model("llama", num_key_value_heads=None)
    assert attention_shape(model).num_kv_heads == attention_shape(model).num_heads == 4
    assert _module_facts(model)[1] == 1


def test_qwen2_window_switched_on_for_upper_layers_only():
    model = make_model(
        "qwen2", num_hidden_layers=4, sliding_window=64, use_sliding_window=True,
        max_window_layers=2,
    )  # fmt: skip
    shape = attention_shape(model)
    assert list(shape.sliding_layers) == _module_facts(model)[3] == [2, 3]
    assert _sliding_layers(model) == (64, 2) and full_attention_layers(model) == [0, 1]
    off = make_model("qwen2", sliding_window=64)  # use_sliding_window defaults to False
    assert attention_shape(off).sliding_layers == () and _sliding_layers(off) == (None, 0)


def test_gemma_per_layer_types_and_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma2Config(
        vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=80, sliding_window=32,
        layer_types=types, attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    shape = attention_shape(model)
    assert shape == ModelShape(
        3, 4, 1, 80, sliding_window=32, sliding_layers=(0, 2), attn_logit_softcapping=20.0,
        final_logit_softcapping=15.0,
    )  # fmt: skip
    assert _module_facts(model) == (3, 4, 80, [0, 2])
    assert _sliding_layer_ids(model) == [0, 2] and full_attention_layers(model) == [1]
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        _inspect(model)  # the layer-by-layer path does not apply the caps: refused


def test_multimodal_config_is_read_through_its_text_config():
    """vLLM's ``hf_config`` of Gemma-3 is the multimodal Gemma3Config."""
    from transformers import Gemma3Config, Gemma3TextConfig

    text = Gemma3TextConfig(
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_size=640, sliding_window=512,
    )  # fmt: skip
    shape = read_model_shape(Gemma3Config(text_config=text.to_dict()))
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (6, 4, 1, 256)
    assert shape.sliding_window == 512 and shape.full_attention_layers == [5]


def test_not_a_decoder_config_is_unsupported():
    class Encoder(torch.nn.Module):
        config = SimpleNamespace(hidden_size=64, num_layers=2)  # no decoder fields

    with pytest.raises(UnsupportedModelError, match="Encoder: config has no num_hidden_layers"):
        attention_shape(Encoder())  # type: ignore[arg-type]


@pytest.mark.real_model
@pytest.mark.skipif(os.environ.get("MINFERENCE_SKIP_REAL_MODEL") == "1", reason="skip real model")
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("smollm2-135m", ModelShape(30, 9, 3, 64)),
        (
            "gemma3-270m",
            ModelShape(
                18, 4, 1, 256, sliding_window=512,
                sliding_layers=tuple(i for i in range(18) if i % 6 != 5),
            ),
        ),
    ],
)  # fmt: skip
def test_shipped_gguf_configs(name, expected):
    """The two trained models minference-hf runs (their GGUF files, config only)."""
    from minference_hf.models import KNOWN_MODELS, resolve_model_file
    from transformers import AutoConfig

    path = resolve_model_file(KNOWN_MODELS[name])
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert read_model_shape(config) == expected
