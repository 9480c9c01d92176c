"""The sparse pre-fill logic shared by every platform's backend.

Two mixins sit in front of a platform's standard attention classes:

* :class:`SparseBuilderMixin` (metadata builder): per step, decides which requests of the batch
  take the sparse path (a pre-fill chunk of at least ``min_sparse_query`` tokens whose context
  reaches ``min_sparse_len``). If none does, it returns the parent's metadata untouched. Otherwise it returns a
  :class:`SparseBatch` holding the parent's metadata for the remaining (dense) requests and the
  token ranges of the sparse ones.
* :class:`SparseImplMixin` (attention impl): checks at construction that the layer and the pattern
  config fit, and in ``forward`` runs the parent on the dense requests and
  ``minference_kernels.sparse_prefill_varlen`` on all sparse requests at once (one call per
  distinct head-pattern row), writing into vLLM's output buffer.

This module imports no vLLM code directly; the compat layer passes what is needed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _compat as compat
from .kvcache import CacheLayout, probe_layout
from .prefill import prefill_requests
from .settings import (
    PluginSettings,
    heads_for_rank,
    layer_index,
    load_patterns,
    plan_batch,
    unsupported_reasons,
)

logger = logging.getLogger("vllm.minference")

#: Sparse pre-fill calls made in this process (one per request, layer and step).
SPARSE_CALLS = 0
_TRACE_LOCK = threading.Lock()


@dataclass(frozen=True)
class SparseRow:
    """One request of the batch that takes the sparse path this step."""

    request: int
    q_start: int
    q_end: int
    seq_len: int
    block_ids: torch.Tensor

    @property
    def num_cached(self) -> int:
        """Tokens of this request already in the KV cache before this chunk."""
        return self.seq_len - (self.q_end - self.q_start)


class SparseBatch:
    """Attention metadata of a step in which at least one request takes the sparse path.

    Attributes:
        full: the parent backend's metadata for the whole batch (attributes not defined here are
            read from it, for code outside the backend that inspects metadata).
        dense: the parent's metadata for the requests that stay dense, or ``None``.
        dense_tokens: their tokens (a ``slice`` when contiguous, else an index tensor).
        rows: the sparse requests.
        block_size: tokens per KV cache block.
    """

    def __init__(
        self,
        full: Any,
        dense: Any | None,
        dense_tokens: slice | torch.Tensor | None,
        rows: Sequence[SparseRow],
        block_size: int,
    ) -> None:
        self.full = full
        self.dense = dense
        self.dense_tokens = dense_tokens
        self.rows = tuple(rows)
        self.block_size = block_size

    def __getattr__(self, name: str) -> Any:
        full = self.__dict__.get("full")
        if full is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(full, name)

    def __repr__(self) -> str:
        rows = ", ".join(f"req{r.request}[{r.q_start}:{r.q_end}]/{r.seq_len}" for r in self.rows)
        return f"SparseBatch(sparse=[{rows}], dense={self.dense is not None})"


class SparseBuilderMixin:
    """Metadata-builder mixin; put it before the platform's builder class."""

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any):
        base: Any = super()  # the platform's builder class, after this mixin in the MRO
        base.__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._mi_settings = compat.plugin_settings(vllm_config)
        self._mi_block_size = int(kv_cache_spec.block_size)
        self._mi_fallback_logged = False

    def build(
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> Any:
        parent: Any = super()  # the platform's builder class, after this mixin in the MRO
        full = parent.build(common_prefix_len, common_attn_metadata, fast_build)
        settings = self._mi_settings
        common = common_attn_metadata
        if (
            settings is None
            or common.max_query_len < settings.options.min_sparse_query
            or common.max_seq_len < settings.options.min_sparse_len
        ):
            return full
        lengths = compat.request_lengths(common)
        if lengths is None:
            return full
        starts, seq_lens = lengths
        sparse, dense = plan_batch(starts, seq_lens, settings)
        if not sparse:
            return full
        dense_meta, dense_tokens = None, None
        if dense:
            selected = compat.select_requests(common, dense)
            if selected is None:
                if not self._mi_fallback_logged:
                    logger.warning(
                        "minference: this batch carries metadata the sparse path cannot split "
                        "by request; running it densely"
                    )
                    self._mi_fallback_logged = True
                return full
            sub, dense_tokens = selected
            dense_meta = parent.build(0, sub, fast_build)
        rows = [
            SparseRow(
                request=r,
                q_start=starts[r],
                q_end=starts[r + 1],
                seq_len=int(seq_lens[r]),
                block_ids=compat.block_table_row(common, r),
            )
            for r in sparse
        ]
        return SparseBatch(full, dense_meta, dense_tokens, rows, self._mi_block_size)


def _validate_model(settings: PluginSettings, num_heads: int) -> tuple[int, int]:
    """Check the config against the model and the rank's head count; ``(tp_size, tp_rank)``."""
    vllm_config = compat.current_vllm_config()
    shape = compat.model_shape(vllm_config)
    load_patterns(settings.config, shape)
    reasons = compat.unsupported_parallelism(vllm_config)
    if reasons:
        raise ValueError(
            "minference: sparse pre-fill needs each request's whole KV cache on every rank; "
            f"unsupported: {', '.join(reasons)}"
        )
    tp_size, tp_rank = compat.tensor_parallel()
    if num_heads * tp_size != shape.num_heads:
        raise ValueError(
            f"minference: this rank holds {num_heads} query heads, but the model has "
            f"{shape.num_heads} over tensor_parallel_size={tp_size}"
        )
    return tp_size, tp_rank


class SparseImplMixin:
    """Attention-impl mixin; put it before the platform's impl class."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = compat.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        settings = compat.plugin_settings(compat.current_vllm_config())
        if settings is not None:
            # Checked before the parent is built, so an unsupported model fails here, first.
            reasons = unsupported_reasons(
                kv_cache_dtype=kv_cache_dtype,
                sliding_window=sliding_window,
                has_alibi=alibi_slopes is not None,
                has_sinks=extra.get("sinks") is not None,
                logits_soft_cap=logits_soft_cap,
                attn_type=attn_type,
                decoder_attn_type=compat.DECODER,
            )
            if reasons:
                raise ValueError(
                    "minference: sparse pre-fill does not support this model's attention: "
                    + "; ".join(reasons)
                    + ". Remove the 'minference' additional config (and MINFERENCE_VLLM_CONFIG) "
                    "to run it with dense attention."
                )
        super().__init__(  # type: ignore[call-arg]
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            **extra,
        )
        self._mi_settings = settings
        self._mi_layout: CacheLayout | None = None
        self._mi_layer: int | None = None
        self._mi_tp = (1, 0)
        if settings is not None:
            self._mi_tp = _validate_model(settings, num_heads)

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        parent: Any = super()
        if not isinstance(attn_metadata, SparseBatch):
            return parent.forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
                **kwargs,
            )
        if output is None:
            raise ValueError("minference: the attention output buffer is required")
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("minference: fused output quantisation is not supported")
        batch = attn_metadata
        if batch.dense is not None:
            sel = batch.dense_tokens
            assert sel is not None
            k_sel = key[sel] if key is not None else None
            v_sel = value[sel] if value is not None else None
            if isinstance(sel, slice):
                parent.forward(layer, query[sel], k_sel, v_sel, kv_cache, batch.dense, output[sel])
            else:
                part = output.new_empty((sel.numel(), *output.shape[1:]))
                parent.forward(layer, query[sel], k_sel, v_sel, kv_cache, batch.dense, part)
                output[sel] = part
        self._mi_prefill_rows(
            layer, batch.rows, batch.block_size, query, key, value, kv_cache, output
        )
        return output

    def _mi_cache_layout(self, layer: Any, kv_cache: torch.Tensor, block_size: int) -> CacheLayout:
        layout = self._mi_layout
        if layout is None or layout.block_size != block_size:

            def write(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor):
                self.do_kv_cache_update(layer, k, v, cache, slots)  # type: ignore[attr-defined]

            layout = probe_layout(
                write,
                kv_cache,
                block_size=block_size,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
            )
            self._mi_layout = layout
        return layout

    def _mi_prefill_rows(
        self,
        layer: Any,
        rows: Sequence[SparseRow],
        block_size: int,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """The step's sparse requests: one ``sparse_prefill_varlen`` call for all the requests
        whose context length gives them the same head patterns (one call in all unless the
        config's patterns depend on the length)."""
        global SPARSE_CALLS
        settings = self._mi_settings
        assert settings is not None
        if self._mi_layer is None:
            self._mi_layer = layer_index(layer.layer_name)
        patterns = load_patterns(settings.config)
        groups: dict[tuple[Any, ...], list[SparseRow]] = {}
        for row in rows:
            heads = heads_for_rank(
                patterns.heads_for_layer(self._mi_layer, seq_len=row.seq_len), *self._mi_tp
            )
            groups.setdefault(tuple(heads), []).append(row)
        for heads, group in groups.items():
            outs = prefill_requests(
                [
                    (
                        query[r.q_start : r.q_end],
                        None if key is None else key[r.q_start : r.q_end],
                        None if value is None else value[r.q_start : r.q_end],
                        r.block_ids,
                        r.seq_len,
                    )
                    for r in group
                ],
                kv_cache,
                lambda: self._mi_cache_layout(layer, kv_cache, block_size),
                heads,
                scale=self.scale,
                options=settings.options,
            )
            for r, out in zip(group, outs):
                output[r.q_start : r.q_end].copy_(out)
                SPARSE_CALLS += 1
                if settings.trace:
                    _trace(settings.trace, self._mi_layer, r, heads, self._mi_tp)


def _trace(path: str, layer: int, row: SparseRow, heads: Sequence[Any], tp: tuple[int, int]):
    kinds: dict[str, int] = {}
    for h in heads:
        kinds[h.kind] = kinds.get(h.kind, 0) + 1
    record = {
        "pid": os.getpid(),
        "layer": layer,
        "tp_rank": tp[1],
        "request": row.request,
        "query_tokens": row.q_end - row.q_start,
        "cached_tokens": row.num_cached,
        "seq_len": row.seq_len,
        "kinds": kinds,
    }
    with _TRACE_LOCK, open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
