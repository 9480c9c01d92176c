"""Cost models and nominal pair counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from minference_kernels import block_sparse_mask, streaming_mask
from minference_patterns import AnalyticCostModel, HeadPattern, MeasuredCostModel
from minference_patterns.cost import (
    CostRecord,
    estimation_work,
    measure_kernel_costs,
    relative_cost,
)
from minference_patterns.density import dense_pairs, nominal_density, nominal_pairs

AS, VS, BS = HeadPattern.a_shape, HeadPattern.vertical_slash, HeadPattern.block_sparse


@pytest.mark.parametrize("n", [1, 63, 64, 200, 1000])
@pytest.mark.parametrize(("sink", "window"), [(0, 1), (4, 16), (64, 64), (500, 700)])
def test_a_shape_pairs_are_exact(n, sink, window):
    got = nominal_pairs(AS(sink, window), n)
    want = int(streaming_mask(sink, window, n).sum())
    assert got == want


@pytest.mark.parametrize("n", [64, 300, 1000])
@pytest.mark.parametrize("top_k", [1, 3, 100])
def test_block_sparse_pairs_with_diagonal_kept(n, top_k):
    nb = math.ceil(n / 64)
    # keep the diagonal plus the top_k - 1 blocks before it
    idx = torch.full((1, 1, nb, top_k), -1)
    for m in range(nb):
        ids = list(range(m, max(-1, m - top_k), -1))
        idx[0, 0, m, : len(ids)] = torch.tensor(ids)
    want = int(block_sparse_mask(idx, n).sum())
    assert nominal_pairs(BS(top_k), n) == want


def test_nominal_density_bounds():
    for p in (VS(10**6, 10**6), AS(0, 10**6), BS(10**4), HeadPattern.dense()):
        assert nominal_density(p, 4096) == 1.0
    assert 0 < nominal_density(VS(100, 800), 131072) < 0.02
    assert dense_pairs(4) == 10
    with pytest.raises(ValueError):
        dense_pairs(-1)


def test_analytic_model():
    m = AnalyticCostModel()
    n = 32768
    assert relative_cost(m, HeadPattern.dense(), n) == pytest.approx(1.0)
    # more kept pairs cost more; estimation is charged to online kinds only
    assert m.cost(VS(10, 10), n, kept_pairs=2e6) > m.cost(VS(10, 10), n, kept_pairs=1e6)
    assert m.cost(VS(10, 10), n, kept_pairs=0) == pytest.approx(2.0 * 64 * n)
    assert m.cost(AS(64, 64), n, kept_pairs=0) == 0
    assert estimation_work(BS(4), 640) == 10 * 11 / 2 + 640
    # without kept_pairs the budget's nominal pairs are used
    assert m.cost(AS(64, 64), n) == pytest.approx(nominal_pairs(AS(64, 64), n))
    assert m.describe()["type"] == "analytic"
    with pytest.raises(ValueError, match="unknown kind"):
        AnalyticCostModel(
            pair_cost={"dense": 1, "a_shape": 1, "vertical_slash": 1, "block_sparse": 1, "x": 1}
        )
    with pytest.raises(ValueError, match="lacks kind"):
        AnalyticCostModel(pair_cost={"dense": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        AnalyticCostModel(estimation_cost={"vertical_slash": -1})


def synthetic_records():
    truth = {
        "dense": (2e-9, 0.0, 0.01),
        "a_shape": (2.5e-9, 0.0, 0.02),
        "vertical_slash": (3e-9, 5e-9, 0.05),
    }
    recs = []
    for n in (8192, 16384, 32768, 65536):
        for p, frac in (
            (HeadPattern.dense(), 1.0),
            (AS(64, 1024), 0.05),
            (AS(64, 4096), 0.2),
            (VS(100, 800), 0.03),
            (VS(1000, 4096), 0.15),
        ):
            kept = frac * dense_pairs(n)
            a, b, c = truth[p.kind]
            t = a * kept + b * estimation_work(p, n) + c
            recs.append(CostRecord(p, n, kept * 8, t * 8, num_heads=8))
    return truth, recs


def test_measured_model_recovers_coefficients(tmp_path):
    truth, recs = synthetic_records()
    m = MeasuredCostModel.from_records(recs, device="fake", dtype="bfloat16", head_dim=128)
    for kind, coef in truth.items():
        assert m.coefficients[kind] == pytest.approx(coef, rel=1e-6, abs=1e-9)
    # block_sparse had no records: dense fit scaled by the analytic rates
    a_d = m.coefficients["dense"][0]
    assert m.coefficients["block_sparse"][0] == pytest.approx(a_d * 1.1)
    path = m.to_json(tmp_path / "costs.json")
    back = MeasuredCostModel.from_json(path)
    for kind in m.coefficients:
        assert back.coefficients[kind] == pytest.approx(m.coefficients[kind], rel=1e-9, abs=1e-15)
    assert back.device == "fake"
    n = 65536
    assert relative_cost(back, HeadPattern.dense(), n) == pytest.approx(1.0)
    assert 0 < relative_cost(back, VS(100, 800), n, kept_pairs=0.03 * dense_pairs(n)) < 0.1


def test_measured_model_errors(tmp_path):
    _, recs = synthetic_records()
    with pytest.raises(ValueError, match="dense"):
        MeasuredCostModel.from_records([r for r in recs if r.pattern.kind != "dense"])
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "nope"}))
    with pytest.raises(ValueError, match="not a minference-patterns cost file"):
        MeasuredCostModel.from_json(bad)
    bad.write_text(json.dumps({"format": "minference-patterns-costs", "version": 1, "records": []}))
    with pytest.raises(ValueError, match="no timing records"):
        MeasuredCostModel.from_json(bad)
    bad.write_text(json.dumps({"format": "minference-patterns-costs", "records": [{"seq_len": 5}]}))
    with pytest.raises(ValueError, match="cost record 0: missing field 'pattern'"):
        MeasuredCostModel.from_json(bad)


def test_measure_kernel_costs_on_cpu():
    pats = [HeadPattern.dense(), AS(16, 64), VS(32, 64), BS(2)]
    m = measure_kernel_costs(
        (256, 512), pats, num_heads=2, num_kv_heads=1, head_dim=64, device="cpu",
        repeats=1, warmup=0, density_rows=64,
    )  # fmt: skip
    assert len(m.records) == 8
    dense = [r for r in m.records if r.pattern.kind == "dense"]
    assert all(r.kept_pairs == 2 * dense_pairs(r.seq_len) for r in dense)
    assert all(0 < r.kept_pairs < 2 * dense_pairs(r.seq_len) for r in m.records if r not in dense)
    assert m.cost(HeadPattern.dense(), 512) > 0
    assert m.describe()["device"] == "cpu"
