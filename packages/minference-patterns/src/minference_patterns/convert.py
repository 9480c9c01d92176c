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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from minference_kernels.patterns import HeadPattern

from .config import FORMAT_NAME, PatternConfig, Provenance, Score, _is_int, _is_number, _where
from .errors import ConfigError
from .policy import BudgetPolicy
from .shipped import shape_for_source_file

__all__ = [
    "MINFERENCE_KINDS",
    "from_minference",
    "from_qwen",
    "load_file",
    "read_json",
    "to_minference",
]

#: MInference kind name -> our kind name.
MINFERENCE_KINDS: Mapping[str, str] = {
    "vertical_and_slash": "vertical_slash",
    "stream_llm": "a_shape",
    "block_sparse": "block_sparse",
}
_TO_MINFERENCE = {v: k for k, v in MINFERENCE_KINDS.items()}
_QWEN_SPARSE_FILE = "sparse_attention_config.json"

PathLike = str | os.PathLike


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a missing, empty, truncated or non-JSON file raises a clear error."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such pattern config file: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory, not a JSON file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", source=str(p)
        ) from None
    if not text.strip():
        raise ConfigError("file is empty", source=str(p))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text.rstrip())
        why = "the file looks truncated" if truncated else "the file is not valid JSON"
        raise ConfigError(
            f"{why}: {exc.msg} at line {exc.lineno}, column {exc.colno}", source=str(p)
        ) from None


# --------------------------------------------------------------------------------------------
# MInference


def _parse_minference(
    data: Any, source: str | None
) -> tuple[list[tuple[HeadPattern, ...]], list[tuple[Score | None, ...]], dict[str, int]]:
    if not isinstance(data, list):
        raise ConfigError(
            f"MInference's format is a JSON list of per-layer objects, got {type(data).__name__}",
            source=source,
        )
    if not data:
        raise ConfigError("MInference config has no layers", source=source)
    num_heads = None
    layers, scores = [], []
    unused_b: dict[str, int] = {}
    for li, layer in enumerate(data):
        if not isinstance(layer, Mapping):
            raise ConfigError(
                f"must be an object mapping head index to [kind, a, b, score], "
                f"got {type(layer).__name__}",
                source=source,
                location=_where(li),
            )
        by_index: dict[int, Any] = {}
        for key, entry in layer.items():
            idx = (
                key
                if _is_int(key)
                else (int(key) if isinstance(key, str) and key.isdigit() else None)
            )
            if idx is None:
                raise ConfigError(
                    f"head key {key!r} is not a head index", source=source, location=_where(li)
                )
            if idx in by_index:
                raise ConfigError(f"head {idx} appears twice", source=source, location=_where(li))
            by_index[idx] = entry
        if num_heads is None:
            num_heads = len(by_index)
        if len(by_index) != num_heads or set(by_index) != set(range(num_heads)):
            missing = sorted(set(range(num_heads)) - set(by_index))
            extra = sorted(set(by_index) - set(range(num_heads)))
            detail = []
            if missing:
                detail.append(f"missing heads {missing}")
            if extra:
                detail.append(f"unexpected heads {extra}")
            raise ConfigError(
                f"has {len(by_index)} heads, layer 0 has {num_heads} ({'; '.join(detail)})",
                source=source,
                location=_where(li),
            )
        row, srow = [], []
        for hi in range(num_heads):
            pattern, score, b = _parse_entry(by_index[hi], li, hi, source)
            if b:  # 0 is what to_minference writes by default
                unused_b[f"{li}:{hi}"] = b
            row.append(pattern)
            srow.append(score)
        layers.append(tuple(row))
        scores.append(tuple(srow))
    return layers, scores, unused_b


def _parse_entry(
    entry: Any, li: int, hi: int, source: str | None
) -> tuple[HeadPattern, Score | None, int | None]:
    def fail(msg: str, fld: str | None = None) -> ConfigError:
        return ConfigError(msg, source=source, location=_where(li, hi, fld))

    if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) not in (3, 4):
        raise fail(f"must be [kind, size_a, size_b, score], got {entry!r}")
    kind, a, b = entry[0], entry[1], entry[2]
    score = entry[3] if len(entry) == 4 else None
    if kind not in MINFERENCE_KINDS:
        raise fail(
            f"unknown MInference pattern kind {kind!r}; known kinds: {', '.join(MINFERENCE_KINDS)}",
            "kind",
        )
    for name, val in (("size_a", a), ("size_b", b)):
        if not _is_int(val):
            raise fail(f"must be an integer, got {val!r}", name)
        if val < 0:
            raise fail(f"must be >= 0, got {val}", name)
    if score is not None and not _is_number(score):
        raise fail(f"must be a finite number, got {score!r}", "score")
    unused = None
    if kind == "vertical_and_slash":
        if a + b < 1:
            raise fail("verticals and slashes are both zero (an empty pattern)", "size_b")
        pattern = HeadPattern.vertical_slash(a, b)
    elif kind == "stream_llm":
        if b < 1:
            raise fail(f"the local window must be a positive integer, got {b}", "size_b")
        pattern = HeadPattern.a_shape(a, b)
    else:
        if a < 1:
            raise fail(f"top-k key blocks must be a positive integer, got {a}", "size_a")
        pattern = HeadPattern.block_sparse(a, 64)
        unused = b
    return pattern, score, unused


def from_minference(
    data_or_path: Any,
    *,
    model_id: str,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    context_length: int | None = None,
    budget_policy: BudgetPolicy | None = None,
    provenance: Provenance | None = None,
) -> PatternConfig:
    """Convert a config in MInference's format (a parsed list, or a path to its JSON file).

    Args:
        data_or_path: the list of per-layer ``{"<head>": [kind, a, b, score]}`` objects, or a path.
        model_id: the model the config is for (MInference's files do not say).
        num_kv_heads, head_dim: the model's shape, if known (MInference's files do not say).
        context_length: the length the config was searched at, if known (MInference does not
            publish it; without it the budgets are used as absolute sizes).
        budget_policy: how budgets adapt to other lengths (default: absolute, like MInference).
        provenance: overrides the default provenance (``source="minference"``).

    Raises:
        ConfigError: naming the layer, head and element at fault.
    """
    source = None
    if isinstance(data_or_path, (str, os.PathLike)):
        source = str(data_or_path)
        data = read_json(data_or_path)
    else:
        data = data_or_path
    return _convert_minference(
        data,
        source,
        model_id=model_id,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        context_length=context_length,
        budget_policy=budget_policy,
        provenance=provenance,
    )


def _convert_minference(
    data: Any,
    source: str | None,
    *,
    model_id: str,
    num_kv_heads: int | None,
    head_dim: int | None,
    context_length: int | None,
    budget_policy: BudgetPolicy | None,
    provenance: Provenance | None,
) -> PatternConfig:
    layers, scores, unused_b = _parse_minference(data, source)
    if provenance is None:
        extra: dict[str, Any] = {}
        if source is not None:
            extra["source_file"] = Path(source).name
        provenance = Provenance(source="minference", tool=None, extra=extra)
    if unused_b:
        extra = dict(provenance.extra)
        mi = dict(extra.get("minference", {}))
        mi["block_sparse_size_b"] = unused_b
        extra["minference"] = mi
        provenance = Provenance(**{**_prov_kwargs(provenance), "extra": extra})
    has_scores = any(s is not None for row in scores for s in row)
    try:
        return PatternConfig(
            model_id=model_id,
            num_layers=len(layers),
            num_heads=len(layers[0]),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layers=tuple(layers),
            context_length=context_length,
            provenance=provenance,
            budget_policy=budget_policy or BudgetPolicy(),
            scores=tuple(scores) if has_scores else None,
        )
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(exc.reason, source=source, location=exc.location) from None


def _prov_kwargs(p: Provenance) -> dict[str, Any]:
    return {name: getattr(p, name) for name in Provenance.__dataclass_fields__}


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
            else:  # pragma: no cover - a kind added without an export rule
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


# --------------------------------------------------------------------------------------------
# Qwen


def _qwen_shape(cfg: Mapping[str, Any]) -> dict[str, int | None]:
    sub = cfg.get("text_config")
    text: Mapping[str, Any] = sub if isinstance(sub, Mapping) else cfg
    heads = text.get("num_attention_heads")
    hd = text.get("head_dim")
    if hd is None and _is_int(text.get("hidden_size")) and _is_int(heads) and heads:
        hd = text["hidden_size"] // heads
    return {
        "num_layers": text.get("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": text.get("num_key_value_heads", heads),
        "head_dim": hd,
    }


def from_qwen(
    data_or_path: Any,
    *,
    model_id: str | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    context_length: int | None = None,
) -> PatternConfig:
    """Convert Qwen's ``sparse_attention_config`` (Qwen2.5-1M) into a :class:`PatternConfig`.

    Accepts any of:

    * the ``sparse_attention_config.json`` list itself (MInference's format), parsed or a path;
    * a model ``config.json`` (parsed dict or path) holding ``sparse_attention_config`` at the top
      level or inside ``dual_chunk_attention_config``, either inline (the list) or as a file name
      relative to the ``config.json``; without it, ``sparse_attention_config.json`` next to the
      ``config.json`` is used (vLLM's convention);
    * a model directory holding those files.

    From a model config the shape (layers, heads, KV heads, head dim) is read and checked against
    the pattern list, ``_name_or_path`` gives the default model id, and the dual-chunk
    ``sparse_attention_threshold`` (vLLM default 32768) becomes ``budget_policy.dense_below`` (one
    more than the threshold: vLLM runs sparse only above it).
    """
    base: Path | None = None
    source: str | None = None
    data = data_or_path
    if isinstance(data_or_path, (str, os.PathLike)):
        p = Path(data_or_path)
        if p.is_dir():
            if (p / "config.json").exists():
                p = p / "config.json"
            elif (p / _QWEN_SPARSE_FILE).exists():
                p = p / _QWEN_SPARSE_FILE
            else:
                raise FileNotFoundError(f"{p} holds neither config.json nor {_QWEN_SPARSE_FILE}")
        source, base = str(p), p.parent
        data = read_json(p)
    if isinstance(data, list):
        return _convert_minference(
            data,
            source,
            model_id=model_id or (base.name if base is not None else "qwen"),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            context_length=context_length,
            budget_policy=None,
            provenance=_qwen_provenance(source, None),
        )
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a model config (object) or a sparse_attention_config (list), "
            f"got {type(data).__name__}",
            source=source,
        )
    dca = data.get("dual_chunk_attention_config")
    dca = dca if isinstance(dca, Mapping) else None
    sparse = data.get("sparse_attention_config")
    if sparse is None and dca is not None:
        sparse = dca.get("sparse_attention_config")
    sparse_source = source
    if sparse is None or isinstance(sparse, str):
        name = sparse or _QWEN_SPARSE_FILE
        if base is None:
            raise ConfigError(
                f"the model config refers to the file {name!r}; pass the path of config.json "
                "(or of the model directory) so it can be found",
                source=source,
            )
        target = base / name
        if not target.exists():
            what = "names" if sparse else "has no sparse_attention_config and there is no"
            raise ConfigError(
                f"the model config {what} {name!r} ({target} not found)", source=source
            )
        sparse_source = str(target)
        sparse = read_json(target)
    shape = _qwen_shape(data)
    policy = BudgetPolicy()
    extra: dict[str, Any] = {}
    if dca is not None:
        threshold = dca.get("sparse_attention_threshold", 32768)
        if _is_int(threshold) and threshold >= 0:
            policy = BudgetPolicy(dense_below=threshold + 1)
        extra["dual_chunk_attention_config"] = {
            k: v for k, v in dca.items() if k != "sparse_attention_config"
        }
    mid = model_id or data.get("_name_or_path") or (base.name if base is not None else "qwen")
    cfg = _convert_minference(
        sparse,
        sparse_source,
        model_id=mid,
        num_kv_heads=num_kv_heads if num_kv_heads is not None else shape["num_kv_heads"],
        head_dim=head_dim if head_dim is not None else shape["head_dim"],
        context_length=context_length,
        budget_policy=policy,
        provenance=_qwen_provenance(sparse_source, extra),
    )
    try:
        cfg.validate_against(num_layers=shape["num_layers"], num_heads=shape["num_heads"])
    except ValueError as exc:
        raise ConfigError(
            f"sparse_attention_config does not match the model config: {exc}", source=source
        ) from None
    return cfg


def _qwen_provenance(source: str | None, extra: dict[str, Any] | None) -> Provenance:
    ex = dict(extra or {})
    if source is not None:
        ex["source_file"] = Path(source).name
    return Provenance(
        source="qwen",
        tool=None,
        notes="Qwen's sparse_attention_config (MInference format); vLLM's dual-chunk backend "
        "raised a vertical size of 30 to 130 at run time, the stored value is kept as is.",
        extra=ex,
    )


# --------------------------------------------------------------------------------------------
# auto-detection


def detect_format(data: Any) -> str:
    """``"minference-patterns"``, ``"minference"`` or ``"qwen"`` for parsed JSON ``data``."""
    if isinstance(data, list):
        return "minference"
    if isinstance(data, Mapping):
        if data.get("format") == FORMAT_NAME or "schema_version" in data:
            return FORMAT_NAME
        if (
            "sparse_attention_config" in data
            or "dual_chunk_attention_config" in data
            or "num_hidden_layers" in data
        ):
            return "qwen"
        if "layers" in data and "model_id" in data:
            return FORMAT_NAME
    raise ValueError("unrecognised pattern config format")


def load_file(path: PathLike, *, model_id: str | None = None) -> PatternConfig:
    """Load a config file in any supported format (ours, MInference's, Qwen's), or a directory.

    A directory must hold a Qwen-style ``config.json`` with a sparse attention config, or its
    ``sparse_attention_config.json``. MInference files get their model id (and shape) from the
    shipped index when the file name matches a shipped source file, else from ``model_id`` or the
    file name.
    """
    p = Path(path)
    if p.is_dir():
        return from_qwen(p, model_id=model_id)
    data = read_json(p)
    try:
        fmt = detect_format(data)
    except ValueError:
        raise ConfigError(
            "not a pattern config: expected our format (an object with 'schema_version'), "
            "MInference's (a list of per-layer objects) or a Qwen model config",
            source=str(p),
        ) from None
    if fmt == FORMAT_NAME:
        cfg = PatternConfig.from_dict(data, source=str(p))
        return cfg if model_id is None else cfg.replace(model_id=model_id)
    if fmt == "qwen":
        return from_qwen(p, model_id=model_id)
    known = shape_for_source_file(p.name)
    return _convert_minference(
        data,
        str(p),
        model_id=model_id or (known["model_id"] if known else p.stem),
        num_kv_heads=known["num_kv_heads"] if known else None,
        head_dim=known["head_dim"] if known else None,
        context_length=None,
        budget_policy=None,
        provenance=None,
    )
