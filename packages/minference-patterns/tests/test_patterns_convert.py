"""Conversions: MInference <-> ours (lossless both ways), Qwen's sparse_attention_config."""

from __future__ import annotations

import json
from collections import Counter

import minference_patterns as mp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from minference_patterns import (
    ConfigError,
    HeadPattern,
    PatternConfig,
    from_minference,
    from_qwen,
    to_minference,
)
from patterns_data import MINFERENCE_DIR

VS = HeadPattern.vertical_slash


def source_files():
    return sorted(p for p in MINFERENCE_DIR.glob("*.json") if p.name != "MODELS.json")


def test_every_source_file_round_trips_exactly():
    files = source_files()
    assert len(files) == 7
    for path in files:
        raw = path.read_text()
        data = json.loads(raw)
        cfg = from_minference(path, model_id="m")
        out = to_minference(cfg)
        assert out == data, path.name
        # the same JSON values, types included (ints stay ints, floats keep all digits)
        assert json.dumps(out) == json.dumps(data), path.name
        # and through our JSON format as well
        again = PatternConfig.from_dict(json.loads(cfg.to_json()))
        assert json.dumps(to_minference(again)) == json.dumps(data), path.name


def test_kind_mapping():
    data = [
        {
            "0": ["vertical_and_slash", 1000, 6096, 0.5],
            "1": ["stream_llm", 100, 800, 0.25],
            "2": ["block_sparse", 16, 0, 0.75],
        }
    ]
    cfg = from_minference(data, model_id="m", num_kv_heads=1, head_dim=64, context_length=4096)
    assert cfg.layers[0] == (
        VS(1000, 6096),
        HeadPattern.a_shape(100, 800),
        HeadPattern.block_sparse(16, 64),
    )
    assert cfg.scores == ((0.5, 0.25, 0.75),)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.context_length) == (1, 64, 4096)
    assert cfg.provenance.source == "minference"
    assert to_minference(cfg) == data


def test_block_sparse_size_b_is_kept():
    data = [{"0": ["block_sparse", 100, 123, 1], "1": ["block_sparse", 4, 0, 2]}]
    cfg = from_minference(data, model_id="m")
    assert to_minference(cfg) == data
    assert to_minference(PatternConfig.from_dict(json.loads(cfg.to_json()))) == data


def test_three_element_entries_get_a_null_score():
    cfg = from_minference([{"0": ["vertical_and_slash", 10, 20]}], model_id="m")
    assert cfg.scores is None
    assert to_minference(cfg) == [{"0": ["vertical_and_slash", 10, 20, None]}]


def test_integer_head_keys_are_accepted():
    cfg = from_minference(
        [{1: ["stream_llm", 4, 64, 0.0], 0: ["stream_llm", 4, 32, 0.0]}], model_id="m"
    )
    assert cfg.layers[0] == (HeadPattern.a_shape(4, 32), HeadPattern.a_shape(4, 64))


@st.composite
def exportable_configs(draw):
    nl, nh = draw(st.integers(1, 3)), draw(st.integers(1, 5))

    def head():
        kind = draw(st.sampled_from(["a_shape", "vertical_slash", "block_sparse"]))
        if kind == "a_shape":
            return HeadPattern.a_shape(draw(st.integers(0, 9999)), draw(st.integers(1, 9999)))
        if kind == "block_sparse":
            return HeadPattern.block_sparse(draw(st.integers(1, 999)))
        return VS(draw(st.integers(1, 9999)), draw(st.integers(0, 9999)))

    layers = [[head() for _ in range(nh)] for _ in range(nl)]
    scores = [[draw(st.floats(0, 1)) for _ in range(nh)] for _ in range(nl)]
    return PatternConfig(
        model_id="m", num_layers=nl, num_heads=nh, layers=layers, scores=scores,
        provenance=mp.Provenance(source="minference", tool=None),
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(exportable_configs())
def test_ours_to_minference_and_back_is_lossless(cfg):
    back = from_minference(json.loads(json.dumps(to_minference(cfg))), model_id="m")
    assert back.layers == cfg.layers
    assert back.scores == cfg.scores
    assert back == cfg


def test_dense_heads_need_dense_as():
    cfg = PatternConfig.uniform(2, 2, HeadPattern.dense())
    with pytest.raises(ValueError, match="layer 0, head 0 is dense.*dense_as"):
        to_minference(cfg)
    out = to_minference(cfg, dense_as=("vertical_and_slash", 10**6, 10**6))
    assert out[1]["1"] == ["vertical_and_slash", 10**6, 10**6, None]
    with pytest.raises(ValueError, match="dense_as"):
        to_minference(cfg, dense_as=("dense", 1, 1))


def test_other_block_sizes_cannot_be_exported():
    cfg = PatternConfig.uniform(1, 1, HeadPattern.block_sparse(4, 128))
    with pytest.raises(ValueError, match="block_size 128"):
        to_minference(cfg)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"0": []}, "JSON list of per-layer objects"),
        ([], "no layers"),
        ([["vertical_and_slash", 1, 1, 0]], "layer 0: must be an object"),
        (
            [{"0": ["diagonal", 1, 1, 0.0]}],
            r"layer 0, head 0, field 'kind': unknown MInference pattern kind 'diagonal'",
        ),
        (
            [{"0": ["vertical_and_slash", -1, 1, 0.0]}],
            r"layer 0, head 0, field 'size_a': must be >= 0",
        ),
        (
            [{"0": ["vertical_and_slash", 0, 0, 0.0]}],
            r"layer 0, head 0, field 'size_b': .*both zero",
        ),
        ([{"0": ["stream_llm", 4, 0, 0.0]}], r"layer 0, head 0, field 'size_b': the local window"),
        ([{"0": ["block_sparse", 0, 0, 0.0]}], r"field 'size_a': top-k key blocks"),
        ([{"0": ["vertical_and_slash", 1.5, 1, 0.0]}], r"field 'size_a': must be an integer"),
        ([{"0": ["vertical_and_slash", 1, 1, "x"]}], r"field 'score'"),
        ([{"0": ["vertical_and_slash", 1]}], r"layer 0, head 0: must be \[kind"),
        ([{"x": ["vertical_and_slash", 1, 1, 0]}], r"layer 0: head key 'x'"),
        (
            [{"0": ["vertical_and_slash", 1, 1, 0]}, {"1": ["vertical_and_slash", 1, 1, 0]}],
            r"layer 1: .*missing heads \[0\]; unexpected heads \[1\]",
        ),
        (
            [
                {"0": ["vertical_and_slash", 1, 1, 0], "1": ["vertical_and_slash", 1, 1, 0]},
                {"0": ["vertical_and_slash", 1, 1, 0]},
            ],
            r"layer 1: has 1 heads, layer 0 has 2",
        ),
    ],
)
def test_malformed_minference_data(data, match):
    with pytest.raises(ConfigError, match=match):
        from_minference(data, model_id="m")


def test_malformed_minference_file_names_the_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"0": ["vertical_and_slash", -3, 1, 0.0]}]))
    with pytest.raises(ConfigError, match=rf"{p}: layer 0, head 0, field 'size_a'"):
        mp.load(p)


def test_minference_file_loads_with_auto_detection(tmp_path):
    src = MINFERENCE_DIR / "Qwen2.5_7B_Instruct_1M.json"
    cfg = mp.load(src)  # shipped source file name: id and shape from the registry
    assert cfg.model_id == "Qwen/Qwen2.5-7B-Instruct-1M"
    assert (cfg.num_kv_heads, cfg.head_dim) == (4, 128)
    other = tmp_path / "my_model.json"
    other.write_text(src.read_text())
    cfg2 = mp.load(other)
    assert cfg2.model_id == "my_model" and cfg2.num_kv_heads is None
    assert cfg2.layers == cfg.layers


# ---- Qwen -----------------------------------------------------------------------------------


QWEN_1M_CONFIG = {
    "_name_or_path": "Qwen/Qwen2.5-7B-Instruct-1M",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1010000,
    "dual_chunk_attention_config": {
        "chunk_size": 262144,
        "local_size": 8192,
        "original_max_position_embeddings": 32768,
    },
}


@pytest.fixture
def qwen_list():
    return json.loads((MINFERENCE_DIR / "Qwen2.5_7B_Instruct_1M.json").read_text())


def test_qwen_list_is_minference_format(qwen_list, tmp_path):
    cfg = from_qwen(qwen_list, model_id="Qwen/Qwen2.5-7B-Instruct-1M")
    assert cfg.num_layers == 28 and cfg.num_heads == 28
    assert cfg.provenance.source == "qwen"
    assert to_minference(cfg) == qwen_list
    p = tmp_path / "sparse_attention_config.json"
    p.write_text(json.dumps(qwen_list))
    assert from_qwen(p, model_id="q").layers == cfg.layers


def test_qwen_model_dir_with_separate_file(qwen_list, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1M_CONFIG))
    (tmp_path / "sparse_attention_config.json").write_text(json.dumps(qwen_list))
    for src in (tmp_path, tmp_path / "config.json"):
        cfg = from_qwen(src)
        assert cfg.model_id == "Qwen/Qwen2.5-7B-Instruct-1M"
        assert (cfg.num_kv_heads, cfg.head_dim) == (4, 128)
        # vLLM ran sparse attention only above sparse_attention_threshold (default 32768)
        assert cfg.budget_policy.dense_below == 32769
        assert cfg.provenance.extra["dual_chunk_attention_config"]["chunk_size"] == 262144
        assert to_minference(cfg) == qwen_list
    assert mp.load(tmp_path).model_id == "Qwen/Qwen2.5-7B-Instruct-1M"
    assert all(h.kind == "dense" for h in mp.load(tmp_path).heads_for_layer(0, 32768))


def test_qwen_config_inline_and_named_file(qwen_list, tmp_path):
    inline = json.loads(json.dumps(QWEN_1M_CONFIG))
    inline["dual_chunk_attention_config"]["sparse_attention_config"] = qwen_list
    inline["dual_chunk_attention_config"]["sparse_attention_threshold"] = 8192
    cfg = from_qwen(inline)
    assert cfg.budget_policy.dense_below == 8193
    assert to_minference(cfg) == qwen_list

    top = dict(QWEN_1M_CONFIG, sparse_attention_config="patterns.json")
    (tmp_path / "patterns.json").write_text(json.dumps(qwen_list))
    (tmp_path / "config.json").write_text(json.dumps(top))
    assert from_qwen(tmp_path / "config.json").layers == cfg.layers
    with pytest.raises(ConfigError, match="refers to the file 'patterns.json'.*pass the path"):
        from_qwen(top)


def test_qwen_errors(qwen_list, tmp_path):
    wrong = dict(QWEN_1M_CONFIG, num_hidden_layers=32, sparse_attention_config=qwen_list)
    with pytest.raises(ConfigError, match="num_layers: config has 28, model has 32"):
        from_qwen(wrong)
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1M_CONFIG))
    with pytest.raises(ConfigError, match="no sparse_attention_config"):
        from_qwen(tmp_path)
    with pytest.raises(ConfigError, match="expected a model config"):
        from_qwen(42)
    with pytest.raises(FileNotFoundError):
        from_qwen(tmp_path / "empty_dir_does_not_exist")
    # the shape is read by read_model_shape, the one reader: a bad field is named
    bad = dict(QWEN_1M_CONFIG, num_key_value_heads=-4, sparse_attention_config=qwen_list)
    with pytest.raises(ConfigError, match="shape: num_key_value_heads must be a positive"):
        from_qwen(bad)
    # a mapping with no shape at all: nothing to check the patterns against
    assert from_qwen({"sparse_attention_config": qwen_list}).layers == from_qwen(qwen_list).layers


def test_counts_per_kind_and_size_match_source():
    for path in source_files():
        data = json.loads(path.read_text())
        cfg = from_minference(path, model_id="m")
        want = Counter(tuple(e[:3]) for layer in data for e in layer.values())
        names = {"vertical_slash": "vertical_and_slash", "a_shape": "stream_llm"}
        got = Counter()
        for row in cfg.layers:
            for h in row:
                a, b = (
                    (h.num_vertical, h.num_slash)
                    if h.kind == "vertical_slash"
                    else (h.sink_tokens, h.window_tokens)
                )
                got[(names[h.kind], a, b)] += 1
        assert got == want, path.name
