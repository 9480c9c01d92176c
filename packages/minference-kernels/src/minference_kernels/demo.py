"""Kernel demo: structured synthetic heads, dense vs sparse attention on the available device.

    python -m minference_kernels.demo [--n 4096] [--heads 8] [--kv-heads 2] [--head-dim 64]

Prints time, density (fraction of causal pairs computed), attention recall and output error vs
dense for a few patterns. On CPU it uses the PyTorch path (keep N small); on CUDA the Triton kernels.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import HeadPattern, dense_attention, index_density, sparse_prefill, sparse_prefill_mask
from .synthetic import structured_qkv


def _time(fn, device) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (Triton compiles on first use)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n", type=int, default=None, help="sequence length (default 2048 CPU, 32768 GPU)"
    )
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = a.n or (32768 if device == "cuda" else 2048)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = structured_qkv(1, a.heads, a.kv_heads, n, a.head_dim, dtype=dtype, device=device)
    print(f"device={device} N={n} heads={a.heads}/{a.kv_heads} head_dim={a.head_dim} dtype={dtype}")
    t_dense, ref = _time(lambda: dense_attention(q, k, v), device)
    print(f"{'dense':28s} {t_dense:9.1f} ms  density 1.000")
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:128].sort().values
    rows = rows.to(device)
    s = q[:, :, rows].float() @ k.float().repeat_interleave(a.heads // a.kv_heads, 1).transpose(
        -1, -2
    )
    s = s * a.head_dim**-0.5
    causal = torch.arange(n, device=device)[None, :] <= rows[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    patterns = {
        "vertical_slash(64, 256)": [HeadPattern.vertical_slash(64, 256)] * a.heads,
        "vertical_slash(256, 1024)": [HeadPattern.vertical_slash(256, 1024)] * a.heads,
        "block_sparse(top_k=8)": [HeadPattern.block_sparse(8)] * a.heads,
        "a_shape(64, 512)": [HeadPattern.a_shape(64, 512)] * a.heads,
    }
    for name, heads in patterns.items():
        ms, (out, idx) = _time(
            lambda h=heads: sparse_prefill(q, k, v, h, return_index=True), device
        )
        blocks = sorted(set((rows // 64).tolist()))
        dens = index_density(idx, blocks).mean().item()
        mask = sparse_prefill_mask(q, k, heads, query_rows=rows)
        recall = (p * mask).sum(-1).mean().item()
        err = (out[:, :, rows].float() - ref[:, :, rows].float()).norm() / ref[
            :, :, rows
        ].float().norm()
        print(
            f"{name:28s} {ms:9.1f} ms  density {dens:.3f}  recall {recall:.3f}  rel.err {err:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
