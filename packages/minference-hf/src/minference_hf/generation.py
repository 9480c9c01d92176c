"""Generation: timed greedy generation (pre-fill, optionally chunked or layer by layer, then
decode, with layer progress) and :func:`generate_long` (``model.generate`` after the layer-by-layer
pre-fill of :mod:`minference_hf.layerwise`).

Pre-fill asks the model for the logits of the last position only (``logits_to_keep=1``), so the
``[N, vocab]`` logits tensor of a long prompt is never materialised.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._progress import Progress
from .caches import _sync, cache_kwarg, new_cache
from .layerwise import long_prefill
from .memory import DEFAULT_CHUNK_SIZE, DEFAULT_RESERVE_TOKENS, OffloadSpec
from .patching import get_plan

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class GenerationResult:
    """Outcome of :func:`greedy_generate` (batch of one).

    Attributes:
        prompt_tokens: prompt length ``N``.
        token_ids: generated token ids (first token included, EOS included if produced).
        prefill_s: wall time of the pre-fill forward passes.
        ttft_s: time to first token (pre-fill plus picking the first token).
        decode_s: wall time of the decode steps (tokens 2..n).
        first_logits: ``[vocab]`` float32 logits of the first generated token (CPU).
        sparse_calls / dense_calls: counters of the model's minference plan for this run (0 when
            the model is not patched).
    """

    prompt_tokens: int
    token_ids: list[int]
    prefill_s: float
    ttft_s: float
    decode_s: float
    first_logits: torch.Tensor = field(repr=False)
    sparse_calls: int = 0
    dense_calls: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput over tokens 2..n (0 when fewer than two tokens)."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of pre-fill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


@contextmanager
def layer_progress(
    model: torch.nn.Module, label: str, steps: int, enabled: bool = True
) -> Iterator[Callable[[], None]]:
    """Report per-layer progress of ``steps`` forward passes through ``model`` on stderr.

    Uses forward hooks on the attention modules (nothing is replaced). Yields a function that
    closes the progress line early.
    """
    attn: list[torch.nn.Module] = []
    layer_ids: set[int] = set()
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and type(m).__name__.endswith("Attention"):
            attn.append(m)
            layer_ids.add(idx)
    layers = sorted(layer_ids)
    prog = Progress(label, len(layers) * steps, enabled=enabled and bool(layers))
    handles = []

    def hook(module: Any, args: Any, output: Any) -> None:  # one of `attn`: layer_idx is an int
        prog.update(1, note=f"layer {module.layer_idx + 1}/{len(layers)}")

    if enabled:
        handles = [m.register_forward_hook(hook) for m in attn]
    try:
        yield prog.close
    finally:
        for h in handles:
            h.remove()
        prog.close()


def _decode_text(tokenizer: Any, token_ids: list[int]) -> str:
    """``tokenizer.decode(token_ids, skip_special_tokens=True)``, checked to be one string."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if not isinstance(text, str):
        raise TypeError(
            f"{type(tokenizer).__name__}.decode returned {type(text).__name__}, not str"
        )
    return text


def greedy_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    offload_kv: OffloadSpec | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Greedy decoding of one prompt with timing.

    Args:
        model: a causal LM (patched or not).
        input_ids: ``[1, N]`` prompt ids.
        max_new_tokens: generated tokens at most.
        eos_token_id: stop after producing one of these (default: the model's generation config).
        chunk_size: pre-fill in chunks of this many tokens (each chunk attends to the cached
            ones), ``None`` for one pass.
        progress: print per-layer pre-fill progress on stderr.
        offload_kv: ``None`` pre-fills with ``model(...)``; anything else pre-fills with
            :func:`minference_hf.long_prefill` (layer by layer, chunked MLP) with this cache
            placement (``"auto"``, ``True``, ``False`` or a number of layers to offload).
            ``chunk_size`` must then be ``None``.
        prefill_chunk: tokens per chunk of :func:`~minference_hf.long_prefill` (its default when
            ``None``).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = input_ids.device
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    ck = cache_kwarg(model)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"logits_to_keep": 1} if keep else {}
    n = int(input_ids.shape[1])
    chunks = [input_ids] if not chunk_size else list(input_ids.split(int(chunk_size), dim=1))
    plan = get_plan(model)
    s0 = (plan.stats.sparse_calls, plan.stats.dense_calls) if plan else (0, 0)
    if offload_kv is not None and chunk_size:
        raise ValueError(
            "chunk_size (chunked model(...) pre-fill) and offload_kv exclude each other"
        )
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        if offload_kv is None:
            cache = new_cache(model)
            with layer_progress(model, f"pre-fill {n} tokens", len(chunks), enabled=progress):
                for chunk in chunks:
                    out = model(input_ids=chunk, use_cache=True, **{ck: cache}, **extra)
            logits = out.logits[:, -1, :]
        else:
            res = long_prefill(
                model,
                input_ids,
                offload_kv=offload_kv,
                chunk_size=prefill_chunk or DEFAULT_CHUNK_SIZE,
                reserve_tokens=max_new_tokens + 1,
                progress=progress,
            )
            cache, logits = res.cache, res.logits
        _sync(device)
        tp = time.perf_counter()
        next_id = logits.argmax(dim=-1)
        tok = int(next_id.item())  # synchronises
        t1 = time.perf_counter()
        tokens = [tok]
        first_logits = logits[0].float().cpu()
        while len(tokens) < max_new_tokens and tok not in eos:
            out = model(input_ids=next_id[:, None], use_cache=True, **{ck: cache})
            next_id = out.logits[:, -1, :].argmax(dim=-1)
            tok = int(next_id.item())
            tokens.append(tok)
        t2 = time.perf_counter()
    s1 = (plan.stats.sparse_calls, plan.stats.dense_calls) if plan else (0, 0)
    return GenerationResult(
        prompt_tokens=n,
        token_ids=tokens,
        prefill_s=tp - t0,
        ttft_s=t1 - t0,
        decode_s=t2 - t1,
        first_logits=first_logits,
        sparse_calls=s1[0] - s0[0],
        dense_calls=s1[1] - s0[1],
    )


def generate_long(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    offload_kv: OffloadSpec = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` with the pre-fill done by :func:`long_prefill`.

    Pre-fills the first ``N - 1`` prompt tokens layer by layer (cache offloaded as asked), then
    hands the cache to ``model.generate``, which processes the last prompt token and decodes.
    Extra keyword arguments go to ``model.generate`` (``max_new_tokens``, ``do_sample`` ...).

    Args:
        input_ids: ``[B, N]`` prompt ids (no padding), ``N >= 2``.

    Returns:
        ``[B, N + new]`` ids, like ``model.generate``.
    """
    from transformers import GenerationMixin

    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} has no generate(): pass a *ForCausalLM model")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, N] with N >= 2, got {tuple(input_ids.shape)}")
    if "past_key_values" in generate_kwargs or "cache" in generate_kwargs:
        raise ValueError("generate() makes the cache itself; do not pass past_key_values")
    for key in ("prompt_lookup_num_tokens", "assistant_model", "assistant_early_exit"):
        if generate_kwargs.get(key) is not None:
            raise ValueError(
                f"generate_long does not support {key} (assisted / prompt-lookup decoding re-feeds "
                "the whole prompt on its first step, ignoring the pre-filled cache)"
            )
    max_new = int(generate_kwargs.get("max_new_tokens") or DEFAULT_RESERVE_TOKENS)
    res = long_prefill(
        model,
        input_ids[:, :-1],
        offload_kv=offload_kv,
        chunk_size=chunk_size,
        reserve_tokens=max_new + 1,
        progress=progress,
    )
    # generate() expands the prompt to B x num_beams (or x num_return_sequences) rows but not a
    # cache passed in: expand the cache the same way
    gc = generate_kwargs.get("generation_config") or model.generation_config
    expand = max(
        int(generate_kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1),
        int(
            generate_kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
        ),
    )
    if expand > 1:
        res.cache.batch_repeat_interleave(expand)
    return model.generate(input_ids, **{cache_kwarg(model): res.cache}, **generate_kwargs)
