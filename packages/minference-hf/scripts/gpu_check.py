"""GPU check of minference-hf: exactness on CUDA, then TTFT and peak memory on an 8B-shaped model.

Random weights only (no download). Run from the repository root on a CUDA machine::

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:packages/minference-hf/src \
        python3 packages/minference-hf/scripts/gpu_check.py --out results.json

Part 1 compares the patched model's logits with SDPA's (full-budget config, batch 2 left-padded,
float32 and bfloat16). Part 2 builds a Llama-3.1-8B-shaped model (random weights), patches it with
the shipped Llama-3.1-8B-Instruct config and reports time to first token and peak GPU memory of a
dense and a sparse pre-fill (single pass and chunked) at the given lengths.
"""

from __future__ import annotations

import argparse
import json
import time

import minference_hf
import minference_patterns
import torch
from minference_hf.generation import greedy_generate
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig
from transformers import LlamaConfig, LlamaForCausalLM


def _full_budget(layers: int, heads: int, kv: int, d: int, n: int) -> PatternConfig:
    kinds = (
        HeadPattern.dense(),
        HeadPattern.vertical_slash(n, n),
        HeadPattern.block_sparse(top_k=(n + 63) // 64),
        HeadPattern.a_shape(0, n),
    )
    row = tuple(kinds[h % 4] for h in range(heads))
    return PatternConfig(
        model_id="check", num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=d,
        layers=(row,) * layers,
    )  # fmt: skip


def exactness(dtype: torch.dtype) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    n = 3000
    ids = torch.randint(3, 1024, (2, n), device="cuda")
    mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    mask[1, :700] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.float()
    minference_hf.patch(model, _full_budget(2, 4, 2, 128, 4096), min_sparse_len=1024)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    stats = model.minference_plan.stats
    return {
        "max_abs_diff": float((out - ref)[valid].abs().max()),
        "ref_max_abs": float(ref[valid].abs().max()),
        "sparse_calls": stats.sparse_calls,
    }


def _gib(x: int) -> float:
    return round(x / 2**30, 2)


def ttft(model, n: int, chunk: int | None) -> dict[str, float]:
    ids = torch.randint(3, 32000, (1, n), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = greedy_generate(model, ids, max_new_tokens=4, eos_token_id=[], chunk_size=chunk)
    peak = torch.cuda.max_memory_allocated()
    return {
        "ttft_s": round(res.ttft_s, 3),
        "decode_tokens_per_s": round(res.decode_tokens_per_s, 1),
        "peak_gib": _gib(peak),
        "peak_over_weights_gib": _gib(peak - base),
        "sparse_calls": res.sparse_calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=32768)
    args = ap.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    result["transformers"] = transformers.__version__
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        result[f"exactness_{name}"] = exactness(dt)
        print(name, result[f"exactness_{name}"], flush=True)

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        attn_implementation="sdpa", tie_word_embeddings=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    result["weights_gib"] = _gib(torch.cuda.memory_allocated())
    print(f"8B-shaped model built in {time.perf_counter() - t0:.1f} s", flush=True)
    pcfg = minference_patterns.load("meta-llama/Llama-3.1-8B-Instruct")
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]
    # warm-up: Triton compilation and cuDNN plans
    minference_hf.patch(model, pcfg)
    ttft(model, 40000, None)  # above the 32K sparse threshold, so the Triton kernels compile here
    minference_hf.unpatch(model)
    ttft(model, 8192, None)
    for n in lengths:
        row = {"n": n, "dense": ttft(model, n, None)}
        minference_hf.patch(model, pcfg)
        row["sparse"] = ttft(model, n, None)
        if n > args.chunk:
            row[f"sparse_chunked_{args.chunk}"] = ttft(model, n, args.chunk)
        minference_hf.unpatch(model)
        rows.append(row)
        print(row, flush=True)
    result["llama3_8b_shape"] = rows
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
