"""register / patch / unpatch: plugging MInference into a transformers model."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from minference_kernels.options import PrefillOptions
from minference_patterns.model_shape import ModelShape, read_model_shape
from minference_patterns.model_shape import text_config as read_text_config

from .attention import (
    CAPTURE_IMPLEMENTATION,
    IMPLEMENTATION,
    UnsupportedAttentionError,
    capture_attention,
    minference_attention,
    minference_mask,
)
from .plan import SparsePrefillPlan

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import PreTrainedModel

logger = logging.getLogger("minference_hf")

_PLAN_ATTR = "_minference_plan"


class UnsupportedModelError(ValueError):
    """The model cannot run MInference sparse pre-fill (architecture or feature not supported)."""


def register() -> None:
    """Register the ``"minference"`` attention and mask functions with transformers.

    Registers :func:`minference_hf.attention.minference_attention` with ``AttentionInterface`` and
    :func:`minference_hf.attention.minference_mask` with ``AttentionMaskInterface`` (without the
    latter transformers builds no mask for an unknown implementation and padding is silently
    ignored), plus the ``"minference_capture"`` pair used by :func:`minference_hf.capture_qkv`.
    Idempotent; :func:`patch` calls it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, minference_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, minference_mask)
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, minference_mask)


def text_config(model: PreTrainedModel) -> Any:
    """The decoder text config of ``model`` (the config itself for plain language models)."""
    return read_text_config(model.config)


def attention_shape(model: PreTrainedModel) -> ModelShape:
    """Layers, query heads, KV heads, head dim, sliding-window layers and soft-capping of
    ``model``'s self-attention (:func:`minference_patterns.read_model_shape` of its config).

    Raises:
        UnsupportedModelError: the config is not a decoder language model's.
    """
    try:
        return read_model_shape(model.config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {e}; minference cannot patch it"
        ) from e


def _check_architecture(model: PreTrainedModel) -> None:
    name = type(model).__name__
    cfg = model.config
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        raise UnsupportedModelError(
            f"{name} does not route its attention through transformers' AttentionInterface, so "
            "minference cannot plug into it (models such as Bloom, GPT-Neo, Falcon use their own "
            "attention code). Supported: decoder models whose attention calls the interface "
            "(Llama, Mistral, Qwen2/3, Phi-3, ...)."
        )
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; minference supports causal decoder models only"
        )
    tc = text_config(model)
    if not getattr(tc, "is_causal", True):
        raise UnsupportedModelError(
            f"{name} is configured for non-causal attention (config.is_causal=False); minference "
            "supports causal decoder self-attention only"
        )
    if getattr(tc, "alibi", False) or getattr(tc, "use_alibi", False):
        raise UnsupportedModelError(
            f"{name} uses ALiBi position biases, which the sparse kernels do not support"
        )


def _sliding_layers(model: PreTrainedModel) -> tuple[int | None, int]:
    """``(window, number of sliding-window layers)`` as the config declares them."""
    shape = attention_shape(model)
    return shape.sliding_window, len(shape.sliding_layers)


def _sliding_layer_ids(model: PreTrainedModel) -> list[int]:
    """Indices of the layers the config declares as sliding-window (local) attention."""
    return list(attention_shape(model).sliding_layers)


def _local_layers_dense(
    config: PatternConfig, model: PreTrainedModel
) -> tuple[PatternConfig, list[int]]:
    """``config`` with every sliding-window layer dense, and the layers that were not: those
    layers run exactly through the streaming kernel whatever their patterns say."""
    from minference_kernels import HeadPattern

    sliding = [i for i in _sliding_layer_ids(model) if i < config.num_layers]
    changed = [i for i in sliding if any(h.kind != "dense" for h in config.layers[i])]
    if not changed:
        return config, []
    dense = (HeadPattern.dense(),) * config.num_heads
    layers = tuple(dense if i in changed else heads for i, heads in enumerate(config.layers))
    return config.replace(layers=layers), changed


def full_attention_layers(model: PreTrainedModel) -> list[int]:
    """The layers whose attention is global (not sliding-window): what densities are counted over."""
    return attention_shape(model).full_attention_layers


def resolve_config(
    config: PatternConfig | str | os.PathLike[str] | None, model: PreTrainedModel | None = None
) -> PatternConfig:
    """Turn ``config`` into a :class:`minference_patterns.PatternConfig`.

    Args:
        config: a ``PatternConfig``; a path to a config file; the model id of a config shipped with
            minference-patterns; or ``None`` to look up ``model``'s own id
            (``model.config._name_or_path``).
        model: needed when ``config`` is ``None``.

    Raises:
        ValueError: the model has no id, or no shipped config matches it; the message lists the
            shipped ids and says how to search a config. For a string ``config`` that is neither
            a file nor a shipped id, ``minference_patterns.UnknownModelError`` (a ``KeyError``
            and ``ValueError``) or ``FileNotFoundError`` (a missing ``.json`` path).
    """
    import minference_patterns
    from minference_patterns import PatternConfig

    if isinstance(config, PatternConfig):
        return config
    if config is None:
        if model is None:
            raise ValueError("config=None needs the model to look up its id")
        model_id = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not model_id:
            raise ValueError(
                f"{type(model).__name__} has no model id (built from a config, not loaded with "
                "from_pretrained), so no shipped pattern config can be found: pass "
                "config=PatternConfig | path | shipped model id, or make one with `minference "
                "search`"
            )
        candidates = [str(model_id)]
        if os.path.isdir(str(model_id)):
            candidates.append(os.path.basename(os.path.normpath(str(model_id))))
        last: Exception | None = None
        for cand in candidates:
            try:
                return minference_patterns.load(cand)
            except (KeyError, FileNotFoundError) as e:  # UnknownModelError is a KeyError
                last = e
        raise ValueError(
            f"config=None: no pattern config found for this model's id {str(model_id)!r}. "
            f"Pass config=PATH or a shipped model id. ({last})"
        ) from last
    if isinstance(config, (str, os.PathLike)):
        return minference_patterns.load(config)
    raise TypeError(
        f"config must be a PatternConfig, a path or a model id, got {type(config).__name__}"
    )


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def get_plan(model: torch.nn.Module) -> SparsePrefillPlan | None:
    """The :class:`SparsePrefillPlan` of a patched model, or ``None``."""
    plan = getattr(model, "minference_plan", None)
    return plan if isinstance(plan, SparsePrefillPlan) else None


def _set_impl(model: PreTrainedModel, impl: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(impl)
    else:  # older transformers: the config attribute is the switch
        model.config._attn_implementation = impl


def _dry_run(model: PreTrainedModel, plan: SparsePrefillPlan, shape: ModelShape) -> None:
    """Run two tokens through the model and check every attention call reached our function."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids = torch.tensor([[1, 2]], dtype=torch.long, device=device)
    plan.stats.reset()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    seen = set(plan.stats.seen_layers)
    plan.stats.reset()
    if not seen:
        raise UnsupportedModelError(
            f"{type(model).__name__} accepted attn_implementation={IMPLEMENTATION!r} but never "
            "called it: its attention does not go through transformers' AttentionInterface"
        )
    extra = sorted(i for i in seen if i >= shape.num_layers)
    if extra:
        raise UnsupportedModelError(
            f"attention calls came from layer indices {extra} but the pattern config has "
            f"{shape.num_layers} layers"
        )
    missing = sorted(set(range(shape.num_layers)) - seen)
    if missing:
        logger.info(
            "minference: layers %s have no attention call through the interface (hybrid "
            "model?); they are left as they are",
            missing,
        )


def patch(
    model: PreTrainedModel,
    config: PatternConfig | str | os.PathLike[str] | None = None,
    *,
    options: PrefillOptions | None = None,
    verify: bool = True,
    **settings: Any,
) -> PreTrainedModel:
    """Switch ``model`` to ``attn_implementation="minference"`` with a per-layer, per-head plan.

    No forward method is replaced: the model keeps calling transformers' attention interface, and
    the registered ``minference`` function takes the sparse path for long pre-fills (at least
    ``min_sparse_len`` keys and ``min_sparse_query`` new tokens) and dense SDPA otherwise (decode
    steps, short prompts).

    Args:
        model: a transformers causal LM (or base model) whose attention uses the interface.
        config: a :class:`minference_patterns.PatternConfig`, a path to one, the model id of a
            shipped config, or ``None`` to use the model's own id.
        options: the sparse pre-fill settings (:class:`minference_kernels.PrefillOptions`:
            ``min_sparse_len``, ``min_sparse_query``, ``last_q``, ``backend``, ``coverage``,
            ``block_allocation``, ``max_density``; its docstring gives each one's meaning and
            default). ``None``: the defaults.
        verify: run a 2-token forward to check every layer reaches the ``minference`` function
            (raises :class:`UnsupportedModelError` otherwise, and restores the previous setting).
        **settings: single settings by their ``PrefillOptions`` name, applied over ``options``
            (``patch(model, min_sparse_len=8192)`` is ``options=PrefillOptions(min_sparse_len=8192)``).
            An unknown name raises ``TypeError``, a bad value ``TypeError``/``ValueError``, both
            naming the setting.

    Returns:
        ``model`` itself (patched in place); its plan is ``model.minference_plan``.

    Raises:
        UnsupportedModelError: the architecture or one of its features is not supported.
        ValueError: the config does not match the model (layers, heads, KV heads, head dim) or
            cannot be found.
    """
    if options is not None and not isinstance(options, PrefillOptions):
        raise TypeError(
            f"options must be a minference_kernels.PrefillOptions, got {type(options).__name__}"
        )
    opts = options or PrefillOptions()
    if settings:
        opts = opts.replace(**settings)  # validated before the model is touched
    register()
    _check_architecture(model)
    shape = attention_shape(model)
    pattern_config = resolve_config(config, model)
    pattern_config.validate_against(
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
    )
    window, n_sliding = _sliding_layers(model)
    pattern_config, overridden = _local_layers_dense(pattern_config, model)
    if overridden:
        logger.info(
            "minference: the config's patterns for sliding-window layers %s are not used: those "
            "layers run exactly (streaming kernel, window %s)",
            overridden,
            window,
        )
    old = get_plan(model)
    previous = (
        old.previous_attn_implementation
        if old is not None
        else getattr(model.config, "_attn_implementation", None)
    )
    if previous in (IMPLEMENTATION, CAPTURE_IMPLEMENTATION):
        previous = "sdpa"
    plan = SparsePrefillPlan(
        config=pattern_config,
        options=opts,
        previous_attn_implementation=previous,
    )
    modules = _attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention layers (layer_idx)")
    vars(model)["minference_plan"] = plan  # a plain attribute, as nn.Module.__setattr__ sets it
    for m in modules:
        setattr(m, _PLAN_ATTR, plan)
    try:
        _set_impl(model, IMPLEMENTATION)
        if getattr(model.config, "_attn_implementation", None) != IMPLEMENTATION:
            raise UnsupportedModelError(
                f"{type(model).__name__} refused attn_implementation={IMPLEMENTATION!r}: it does "
                "not support setting its attention implementation through the interface"
            )
        if verify:
            _dry_run(model, plan, shape)
    except UnsupportedAttentionError as e:
        _remove(model, previous)
        raise UnsupportedModelError(f"{type(model).__name__}: {e}") from e
    except Exception:
        _remove(model, previous)
        raise
    if n_sliding:
        logger.info(
            "minference: %s has %d sliding-window layer(s) (window %s); for prompts longer "
            "than the window they run exactly through the streaming kernel, the others by the "
            "pattern config",
            type(model).__name__,
            n_sliding,
            window,
        )
    logger.info("minference: patched %s (%s)", type(model).__name__, plan.summary())
    return model


def restore_plan(model: PreTrainedModel, plan: SparsePrefillPlan) -> PreTrainedModel:
    """Patch ``model`` again with every setting of an earlier ``plan`` (its config and its
    :class:`minference_kernels.PrefillOptions`, unchanged), e.g. after a tool unpatched it for a
    dense run."""
    return patch(model, plan.config, options=plan.options)


def _remove(model: PreTrainedModel, previous: str | None) -> None:
    for m in model.modules():
        if _PLAN_ATTR in m.__dict__:
            delattr(m, _PLAN_ATTR)
    if "minference_plan" in model.__dict__:
        del model.__dict__["minference_plan"]
    if getattr(model.config, "_attn_implementation", None) in (
        IMPLEMENTATION,
        CAPTURE_IMPLEMENTATION,
    ):
        _set_impl(model, previous or "sdpa")


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch`: restore the previous attention implementation and drop the plan.

    Raises:
        ValueError: ``model`` is not patched.
    """
    plan = get_plan(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} is not patched by minference_hf.patch")
    _remove(model, plan.previous_attn_implementation)
    return model
