"""``LLM.generate`` with the plugin on a tiny random Llama, on vLLM's CPU backend.

Each engine configuration runs once per test session, in a fresh process
(``vllm_engine_runner.py``); an engine start costs tens of seconds on CPU, so the tests share four:

* ``baseline``: the same model *without* the plugin (``VLLM_PLUGINS=""``);
* ``full``: the plugin with full-budget patterns of every kind, a low threshold and small chunks:
  every pre-fill chunk past 64 tokens of context runs the sparse kernels, which at full budget must
  reproduce dense attention;
* ``sparse``: real sparse budgets on a long prompt, configured through environment variables;
* ``mismatch``: a config for another model shape, which must stop the engine at start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import vllm_tiny_model as tiny

pytestmark = pytest.mark.vllm

HERE = Path(__file__).parent
MAX_TOKENS = 8
# three concurrent prompts of different lengths: two long ones (chunked, sparse) and a short one
PROMPTS = [tiny.word_ids(700, 1), tiny.word_ids(230, 2), tiny.word_ids(20, 3)]
LONG_PROMPT = tiny.word_ids(900, 5)
ENGINE = {
    "dtype": "float32",
    "max_model_len": 1024,
    "enforce_eager": True,
    "max_num_seqs": 4,
    "seed": 0,
}
CHUNKED = {**ENGINE, "max_num_batched_tokens": 96}


@dataclass
class EngineRun:
    returncode: int
    token_ids: list[list[int]]
    trace: list[dict[str, Any]]
    log: str


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("minference_vllm")


@pytest.fixture(scope="session")
def model_dir(workdir: Path) -> str:
    return str(tiny.build_model(workdir / "tiny-llama"))


def _pattern_config(path: Path, layers: list[list[Any]], **kwargs: Any) -> str:
    from minference_patterns import PatternConfig

    PatternConfig(
        model_id="tiny-llama",
        num_layers=tiny.NUM_LAYERS,
        num_heads=tiny.NUM_HEADS,
        num_kv_heads=tiny.NUM_KV_HEADS,
        head_dim=tiny.HEAD_DIM,
        layers=tuple(tuple(layer) for layer in layers),
        **kwargs,
    ).save(path)
    return str(path)


@pytest.fixture(scope="session")
def run_engine(workdir: Path, model_dir: str) -> Callable[..., EngineRun]:
    def run(
        name: str,
        prompts: list[list[int]],
        engine: dict[str, Any],
        minference: dict[str, Any] | None = None,
        plugins: bool = True,
        via_env: bool = False,
    ) -> EngineRun:
        spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
        trace_path = workdir / f"{name}.trace.jsonl"
        engine = dict(engine)
        settings = None if minference is None else {**minference, "trace": str(trace_path)}
        if settings is not None and not via_env:
            engine["additional_config"] = {"minference": settings}
        spec = {"model": model_dir, "prompts": prompts, "max_tokens": MAX_TOKENS, "engine": engine}
        spec_path.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINFERENCE_VLLM_")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; plenty for the tiny model
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["HF_HUB_OFFLINE"] = "1"
        if not plugins:
            env["VLLM_PLUGINS"] = ""  # vLLM's own switch: load no general plugin
        if settings is not None and via_env:  # the environment-variable fallback
            env.update({f"MINFERENCE_VLLM_{k.upper()}": str(v) for k, v in settings.items()})
        proc = subprocess.run(
            [sys.executable, str(HERE / "vllm_engine_runner.py"), str(spec_path), str(out_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = proc.stdout + proc.stderr
        token_ids = json.loads(out_path.read_text())["token_ids"] if proc.returncode == 0 else []
        trace = []
        if trace_path.exists():
            trace = [json.loads(line) for line in trace_path.read_text().splitlines()]
        return EngineRun(proc.returncode, token_ids, trace, log)

    return run


def _ok(run: EngineRun) -> EngineRun:
    assert run.returncode == 0, run.log[-6000:]
    return run


@pytest.fixture(scope="session")
def baseline(run_engine) -> EngineRun:
    return _ok(run_engine("baseline", PROMPTS, CHUNKED, plugins=False))


@pytest.fixture(scope="session")
def full_budget(run_engine, workdir: Path) -> EngineRun:
    from minference_kernels import HeadPattern as P
    from minference_patterns import BudgetPolicy

    big = 4096  # more than any prompt here: every causal pair is kept
    config = _pattern_config(
        workdir / "full.json",
        [
            [P.vertical_slash(big, big)] * tiny.NUM_HEADS,
            [P.a_shape(4, big), P.block_sparse(big), P.dense(), P.vertical_slash(big, big)],
        ],
        # keep the sparse kinds instead of turning covering budgets into dense heads
        budget_policy=BudgetPolicy(densify_covering=False),
    )
    settings = {"config": config, "min_sparse_len": 64, "min_sparse_query": 16}
    return _ok(run_engine("full", PROMPTS, CHUNKED, settings))


@pytest.fixture(scope="session")
def sparse_budget(run_engine, workdir: Path) -> EngineRun:
    from minference_kernels import HeadPattern as P

    config = _pattern_config(
        workdir / "sparse.json",
        [
            [P.vertical_slash(16, 32)] * tiny.NUM_HEADS,
            [P.a_shape(4, 32), P.block_sparse(2), P.dense(), P.vertical_slash(8, 16)],
        ],
    )
    engine = {**ENGINE, "max_num_batched_tokens": 512}
    settings = {"config": config, "min_sparse_len": 256}
    # configured through MINFERENCE_VLLM_* variables instead of --additional-config
    return _ok(run_engine("sparse", [LONG_PROMPT], engine, settings, via_env=True))


def test_full_budget_matches_dense(baseline: EngineRun, full_budget: EngineRun) -> None:
    assert len(baseline.token_ids) == len(PROMPTS)
    assert all(len(ids) == MAX_TOKENS for ids in baseline.token_ids)
    assert full_budget.token_ids == baseline.token_ids


def test_full_budget_took_the_sparse_path(full_budget: EngineRun) -> None:
    trace = full_budget.trace
    assert trace, "the sparse path never ran"
    assert {t["layer"] for t in trace} == set(range(tiny.NUM_LAYERS))
    # chunked pre-fill: later chunks attend to keys read back from the paged cache
    assert any(t["cached_tokens"] > 0 for t in trace)
    # both long prompts took it; the 20-token prompt is under the threshold and never does
    assert {t["seq_len"] for t in trace} >= {700, 230}
    assert all(t["seq_len"] >= 64 and t["query_tokens"] >= 16 for t in trace)
    kinds = {k for t in trace for k in t["kinds"]}
    assert kinds == {"vertical_slash", "a_shape", "block_sparse", "dense"}


def test_full_budget_ran_mixed_batches(full_budget: EngineRun) -> None:
    # a sparse chunk that is not the first row of its batch shares the step with dense rows
    # (decodes or short pre-fills), which the parent backend computed
    assert any(t["request"] > 0 for t in full_budget.trace)


def test_sparse_budget_generates(sparse_budget: EngineRun) -> None:
    assert len(sparse_budget.token_ids) == 1 and len(sparse_budget.token_ids[0]) == MAX_TOKENS
    trace = sparse_budget.trace
    assert trace, "the sparse path never ran"
    assert trace[-1]["seq_len"] == len(LONG_PROMPT)
    assert any(t["cached_tokens"] > 0 for t in trace)
    # the budgets stay sparse at this length (not densified)
    assert all(t["kinds"].get("vertical_slash", 0) >= 1 for t in trace)


def test_mismatched_config_fails_at_startup(run_engine, workdir: Path) -> None:
    from minference_kernels import HeadPattern as P
    from minference_patterns import PatternConfig

    path = workdir / "wrong.json"
    PatternConfig.uniform(
        tiny.NUM_LAYERS + 1,
        tiny.NUM_HEADS,
        P.vertical_slash(8, 8),
        model_id="other-model",
        num_kv_heads=tiny.NUM_KV_HEADS,
    ).save(path)
    run = run_engine("mismatch", PROMPTS[2:], ENGINE, {"config": str(path)})
    assert run.returncode != 0
    assert "num_layers: config has 3, model has 2" in run.log
    assert not run.token_ids
