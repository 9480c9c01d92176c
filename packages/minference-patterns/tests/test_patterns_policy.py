"""Budget policy: how stored budgets adapt to other prompt lengths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from minference_patterns import BudgetPolicy, HeadPattern, PatternConfig, adapt_pattern

VS, AS, BS = HeadPattern.vertical_slash, HeadPattern.a_shape, HeadPattern.block_sparse


def cfg(policy=None, context_length=32768):
    return PatternConfig(
        model_id="m",
        num_layers=1,
        num_heads=4,
        layers=[[VS(1000, 2000), AS(64, 1024), BS(16), HeadPattern.dense()]],
        context_length=context_length,
        budget_policy=policy or BudgetPolicy(),
    )


def test_default_is_absolute_and_clamps():
    c = cfg()
    assert c.budget_policy == BudgetPolicy.absolute()
    assert c.heads_for_layer(0, 32768) == c.layers[0]
    assert c.heads_for_layer(0, 1 << 20) == c.layers[0]  # never grows
    # shorter: unchanged while they fit, dense when the budget covers everything
    assert c.heads_for_layer(0, 3000) == (VS(1000, 2000), AS(64, 1024), BS(16), HeadPattern.dense())
    assert c.heads_for_layer(0, 1500) == (
        HeadPattern.dense(),
        AS(64, 1024),
        BS(16),
        HeadPattern.dense(),
    )
    assert c.heads_for_layer(0, 1000) == (HeadPattern.dense(),) * 4


def test_covering_rules_are_exact():
    p = BudgetPolicy()
    # a_shape covers iff sink + window >= n
    assert adapt_pattern(AS(64, 1024), 1088, None, p).kind == "dense"
    assert adapt_pattern(AS(64, 1024), 1089, None, p) == AS(64, 1024)
    # vertical_slash covers iff every diagonal (or every column) is kept
    assert adapt_pattern(VS(10, 500), 500, None, p).kind == "dense"
    assert adapt_pattern(VS(10, 500), 501, None, p) == VS(10, 500)
    # block_sparse covers iff top_k >= number of key blocks
    assert adapt_pattern(BS(16), 16 * 64, None, p).kind == "dense"
    assert adapt_pattern(BS(16), 16 * 64 + 1, None, p) == BS(16)


def test_without_densify_sizes_are_only_clamped():
    p = BudgetPolicy(densify_covering=False)
    assert adapt_pattern(VS(1000, 2000), 1500, None, p) == VS(1000, 1500)
    assert adapt_pattern(AS(64, 1024), 100, None, p) == AS(64, 100)
    assert adapt_pattern(BS(16), 200, None, p) == BS(4)


def test_proportional_keeps_density():
    c = cfg(BudgetPolicy.proportional())
    long = c.heads_for_layer(0, 4 * 32768)
    assert long == (VS(4000, 8000), AS(64, 4096), BS(64), HeadPattern.dense())  # sinks not scaled
    short = c.heads_for_layer(0, 16384)
    assert short == (VS(500, 1000), AS(64, 512), BS(8), HeadPattern.dense())


def test_separate_exponents():
    p = BudgetPolicy(shorter_exponent=0.0, longer_exponent=0.5)
    assert adapt_pattern(VS(1000, 2000), 4 * 32768, 32768, p) == VS(2000, 4000)
    assert adapt_pattern(VS(1000, 2000), 16384, 32768, p) == VS(1000, 2000)


def test_scaling_never_reaches_zero():
    p = BudgetPolicy.proportional()
    assert adapt_pattern(VS(1, 3), 100, 32768, p) == VS(1, 1)
    assert adapt_pattern(VS(0, 3), 100, 32768, p) == VS(0, 1)


def test_no_context_length_means_no_scaling():
    c = cfg(BudgetPolicy.proportional(), context_length=None)
    assert c.heads_for_layer(0, 1 << 20) == c.layers[0]


def test_dense_below():
    c = cfg(BudgetPolicy(dense_below=8192))
    assert c.heads_for_layer(0, 8191) == (HeadPattern.dense(),) * 4
    assert c.heads_for_layer(0, 8192)[0] == VS(1000, 2000)


def test_override_policy_per_call():
    c = cfg()
    assert c.heads_for_layer(0, 65536, policy=BudgetPolicy.proportional())[0] == VS(2000, 4000)
    assert c.with_budget_policy(BudgetPolicy.proportional()).heads_for_layer(0, 65536)[0] == VS(
        2000, 4000
    )


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"shorter_exponent": -1}, ValueError),
        ({"longer_exponent": 3}, ValueError),
        ({"longer_exponent": float("nan")}, ValueError),
        ({"dense_below": -1}, ValueError),
        ({"densify_covering": 1}, TypeError),
        ({"shorter_exponent": "1"}, TypeError),
        ({"reference_length": 0}, ValueError),
        ({"reference_length": 1.5}, ValueError),
        ({"reference_length": True}, ValueError),
    ],
)
def test_invalid_policy(kwargs, exc):
    with pytest.raises(exc):
        BudgetPolicy(**kwargs)


def test_policy_dict_round_trip_and_unknown_keys():
    p = BudgetPolicy(0.25, 1.0, False, 10)
    assert BudgetPolicy.from_dict(p.to_dict()) == p
    assert "reference_length" not in p.to_dict()  # files without it are written as before
    p = BudgetPolicy.measured(reference_length=131072)
    assert BudgetPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown budget_policy field"):
        BudgetPolicy.from_dict({"exponent": 1})


@pytest.mark.parametrize("bad", [0, -5, 1.5, None, True])
def test_bad_seq_len(bad):
    with pytest.raises(ValueError, match="seq_len"):
        adapt_pattern(VS(1, 1), bad, None, BudgetPolicy())


def test_reference_length_stands_in_for_an_unknown_context_length():
    """A converted config (no context_length) scales from the policy's reference_length; a
    config's own context_length takes precedence."""
    from minference_patterns.policy import MEASURED_LONGER_EXPONENT as E

    pol = BudgetPolicy.measured(reference_length=131072)
    assert pol.shorter_exponent == 0.0 and pol.longer_exponent == E > 0
    c = cfg(pol, context_length=None)
    assert c.heads_for_layer(0, 131072) == c.layers[0]
    assert c.heads_for_layer(0, 65536) == c.layers[0]  # shorter: never less attention
    f = 4**E
    assert c.heads_for_layer(0, 524288) == (
        VS(round(1000 * f), round(2000 * f)),
        AS(64, round(1024 * f)),
        BS(round(16 * f)),
        HeadPattern.dense(),
    )
    assert pol.scale(524288, None) == pytest.approx(f)
    assert pol.scale(524288, 262144) == pytest.approx(2**E)  # context_length wins
    assert BudgetPolicy.absolute().scale(524288, None) == 1.0


RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "length_policy_cpu.json"


@pytest.mark.skipif(not RESULTS.exists(), reason="benchmark results not in this checkout")
def test_the_measured_exponent_follows_its_result_file():
    """MEASURED_LONGER_EXPONENT is not typed by hand: it is the rule of
    benchmarks/report_length_policy.py (largest per-estimator median growth exponent on real
    heads, rounded up to 0.05) applied to benchmarks/results/length_policy_cpu.json."""
    from minference_patterns.policy import MEASURED_LONGER_EXPONENT

    sys.path.insert(0, str(RESULTS.parents[1]))
    try:
        from report_length_policy import fitted_exponent
    finally:
        sys.path.pop(0)
    res = json.loads(RESULTS.read_text())
    assert {"gemma3", "smollm2"} <= set(res["sources"])  # real heads of two models
    assert MEASURED_LONGER_EXPONENT == pytest.approx(fitted_exponent(res))
