"""Read a model's attention shape from its configuration: the one reader both integrations use.

minference-hf (``patch``, the layer-by-layer pre-fill, capture) and minference-vllm (the engine's
model check) read layers, query heads, KV heads, head size, sliding-window layers and logit
soft-capping from the same kind of object: a transformers ``PretrainedConfig`` (vLLM's
``model_config.hf_config`` is one). Any object with the same attributes works, and so does a
parsed ``config.json`` (a mapping; the Qwen importer reads one); this module does not import
transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelShape", "read_model_shape", "text_config"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a whole (unsplit) decoder model, read by :func:`read_model_shape`.

    The first four fields are what a :class:`~minference_patterns.PatternConfig` is checked
    against (``PatternConfig.validate_against``); the others describe layers and features that
    change which attention a layer computes. Attention inputs are ``q [B, num_heads, N,
    head_dim]``, ``k, v [B, num_kv_heads, N, head_dim]`` in every one of ``num_layers`` layers.

    Attributes:
        num_layers: decoder layers (``num_hidden_layers``).
        num_heads: query heads per layer (``num_attention_heads``).
        num_kv_heads: key/value heads per layer (``num_key_value_heads``; equal to ``num_heads``
            when the config does not set it: multi-head attention).
        head_dim: size of one head (``head_dim``; ``hidden_size // num_heads`` when unset).
        sliding_window: the window of the sliding-window (local) layers, ``None`` when there are
            none.
        sliding_layers: indices of the sliding-window layers, ascending: those whose
            ``layer_types`` entry names sliding or local attention; every layer for a model with a
            ``sliding_window`` and no ``layer_types`` (Mistral), unless ``use_sliding_window`` is
            false (Qwen2).
        attn_logit_softcapping: the attention-logit cap ``c`` of ``c * tanh(logits / c)``
            (Gemma-2), ``None`` when not capped.
        final_logit_softcapping: the cap on the output logits (Gemma-2), ``None`` when not capped.
        logit_scale: a factor on the output logits (Cohere), ``None`` when the config has none.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    logit_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _positive_int(name, getattr(self, name))
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if list(self.sliding_layers) != sorted(set(self.sliding_layers)) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.sliding_layers
        ):
            raise ValueError(
                "sliding_layers must be ascending, distinct, non-negative layer indices, got "
                f"{self.sliding_layers!r}"
            )
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "logit_scale"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number or None, got {value!r}")

    @property
    def full_attention_layers(self) -> list[int]:
        """The layers whose attention is global (not sliding-window), ascending."""
        local = set(self.sliding_layers)
        return [i for i in range(self.num_layers) if i not in local]


class _JsonConfig:
    """A parsed ``config.json`` read like a config object: keys as attributes (``None`` when
    absent), and ``get_text_config`` returning its ``text_config`` object when it has one."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._data.get(name)

    def get_text_config(self, decoder: bool = True) -> Any:
        sub = self._data.get("text_config")
        return _JsonConfig(sub) if isinstance(sub, Mapping) else self


def text_config(config: Any) -> Any:
    """The decoder text config inside ``config`` (``config`` itself for a plain language model).

    A multimodal config (Gemma-3, Llava, ...) holds its language model's settings in a sub-config
    that transformers' ``get_text_config(decoder=True)`` returns (in a parsed ``config.json``: its
    ``text_config`` object); objects without that method are returned as they are.
    """
    if isinstance(config, Mapping):
        config = _JsonConfig(config)
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:  # an older get_text_config without the keyword
        return get()


def _sliding_layers(tc: Any, num_layers: int) -> tuple[int, ...]:
    layer_types = getattr(tc, "layer_types", None)
    if layer_types:
        return tuple(
            i for i, t in enumerate(layer_types) if "sliding" in str(t) or "local" in str(t)
        )
    if getattr(tc, "sliding_window", None) is not None and getattr(tc, "use_sliding_window", True):
        return tuple(range(num_layers))
    return ()


def _optional_float(tc: Any, name: str) -> float | None:
    value = getattr(tc, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config field {name} must be a number or None, got {value!r}")
    return float(value)


def read_model_shape(config: Any) -> ModelShape:
    """The :class:`ModelShape` of a model from its configuration.

    Args:
        config: a transformers ``PretrainedConfig`` (``model.config``; vLLM's
            ``model_config.hf_config``) or its text config, any object with the same
            attributes, or a parsed ``config.json`` (a mapping). Multimodal configs are read
            through :func:`text_config`.

    Returns:
        The shape. A missing ``num_key_value_heads`` (or ``None``) means multi-head attention
        (as many KV heads as query heads); a missing ``head_dim`` means ``hidden_size //
        num_attention_heads``.

    Raises:
        ValueError: the config has no ``num_hidden_layers`` / ``num_attention_heads`` (not a
            decoder language model), or a field has an impossible value (named in the message).
    """
    tc = text_config(config)
    layers = getattr(tc, "num_hidden_layers", None)
    heads = getattr(tc, "num_attention_heads", None)
    if layers is None or heads is None:
        raise ValueError(
            "config has no num_hidden_layers / num_attention_heads; not a decoder language model"
        )
    layers = _positive_int("num_hidden_layers", layers)
    heads = _positive_int("num_attention_heads", heads)
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None)
    if not head_dim:
        hidden = getattr(tc, "hidden_size", None)
        if hidden is None:
            raise ValueError("config has neither head_dim nor hidden_size")
        head_dim = _positive_int("hidden_size", hidden) // heads
    sliding = _sliding_layers(tc, layers)
    window = getattr(tc, "sliding_window", None) if sliding else None
    return ModelShape(
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_positive_int("num_key_value_heads", kv),
        head_dim=_positive_int("head_dim", head_dim),
        sliding_window=window,
        sliding_layers=sliding,
        attn_logit_softcapping=_optional_float(tc, "attn_logit_softcapping"),
        final_logit_softcapping=_optional_float(tc, "final_logit_softcapping"),
        logit_scale=_optional_float(tc, "logit_scale"),
    )
