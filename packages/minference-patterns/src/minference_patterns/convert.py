"""Conversion from and to MInference's config format, from Qwen's, and format auto-detection.

MInference's format (``minference/configs/*.json``) is a JSON list with one object per layer,
mapping a query-head index (a string) to ``[kind, size_a, size_b, search_score]``:

==================== ================== =================== ===================================
MInference kind      our kind           ``size_a``          ``size_b``
==================== ================== =================== ===================================
vertical_and_slash   ``vertical_slash`` verticals           slashes
stream_llm           ``a_shape``        sink tokens         local window
block_sparse         ``block_sparse``   top-k key blocks    not used (kept in provenance)
==================== ================== =================== ===================================

The score is kept in :attr:`PatternConfig.scores`, so MInference -> ours -> MInference gives back
the same JSON values (ints stay ints, floats keep every digit).

Qwen2.5-1M ships the same list as ``sparse_attention_config.json`` next to ``config.json``; vLLM's
dual-chunk backend put it under ``config.json``'s ``dual_chunk_attention_config`` (as a list, or a
file name). :func:`from_qwen` accepts all of these.

The readers (:func:`from_minference`, :func:`from_qwen`, :func:`load_file`) live in
:mod:`minference_patterns.config`, beside :meth:`PatternConfig.load` which auto-detects the
formats (so config never imports this module: no import loop); this module adds the writer and
re-exports the readers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import (
    MINFERENCE_KINDS,
    PathLike,
    PatternConfig,
    _is_int,
    _where,
    detect_format,
    from_minference,
    from_qwen,
    load_file,
    read_json,
)

__all__ = [
    "MINFERENCE_KINDS",
    "detect_format",
    "from_minference",
    "from_qwen",
    "load_file",
    "read_json",
    "to_minference",
]

_TO_MINFERENCE = {v: k for k, v in MINFERENCE_KINDS.items()}


def to_minference(
    config: PatternConfig, *, dense_as: tuple[str, int, int] | None = None
) -> list[dict[str, list[Any]]]:
    """Export a config to MInference's format (a list of per-layer dicts, JSON-ready).

    Every head becomes ``[kind, size_a, size_b, score]`` (``score`` is the stored score, or
    ``None``, which MInference ignores). MInference has no ``dense`` kind and a fixed block size of
    64: a dense head raises ``ValueError`` unless ``dense_as`` gives the entry to write for it
    (e.g. ``("vertical_and_slash", 1_048_576, 1_048_576)``, which MInference clamps to the prompt
    length, i.e. attends to everything); other block sizes raise ``ValueError``.
    """
    if not isinstance(config, PatternConfig):
        raise TypeError(f"config must be a PatternConfig, got {type(config).__name__}")
    if dense_as is not None:
        if (
            not isinstance(dense_as, (tuple, list))
            or len(dense_as) != 3
            or dense_as[0] not in MINFERENCE_KINDS
            or not all(_is_int(x) and x >= 0 for x in dense_as[1:])
        ):
            raise ValueError(f"dense_as must be (minference_kind, int, int), got {dense_as!r}")
    unused_b = config.provenance.extra.get("minference", {}).get("block_sparse_size_b", {})
    out = []
    for li, layer in enumerate(config.layers):
        row: dict[str, list[Any]] = {}
        for hi, p in enumerate(layer):
            score = config.score(li, hi)
            if p.kind == "vertical_slash":
                entry = ["vertical_and_slash", p.num_vertical, p.num_slash]
            elif p.kind == "a_shape":
                entry = ["stream_llm", p.sink_tokens, p.window_tokens]
            elif p.kind == "block_sparse":
                if p.block_size != 64:
                    raise ValueError(
                        f"{_where(li, hi)}: block_size {p.block_size} cannot be expressed in "
                        "MInference's format (its block size is fixed at 64)"
                    )
                if p.scoring != "pooled":
                    raise ValueError(
                        f"{_where(li, hi)}: block scoring {p.scoring!r} cannot be expressed in "
                        "MInference's format (its block-sparse heads are mean-pooled)"
                    )
                entry = ["block_sparse", p.top_k, int(unused_b.get(f"{li}:{hi}", 0))]
            elif p.kind == "dense":
                if dense_as is None:
                    raise ValueError(
                        f"{_where(li, hi)} is dense, which MInference's format cannot express; "
                        "pass dense_as=('vertical_and_slash', N, N) with N >= the longest prompt"
                    )
                entry = list(dense_as)
            else:  # vertical_block (and any later kind without an export rule)
                raise ValueError(f"{_where(li, hi)}: kind {p.kind!r} has no MInference equivalent")
            row[str(hi)] = [*entry, score]
        out.append(row)
    return out


def save_minference(config: PatternConfig, path: PathLike, **kwargs: Any) -> Path:
    """Write :func:`to_minference` of ``config`` to ``path`` (compact JSON, like MInference)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_minference(config, **kwargs)) + "\n", encoding="utf-8")
    return p
