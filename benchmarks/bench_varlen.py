"""Varlen benchmark (issue 22): a batch of mixed-length sequences through
``sparse_prefill_varlen`` (per-sequence estimation, ONE attention launch) against a loop of
``sparse_prefill`` per sequence, on one Llama-3-8B-shaped layer (32 query / 8 KV heads, head dim
128, bf16 on CUDA).

Timed interleaved (varlen, loop, varlen, loop, ...) with CUDA events after a warm-up, so clock and
thermal drift hit both the same; medians reported. Two rows: the whole call (estimation + index +
attention) and the attention alone (indices built once: one varlen launch vs one launch per
sequence). A correctness check compares the varlen output with the loop's, per sequence.

    PYTHONPATH=packages/minference-kernels/src python benchmarks/bench_varlen.py --out DIR
        [--lengths 16384,32768,...] [--reps 10]

CPU smoke check (tiny shapes, Triton interpreter; timings meaningless):

    TRITON_INTERPRET=1 PYTHONPATH=packages/minference-kernels/src \\
        python benchmarks/bench_varlen.py --out /tmp/bv --lengths 130,70,200 --reps 1 --heads 4,2,64

Writes DIR/bench_varlen.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import minference_kernels as mk
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _provenance import commit  # noqa: E402

DEFAULT_LENGTHS = "16384,131072,32768,98304,49152,65536,114688,81920"  # 8 x 16K-128K, mixed order


def patterns(hq: int) -> list[mk.HeadPattern]:
    """A shipped-config-like mix: vertical-slash (1000, 6096) and block-sparse (top 64) heads."""
    kinds = [mk.HeadPattern.vertical_slash(1000, 6096), mk.HeadPattern.block_sparse(64)]
    return [kinds[h % 2] for h in range(hq)]


class Timer:
    """Elapsed ms of ``fn()``: CUDA events on a GPU, wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths")
    ap.add_argument("--prefix", type=int, default=0, help="cached keys before each sequence")
    ap.add_argument("--heads", default="32,8,128", help="Hq,Hkv,D")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    lengths = [int(x) for x in args.lengths.split(",")]
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    nk = [n + args.prefix for n in lengths]
    q = torch.randn(sum(lengths), hq, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(sum(nk), hkv, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(sum(nk), hkv, d, device=dev, dtype=dt, generator=g)

    def cu(xs):
        c = [0]
        for x in xs:
            c.append(c[-1] + x)
        return c

    cq, ck = cu(lengths), cu(nk)
    # on the host, as the integrations pass them (a GPU tensor would add a sync per call)
    cq_t = torch.tensor(cq, dtype=torch.int32)
    ck_t = torch.tensor(ck, dtype=torch.int32)
    heads = patterns(hq)
    kw = dict(backend="triton", validate=False)

    def seq(x, c, i):
        return x[c[i] : c[i + 1]].transpose(0, 1).unsqueeze(0)

    def run_varlen():
        return mk.sparse_prefill_varlen(q, k, v, cq_t, ck_t, heads, **kw)

    def run_loop():
        return [
            mk.sparse_prefill(seq(q, cq, i), seq(k, ck, i), seq(v, ck, i), heads, **kw)
            for i in range(len(lengths))
        ]

    # attention alone: indices built once
    from minference_kernels.ops import attention_triton
    from minference_kernels.ops import varlen_triton as _varlen_triton

    scale = d**-0.5
    indices = [
        mk.build_index(seq(q, cq, i), seq(k, ck, i), heads, backend="triton", validate=False)
        for i in range(len(lengths))
    ]

    def attn_varlen(order="sequence"):
        return _varlen_triton.attend_varlen(
            q, k, v, cq[:-1], ck[:-1], lengths, nk, indices, scale, order=order
        )

    def attn_varlen_causal():
        return attn_varlen("causal")

    def attn_loop():
        return [
            attention_triton.attend(seq(q, cq, i), seq(k, ck, i), seq(v, ck, i), indices[i], scale)
            for i in range(len(lengths))
        ]

    # correctness: varlen vs the loop, per sequence
    out_v, out_l = run_varlen(), run_loop()
    errs = []
    for i, o in enumerate(out_l):
        ref = o[0].transpose(0, 1).float()
        got = out_v[cq[i] : cq[i + 1]].float()
        errs.append(float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
    del out_v, out_l

    timer = Timer(dev)
    rows = {}
    cases = (
        ("total", run_varlen, run_loop),
        ("attention", attn_varlen, attn_loop),
        # the earlier program order (every block of the batch by causal key count), same launch
        ("attention_causal_order", attn_varlen_causal, attn_loop),
    )
    for name, fv, fl in cases:
        for _ in range(args.warmup):
            fv(), fl()
        tv, tl_ = [], []
        for _ in range(args.reps):  # interleaved
            tv.append(timer(fv))
            tl_.append(timer(fl))
        mv, ml = statistics.median(tv), statistics.median(tl_)
        rows[name] = {
            "varlen_ms": tv,
            "loop_ms": tl_,
            "varlen_median_ms": mv,
            "loop_median_ms": ml,
            "speedup": ml / mv,
        }
        print(f"{name:22s}: varlen {mv:9.2f} ms  loop {ml:9.2f} ms  loop/varlen {ml / mv:.3f}x")
    print(f"max relative error varlen vs loop: {max(errs):.2e}")

    result = {
        "benchmark": "bench_varlen",
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "dtype": str(dt),
        "lengths": lengths,
        "prefix": args.prefix,
        "heads": {"hq": hq, "hkv": hkv, "d": d, "patterns": [repr(h) for h in heads[:2]]},
        "reps": args.reps,
        "rel_err_varlen_vs_loop": errs,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_varlen.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
