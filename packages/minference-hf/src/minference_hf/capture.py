"""Capture of per-layer post-RoPE Q/K/V for the offline pattern search.

The capture goes through the same extension point as the sparse path: for the duration of a
forward pass the model runs ``attn_implementation="minference_capture"``, whose attention function
hands ``query`` / ``key`` / ``value`` (after RoPE, exactly what attention sees) to a hook and then
computes dense SDPA. The forward pass runs in a worker thread and hands over one layer at a time,
so a consumer that processes layers in order (the search) never holds more than about three
layers' tensors.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .attention import CAPTURE_IMPLEMENTATION, _layer_idx
from .patching import _attention_modules, _set_impl, attention_shape, register

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import PreTrainedModel

_HOOK_ATTR = "_minference_capture_hook"


@dataclass(frozen=True)
class CapturedLayer:
    """Post-RoPE attention inputs of one layer.

    Attributes:
        layer: layer index (``module.layer_idx``).
        q: ``[B, Hq, N, D]``.
        k: ``[B, Hkv, N, D]``.
        v: ``[B, Hkv, N, D]``.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class _Stopped(Exception):
    pass


def capture_qkv(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    to_device: torch.device | str | None = None,
) -> Iterator[CapturedLayer]:
    """Run one forward pass of ``model`` on ``input_ids`` and yield each layer's Q/K/V in order.

    Args:
        model: a transformers decoder model whose attention uses the interface (patched or not;
            its attention implementation is restored afterwards).
        input_ids: ``[B, N]`` token ids (the search uses ``B = 1``).
        attention_mask: optional ``[B, N]`` padding mask.
        to_device: copy the tensors there (e.g. ``"cpu"``) before yielding; default: leave them
            where the model computed them.

    Yields:
        :class:`CapturedLayer` per attention layer, in execution order. The forward pass of the
        next layer runs while the consumer works on the current one; closing the generator early
        stops the forward pass.
    """
    register()
    modules = _attention_modules(model)
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> None:
        while True:
            if stop.is_set():
                raise _Stopped
            try:
                handoff.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def hook(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if to_device is not None:
            q, k, v = q.to(to_device), k.to(to_device), v.to(to_device)
        put(("layer", CapturedLayer(_layer_idx(module), q.detach(), k.detach(), v.detach())))

    runner = getattr(model, "base_model", model)

    def work() -> None:
        try:
            with torch.no_grad():
                runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            put(("done", None))
        except _Stopped:
            pass
        except BaseException as e:  # handed to the consumer, re-raised there
            try:
                put(("error", e))
            except _Stopped:
                pass

    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    for m in modules:
        setattr(m, _HOOK_ATTR, hook)
    _set_impl(model, CAPTURE_IMPLEMENTATION)
    thread = threading.Thread(target=work, name="minference-capture", daemon=True)
    try:
        thread.start()
        while True:
            kind, payload = handoff.get()
            if kind == "layer":
                yield payload
            elif kind == "error":
                raise payload
            else:
                break
    finally:
        stop.set()
        thread.join()
        for m in modules:
            if _HOOK_ATTR in m.__dict__:
                delattr(m, _HOOK_ATTR)
        _set_impl(model, previous)


def search_model_config(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    model_id: str | None = None,
    budget: float | None = None,
    seed: int = 0,
    calibration: str | None = None,
    progress: bool = True,
    **search_kwargs: Any,
) -> PatternConfig:
    """Capture ``model``'s Q/K/V on a calibration prompt and search a pattern config.

    Streams :func:`capture_qkv` layer by layer into :func:`minference_patterns.search_config`.

    Args:
        model: the model to search for.
        input_ids: ``[1, N]`` calibration tokens.
        model_id: stored in the config (default: the model's own id).
        budget: the search's compute budget (fraction of dense attention cost; the search's
            default when ``None``).
        seed: search seed.
        calibration: description of the calibration prompt, stored in the config's provenance.
        progress: let the search report progress on stderr.
        search_kwargs: passed to :func:`minference_patterns.search_config` (``objective``,
            ``min_score``, ``num_rows``, ...).

    Sliding-window layers (``config.layer_types``) are not searched: their attention is local by
    construction, so every head of such a layer is ``dense`` in the config (at inference it runs
    exactly through the streaming kernel with the model's window) and the provenance lists them.
    A model with attention-logit soft-capping (Gemma-2's ``attn_logit_softcapping``) is searched
    on its capped attention (``softcap`` is passed to the search).
    """
    import minference_patterns
    from minference_kernels import HeadPattern

    from .patching import _sliding_layer_ids

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"calibration input_ids must be [1, N], got {tuple(input_ids.shape)}")
    shape = attention_shape(model)
    if model_id is None:
        model_id = getattr(model.config, "_name_or_path", "") or "custom"
        model_id = (
            os.path.basename(os.path.normpath(model_id)) if os.path.isdir(model_id) else model_id
        )
    modules = _attention_modules(model)
    # attributes of the model's own attention classes (untyped)
    scales: list[Any] = [m.scaling for m in modules if hasattr(m, "scaling")]
    caps: set[Any] = {getattr(m, "attn_logit_softcapping", None) for m in modules}
    layers = ((c.q, c.k, c.v) for c in capture_qkv(model, input_ids))
    kwargs: dict[str, Any] = {
        "model_id": model_id,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "num_layers": shape.num_layers,
        "calibration": calibration or f"{input_ids.shape[1]}-token prompt",
        "seed": seed,
        "progress": progress,
    }
    if scales:
        kwargs["scale"] = float(scales[0])
    if len(caps) > 1:
        raise ValueError(f"attention layers disagree on attn_logit_softcapping: {sorted(caps)}")
    cap = next(iter(caps), None)
    if cap is not None:  # Gemma-2: the search measures the capped attention, as inference runs it
        kwargs["softcap"] = float(cap)
    if budget is not None:
        kwargs["budget"] = budget
    sliding = _sliding_layer_ids(model)
    if sliding:
        kwargs["fixed"] = dict.fromkeys(sliding, HeadPattern.dense())
    kwargs.update(search_kwargs)
    return minference_patterns.search_config(layers, **kwargs)
