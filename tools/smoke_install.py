#!/usr/bin/env python3
"""Smoke test of one minference package as a user installed it (``nox -s release`` runs it).

    python smoke_install.py DIST_NAME VERSION [--absent NAME ...]

Run by the clean virtual environment's own interpreter, outside the repository, after the
package was installed from its built wheel. Standard library only. Checks: the distribution's
version, ``__version__`` and the import location (site-packages, not the source tree); py.typed;
that the sibling packages outside its closure are absent; every console script answers ``--help``
and ``--version``; every other entry point loads; then a few real calls of the package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}", flush=True)


def run(*cmd: str, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"smoke: FAILED: {' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def script(name: str) -> str:
    path = Path(sysconfig.get_path("scripts")) / name
    check(path.exists(), f"console script {name} installed at {path}")
    return str(path)


# ---- package-specific calls ---------------------------------------------------------------


def smoke_kernels() -> None:
    import minference_kernels as mk
    import torch

    torch.manual_seed(0)
    q = torch.randn(1, 4, 300, 64)
    k = torch.randn(1, 2, 300, 64)
    v = torch.randn(1, 2, 300, 64)
    ref = mk.dense_attention(q, k, v)
    out = mk.sparse_prefill(q, k, v, [mk.HeadPattern.dense()] * 4)
    check(torch.allclose(out, ref, atol=1e-5), "sparse_prefill with dense heads equals dense")
    heads = [
        mk.HeadPattern.vertical_slash(32, 128),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.a_shape(16, 64),
        mk.HeadPattern.dense(),
    ]
    out = mk.sparse_prefill(q, k, v, heads)
    check(out.shape == q.shape and bool(torch.isfinite(out).all()), "sparse_prefill, 4 kinds")


def smoke_patterns() -> None:
    import minference_patterns as mp

    listed = run(script("minference-patterns"), "list")
    check("meta-llama/Llama-3.1-8B-Instruct".lower() in listed.lower(), "shipped configs listed")
    cfg = mp.load("meta-llama/Llama-3.1-8B-Instruct")
    check(cfg.num_layers > 0, f"shipped config loads ({cfg.num_layers} layers)")
    check(isinstance(mp.json_schema(), dict), "JSON Schema (package data) loads")


def smoke_hf() -> None:
    import minference_hf  # noqa: F401

    out = run(script("minference"), "generate", "--tiny", "--max-new-tokens", "2",
              "--prompt-tokens", "300", "--no-warmup")  # fmt: skip
    check("time to first token" in out, "minference generate --tiny runs")


def smoke_vllm() -> None:
    eps = [
        ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "minference"
    ]
    check(len(eps) == 1, "vllm.general_plugins entry point 'minference' found")
    check(eps[0].value == "minference_vllm:register", f"it points at {eps[0].value}")
    import minference_vllm._plugin as plugin
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()  # vLLM's own discovery, as every vLLM process does it
    got = AttentionBackendEnum["CPU_ATTN"].get_path()
    check(got == plugin.CPU_BACKEND, f"vLLM loaded the plugin: CPU_ATTN -> {got}")


SMOKE = {
    "minference-kernels": smoke_kernels,
    "minference-patterns": smoke_patterns,
    "minference-hf": smoke_hf,
    "minference-vllm": smoke_vllm,
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dist")
    p.add_argument("version")
    p.add_argument("--absent", nargs="*", default=[])
    args = p.parse_args(argv)
    name, version = args.dist, args.version
    mod = name.replace("-", "_")

    check(metadata.version(name) == version, f"{name} {metadata.version(name)} installed")
    m = importlib.import_module(mod)
    check(m.__version__ == version, f"{mod}.__version__ == {version}")
    site = Path(sysconfig.get_path("purelib")).resolve()
    where = Path(m.__file__).resolve()
    check(site in where.parents, f"imported from {where.parent} (site-packages)")
    check((where.parent / "py.typed").exists(), "py.typed installed")
    for other in args.absent:
        try:
            metadata.version(other)
            present = True
        except metadata.PackageNotFoundError:
            present = False
        check(not present, f"{other} not installed (not needed by {name})")

    dist = metadata.distribution(name)
    for ep in dist.entry_points:
        if ep.group == "console_scripts":
            exe = script(ep.name)
            run(exe, "--help")
            out = run(exe, "--version")
            check(version in out, f"{ep.name} --help, --version -> {out.strip()}")
        elif ep.group != "vllm.general_plugins":  # that one is loaded by vLLM below
            check(callable(ep.load()), f"entry point {ep.group}:{ep.name} loads")
    SMOKE[name]()
    print(f"smoke: {name} {version} passed ({os.path.basename(sys.prefix)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
