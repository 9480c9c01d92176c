"""Settings, layer names, tensor-parallel head slicing and start-up checks (no vLLM needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from minference_kernels import HeadPattern, PrefillOptions
from minference_patterns import PatternConfig
from minference_vllm import settings as S
from minference_vllm._plugin import parse_version, version_supported

# ---- resolve_settings -------------------------------------------------------------------


def test_unconfigured_is_none() -> None:
    assert S.resolve_settings(None, {}) is None
    assert S.resolve_settings({}, {}) is None
    assert S.resolve_settings({"other_plugin": {"x": 1}}, {}) is None
    # env knobs without a config do not switch the plugin on
    assert S.resolve_settings({}, {S.ENV_MIN_SPARSE_LEN: "100"}) is None


def test_additional_config_section() -> None:
    got = S.resolve_settings(
        {"minference": {"config": "p.json", "min_sparse_len": 4096, "last_q": 32}}, {}
    )
    opts = PrefillOptions(min_sparse_len=4096, last_q=32)
    assert got == S.PluginSettings(config="p.json", options=opts)
    assert got is not None and got.options.min_sparse_query == 64
    assert got.options.backend == "auto"


def test_additional_config_as_json_string() -> None:
    got = S.resolve_settings({"minference": json.dumps({"config": "org/model"})}, {})
    assert got is not None and got.config == "org/model" and got.options == PrefillOptions()


def test_env_fallback_and_precedence() -> None:
    env = {
        S.ENV_CONFIG: "env.json",
        S.ENV_MIN_SPARSE_LEN: "1000",
        S.ENV_MIN_SPARSE_QUERY: "8",
        S.ENV_LAST_Q: "16",
        S.ENV_TRACE: "/tmp/t.jsonl",
    }
    got = S.resolve_settings(None, env)
    opts = PrefillOptions(min_sparse_len=1000, min_sparse_query=8, last_q=16)
    assert got == S.PluginSettings("env.json", opts, "/tmp/t.jsonl")
    # additional_config wins field by field; the rest still comes from the environment
    got = S.resolve_settings({"minference": {"min_sparse_len": 5}}, env)
    assert got is not None and got.config == "env.json" and got.options.min_sparse_len == 5
    assert got.options.last_q == 16 and got.options.block_allocation == "query_block"
    got = S.resolve_settings(None, {**env, S.ENV_BLOCK_ALLOCATION: "head"})
    assert got is not None and got.options.block_allocation == "head"
    assert got.options.coverage is None
    got = S.resolve_settings(None, {**env, S.ENV_COVERAGE: "0.9"})
    assert got is not None and got.options.coverage == 0.9
    got = S.resolve_settings({"minference": {"coverage": 1}}, {**env, S.ENV_COVERAGE: "0.9"})
    assert got is not None and got.options.coverage == 1
    got = S.resolve_settings(None, {**env, S.ENV_BACKEND: "torch", S.ENV_MAX_DENSITY: "none"})
    assert got is not None and got.options.backend == "torch" and got.options.max_density is None


@pytest.mark.parametrize(
    ("section", "env", "match"),
    [
        ({"config": "p", "treshold": 3}, {}, "unknown key"),
        ({"config": "p", "min_sparse_len": "big"}, {}, "min_sparse_len must be an int"),
        ({"config": "p", "min_sparse_len": 0}, {}, "min_sparse_len must be >= 1"),
        ({"config": "p", "min_sparse_len": True}, {}, "min_sparse_len must be an int"),
        ({"config": "p", "backend": "cuda"}, {}, "backend must be one of"),
        ({"config": "p", "last_q": 129}, {}, "last_q must be <= 128"),
        ({"config": "p", "block_allocation": "row"}, {}, "block_allocation must be one of"),
        ({"config": "p", "coverage": 0}, {}, r"coverage must be in \(0, 1\]"),
        ({"config": "p", "coverage": 1.5}, {}, r"coverage must be in \(0, 1\]"),
        ({"config": "p", "coverage": float("nan")}, {}, r"coverage must be in \(0, 1\]"),
        ({"config": "p", "coverage": "0.9"}, {}, "coverage must be a number"),
        ({"config": "p", "coverage": True}, {}, "coverage must be a number"),
        ({"config": "p", "max_density": 2}, {}, r"max_density must be in \(0, 1\]"),
        # the names renamed in 0.2.0 fail with the new name, not silently
        ({"config": "p", "threshold": 8192}, {}, "'threshold' was renamed to 'min_sparse_len'"),
        ({"config": "p", "min_query_len": 8}, {}, "renamed to 'min_sparse_query'"),
        ({"config": "p", "kernel_backend": "torch"}, {}, "renamed to 'backend'"),
        ({}, {S.ENV_CONFIG: "p", "MINFERENCE_VLLM_THRESHOLD": "9"}, "MIN_SPARSE_LEN"),
        ({}, {S.ENV_CONFIG: "p", S.ENV_COVERAGE: "most"}, "COVERAGE='most' is not a number"),
        ({"config": ""}, {}, "non-empty"),
        ({}, {S.ENV_CONFIG: "p", S.ENV_MIN_SPARSE_LEN: "1e4"}, "not an integer"),
        ([1, 2], {}, "must be an object"),
        ("{not json", {}, "not valid JSON"),
    ],
)
def test_bad_settings_raise(section: object, env: dict[str, str], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        S.resolve_settings({"minference": section}, env)


def test_env_flag() -> None:
    assert S.env_flag({"X": "1"}, "X") and S.env_flag({"X": "yes"}, "X")
    assert not S.env_flag({}, "X") and not S.env_flag({"X": "0"}, "X")
    with pytest.raises(ValueError, match="not a boolean"):
        S.env_flag({"X": "maybe"}, "X")


def test_defaults_are_the_options_defaults() -> None:
    """The plugin's settings are PrefillOptions unchanged: one name and one default per setting
    (a re-declared key or default fails here), and every option has its variable."""
    import dataclasses

    got = S.resolve_settings({"minference": {"config": "p"}}, {})
    assert got is not None and got.options == PrefillOptions()
    assert got.options.min_sparse_len == 32768  # the measured crossover, not 8192 any more
    other = {"min_sparse_len": ("9", 9), "min_sparse_query": ("3", 3), "last_q": ("7", 7),
             "backend": ("torch", "torch"), "coverage": ("0.5", 0.5),
             "block_allocation": ("layer", "layer"), "max_density": ("none", None)}  # fmt: skip
    assert set(other) == {f.name for f in dataclasses.fields(PrefillOptions)}
    for name, (raw, value) in other.items():
        var = "MINFERENCE_VLLM_" + name.upper()
        assert getattr(S, "ENV_" + name.upper()) == var
        got = S.resolve_settings(None, {S.ENV_CONFIG: "p", var: raw})
        assert got is not None and getattr(got.options, name) == value
        assert got.options == PrefillOptions().replace(**{name: value})


# ---- layer names and tensor parallelism --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.0.self_attn.attn", 0),
        ("model.layers.17.self_attn.attn", 17),
        ("language_model.model.layers.3.self_attn.attn", 3),
    ],
)
def test_layer_index(name: str, index: int) -> None:
    assert S.layer_index(name) == index


@pytest.mark.parametrize("name", ["model.attn", "model.layers.1.experts.2.attn", ""])
def test_layer_index_rejects_ambiguous_names(name: str) -> None:
    with pytest.raises(ValueError, match="layer index"):
        S.layer_index(name)


def _heads(n: int) -> tuple[HeadPattern, ...]:
    return tuple(HeadPattern.vertical_slash(i + 1, 10) for i in range(n))


def test_heads_for_rank_slices_contiguously() -> None:
    heads = _heads(8)
    assert S.heads_for_rank(heads, 1, 0) == heads
    assert S.heads_for_rank(heads, 2, 0) == heads[:4]
    assert S.heads_for_rank(heads, 2, 1) == heads[4:]
    slices = [S.heads_for_rank(heads, 4, r) for r in range(4)]
    assert slices == [heads[0:2], heads[2:4], heads[4:6], heads[6:8]]
    # the ranks together cover every head exactly once, in order
    assert sum(slices, ()) == heads
    # as many ranks as heads: one head each
    assert [S.heads_for_rank(heads, 8, r) for r in range(8)] == [(h,) for h in heads]


@pytest.mark.parametrize(
    ("tp", "rank", "match"), [(3, 0, "evenly"), (2, 2, "rank"), (0, 0, "rank")]
)
def test_heads_for_rank_errors(tp: int, rank: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.heads_for_rank(_heads(8), tp, rank)


# ---- unsupported settings ------------------------------------------------------------------


def _reasons(**overrides: object) -> list[str]:
    kw: dict[str, object] = dict(
        kv_cache_dtype="auto",
        sliding_window=None,
        has_alibi=False,
        has_sinks=False,
        logits_soft_cap=None,
        attn_type="decoder",
    )
    kw.update(overrides)
    return S.unsupported_reasons(**kw)  # type: ignore[arg-type]


def test_plain_attention_is_supported() -> None:
    assert _reasons() == []
    assert _reasons(kv_cache_dtype="bfloat16", logits_soft_cap=0.0) == []


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"kv_cache_dtype": "fp8"}, "fp8"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "quantised"),
        ({"sliding_window": 4096}, "sliding-window"),
        ({"has_alibi": True}, "ALiBi"),
        ({"has_sinks": True}, "sinks"),
        ({"logits_soft_cap": 30.0}, "soft-capping"),
        ({"attn_type": "encoder_only"}, "decoder self-attention"),
    ],
)
def test_unsupported_settings_are_named(override: dict[str, object], match: str) -> None:
    reasons = _reasons(**override)
    assert len(reasons) == 1 and match in reasons[0]


def test_all_unsupported_reasons_are_reported_together() -> None:
    assert len(_reasons(kv_cache_dtype="fp8", sliding_window=8, has_alibi=True)) == 3


# ---- batch planning --------------------------------------------------------------------


def test_plan_batch_mixed() -> None:
    cfg = S.PluginSettings("x", PrefillOptions(min_sparse_len=100, min_sparse_query=16))
    # decode (q=1, long ctx) | long chunk | short prompt | chunk with too few queries | empty row
    starts = [0, 1, 201, 221, 231, 231]
    seq_lens = [5000, 300, 20, 5000, 7]
    sparse, dense = S.plan_batch(starts, seq_lens, cfg)
    assert sparse == [1]
    assert dense == [0, 2, 3]


def test_plan_batch_threshold_counts_cached_tokens() -> None:
    cfg = S.PluginSettings("x", PrefillOptions(min_sparse_len=100, min_sparse_query=16))
    # a 50-token chunk after 60 cached tokens reaches the threshold
    assert S.plan_batch([0, 50], [110], cfg) == ([0], [])
    assert S.plan_batch([0, 50], [99], cfg) == ([], [0])


# ---- pattern configs -------------------------------------------------------------------


@pytest.fixture()
def config_file(tmp_path):
    S.clear_pattern_cache()
    path = tmp_path / "patterns.json"
    PatternConfig.uniform(
        2, 4, HeadPattern.vertical_slash(8, 16), model_id="tiny", num_kv_heads=2, head_dim=64
    ).save(path)
    yield str(path)
    S.clear_pattern_cache()


def test_load_patterns_fits(config_file: str) -> None:
    cfg = S.load_patterns(config_file, S.ModelShape(2, 4, 2, 64))
    assert cfg.num_layers == 2
    assert S.load_patterns(config_file) is cfg  # loaded once per process


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        (S.ModelShape(3, 4, 2, 64), "num_layers: config has 2, model has 3"),
        (S.ModelShape(2, 8, 2, 64), "num_heads: config has 4, model has 8"),
        (S.ModelShape(2, 4, 4, 64), "num_kv_heads"),
        (S.ModelShape(2, 4, 2, 128), "head_dim"),
    ],
)
def test_load_patterns_mismatch(config_file: str, shape: S.ModelShape, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        S.load_patterns(config_file, shape)
    assert str(info.value).startswith("minference: ")


def test_load_patterns_refuses_vertical_block_heads(tmp_path) -> None:
    """The one-launch batch kernel does not run vertical_block heads: the engine fails at start,
    naming them, not at the first long prompt."""
    S.clear_pattern_cache()
    path = tmp_path / "vb.json"
    PatternConfig.uniform(
        2, 4, HeadPattern.vertical_block(8, 2), model_id="tiny", num_kv_heads=2, head_dim=64
    ).save(path)
    with pytest.raises(ValueError, match="8 vertical_block heads, which the plugin"):
        S.load_patterns(str(path), S.ModelShape(2, 4, 2, 64))
    S.clear_pattern_cache()


def test_load_patterns_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot load pattern config"):
        S.load_patterns(str(tmp_path / "nope.json"))


# ---- plugin entry point ------------------------------------------------------------------


def test_parse_version() -> None:
    assert parse_version("0.32.0") == (0, 32, 0)
    assert parse_version("0.32.1rc1.dev5+gabc.cpu") == (0, 32, 1)
    assert version_supported("0.32.0", (0, 32), (0, 33))
    assert version_supported("0.32.9", (0, 32), (0, 33))
    assert not version_supported("0.33.0", (0, 32), (0, 33))
    assert not version_supported("0.31.2", (0, 32), (0, 33))
    with pytest.raises(ValueError):
        parse_version("dev")


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, minference_vllm\n"
        "heavy = [m for m in ('vllm', 'torch', 'minference_kernels') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(minference_vllm.register)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_disabled_register_imports_nothing() -> None:
    code = (
        "import os, sys\n"
        "os.environ['MINFERENCE_VLLM_DISABLE'] = '1'\n"
        "import minference_vllm\n"
        "minference_vllm.register(); minference_vllm.register()\n"
        "assert 'vllm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
