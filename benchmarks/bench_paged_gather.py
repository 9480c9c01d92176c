"""What the vLLM plugin's copy of the cached context out of the paged KV cache costs, per chunk.

When a chunk of a chunked pre-fill (or the new part of a prompt after a prefix-cache hit) takes
the sparse path, ``minference_vllm.prefill.prefill_request`` reads the request's cached keys and
values out of vLLM's paged cache (``kvcache.gather_kv``: index the request's blocks, un-permute the
probed layout), concatenates the chunk's own keys and values and makes the result contiguous for
``minference_kernels.sparse_prefill``; once per layer and per chunk. This script times, for one
layer and one chunk of ``--chunk`` queries after ``N`` cached tokens:

* ``gather``: exactly that read-back (``gather_kv`` + ``torch.cat`` + ``contiguous``);
* ``attention``: ``sparse_prefill`` on keys and values already contiguous;
* ``chunk``: the whole ``prefill_request`` call (gather + attention), as the plugin runs it.

Defaults: Llama-3.1-8B at tensor_parallel_size=1 (32 query / 8 KV heads of dim 128, bf16),
vLLM's block size 16, blocks of the request scattered over the cache (a random permutation), the
cache in FlashAttention's layout (logical ``[blocks, kv_heads, block_size, 2 * head_dim]``,
``[blocks, block_size, kv_heads, 2 * head_dim]`` in memory), every head
``vertical_slash(--vertical, --slash)``. Run from the repository root on a CUDA machine::

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:packages/minference-vllm/src \\
        python3 benchmarks/bench_paged_gather.py --out benchmarks/results/paged_gather_h200.json

On CPU (small shapes, the PyTorch kernels) add ``--device cpu --dtype float32`` and shorter
``--contexts``. The JSON holds one row per context length with the median milliseconds of each
part, the bytes of keys and values the gather returns, the machine's 1-minute load average before
and after (CPU timings on a shared machine mean little under load), and the commit
(``_provenance.commit()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from minference_kernels import HeadPattern, PrefillOptions, sparse_prefill
from minference_vllm.kvcache import gather_kv, probe_layout
from minference_vllm.prefill import prefill_request

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import commit  # noqa: E402


def flash_writer(head_size: int, block_size: int):
    """FlashAttention's cache write (``do_kv_cache_update``) in PyTorch: slot -> (block, row)."""

    def write(key, value, cache, slots):
        kc, vc = cache.transpose(1, 2).split(head_size, dim=-1)
        kc[slots // block_size, slots % block_size] = key
        vc[slots // block_size, slots % block_size] = value

    return write


def timed(fn, sync, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_one(a, n_cached: int, device: torch.device, dtype: torch.dtype, sync) -> dict:
    hq, hkv, d, bs, c = a.heads, a.kv_heads, a.head_dim, a.block_size, a.chunk
    total = n_cached + c
    nblk = -(-total // bs)
    g = torch.Generator(device="cpu").manual_seed(0)
    # physical [blocks, slot, head, 2D], seen as vLLM's logical [blocks, head, slot, 2D]
    cache = torch.empty(nblk + 8, bs, hkv, 2 * d, device=device, dtype=dtype).transpose(1, 2)
    cache.normal_()
    blocks = torch.randperm(nblk + 8, generator=g)[:nblk].to(device, torch.int32)
    layout = probe_layout(flash_writer(d, bs), cache, block_size=bs, num_kv_heads=hkv, head_size=d)
    q = torch.randn(c, hq, d, device=device, dtype=dtype)
    k_new = torch.randn(c, hkv, d, device=device, dtype=dtype)
    v_new = torch.randn(c, hkv, d, device=device, dtype=dtype)
    heads = [HeadPattern.vertical_slash(a.vertical, a.slash)] * hq
    scale = d**-0.5

    def gather():
        k_old, v_old = gather_kv(cache, layout, blocks, n_cached)
        k = torch.cat([k_old, k_new.transpose(0, 1)], dim=1).unsqueeze(0).contiguous()
        v = torch.cat([v_old, v_new.transpose(0, 1)], dim=1).unsqueeze(0).contiguous()
        return k, v

    k, v = gather()
    q4 = q.transpose(0, 1).unsqueeze(0).contiguous()

    def attention():
        sparse_prefill(q4, k, v, heads, scale=scale, backend=a.backend, validate=False)

    def chunk():
        prefill_request(
            q, k_new, v_new, cache, lambda: layout, blocks, total, heads,
            scale=scale, options=PrefillOptions(backend=a.backend),
        )  # fmt: skip

    row = {
        "cached_tokens": n_cached,
        "chunk_tokens": c,
        "gather_ms": timed(gather, sync, a.repeats),
        "attention_ms": timed(attention, sync, a.repeats),
        "chunk_ms": timed(chunk, sync, a.repeats),
        # keys + values of the whole context (each copy the gather makes writes this much)
        "gather_bytes": 2 * total * hkv * d * cache.element_size(),
    }
    row["gather_share_of_chunk"] = row["gather_ms"] / row["chunk_ms"]
    row["gather_ms_all_layers"] = row["gather_ms"] * a.layers
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="32768,65536,131072,262144,524288")
    p.add_argument("--chunk", type=int, default=8192, help="queries per chunk")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32, help="to scale one layer's gather")
    p.add_argument("--vertical", type=int, default=1000)
    p.add_argument("--slash", type=int, default=6096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/paged_gather.json")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()[0]  # on a shared CPU, the load the timings ran under
    rows = []
    for n in (int(x) for x in a.contexts.split(",")):
        row = run_one(a, n, device, dtype, sync)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this length's cache, before the next one's
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "paged_gather",
        "commit": commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(a),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
