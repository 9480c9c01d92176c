"""Time the head allocation's ranking (``block_allocation="head"``) at one 128K layer's size.

    PYTHONPATH=packages/minference-kernels/src python benchmarks/bench_head_rank.py --out $OUT

Candidates like ``block_sparse(8%, head)`` at 128K: 32 heads x 2048 query blocks x
``HEAD_ALLOCATION_CAP * top_k`` candidates (top_k = 164; ``--cap`` to change), float32 shares with -inf where a query block has fewer causal blocks,
ascending ids. Compares the Triton ranking (``head_rank_triton.head_keep``) in several launch variants with
the PyTorch one (``_best_of_rows`` bisection + compaction sort), checks that all keep the same
blocks, and prints a table (median ms). CUDA only.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import triton
from _provenance import write_json
from minference_kernels.index import _BIG
from minference_kernels.ops import head_rank_triton
from minference_kernels.ops.block_select import HEAD_ALLOCATION_CAP
from minference_kernels.ops.head_rank import _best_of_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--mb", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=164)
    ap.add_argument("--cap", type=int, default=HEAD_ALLOCATION_CAP, help="candidates / top_k")
    ap.add_argument(
        "--also",
        help="a Python file with another head_keep to time beside the shipped one (e.g. an earlier "
        "ops/head_rank_triton.py, or _triton.py before the kernels were split by operation: "
        "git show REV:packages/minference-kernels/src/minference_kernels/_triton.py)",
    )
    args = ap.parse_args()
    h, mb, top_k = args.heads, args.mb, args.top_k
    cap = args.cap * top_k
    g = torch.Generator(device="cuda").manual_seed(0)
    vals = torch.randn(1, h, mb, cap, device="cuda", generator=g) - 8.0
    n_causal = torch.arange(1, mb + 1, device="cuda")
    slot = torch.arange(cap, device="cuda")
    valid = slot[None, :] < n_causal[:, None].clamp(max=cap)
    vals = vals.masked_fill(~valid, float("-inf"))
    vals[..., 0] = float("inf")  # the diagonal block
    vals = (vals * 64).round() / 64  # exact ties, many at the threshold
    tie = valid[::7, 1:9]  # more exact ties on real candidates (padding stays -inf)
    vals[:, :, ::7, 1:9] = torch.where(tie, -7.5, float("-inf"))
    ids = torch.where(valid, slot * 3, -1).expand(1, h, mb, cap).contiguous()
    budget = torch.full((h,), int(n_causal.clamp(max=top_k).sum()), device="cuda")

    def torch_path():
        keep = _best_of_rows(vals.reshape(1, h, -1), budget, "bisect")
        picked = torch.where(keep.view_as(ids), ids, _BIG).sort(-1).values
        return torch.where(picked == _BIG, -1, picked)

    want = torch_path()
    rows = [("torch bisect + sort", triton.testing.do_bench(torch_path, rep=200), True)]
    default = (head_rank_triton._RANK_SUB, head_rank_triton._RANK_CHUNK)
    for sub, chunk in [(128, 8192), (64, 8192), (256, 8192), (128, 32768), (128, 4096)]:
        head_rank_triton._RANK_SUB, head_rank_triton._RANK_CHUNK = sub, chunk
        same = torch.equal(head_rank_triton.head_keep(vals, ids, budget), want)
        ms = triton.testing.do_bench(lambda: head_rank_triton.head_keep(vals, ids, budget), rep=200)
        rows.append((f"triton sub={sub} chunk={chunk}", ms, same))
    head_rank_triton._RANK_SUB, head_rank_triton._RANK_CHUNK = default
    if args.also:
        spec = importlib.util.spec_from_file_location("other_ranking", args.also)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        same = torch.equal(other.head_keep(vals, ids, budget), want)
        ms = triton.testing.do_bench(lambda: other.head_keep(vals, ids, budget), rep=200)
        rows.append((f"{Path(args.also).name} (--also)", ms, same))
    print(f"{h} heads x {mb} query blocks x {cap} candidates, budget {int(budget[0])} per head")
    for name, ms, same in rows:
        print(f"  {name:<40} {ms:8.3f} ms  {'same' if same else 'DIFFERENT'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "bench_head_rank.json",
               {"device": torch.cuda.get_device_name(), "heads": h, "mb": mb, "cap": cap,
                "rows": [{"name": n, "ms": m, "same": s} for n, m, s in rows]})  # fmt: skip
    return 0 if all(s for _, _, s in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
