"""One command per benchmark suite: runs the suite's scripts, keeps their logs, and (``--promote``)
makes the new files the ones the reports read.

    python benchmarks/run.py --list
    python benchmarks/run.py layer                       # bench_layer.py with its defaults
    python benchmarks/run.py interleaved --promote -- --rounds 5
    python benchmarks/run.py gpu                         # pytest -m gpu (the GPU correctness suites)

Each step writes ``benchmarks/results/<stem>_<tag>.json`` (and ``.log``: the step's stdout and
stderr), where ``tag`` defaults to ``<commit>_<device>``; every JSON carries the ``provenance``
block of ``benchmarks/_provenance.py`` (commit, exact arguments, device, versions). Arguments
after ``--`` go to the script of a one-script suite. ``--promote`` points the suite's keys in
``benchmarks/sources.json`` at the new files, so ``benchmarks/report.py`` and
``benchmarks/results.py`` (RESULTS.md, the README block) read them next time. Without it the new
files are declared nowhere: promote them, or ``git mv`` them to ``results/archive/`` (a test fails
on result files that no key names).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import commit, device, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SOURCES = BENCH / "sources.json"


@dataclass(frozen=True)
class Step:
    """One script of a suite: how it takes its output (``"dir"``: ``--out DIR`` and writes
    ``DIR/<writes>``; ``"file"``: ``--out FILE``), its fixed arguments, and the key of
    ``sources.json`` its file feeds (``None``: recorded, not read by a report)."""

    script: str
    out: str  # "dir" | "file"
    writes: str  # the file name the script writes (dir) / the stem of the result (file)
    args: tuple[str, ...] = ()
    key: str | None = None


#: every suite and the scripts it runs, in order
SUITES: dict[str, tuple[Step, ...]] = {
    "layer": (Step("bench_layer.py", "dir", "bench_layer.json", key="layer"),),
    "layer-fracs": (
        Step(
            "bench_layer.py",
            "dir",
            "bench_layer.json",
            (
                "--ns",
                "131072",
                "--random-ns",
                "",
                "--flex-ns",
                "",
                "--block-fracs",
                "0.09,0.095,0.1",
            ),
            key="fracs",
        ),
    ),
    "interleaved": (
        Step("bench_interleaved.py", "dir", "bench_interleaved.json", key="interleaved"),
    ),
    "bench": (  # what `nox -s bench` runs
        Step("bench_layer.py", "dir", "bench_layer.json", key="layer"),
        Step("bench_interleaved.py", "dir", "bench_interleaved.json", key="interleaved"),
    ),
    "e2e": (Step("bench_e2e.py", "file", "e2e.json", key="e2e"),),
    "length-policy-gpu": (
        Step(
            "bench_length_policy_gpu.py", "dir", "bench_length_policy.json", key="length_policy_gpu"
        ),
    ),
    "length-policy": (
        Step("length_policy.py", "file", "length_policy.json", key="length_policy_cpu"),
    ),
    "cpu-crossover": (Step("cpu_crossover.py", "file", "cpu_crossover.json", key="cpu_crossover"),),
    "recall-frontier": (
        Step("recall_frontier.py", "dir", "recall_frontier.json", key="recall_frontier"),
    ),
    "block-select": (Step("bench_block_select.py", "dir", "bench_block_select.json"),),
    "sampled-scoring": (
        Step(
            "bench_sampled_scoring.py",
            "file",
            "bench_sampled_scoring.json",
            key="sampled_scoring_rows",
        ),
    ),
    "hybrid": (Step("bench_hybrid.py", "file", "bench_hybrid.json", key="hybrid"),),
    "pinned": (Step("bench_pinned.py", "dir", "bench_pinned.json"),),
    "tile-floor": (Step("tile_floor.py", "file", "tile_floor.json"),),
}

#: suites that are a pytest run, not scripts: the GPU correctness suites
PYTEST_SUITES = {
    "gpu": ("-m", "gpu", "tests/gpu"),
}


def default_tag() -> str:
    dev = device()
    name = dev["gpu"] or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", "")) or "cpu"
    return f"{commit()}_{slug}"


def run_step(step: Step, tag: str, extra: list[str], dry: bool) -> Path | None:
    """Run one step in a scratch folder; move its result to ``results/<stem>_<tag>.json``."""
    stem = Path(step.writes).stem
    dest = RESULTS / f"{stem}_{tag}.json"
    log = dest.with_suffix(".log")
    with tempfile.TemporaryDirectory(prefix="minference-bench-") as tmp:
        produced = Path(tmp) / step.writes
        out = tmp if step.out == "dir" else str(produced)
        cmd = [sys.executable, str(BENCH / step.script), "--out", out, *step.args, *extra]
        print("+", " ".join(cmd), flush=True)
        if dry:
            return None
        with log.open("w") as fh:
            fh.write(f"# provenance: {json.dumps(provenance(cmd))}\n")
            fh.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                fh.write(line)
            rc = proc.wait()
        if not produced.exists():
            raise SystemExit(f"{step.script} wrote no {step.writes} (exit {rc}); log: {log}")
        shutil.move(str(produced), dest)
        for extra_file in Path(tmp).glob(f"{stem}.*"):  # a plot beside the JSON, e.g. .png
            shutil.move(str(extra_file), dest.with_suffix(extra_file.suffix))
        if rc:
            raise SystemExit(f"{step.script} exited {rc}; partial result {dest}, log {log}")
    print(f"wrote {dest.relative_to(ROOT)} and {log.name}", flush=True)
    return dest


def promote(written: dict[str, list[str]]) -> None:
    """Point ``sources.json``'s keys at the new files."""
    sources = json.loads(SOURCES.read_text())
    for key, files in written.items():
        sources[key]["files"] = files
        print(f"sources.json: {key} -> {', '.join(files)}")
    SOURCES.write_text(json.dumps(sources, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", nargs="?", help="a suite name (see --list)")
    ap.add_argument("--list", action="store_true", help="list the suites and their scripts")
    ap.add_argument("--tag", help="result file suffix (default: <commit>_<device>)")
    ap.add_argument(
        "--promote", action="store_true", help="point sources.json at the new files (default: off)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    if args.list or not args.suite:
        for name, steps in SUITES.items():
            feeds = ", ".join(s.key for s in steps if s.key) or "-"
            print(f"{name:18} {' + '.join(s.script for s in steps):60} feeds: {feeds}")
        for name, pyargs in PYTEST_SUITES.items():
            print(f"{name:18} pytest {' '.join(pyargs):53} feeds: gpu_properties, gpu_check")
        return 0 if args.list else 2
    if args.suite in PYTEST_SUITES:
        cmd = [sys.executable, "-m", "pytest", *PYTEST_SUITES[args.suite], *extra]
        print("+", " ".join(cmd), flush=True)
        if args.dry_run:
            return 0
        env = dict(
            os.environ,
            MINFERENCE_GPU_RESULTS=str(RESULTS),
            MINFERENCE_GPU_TAG=args.tag or default_tag(),
        )
        return subprocess.call(cmd, cwd=ROOT, env=env)
    if args.suite not in SUITES:
        ap.error(f"unknown suite {args.suite!r}; one of {', '.join([*SUITES, *PYTEST_SUITES])}")
    if extra and len(SUITES[args.suite]) > 1:
        ap.error(
            f"suite {args.suite!r} runs several scripts: pass script arguments to one-script suites"
        )
    tag = args.tag or default_tag()
    written: dict[str, list[str]] = {}
    for step in SUITES[args.suite]:
        dest = run_step(step, tag, extra, args.dry_run)
        if dest is not None and step.key:
            written.setdefault(step.key, []).append(dest.name)
    if args.promote and written:
        promote(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
