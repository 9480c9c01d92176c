"""End-to-end pre-fill benchmark: time to first token of a Llama-3-8B-shaped model, 128K to 1M tokens.

Run from the repository root on a CUDA machine (no download: the model is built from its config)::

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:packages/minference-hf/src \\
        python3 benchmarks/bench_e2e.py --lengths 131072,262144 --out results/e2e.json

Per length, in one process and on the same model: **dense** (SDPA: cuDNN / FlashAttention) and
**minference** (the model patched with the shipped ``meta-llama/Llama-3.1-8B-Instruct`` config),
both through :func:`minference_hf.long_prefill` (layer by layer, chunked MLP, last-position logits,
KV cache offloaded to pinned host memory when it does not fit), so the two differ in attention
only. Reported: TTFT, attention seconds (sum over layers), peak GPU memory, offloaded layers.
``--dense-max`` skips dense runs above a length; there the dense TTFT is **estimated** as the
minference run's non-attention time plus ``layers x`` one measured dense attention call at that
length (labelled ``estimated`` in the JSON and the table).

Weights (``--weights``):

* ``random``: the usual initialisation. Attention over random activations has no structure: the
  online estimate keeps most pairs and the integration's ``max_density`` guard runs it dense.
* ``structured``: random weights plus one shared direction added to every token embedding (so the
  residual stream has a component common to all positions, as trained models' do) and, in each
  KV group, the key projection of the first query head tied to its query projection. Through RoPE
  this gives scores that depend on the relative position (diagonal "slash" lines and a local
  window), the structure trained heads show. It is a synthetic stand-in for real weights: the
  numbers it gives are for heads with this structure, not for a trained checkpoint.

``--check`` first compares ``long_prefill`` with ``model(...)`` at a short length on the GPU
(logits, then 8 greedy tokens with the offloaded cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA init

import minference_hf  # noqa: E402
import torch  # noqa: E402
from _provenance import write_json
from minference_hf.caches import cache_kwarg  # noqa: E402
from minference_kernels.options import DEFAULT_MIN_SPARSE_LEN, PrefillOptions  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CONFIG_ID = "meta-llama/Llama-3.1-8B-Instruct"
DEVICE = "cuda"


def llama3_8b_config(num_layers: int, max_len: int) -> LlamaConfig:
    """Llama-3.1-8B's architecture (32 x 128 query heads, 8 KV heads, MLP 14336, vocab 128256)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=max(max_len, 131072),
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def build_model(
    config: LlamaConfig,
    weights: str,
    device: str,
    seed: int = 0,
    dtype=torch.bfloat16,
    self_logit: float = 24.0,
    query_noise: float = 0.5,
) -> LlamaForCausalLM:
    """The model with random weights; ``structured`` adds the shared embedding direction and ties
    each KV group's key projection to its first query head (see the module docstring)."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype).eval()
    if weights == "structured":
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            std = float(emb.float().std())
            shared = torch.randn(emb.shape[1], device=emb.device, dtype=torch.float32)
            # token part ~0.25 of the shared part per element
            emb.mul_(0.25 / std).add_(shared.to(emb.dtype))
            d = config.head_dim
            group = config.num_attention_heads // config.num_key_value_heads
            h = config.hidden_size
            # per-element key std s with sqrt(d) * s^2 = self_logit (score of a key with itself)
            s_k = (self_logit / d**0.5) ** 0.5
            for layer in model.model.layers:
                attn = layer.self_attn
                kw = attn.k_proj.weight.view(config.num_key_value_heads, d, h)
                qw = attn.q_proj.weight.view(config.num_attention_heads, d, h)
                kw.normal_(0.0, s_k / h**0.5)
                for g in range(config.num_key_value_heads):
                    for j in range(group):
                        noise = torch.randn_like(kw[g]) * (query_noise * s_k / h**0.5)
                        qw[g * group + j] = kw[g] + noise
    elif weights != "random":
        raise ValueError(f"weights must be 'random' or 'structured', got {weights!r}")
    return model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check(model: LlamaForCausalLM, n: int) -> dict[str, object]:
    """long_prefill vs model(...) on the GPU: last logits, and greedy tokens with an offloaded cache."""
    ids = torch.randint(3, model.config.vocab_size, (1, n), device=DEVICE)
    with torch.no_grad():
        ref = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    out: dict[str, object] = {"n": n}
    for off in (False, True, 4):
        r = minference_hf.long_prefill(model, ids, offload_kv=off, chunk_size=3000)
        err = (r.logits - ref).abs().max().item()
        out[f"logits_maxdiff_offload_{off}"] = err
        out["logits_scale"] = ref.abs().max().item()
    torch.manual_seed(0)
    base = model.generate(ids, max_new_tokens=8, do_sample=False)
    mine = minference_hf.generate_long(
        model, ids, offload_kv=True, max_new_tokens=8, do_sample=False
    )
    out["greedy_tokens_equal"] = bool(torch.equal(base, mine))
    out["tokens_ref"] = base[0, n:].tolist()
    out["tokens_offloaded"] = mine[0, n:].tolist()
    # decode 4 steps directly through the cache: offloaded vs resident layers
    r1 = minference_hf.long_prefill(model, ids, offload_kv=True)
    r2 = minference_hf.long_prefill(model, ids, offload_kv=False)
    nxt = r1.logits.argmax(-1, keepdim=True)
    ck = cache_kwarg(model)
    diffs = []
    with torch.no_grad():
        for _ in range(4):
            a = model(input_ids=nxt, **{ck: r1.cache}, use_cache=True).logits[:, -1].float()
            b = model(input_ids=nxt, **{ck: r2.cache}, use_cache=True).logits[:, -1].float()
            diffs.append((a - b).abs().max().item())
            nxt = a.argmax(-1, keepdim=True)
    out["decode_offloaded_vs_resident_maxdiff"] = max(diffs)
    return out


def dense_attention_seconds(n: int, repeats: int = 1) -> float:
    """One dense causal attention call of the layer shape at ``n`` tokens (SDPA, bf16)."""
    q = torch.randn(
        1, 32, n, 128, device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32
    )
    k = torch.randn(1, 8, n, 128, device=DEVICE, dtype=q.dtype)
    v = torch.randn_like(k)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def decode_seconds(model, r, steps: int) -> list[float]:
    """Seconds of each of ``steps`` greedy decode steps continuing from a pre-fill's cache."""
    nxt = r.logits.argmax(-1, keepdim=True)  # [B, 1]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            _sync()
            t0 = time.perf_counter()
            logits = model(input_ids=nxt, **{cache_kwarg(model): r.cache}, use_cache=True).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            _sync()
            out.append(time.perf_counter() - t0)
    return out


def run_one(model, ids, label: str, offload_kv, decode_steps: int = 0) -> dict[str, object]:
    torch.cuda.empty_cache()
    r = minference_hf.long_prefill(
        model, ids, offload_kv=offload_kv, time_layers=True, progress=True
    )
    t0 = time.perf_counter()
    tok = int(r.logits.argmax(-1)[0])
    ttft = r.seconds + time.perf_counter() - t0
    decode = decode_seconds(model, r, decode_steps) if decode_steps else []
    row = {
        "method": label,
        "n": int(ids.shape[1]),
        "ttft_s": ttft,
        "attention_s": sum(r.attention_seconds),
        "non_attention_s": ttft - sum(r.attention_seconds),
        "peak_gpu_gib": (r.peak_gpu_bytes or 0) / 2**30,
        "predicted_peak_gib": r.memory.gpu_peak / 2**30,
        "offloaded_layers": len(r.cache.offloaded),
        "host_kv_gib": r.cache.host_bytes / 2**30,
        "first_token": tok,
        "estimated": False,
        "layer_s": [round(x, 3) for x in r.layer_seconds],
        "decode_step_s": [round(x, 3) for x in decode],
    }
    del r
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", help="default 131072,262144,524288,1048576 (--smoke: 4096)")
    ap.add_argument("--layers", type=int, default=32, help="the shipped config's 32 by default")
    ap.add_argument("--weights", default="structured", choices=("structured", "random"))
    ap.add_argument("--dense-max", type=int, default=524288, help="longest length run dense")
    ap.add_argument("--offload-kv", default="auto", help="auto | on | off | number of layers")
    ap.add_argument("--check", type=int, default=0, help="run the GPU check at this length first")
    ap.add_argument(
        "--warmup", type=int, help="warm-up prompt length; default 32768 (--smoke: 512)"
    )
    ap.add_argument(
        "--decode-steps", type=int, default=0, help="time this many decode steps after pre-fill"
    )
    ap.add_argument("--out", default="bench_e2e.json")
    ap.add_argument(
        "--min-sparse-len",
        type=int,
        help=f"default PrefillOptions' {DEFAULT_MIN_SPARSE_LEN} (--smoke: 1024)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="CPU smoke test: a narrow model, short prompts"
    )
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    # unset sizes: the GPU run's, or a CPU smoke test's that finishes in about a minute
    for name, full, smoke in (
        ("lengths", "131072,262144,524288,1048576", "4096"),
        ("min_sparse_len", DEFAULT_MIN_SPARSE_LEN, 1024),
        ("warmup", 32768, 512),
    ):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    options = PrefillOptions(min_sparse_len=args.min_sparse_len)  # the sparse runs' settings
    off = {"auto": "auto", "on": True, "off": False}.get(args.offload_kv)
    off = off if off is not None else int(args.offload_kv)
    config = llama3_8b_config(args.layers, max(lengths))
    if args.smoke:
        config.hidden_size, config.intermediate_size, config.vocab_size = 512, 512, 1000
    t = time.perf_counter()
    model = build_model(
        config, args.weights, DEVICE, dtype=torch.float32 if args.smoke else torch.bfloat16
    )
    print(f"model built in {time.perf_counter() - t:.1f} s ({args.weights} weights)", flush=True)
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "triton": getattr(__import__("triton"), "__version__", "?"),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "layers": args.layers,
        "weights": args.weights,
        "config": CONFIG_ID,
        "options": options.to_dict(),
        "rows": [],
    }
    if args.check:
        result["check"] = check(model, args.check)
        print("check:", json.dumps(result["check"]), flush=True)
    # warm-up: compile the kernels, touch cuDNN
    w = torch.randint(3, config.vocab_size, (1, args.warmup), device=DEVICE)
    minference_hf.long_prefill(model, w, offload_kv=False)
    minference_hf.patch(model, config=CONFIG_ID, min_sparse_len=min(32768, args.warmup))
    minference_hf.long_prefill(model, w, offload_kv=False)
    minference_hf.unpatch(model)
    del w
    rows: list[dict[str, object]] = result["rows"]  # type: ignore[assignment]
    for n in lengths:
        ids = torch.randint(3, config.vocab_size, (1, n), device=DEVICE)
        minference_hf.patch(model, config=CONFIG_ID, options=options)
        sp = run_one(model, ids, "minference", off, args.decode_steps)
        stats = model.minference_plan.stats
        sp["sparse_calls"], sp["dense_calls"] = stats.sparse_calls, stats.dense_calls
        minference_hf.unpatch(model)
        rows.append(sp)
        print(json.dumps(sp), flush=True)
        if n <= args.dense_max:
            de = run_one(model, ids, "dense", off)
        else:
            a = dense_attention_seconds(n)
            de = {
                "method": "dense",
                "n": n,
                "ttft_s": sp["non_attention_s"] + args.layers * a,
                "attention_s": args.layers * a,
                "non_attention_s": sp["non_attention_s"],
                "dense_attention_call_s": a,
                "estimated": True,
                "note": "estimated: minference run's non-attention time + layers x one measured "
                "dense SDPA attention call at this length",
            }
        rows.append(de)
        print(json.dumps(de), flush=True)
        sp["speedup"] = de["ttft_s"] / sp["ttft_s"]
        print(f"N={n}: dense {de['ttft_s']:.2f} s{' (est.)' if de['estimated'] else ''}, "
              f"minference {sp['ttft_s']:.2f} s, speedup {sp['speedup']:.2f}x", flush=True)  # fmt: skip
        write_json(args.out, result)
    print(
        "\n| N | dense TTFT s | minference TTFT s | speedup | attn s dense / ours | peak GiB ours | offloaded |"
    )
    print("|---|---|---|---|---|---|---|")
    for sp, de in zip(rows[0::2], rows[1::2]):
        print(
            f"| {sp['n']} | {de['ttft_s']:.2f}{' (est.)' if de['estimated'] else ''} | "
            f"{sp['ttft_s']:.2f} | {sp['speedup']:.2f}x | {de['attention_s']:.2f} / "
            f"{sp['attention_s']:.2f} | {sp['peak_gpu_gib']:.1f} | {sp['offloaded_layers']} |"
        )


if __name__ == "__main__":
    main()
