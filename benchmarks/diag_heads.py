"""Where a sparse layer's time goes, head by head, and what the kernel's launch order changes.

For the end-to-end benchmark's model (``bench_e2e.build_model``, structured weights) and for the
layer benchmark's synthetic heads, per N: cuDNN time, index time, the index's size per head
(relative tiles per query block, gathered columns, computed-pair fraction = an upper bound of the
density), how much the query heads of one GQA group share tiles (Jaccard of their tile sets), and
the attention kernel's time and rate on the pairs it computes. Also the peak memory of estimation + index building at long N (the memory
model's workspace term). CUDA only; writes ``diag_heads.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import minference_kernels as mk
import torch
import triton
from minference_kernels.ops import attention_triton

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402
from _provenance import write_json  # noqa: E402
from bench_layer import structured_layer  # noqa: E402

GIB = 1 << 30


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")


def group_sharing(idx: mk.SparseIndex, g: int) -> float:
    """Mean Jaccard overlap of relative-tile sets between a group's first head and the others."""
    out = []
    for h0 in range(0, idx.rel_tiles.shape[1], g):
        sets = [set(idx.rel_tiles[0, h0 + i].tolist()) - {-(1 << 30)} for i in range(g)]
        for s in sets[1:]:
            u = sets[0] | s
            out.append(len(sets[0] & s) / len(u) if u else 1.0)
    return sum(out) / max(1, len(out))


def analyse(label: str, q, k, v, heads, log: list) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, hq, d = q.shape[2], q.shape[1], q.shape[3]
    g = hq // k.shape[1]
    scale = d**-0.5
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn = bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
        )
    idx = mk.build_index(q, k, heads, validate=False)
    t_index = bench(lambda: mk.build_index(q, k, heads, validate=False))
    causal = n * (n + 1) / 2
    cand = idx.candidate_keys()[0].double()  # [H, MB] keys visited per block (upper bound)
    rows = torch.full((idx.num_blocks,), 64.0, dtype=torch.float64, device=q.device)
    rows[-1] = n - 64 * (idx.num_blocks - 1)
    computed = (cand * rows).sum(-1) / causal  # [H]
    tiles = idx.rel_end[0].double().mean(-1)  # [H]
    cols = idx.col_count[0].double().mean(-1)
    row = {
        "label": label,
        "n": n,
        "cudnn_ms": t_cudnn,
        "index_ms": t_index,
        "computed_frac_mean": float(computed.mean()),
        "computed_frac_per_head": [round(float(x), 4) for x in computed],
        "tiles_per_block_per_head": [round(float(x), 1) for x in tiles],
        "cols_per_block_mean": float(cols.mean()),
        "group_tile_jaccard": group_sharing(idx, g),
    }
    t = bench(lambda: attention_triton.attend(q, k, v, idx, scale))
    row["kernel_ms"] = t
    row["computed_tflops"] = 4 * d * float((cand * rows).sum()) / t / 1e9
    row["cudnn_tflops"] = 4 * d * hq * causal / t_cudnn / 1e9
    log.append(row)
    print(
        f"{label:28s} N={n:>7} cuDNN {t_cudnn:7.1f} ms | index {t_index:5.1f} ms | computed "
        f"{row['computed_frac_mean']:.3f} (tiles/blk {float(tiles.mean()):5.1f}, cols "
        f"{row['cols_per_block_mean']:5.0f}) | group jaccard {row['group_tile_jaccard']:.2f} | "
        f"kernel {t:7.2f} ms ({row['computed_tflops']:.0f} TF/s)",
        flush=True,
    )


def index_memory(n: int, heads, log: list) -> None:
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    idx = mk.build_index(q, k, heads)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kept = torch.cuda.memory_allocated() - base
    del idx
    row = {"n": n, "index_peak_gib": peak / GIB, "index_kept_gib": kept / GIB}
    row["peak_bytes_per_head_key"] = peak / (32 * n)
    log.append(row)
    print(f"index memory N={n}: peak {peak / GIB:.2f} GiB, kept {kept / GIB:.2f} GiB", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--e2e-n", type=int, default=131072)
    ap.add_argument("--e2e-layers", default="1,16")
    ap.add_argument("--synthetic-ns", default="131072,524288")
    ap.add_argument("--memory-ns", default="524288,1048576")
    args = ap.parse_args()
    from minference_hf.capture import capture_qkv
    from minference_patterns.registry import load_shipped

    cfg = load_shipped(bench_e2e.CONFIG_ID)
    log: dict[str, list] = {"rows": [], "memory": []}
    torch.manual_seed(0)
    for n in [int(x) for x in args.synthetic_ns.split(",") if x]:
        q, k, v = structured_layer(n)
        analyse("synthetic (bench_layer)", q, k, v, cfg.heads_for_layer(0, n), log["rows"])
        del q, k, v
    want = {int(x) for x in args.e2e_layers.split(",") if x}
    if want:
        n = args.e2e_n
        model = bench_e2e.build_model(bench_e2e.llama3_8b_config(32, n), "structured", "cuda")
        ids = torch.randint(3, model.config.vocab_size, (1, n), device="cuda")
        gen = capture_qkv(model, ids)
        for cap in gen:
            if cap.layer in want:
                heads = cfg.heads_for_layer(cap.layer, n)
                analyse(f"e2e model layer {cap.layer}", cap.q, cap.k, cap.v, heads, log["rows"])
                want.discard(cap.layer)
            if not want:
                break
        gen.close()
        del model, gen
        torch.cuda.empty_cache()
    for n in [int(x) for x in args.memory_ns.split(",") if x]:
        index_memory(n, cfg.heads_for_layer(0, n), log["memory"])
        torch.cuda.empty_cache()
    log["device"] = torch.cuda.get_device_name()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "diag_heads.json", log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
