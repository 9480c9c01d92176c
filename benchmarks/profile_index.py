"""Profile estimation + index building for one Llama-3-8B layer (shipped Llama-3.1 config, or
``--pattern block_sparse``: every head block-sparse at ``--frac`` of its key blocks, 2% by default,
as in bench_layer; ``--allocation head`` or ``layer`` spreads that budget per head or layer).

Prints the wall time of ``build_index``, the sum of its GPU kernel times (if the wall time is far
above it, the host side, meaning launches and syncs, is the bottleneck), and the top kernels and
operators, and the peak memory that ``build_index`` adds. CUDA only; writes ``profile_index_<pattern>.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import minference_kernels as mk
import torch
import triton
from _provenance import write_text
from bench_layer import CONFIG_ID, structured_layer
from minference_patterns.registry import load_shipped
from torch.profiler import ProfilerActivity, profile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--ns", default="131072,524288")
    ap.add_argument("--pattern", default="config", choices=("config", "block_sparse"))
    ap.add_argument("--frac", type=float, default=0.02, help="block_sparse: share of key blocks")
    ap.add_argument("--allocation", default="query_block", choices=("query_block", "head", "layer"))
    ap.add_argument(
        "--scoring",
        default="pooled",
        choices=("pooled", "sampled"),
        help="block_sparse: block scoring",
    )
    ap.add_argument("--no-profile", action="store_true", help="wall time and peak memory only")
    args = ap.parse_args()
    cfg = load_shipped(CONFIG_ID)
    lines = []
    for n in [int(x) for x in args.ns.split(",")]:
        q, k, _ = structured_layer(n)
        heads = cfg.heads_for_layer(0, n)
        if args.pattern == "block_sparse":
            heads = [
                mk.HeadPattern.block_sparse(math.ceil(args.frac * n / 64), scoring=args.scoring)
            ] * len(heads)

        def fn(q=q, k=k, heads=heads):
            return mk.build_index(q, k, heads, validate=False, block_allocation=args.allocation)

        wall = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        head = (
            f"N={n} {args.pattern} ({args.frac:g}, {args.allocation}, {args.scoring}): "
            f"build_index wall {wall:.2f} ms, peak +{extra:.2f} GiB"
        )
        print(head, flush=True)
        lines.append(head)
        if args.no_profile:
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ev) / 5
        print(f"  GPU kernels {gpu_us / 1000:.2f} ms per call (profiled)", flush=True)
        lines += [f"  GPU kernels {gpu_us / 1000:.2f} ms per call (profiled)"]
        lines += [ev.table(sort_by="self_device_time_total", row_limit=25), ""]
        lines += [ev.table(sort_by="self_cpu_time_total", row_limit=20), ""]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text(
        Path(args.out) / f"profile_index_{args.pattern}_{args.allocation}_{args.scoring}.txt",
        "\n".join(lines),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
