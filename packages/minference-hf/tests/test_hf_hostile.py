"""Hostile inputs to ``patch`` not covered by test_patch.py: wrong config types and paths, configs
for another model's KV heads / head dim, unsupported features (ALiBi, encoder-decoder), bad plan
arguments. Each is a clear error (docs/troubleshooting.md) and leaves the model unpatched."""

from __future__ import annotations

import minference_hf
import pytest
from conftest import HEAD_DIM, HEADS, KV_HEADS, LAYERS, make_model
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig


def config(**kw):
    args = dict(num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    args.update(kw)
    return PatternConfig.uniform(LAYERS, HEADS, HeadPattern.vertical_slash(64, 256), **args)


@pytest.mark.parametrize(
    "make_cfg,exc,words",
    [
        (lambda: 42, TypeError, "config must be a PatternConfig, a path or a model id, got int"),
        (lambda: "/nonexistent/dir/p.json", FileNotFoundError, "no such pattern config file"),
        (lambda: config(num_kv_heads=4), ValueError, "num_kv_heads: config has 4, model has 2"),
        (lambda: config(head_dim=128), ValueError, "head_dim: config has 128, model has 64"),
    ],
)
def test_bad_configs(make_cfg, exc, words):
    model = make_model("llama")
    with pytest.raises(exc, match=words):
        minference_hf.patch(model, make_cfg())
    assert model.config._attn_implementation != "minference"


@pytest.mark.parametrize(
    "attr,value,words",
    [("alibi", True, "ALiBi"), ("is_encoder_decoder", True, "encoder-decoder")],
)
def test_unsupported_features(attr, value, words):
    model = make_model("llama")
    setattr(model.config, attr, value)
    with pytest.raises(minference_hf.UnsupportedModelError, match=words):
        minference_hf.patch(model, config())
    assert model.config._attn_implementation != "minference"


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"last_q": 0}, "last_q must be >= 1, got 0"),
        ({"last_q": 129}, "last_q must be <= 128, got 129"),  # up front, not at the first prompt
        ({"min_sparse_len": 0}, "min_sparse_len must be >= 1, got 0"),
        ({"min_sparse_query": True}, "min_sparse_query must be an int, got bool"),
        ({"coverage": 2.0}, r"coverage must be in \(0, 1\]"),
        ({"coverage": "0.5"}, "coverage must be a number in \\(0, 1\\] or None, got str"),
        ({"coverage": True}, "coverage must be a number in \\(0, 1\\] or None, got bool"),
        ({"block_allocation": "row"}, "block_allocation must be one of 'query_block', 'head'"),
        ({"threshold": 8192}, "unknown PrefillOptions setting.*threshold"),
    ],
)
def test_bad_plan_arguments(kwargs, words):
    model = make_model("llama")
    with pytest.raises((ValueError, TypeError), match=words):
        minference_hf.patch(model, config(), **kwargs)
    assert model.config._attn_implementation != "minference"
