"""Shipped configs: every MODELS.json entry loads offline and matches its MInference source."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import minference_patterns as mp
import pytest
from minference_patterns import UnknownModelError, to_minference
from minference_patterns.registry import SEARCHED_MODELS, SHIPPED_MODELS, shipped_path
from patterns_data import MINFERENCE_DIR, MODELS_MAP


def test_every_models_json_entry_is_shipped():
    shipped = {m.model_id: m.source_file for m in SHIPPED_MODELS}
    assert shipped == MODELS_MAP
    searched = {m.model_id for m in SEARCHED_MODELS}
    assert set(mp.shipped_model_ids()) == set(MODELS_MAP) | searched


@pytest.mark.parametrize("model", SEARCHED_MODELS, ids=lambda m: m.model_id)
def test_searched_configs_load_with_their_provenance(model):
    cfg = mp.load(model.model_id)
    assert cfg.model_id == model.model_id
    cfg.validate_against(
        num_layers=model.num_layers, num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
    )  # fmt: skip
    prov = cfg.provenance
    assert prov.source == "search" and prov.calibration and prov.objective
    assert prov.tool == "minference-patterns" and prov.tool_version
    # how it was made (the real-heads table it was derived from, or the search command) and where
    # its accuracy against dense is measured
    assert prov.extra["rule"] and (prov.extra.get("table") or prov.extra.get("command"))
    assert prov.extra["measured"].startswith("benchmarks/results/eval_")
    assert cfg.context_length and cfg.scores is not None
    assert shipped_path(model).is_file()


@pytest.mark.parametrize("model", SHIPPED_MODELS, ids=lambda m: m.model_id)
def test_shipped_config_matches_source(model):
    cfg = mp.load(model.model_id)
    src = json.loads((MINFERENCE_DIR / model.source_file).read_text())
    assert cfg.model_id == model.model_id
    assert cfg.num_layers == len(src) == model.num_layers
    assert cfg.num_heads == len(src[0]) == model.num_heads
    assert (cfg.num_kv_heads, cfg.head_dim) == (model.num_kv_heads, model.head_dim)
    cfg.validate_against(
        num_layers=model.num_layers, num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
    )  # fmt: skip
    # per-kind and per-budget counts equal the source's
    kinds = {"vertical_and_slash": "vertical_slash", "stream_llm": "a_shape"}
    want = Counter(kinds[e[0]] for layer in src for e in layer.values())
    assert {k: v for k, v in cfg.kind_counts().items() if v} == dict(want)
    # and the whole file comes back exactly, scores included
    assert json.dumps(to_minference(cfg)) == json.dumps(src)
    prov = cfg.provenance
    assert prov.source == "minference" and "MIT" in prov.license
    assert prov.extra["source_file"] == model.source_file


def test_licence_ships_next_to_the_configs():
    text = files("minference_patterns").joinpath("configs", "LICENSE-MInference").read_text()
    assert "MIT License" in text and "Microsoft" in text
    for m in SHIPPED_MODELS:
        assert shipped_path(m).is_file()


@pytest.mark.parametrize(
    "name",
    [
        "Qwen/Qwen2.5-7B-Instruct",
        "qwen/qwen2.5-7b-instruct",
        "QWEN/QWEN2.5-7B-INSTRUCT",
        " Qwen/Qwen2.5-7B-Instruct ",
        "Qwen2.5-7B-Instruct",
    ],
)
def test_lookup_is_case_insensitive(name):
    cfg = mp.load(name)
    assert cfg.model_id == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.num_layers == 28


def test_aliases_share_a_file_but_keep_their_id():
    a = mp.load("meta-llama/Llama-3.1-8B-Instruct")
    b = mp.load("meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert a.layers == b.layers
    assert (a.model_id, b.model_id) == (
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
    )
    assert (
        mp.load("gradientai/llama-3-8b-instruct-gradient-1048k").model_id
        == "gradientai/Llama-3-8B-Instruct-Gradient-1048k"
    )


def test_unknown_model_id_says_how_to_search():
    with pytest.raises(UnknownModelError) as info:
        mp.load("acme/SuperLM-70B")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    msg = str(err)
    assert "no shipped pattern config for 'acme/SuperLM-70B'" in msg
    assert "minference search --model" in msg and "--calib" in msg and "--out" in msg
    assert "Qwen/Qwen2.5-7B-Instruct" in msg  # lists what is shipped
    with pytest.raises(KeyError):
        mp.load("Llama")  # not a unique short name either


def test_missing_json_path_is_a_file_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        mp.load("does/not/exist.json")


def test_bad_argument_type():
    with pytest.raises(TypeError):
        mp.load(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mp.load("")


def test_a_local_directory_named_like_a_model_falls_back_to_the_shipped_config(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen2.5-7B-Instruct").mkdir(parents=True)
    assert mp.load("Qwen/Qwen2.5-7B-Instruct").num_layers == 28


def test_a_local_model_directory_gets_its_shipped_config(tmp_path):
    d = tmp_path / "checkout"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": "01-ai/Yi-9B-200K"}))
    assert mp.load(d).model_id == "01-ai/Yi-9B-200K"
    named = tmp_path / "glm-4-9b-chat-1m"
    named.mkdir()
    assert mp.load(named).model_id == "THUDM/glm-4-9b-chat-1m"
    other = tmp_path / "my-finetune"
    other.mkdir()
    with pytest.raises(UnknownModelError, match="directory without a sparse attention config"):
        mp.load(other)


def test_heads_for_layer_on_a_shipped_config():
    cfg = mp.load("Qwen/Qwen2.5-7B-Instruct")
    # 1000 verticals + 6096 slashes cover every diagonal of a 4K prompt: dense there
    l0 = cfg.heads_for_layer(0, 4096)
    stored = cfg.heads_for_layer(0)
    for s, h in zip(stored, l0):
        if s.kind == "vertical_slash" and s.num_slash >= 4096:
            assert h.kind == "dense"
        elif s.kind == "vertical_slash":
            assert h == s or h.kind == "dense"
    # the shipped policy (measured): sizes as published up to 128K (MInference's RULER lengths),
    # grown like (n / 128K) ** MEASURED_LONGER_EXPONENT beyond; the absolute policy keeps them
    from minference_patterns.policy import MEASURED_LONGER_EXPONENT

    assert cfg.budget_policy == mp.BudgetPolicy.measured(reference_length=131072)
    assert cfg.heads_for_layer(0, 131072) == stored
    grown = cfg.heads_for_layer(0, 1 << 20)
    f = 8**MEASURED_LONGER_EXPONENT
    for s, h in zip(stored, grown, strict=True):
        if s.kind == "vertical_slash":
            assert (h.num_vertical, h.num_slash) == (
                round(s.num_vertical * f),
                round(s.num_slash * f),
            )
    assert cfg.heads_for_layer(0, 1 << 20, policy=mp.BudgetPolicy.absolute()) == stored


def test_every_shipped_config_carries_the_measured_policy():
    for model_id in mp.shipped_model_ids():
        cfg = mp.load(model_id)
        ref = None if cfg.context_length is not None else 131072
        assert cfg.budget_policy == mp.BudgetPolicy.measured(reference_length=ref), model_id
