"""read_model_shape: the one reader of a model's attention shape (minference-hf and -vllm use it).

Here on plain objects shaped like transformers configs, for the odd cases each former copy
handled; minference-hf's tests read real transformers and GGUF configs through it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from minference_patterns import ModelShape, read_model_shape, text_config


def cfg(**kw):
    base = dict(num_hidden_layers=4, num_attention_heads=8, hidden_size=512)
    base.update(kw)
    return SimpleNamespace(**base)


def test_plain_gqa_config():
    s = read_model_shape(cfg(num_key_value_heads=2, head_dim=96))
    assert s == ModelShape(4, 8, 2, 96)
    assert s.sliding_layers == () and s.sliding_window is None
    assert s.full_attention_layers == [0, 1, 2, 3]
    assert s.attn_logit_softcapping is None and s.final_logit_softcapping is None


@pytest.mark.parametrize("kv", ["absent", None, 0])
def test_missing_kv_heads_is_multi_head_attention(kv):
    c = cfg() if kv == "absent" else cfg(num_key_value_heads=kv)
    assert read_model_shape(c).num_kv_heads == 8


@pytest.mark.parametrize("head_dim", ["absent", None, 0])
def test_missing_head_dim_is_hidden_over_heads(head_dim):
    c = cfg(hidden_size=640) if head_dim == "absent" else cfg(hidden_size=640, head_dim=head_dim)
    assert read_model_shape(c).head_dim == 80


def test_explicit_head_dim_wins_over_hidden_size():  # Gemma, Qwen3: head_dim * heads != hidden
    assert read_model_shape(cfg(head_dim=256, hidden_size=640)).head_dim == 256


def test_per_layer_types():
    types = ["sliding_attention"] * 2 + ["full_attention"] + ["local"] + ["chunked_attention"]
    s = read_model_shape(cfg(num_hidden_layers=5, layer_types=types, sliding_window=512))
    assert s.sliding_layers == (0, 1, 3) and s.sliding_window == 512
    assert s.full_attention_layers == [2, 4]


def test_all_full_layer_types_have_no_window_even_if_the_config_sets_one():  # Qwen2
    s = read_model_shape(cfg(layer_types=["full_attention"] * 4, sliding_window=4096))
    assert s.sliding_layers == () and s.sliding_window is None


def test_window_without_layer_types_is_every_layer_unless_switched_off():
    assert read_model_shape(cfg(sliding_window=64)).sliding_layers == (0, 1, 2, 3)  # Mistral
    off = read_model_shape(cfg(sliding_window=64, use_sliding_window=False))
    assert off.sliding_layers == () and off.sliding_window is None
    assert read_model_shape(cfg(sliding_window=None)).sliding_layers == ()


def test_soft_capping_and_logit_scale():
    s = read_model_shape(
        cfg(attn_logit_softcapping=50, final_logit_softcapping=30.0, logit_scale=0.0625)
    )
    assert (s.attn_logit_softcapping, s.final_logit_softcapping, s.logit_scale) == (
        50.0,
        30.0,
        0.0625,
    )
    assert isinstance(s.attn_logit_softcapping, float)


class _Multimodal:
    """Like a transformers multimodal config: the decoder's settings in a text sub-config."""

    def __init__(self, text, keyword=True):
        self.text, self.keyword = text, keyword
        self.num_hidden_layers = 99  # a vision tower's, say: must not be read

    def get_text_config(self, *args, **kwargs):
        if kwargs and not self.keyword:
            raise TypeError("unexpected keyword argument 'decoder'")
        assert not kwargs or kwargs == {"decoder": True}
        return self.text


@pytest.mark.parametrize("keyword", [True, False])
def test_multimodal_configs_are_read_through_their_text_config(keyword):
    text = cfg(num_key_value_heads=4)
    mm = _Multimodal(text, keyword=keyword)
    assert text_config(mm) is text
    assert read_model_shape(mm) == ModelShape(4, 8, 4, 64)
    assert text_config(text) is text


@pytest.mark.parametrize(
    ("c", "match"),
    [
        (SimpleNamespace(num_attention_heads=8, hidden_size=512), "num_hidden_layers"),
        (SimpleNamespace(num_hidden_layers=4, hidden_size=512), "num_attention_heads"),
        (cfg(num_hidden_layers=None), "not a decoder language model"),
        (cfg(num_attention_heads=0), "num_attention_heads must be a positive integer"),
        (cfg(num_hidden_layers=2.0), "num_hidden_layers must be a positive integer"),
        (SimpleNamespace(num_hidden_layers=2, num_attention_heads=8), "neither head_dim nor"),
        (cfg(hidden_size=4), "head_dim must be a positive integer"),  # 4 // 8 == 0
        (cfg(num_key_value_heads=-2), "num_key_value_heads"),
        (cfg(sliding_window="wide"), "sliding_window"),
        (cfg(attn_logit_softcapping="50"), "attn_logit_softcapping"),
        (cfg(attn_logit_softcapping=float("nan")), "attn_logit_softcapping"),
    ],
)
def test_bad_configs_name_the_field(c, match):
    with pytest.raises(ValueError, match=match):
        read_model_shape(c)


def test_shape_validates_its_fields():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape(2, 4, 0, 64)
    with pytest.raises(ValueError, match="sliding_layers"):
        ModelShape(2, 4, 2, 64, sliding_window=8, sliding_layers=(1, 0))


def test_parsed_config_json_reads_like_a_config_object():
    """A parsed config.json (the Qwen importer's input) goes through the same reader."""
    plain = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 640,
             "num_key_value_heads": 2, "layer_types": ["sliding_attention", "full_attention"] * 2,
             "sliding_window": 512}  # fmt: skip
    s = read_model_shape(plain)
    assert s == read_model_shape(SimpleNamespace(**plain))
    assert (s.num_kv_heads, s.head_dim, s.sliding_layers, s.sliding_window) == (2, 80, (0, 2), 512)
    nested = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": plain}
    assert read_model_shape(nested) == s and text_config(nested).num_hidden_layers == 4
    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer"):
        read_model_shape(dict(plain, num_attention_heads="8"))
