"""Profile one pre-fill of a 4-layer Llama-3-8B-shaped model (random weights) through minference-hf
at N tokens: top CUDA kernels, sparse vs dense. Also times sparse_prefill on HF-layout (transposed)
q vs contiguous q.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:packages/minference-hf/src \
        python benchmarks/profile_hf.py --n 131072
"""

from __future__ import annotations

import argparse
import time

import minference_hf
import minference_kernels as mk
import torch
import triton
from minference_patterns import PatternConfig
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    a = ap.parse_args()
    n = a.n
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    heads = [mk.HeadPattern.vertical_slash(512, 2048)] * 32
    t_t = triton.testing.do_bench(lambda: mk.sparse_prefill(q, k, v, heads), warmup=5, rep=30)
    qc = q.contiguous()
    t_c = triton.testing.do_bench(lambda: mk.sparse_prefill(qc, k, v, heads), warmup=5, rep=30)
    print(f"sparse_prefill N={n}: transposed q {t_t:.1f} ms, contiguous q {t_c:.1f} ms", flush=True)

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=n,
        attn_implementation="sdpa", tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, 128000, (1, n), device="cuda")
    pc = PatternConfig.uniform(
        4, 32, mk.HeadPattern.vertical_slash(512, 2048), num_kv_heads=8, head_dim=128
    )

    def run():
        with torch.no_grad():
            model(ids, logits_to_keep=1, use_cache=True)
        torch.cuda.synchronize()

    for mode in ("dense", "sparse"):
        if mode == "sparse":
            minference_hf.patch(model, pc)
        run()
        t0 = time.perf_counter()
        run()
        print(f"{mode}: forward {time.perf_counter() - t0:.3f} s", flush=True)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        ) as prof:
            run()
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
