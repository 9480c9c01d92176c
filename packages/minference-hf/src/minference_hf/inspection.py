"""Model inspection for the layer-by-layer pre-fill: checks that a model has the supported decoder
layout (Llama family) and collects the parts :func:`~minference_hf.long_prefill` runs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from minference_patterns.model_shape import read_model_shape, text_config

from .patching import UnsupportedModelError

_LAYER_CHILDREN = {
    "input_layernorm",
    "self_attn",
    "post_attention_layernorm",
    "mlp",
    "resid_attn_dropout",
    "resid_mlp_dropout",
}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm"}


@dataclass
class _Model:
    embed: torch.nn.Module
    embed_weight: torch.Tensor  # [vocab, hidden]
    # decoder layers of the model's own class: _inspect checks their children by name, which the
    # type system cannot see, so their attributes are looked up untyped
    layers: list[Any]
    norm: torch.nn.Module
    rotary: torch.nn.Module
    lm_head: torch.nn.Module
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def _fail(msg: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"long_prefill: {msg}")


def _inspect(model: torch.nn.Module) -> _Model:
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise _fail(
            f"{type(model).__name__} has no `model.layers` decoder stack; supported: causal LMs "
            "of the Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3)"
        )
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if getattr(base, name, None) is None:
            raise _fail(f"{type(base).__name__} has no `{name}`")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise _fail(f"{type(model).__name__} has no `lm_head` (pass the *ForCausalLM model)")
    config: Any = model.config  # a transformers PretrainedConfig (nn.Module attributes are untyped)
    try:
        shape = read_model_shape(config)
    except ValueError as e:
        raise _fail(f"{type(model).__name__}: {e}") from e
    cfg = text_config(config)
    for attr, what in (
        ("final_logit_softcapping", "final logit soft-capping"),
        ("attn_logit_softcapping", "attention logit soft-capping"),
        ("logit_scale", "a logit scale"),
    ):
        if getattr(shape, attr) not in (None, 1.0):
            raise _fail(f"{type(model).__name__} uses {what} ({attr}), which it does not apply")
    layers = list(base.layers)
    for i, layer in enumerate(layers):
        extra = {n for n, _ in layer.named_children()} - _LAYER_CHILDREN
        if extra:
            raise _fail(
                f"decoder layer {i} ({type(layer).__name__}) has submodules {sorted(extra)} beyond "
                "the Llama layout (input_layernorm, self_attn, post_attention_layernorm, mlp)"
            )
        for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if getattr(layer, n, None) is None:
                raise _fail(f"decoder layer {i} ({type(layer).__name__}) has no `{n}`")
        attn = layer.self_attn
        extra = {n for n, _ in attn.named_children()} - _ATTN_CHILDREN
        if extra:
            raise _fail(
                f"attention of layer {i} ({type(attn).__name__}) has submodules {sorted(extra)} "
                "beyond q/k/v/o projections and q/k norms"
            )
        if getattr(attn, "qkv_proj", None) is None and not all(
            getattr(attn, n, None) is not None for n in ("q_proj", "k_proj", "v_proj")
        ):
            raise _fail(f"attention of layer {i} has neither q/k/v_proj nor qkv_proj")
        if getattr(attn, "o_proj", None) is None:
            raise _fail(f"attention of layer {i} has no o_proj")
        if not hasattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb"):
            raise _fail(f"{type(attn).__module__} defines no apply_rotary_pos_emb")
    embed_weight = getattr(base.embed_tokens, "weight", None)
    if not isinstance(embed_weight, torch.Tensor):
        raise _fail(f"{type(base.embed_tokens).__name__} (embed_tokens) has no weight tensor")
    # the attention module's own head size where it keeps one (what its projections produce)
    head_dim = int(getattr(layers[0].self_attn, "head_dim", shape.head_dim))
    return _Model(
        embed=base.embed_tokens,
        embed_weight=embed_weight,
        layers=layers,
        norm=base.norm,
        rotary=base.rotary_emb,
        lm_head=lm_head,
        hidden=int(cfg.hidden_size),
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=head_dim,
        intermediate=int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
        vocab=int(cfg.vocab_size),
    )


def _check_window(attn: torch.nn.Module, config: Any, layer: int, n: int) -> None:
    # Qwen2 sets the window per attention module (None on full-attention layers); Mistral and
    # Phi-3 keep it in the config only
    window: Any
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < n:
        raise _fail(
            f"layer {layer} uses sliding-window attention (window {window} < {n} tokens); "
            "long_prefill computes full causal attention only"
        )
