"""PatternConfig: construction, validation, JSON round trips, budget policy access."""

from __future__ import annotations

import json

import minference_patterns as mp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from minference_patterns import BudgetPolicy, ConfigError, HeadPattern, PatternConfig, Provenance

VS = HeadPattern.vertical_slash
AS = HeadPattern.a_shape
BS = HeadPattern.block_sparse


def small_config(**kw) -> PatternConfig:
    layers = (
        (VS(1000, 6096), AS(64, 1024), BS(8), HeadPattern.dense()),
        (VS(30, 800), VS(3500, 100), BS(4, 128), AS(0, 64)),
    )
    args = dict(
        model_id="org/model",
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=128,
        layers=layers,
        context_length=32768,
        scores=((0.5, 1, None, 0.25), (0.125, 3, 0.75, None)),
        provenance=Provenance(source="search", budget=0.1, date="2025-01-01", extra={"seed": 3}),
    )
    args.update(kw)
    return PatternConfig(**args)


# ---- construction ------------------------------------------------------------------------------


def test_fields_and_access():
    cfg = small_config()
    assert cfg.schema_version == mp.SCHEMA_VERSION == 1
    assert cfg.head(1, 2) == BS(4, 128)
    assert cfg.score(0, 1) == 1 and cfg.score(0, 2) is None
    assert cfg.heads_for_layer(1) == cfg.layers[1]
    assert cfg.kind_counts() == {
        "dense": 1, "a_shape": 2, "vertical_slash": 3, "block_sparse": 2, "vertical_block": 0,
    }  # fmt: skip
    with pytest.raises(IndexError, match="layer 2 out of range"):
        cfg.heads_for_layer(2)


def test_lists_are_frozen_to_tuples_and_hashable():
    cfg = small_config(layers=[list(row) for row in small_config().layers])
    assert isinstance(cfg.layers, tuple) and isinstance(cfg.layers[0], tuple)
    assert hash(cfg) == hash(small_config())
    assert cfg == small_config()
    with pytest.raises(AttributeError):
        cfg.model_id = "x"  # type: ignore[misc]


def test_uniform():
    p = VS(100, 800)
    cfg = PatternConfig.uniform(3, 8, p, model_id="m", num_kv_heads=2, head_dim=64)
    assert cfg.num_layers == 3 and cfg.num_heads == 8
    assert all(h == p for row in cfg.layers for h in row)
    assert cfg.provenance.source == "uniform"
    assert PatternConfig.uniform(1, 1, p).model_id == "custom"
    with pytest.raises(TypeError):
        PatternConfig.uniform(1, 1, "vertical_slash")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 3}, "has 2 layers but num_layers is 3"),
        ({"num_heads": 6}, "layer 0: has 4 heads but num_heads is 6"),
        ({"num_kv_heads": 3}, "not a multiple of num_kv_heads"),
        ({"head_dim": 0}, "'head_dim': must be a positive integer"),
        ({"model_id": ""}, "'model_id'"),
        ({"schema_version": 2}, "newer than this minference-patterns"),
        ({"scores": ((1.0,),)}, "'scores'"),
        ({"layers": ((VS(1, 1),) * 4, (VS(1, 1),) * 3 + ("dense",))}, "layer 1, head 3"),
    ],
)
def test_invalid_construction_names_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        small_config(**kwargs)


def test_validate_against():
    cfg = small_config()
    cfg.validate_against(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128)
    cfg.validate_against(num_layers=2)  # unspecified fields are not checked
    with pytest.raises(ValueError) as info:
        cfg.validate_against(num_layers=32, num_heads=4, num_kv_heads=8, head_dim=128)
    msg = str(info.value)
    assert "num_layers: config has 2, model has 32" in msg
    assert "num_kv_heads: config has 2, model has 8" in msg
    assert "num_heads" not in msg.split("(", 1)[1].split(")")[0].replace("num_kv_heads", "")
    assert "minference search" in msg
    # a config without a head_dim does not object to any head_dim
    small_config(head_dim=None).validate_against(head_dim=64)


# ---- JSON --------------------------------------------------------------------------------------


def test_dict_round_trip():
    cfg = small_config()
    d = cfg.to_dict()
    assert d["format"] == "minference-patterns"
    assert d["layers"][1][2] == {
        "kind": "block_sparse",
        "top_k": 4,
        "block_size": 128,
        "score": 0.75,
    }
    assert d["layers"][0][3] == {"kind": "dense", "score": 0.25}
    assert d["layers"][1][3] == {"kind": "a_shape", "sink_tokens": 0, "window_tokens": 64}
    back = PatternConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.scores == cfg.scores
    assert isinstance(back.scores[0][1], int)  # ints stay ints


def test_file_round_trip(tmp_path):
    cfg = small_config()
    path = cfg.save(tmp_path / "sub" / "cfg.json")
    assert PatternConfig.load(path) == cfg
    assert mp.load(path) == cfg
    assert mp.load(str(path), model_id="other").model_id == "other"
    text = path.read_text()
    assert text.count("\n") > 2 * 4  # one head per line
    assert json.loads(text) == cfg.to_dict()


def test_no_scores_round_trip(tmp_path):
    cfg = small_config(scores=None)
    assert "score" not in json.dumps(cfg.to_dict()["layers"])
    assert PatternConfig.load(cfg.save(tmp_path / "c.json")).scores is None


def test_policy_and_provenance_round_trip(tmp_path):
    cfg = small_config(budget_policy=BudgetPolicy(0.5, 1.0, False, 4096))
    back = PatternConfig.load(cfg.save(tmp_path / "c.json"))
    assert back.budget_policy == BudgetPolicy(0.5, 1.0, False, 4096)
    assert back.provenance == cfg.provenance
    assert back.provenance.extra["seed"] == 3


kinds = st.sampled_from(["dense", "a_shape", "vertical_slash", "block_sparse"])


@st.composite
def head_patterns(draw):
    kind = draw(kinds)
    if kind == "dense":
        return HeadPattern.dense()
    if kind == "a_shape":
        return AS(draw(st.integers(0, 10**6)), draw(st.integers(1, 10**6)))
    if kind == "vertical_slash":
        v = draw(st.integers(0, 10**6))
        return VS(v, draw(st.integers(0 if v else 1, 10**6)))
    return BS(draw(st.integers(1, 4096)), 64 * draw(st.integers(1, 4)))


@st.composite
def configs(draw):
    nl, nh = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    layers = [[draw(head_patterns()) for _ in range(nh)] for _ in range(nl)]
    score = st.one_of(
        st.none(), st.integers(-(10**9), 10**9), st.floats(allow_nan=False, allow_infinity=False)
    )
    scores = draw(
        st.one_of(st.none(), st.just([[draw(score) for _ in range(nh)] for _ in range(nl)]))
    )
    if scores is not None and all(s is None for row in scores for s in row):
        scores = None
    return PatternConfig(
        model_id=draw(st.text(min_size=1, max_size=20)),
        num_layers=nl,
        num_heads=nh,
        num_kv_heads=draw(st.sampled_from([None, 1])),
        head_dim=draw(st.sampled_from([None, 64, 128])),
        layers=layers,
        context_length=draw(st.one_of(st.none(), st.integers(1, 10**7))),
        scores=scores,
    )


@settings(max_examples=60, deadline=None)
@given(configs())
def test_random_round_trip(cfg):
    text = cfg.to_json()
    assert PatternConfig.from_dict(json.loads(text)) == cfg


# ---- malformed files ---------------------------------------------------------------------------


def write(tmp_path, obj, name="bad.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def good_dict():
    return small_config().to_dict()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda d: d["layers"][1][3].update(kind="diagonal"),
            r"layer 1, head 3, field 'kind': unknown pattern kind 'diagonal'",
        ),
        (
            lambda d: d["layers"][0][0].update(num_vertical=-5),
            r"layer 0, head 0, field 'num_vertical': must be >= 0, got -5",
        ),
        (
            lambda d: d["layers"][0][1].update(window_tokens=0),
            r"layer 0, head 1, field 'window_tokens': must be a positive integer, got 0",
        ),
        (
            lambda d: d["layers"][0][2].update(top_k=0),
            r"layer 0, head 2, field 'top_k': must be a positive integer",
        ),
        (
            lambda d: d["layers"][1][2].update(block_size=100),
            r"layer 1, head 2, field 'block_size': must be a multiple of 64",
        ),
        (
            lambda d: d["layers"][0][0].update(num_vertical=0, num_slash=0),
            r"layer 0, head 0, field 'num_slash': .*both zero",
        ),
        (
            lambda d: d["layers"][0][0].update(num_slash=1.5),
            r"layer 0, head 0, field 'num_slash': must be an integer",
        ),
        (
            lambda d: d["layers"][0][0].pop("num_slash"),
            r"layer 0, head 0, field 'num_slash': missing",
        ),
        (
            lambda d: d["layers"][0][1].update(top_k=3),
            r"layer 0, head 1: unknown field\(s\) 'top_k' for kind 'a_shape'",
        ),
        (lambda d: d["layers"][0][0].pop("kind"), r"layer 0, head 0: missing 'kind'"),
        (lambda d: d["layers"][1].pop(), r"layer 1: has 3 heads but num_heads is 4"),
        (lambda d: d["layers"].pop(), r"'layers': has 1 layers but num_layers is 2"),
        (lambda d: d.update(num_heads=0), r"'num_heads': must be a positive integer"),
        (lambda d: d.update(schema_version=7), r"schema version 7 is newer than .* upgrade"),
        (lambda d: d.update(schema_version="1"), r"'schema_version': must be a positive integer"),
        (lambda d: d.pop("model_id"), r"'model_id': missing"),
        (lambda d: d.update(colour="red"), r"unknown top-level field\(s\) 'colour'"),
        (
            lambda d: d["budget_policy"].update(longer_exponent=5),
            r"'budget_policy'.*longer_exponent",
        ),
        (lambda d: d["layers"][0][0].update(score="high"), r"layer 0, head 0, field 'score'"),
    ],
)
def test_malformed_file_errors_name_layer_head_field(tmp_path, mutate, match):
    d = good_dict()
    mutate(d)
    p = write(tmp_path, d)
    with pytest.raises(ConfigError, match=match) as info:
        mp.load(p)
    assert str(p) in str(info.value)  # the file is named too
    assert isinstance(info.value, ValueError)


def test_truncated_file(tmp_path):
    text = small_config().to_json()
    p = write(tmp_path, text[: len(text) // 2])
    with pytest.raises(ConfigError, match="looks truncated"):
        mp.load(p)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "file is empty"),
        ("   \n", "file is empty"),
        ("this is not json", "not valid JSON"),
        ('{"a": 1}', "not a pattern config"),
        ("42", "not a pattern config"),
    ],
)
def test_non_json_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        mp.load(write(tmp_path, text))


def test_binary_file(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a UTF-8"):
        mp.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such pattern config file"):
        mp.load(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        PatternConfig.load(tmp_path / "nope.json")


def test_from_dict_of_a_list_hints_at_minference():
    with pytest.raises(ConfigError, match="MInference's format"):
        PatternConfig.from_dict([{"0": ["vertical_and_slash", 1, 1, 0.0]}])


def test_vertical_block_heads_round_trip_and_follow_the_rules(tmp_path):
    """A config of vertical_block heads saves and loads (fields in the schema's order), counts its
    pairs as columns plus blocks, grows both budgets with the policy, estimates with both passes,
    and cannot be written in MInference's format."""
    from minference_patterns.convert import to_minference
    from minference_patterns.cost import estimation_work
    from minference_patterns.density import nominal_pairs
    from minference_patterns.policy import adapt_pattern

    vb = HeadPattern.vertical_block(128, 8)
    cfg = PatternConfig.uniform(2, 4, vb, model_id="t", num_kv_heads=2, head_dim=64)
    cfg.save(tmp_path / "vb.json")
    head = json.loads((tmp_path / "vb.json").read_text())["layers"][0][0]
    assert head == {"kind": "vertical_block", "num_vertical": 128, "top_k": 8}
    assert mp.load(tmp_path / "vb.json").head(1, 3) == vb
    assert cfg.kind_counts()["vertical_block"] == 8
    n = 8192
    cols = nominal_pairs(HeadPattern.vertical_slash(128, 0), n)
    blocks = nominal_pairs(HeadPattern.block_sparse(8), n)
    assert nominal_pairs(vb, n) == pytest.approx(cols + blocks)
    assert estimation_work(vb, n) == estimation_work(
        HeadPattern.vertical_slash(128, 1), n
    ) + estimation_work(HeadPattern.block_sparse(8), n)
    grown = adapt_pattern(vb, 4 * n, n, BudgetPolicy(reference_length=n, longer_exponent=1.0))
    assert grown == HeadPattern.vertical_block(512, 32)
    with pytest.raises(ValueError, match="'vertical_block' has no MInference equivalent"):
        to_minference(cfg)
    bad = json.loads((tmp_path / "vb.json").read_text())
    bad["layers"][0][0]["top_k"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="top_k"):
        mp.load(tmp_path / "bad.json")
