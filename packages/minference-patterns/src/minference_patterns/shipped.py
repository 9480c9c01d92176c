"""The models with a shipped config: ids, files, shapes, and the MInference files they were
converted from (data only; loading is :mod:`minference_patterns.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShippedModel:
    """A model with a shipped config, its shape and the MInference file it was converted from."""

    model_id: str
    file: str
    source_file: str | None  # MInference's file it was converted from; None: searched by us
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


_LLAMA3_262K = "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json"
_LLAMA31 = "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern_v2.json"

#: Every shipped model id (several ids may share one file). Shapes are from the models' configs.
SHIPPED_MODELS: tuple[ShippedModel, ...] = (
    ShippedModel("gradientai/Llama-3-8B-Instruct-262k", "llama-3-8b-instruct-262k.json",
                 _LLAMA3_262K, 32, 32, 8, 128),
    ShippedModel("gradientai/Llama-3-8B-Instruct-Gradient-1048k", "llama-3-8b-instruct-262k.json",
                 _LLAMA3_262K, 32, 32, 8, 128),
    ShippedModel("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct-128k.json",
                 _LLAMA31, 32, 32, 8, 128),
    ShippedModel("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct-128k.json",
                 _LLAMA31, 32, 32, 8, 128),
    ShippedModel("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct-128k.json",
                 "Qwen2.5_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern.json",
                 28, 28, 4, 128),
    ShippedModel("Qwen/Qwen2.5-7B-Instruct-1M", "qwen2.5-7b-instruct-1m.json",
                 "Qwen2.5_7B_Instruct_1M.json", 28, 28, 4, 128),
    ShippedModel("microsoft/Phi-3-mini-128k-instruct", "phi-3-mini-128k-instruct.json",
                 "Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern.json", 32, 32, 32, 96),
    ShippedModel("THUDM/glm-4-9b-chat-1m", "glm-4-9b-chat-1m.json",
                 "GLM_4_9B_1M_instruct_kv_out_v32_fit_o_best_pattern.json", 40, 32, 2, 128),
    ShippedModel("01-ai/Yi-9B-200K", "yi-9b-200k.json",
                 "Yi_9B_200k_kv_out_v32_fit_o_best_pattern.json", 48, 32, 4, 128),
)  # fmt: skip

#: Configs this project searched on trained models it can run (benchmarks/real_heads.py on the
#: calibration text, then benchmarks/gpu_real_eval.sh to measure them; the provenance of each file
#: says how). Accuracy against dense: docs/guides/real-models.md.
SEARCHED_MODELS: tuple[ShippedModel, ...] = (
    ShippedModel("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct.json", None,
                 30, 9, 3, 64),
    ShippedModel("google/gemma-3-270m", "gemma-3-270m.json", None, 18, 4, 1, 256),
)  # fmt: skip

_BY_ID = {m.model_id.lower(): m for m in (*SHIPPED_MODELS, *SEARCHED_MODELS)}


def shipped_model_ids() -> list[str]:
    """Ids with a shipped config (case-insensitive when loading): MInference's converted ones and
    the ones searched by this project."""
    return [m.model_id for m in (*SHIPPED_MODELS, *SEARCHED_MODELS)]


def resolve_model_id(name: str) -> ShippedModel | None:
    """The shipped model for ``name``: exact id (any case), else a unique name after the ``/``."""
    key = name.strip().lower()
    if key in _BY_ID:
        return _BY_ID[key]
    if "/" not in key:
        hits = {
            m.file: m
            for m in (*SHIPPED_MODELS, *SEARCHED_MODELS)
            if m.model_id.lower().split("/", 1)[1] == key
        }
        if len(hits) == 1:
            return next(iter(hits.values()))
    return None


def shape_for_source_file(file_name: str) -> dict[str, Any] | None:
    """Model id and shape of the first shipped model converted from MInference's ``file_name``."""
    for m in SHIPPED_MODELS:
        if m.source_file == file_name:
            return {"model_id": m.model_id, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim}
    return None
