"""Launch tuning of the vertical-slash score pass (key windows per program x warps), one layer.

Checks that every setting gives bit-identical scores to the current default, then prints a table
of ms per setting and the whole ``build_index`` time with the default. CUDA only; writes
``tune_vs_scores.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from bench_layer import CONFIG_ID, structured_layer
from minference_kernels.ops import vs_scores_triton
from minference_patterns.registry import load_shipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--ns", default="131072,524288")
    args = ap.parse_args()
    cfg = load_shipped(CONFIG_ID)
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        q, k, _ = structured_layer(n)
        ref = vs_scores_triton.vs_scores(q, k, 64, 128**-0.5)
        for per in (1, 2, 4, 8, 16):
            for warps in (4, 8):

                def fn(q=q, k=k, per=per, warps=warps):
                    return vs_scores_triton.vs_scores(
                        q, k, 64, 128**-0.5, score_per=per, score_warps=warps
                    )

                got = fn()
                same = all(torch.equal(a, b) for a, b in zip(got, ref))
                ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
                rows.append({"n": n, "per": per, "warps": warps, "ms": ms, "identical": same})
                print(f"N={n:>7} per={per:>2} warps={warps}: {ms:6.3f} ms  identical={same}")
        heads = cfg.heads_for_layer(0, n)
        ms = triton.testing.do_bench(
            lambda q=q, k=k, heads=heads: mk.build_index(q, k, heads, validate=False),
            warmup=10,
            rep=100,
            return_mode="median",
        )
        rows.append({"n": n, "build_index_ms_default": ms})
        print(f"N={n:>7} build_index (default launch): {ms:.2f} ms", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # a dict since provenance was added (earlier files: the bare list of rows)
    write_json(Path(args.out) / "tune_vs_scores.json", {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
