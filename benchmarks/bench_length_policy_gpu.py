"""What the measured budget policy costs in speed, and what it buys in recall (GPU, issue 20).

``BudgetPolicy.measured(reference_length=131072)`` keeps a config's sizes up to 128K and grows them
like ``(n / 128K) ** MEASURED_LONGER_EXPONENT`` beyond (``benchmarks/length_policy.py`` fitted
the exponent). Per length, on the layer benchmark's Llama-3-8B-shaped structured heads (32 query /
8 KV heads, head dim 128, bf16; ``bench_layer.structured_layer``), layer 0 of each shipped config
under the absolute policy (MInference's: sizes fixed) and under the measured one: pipeline time
(estimation + index + kernel) timed interleaved with cuDNN's dense attention (each round times
dense once, then every method; each ratio from its round; medians over rounds), density, recall and relative output error on sampled rows.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \
        python benchmarks/bench_length_policy_gpu.py --out DIR [--ns 131072,262144,524288,1048576]

Writes DIR/bench_length_policy.json.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import minference_kernels as mk
import minference_patterns as mp
import torch
import triton
from _provenance import commit, write_json
from bench_layer import HQ, dense_probs, sample_rows, structured_layer
from minference_kernels.index import BLOCK
from minference_kernels.ops.attention import index_mask
from minference_patterns.policy import MEASURED_LONGER_EXPONENT

CONFIGS = ("meta-llama/Meta-Llama-3.1-8B-Instruct", "gradientai/Llama-3-8B-Instruct-262k")
REFERENCE = 131072


def timed(fn) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--ns", default="131072,262144,524288,1048576")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    policies = {
        "absolute": mp.BudgetPolicy.absolute(),
        "measured": mp.BudgetPolicy.measured(reference_length=REFERENCE),
    }
    log = dict(
        benchmark="bench_length_policy_gpu",
        commit=commit(),
        argv=vars(a),
        device=torch.cuda.get_device_name(),
        versions=dict(torch=torch.__version__, triton=triton.__version__),
        date=datetime.date.today().isoformat(),
        layer=dict(hq=HQ, hkv=8, d=128, dtype="bf16", batch=1, inputs="structured (legacy)"),
        reference_length=REFERENCE,
        exponent=MEASURED_LONGER_EXPONENT,
        rows=[],
    )
    t0 = time.time()
    for n in (int(x) for x in a.ns.split(",") if x):
        log["rows"] += run_n(n, policies, a.rounds)
        torch.cuda.empty_cache()
        write_json(f"{a.out}/bench_length_policy.json", log)
        print(f"   [{time.time() - t0:.0f} s]", flush=True)


def run_n(n: int, policies: dict, rounds: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = structured_layer(n)
    rows = sample_rows(n)
    p = dense_probs(q, k, rows)
    blocks = sorted(set((rows // BLOCK).tolist()))

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )

    ref = dense()[:, :, rows].float()
    methods = {}
    for cid in CONFIGS:
        cfg = mp.load(cid)
        for pname, pol in policies.items():
            methods[f"{cid.split('/')[-1]} [{pname}]"] = list(cfg.heads_for_layer(0, n, policy=pol))
    for heads in methods.values():
        mk.sparse_prefill(q, k, v, heads)  # warm-up (and compile)
    times: dict[str, list[float]] = {"cudnn": [], **{m: [] for m in methods}}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):  # one dense run per round, then every method: ratios per round
        td = timed(dense)
        times["cudnn"].append(td)
        for name, heads in methods.items():
            ts = timed(lambda heads=heads: mk.sparse_prefill(q, k, v, heads))
            times[name].append(ts)
            ratios[name].append(td / ts)
    flops = 4 * 128 * HQ * n * (n + 1) / 2
    t_dense = statistics.median(times["cudnn"])
    print(f"N={n}: cuDNN {t_dense:.1f} ms ({flops / t_dense / 1e9:.0f} TFLOP/s)", flush=True)
    out_rows = []
    for name, heads in methods.items():
        idx = mk.build_index(q, k, heads)
        dens = mk.index_density(idx, blocks).mean().item()
        m = index_mask(idx, rows)[0]
        recall = (p * m).sum(-1).mean().item()
        out = mk.sparse_prefill(q, k, v, heads)[:, :, rows].float()
        err = ((out - ref).norm() / ref.norm()).item()
        sizes = sorted({(h.kind, h.num_vertical, h.num_slash) for h in heads})
        row = dict(
            n=n,
            method=name,
            cudnn_ms=t_dense,
            cudnn_tflops=flops / t_dense / 1e9,
            total_ms=statistics.median(times[name]),
            speedup_median=statistics.median(ratios[name]),
            speedup_min=min(ratios[name]),
            speedup_max=max(ratios[name]),
            density=dens,
            kept_tflops=flops * dens / statistics.median(times[name]) / 1e9,
            recall=recall,
            rel_err=err,
            sizes=[list(s) for s in sizes],
        )
        out_rows.append(row)
        print(
            f"   {name:48s} {row['total_ms']:8.1f} ms  x{row['speedup_median']:5.2f} "
            f"[{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  density {dens:.4f}  "
            f"recall {recall:.3f}  err {err:.3f}",
            flush=True,
        )
    return out_rows


if __name__ == "__main__":
    main()
