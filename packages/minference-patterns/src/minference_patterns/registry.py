"""Configs shipped with the package, and :func:`load` (a path or a model id).

The shipped configs are MInference's published per-head configs (MIT licence, Microsoft; see
``configs/LICENSE-MInference``), converted to our format by ``scripts/convert_anchor_configs.py``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from .config import PatternConfig
from .convert import load_file, read_json
from .errors import UnknownModelError
from .shipped import (
    SEARCHED_MODELS,
    SHIPPED_MODELS,
    ShippedModel,
    resolve_model_id,
    shipped_model_ids,
)

__all__ = [
    "SEARCHED_MODELS",
    "SHIPPED_MODELS",
    "ShippedModel",
    "load",
    "load_shipped",
    "resolve_model_id",
]

SEARCH_HINT = (
    "To make a config for a new model, run the kernel-aware search on a calibration prompt: "
    "`minference search --model MODEL --calib PROMPT.txt --out CONFIG.json` (package "
    "minference-hf), or call minference_patterns.search_config on captured Q/K; then "
    "load('CONFIG.json')."
)


def shipped_path(model: ShippedModel) -> Path:
    """Filesystem path of a shipped config file."""
    return Path(str(files("minference_patterns").joinpath("configs").joinpath(model.file)))


@lru_cache(maxsize=16)
def _load_shipped_file(file: str) -> PatternConfig:
    text = (
        files("minference_patterns").joinpath("configs").joinpath(file).read_text(encoding="utf-8")
    )
    return PatternConfig.from_dict(json.loads(text), source=f"shipped config {file}")


def load_shipped(model_id: str) -> PatternConfig:
    """The shipped config of ``model_id`` (case-insensitive); :class:`UnknownModelError` if none."""
    m = resolve_model_id(model_id)
    if m is None:
        raise UnknownModelError(_unknown_msg(model_id), model_id)
    cfg = _load_shipped_file(m.file)
    return cfg if cfg.model_id == m.model_id else cfg.replace(model_id=m.model_id)


def _unknown_msg(model_id: str) -> str:
    ids = "\n  ".join(shipped_model_ids())
    return (
        f"no shipped pattern config for {model_id!r} (and no such file).\n"
        f"Shipped configs:\n  {ids}\n{SEARCH_HINT}"
    )


def load(path_or_model_id: str | os.PathLike[str], *, model_id: str | None = None) -> PatternConfig:
    """Load a pattern config from a file, a model directory or a shipped model id.

    * an existing file: our JSON, MInference's format or a Qwen ``config.json`` (auto-detected);
    * an existing directory: a Qwen-style model directory (``config.json`` with a sparse attention
      config, or ``sparse_attention_config.json``); a model directory without one gets the shipped
      config of the model it holds (matched by the path as given, ``config.json``'s
      ``_name_or_path``, or the directory name);
    * otherwise a model id with a shipped config, matched case-insensitively (e.g.
      ``"qwen/qwen2.5-7b-instruct"``; a unique name without the organisation also works).

    ``model_id`` overrides the model id stored in (or guessed for) a file.

    Raises:
        UnknownModelError: (a ``KeyError`` and ``ValueError``) no such file and no shipped config;
            the message lists the shipped ids and says how to search a config.
        ConfigError: the file is malformed (the message names the layer, head and field).
    """
    if isinstance(path_or_model_id, os.PathLike):
        path_or_model_id = os.fspath(path_or_model_id)
    if not isinstance(path_or_model_id, str) or not path_or_model_id.strip():
        raise TypeError(f"expected a path or a model id, got {path_or_model_id!r}")
    p = Path(path_or_model_id).expanduser()
    if p.is_file():
        return load_file(p, model_id=model_id)
    name = path_or_model_id
    if p.is_dir():
        if _has_sparse_config(p):
            return load_file(p, model_id=model_id)
        # a model directory without a sparse config: the shipped config of the model it holds
        held = next((n for n in _dir_model_names(p, path_or_model_id) if resolve_model_id(n)), None)
        if held is None:
            raise UnknownModelError(
                f"{p} is a directory without a sparse attention config (no "
                "sparse_attention_config in config.json, no sparse_attention_config.json), and "
                f"the model it holds has no shipped pattern config.\n{SEARCH_HINT}",
                path_or_model_id,
            )
        name = held
    elif resolve_model_id(name) is None and name.lower().endswith(".json"):
        raise FileNotFoundError(f"no such pattern config file: {name}")
    cfg = load_shipped(name)
    return cfg if model_id is None else cfg.replace(model_id=model_id)


def _has_sparse_config(d: Path) -> bool:
    if (d / "sparse_attention_config.json").is_file():
        return True
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        data = read_json(cfg_file)
    except (ValueError, OSError):
        return True  # let the loader report what is wrong with it
    if not isinstance(data, dict):
        return True
    dca = data.get("dual_chunk_attention_config")
    return "sparse_attention_config" in data or (
        isinstance(dca, dict) and "sparse_attention_config" in dca
    )


def _dir_model_names(d: Path, given: str) -> list[str]:
    """Names a model directory may go by: the path as given, config.json's ``_name_or_path``,
    the directory's name."""
    names = [given]
    cfg_file = d / "config.json"
    if cfg_file.is_file():
        try:
            data = read_json(cfg_file)
        except (ValueError, OSError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("_name_or_path"), str):
            names.append(data["_name_or_path"])
    names.append(d.resolve().name)
    return names
