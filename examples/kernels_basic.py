"""Kernel-only use of minference-kernels: one layer of sparse pre-fill, checked against dense.

    python examples/kernels_basic.py                 # CPU, 1024 tokens (a few seconds)
    python examples/kernels_basic.py --n 131072      # on a CUDA machine: the Triton kernels

Builds structured synthetic heads (RoPE slashes, anchor columns, topic blocks), runs
``sparse_prefill`` with a different pattern per query head, and reports for each head the share of
causal (query, key) pairs computed (density), the attention mass they hold (recall) and the output
error against dense attention. Needs only ``pip install minference-kernels``.
"""

from __future__ import annotations

import argparse
import time

import minference_kernels as mk
import torch
from minference_kernels.synthetic import structured_qkv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="prompt length (default 1024)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = args.n

    # q [B, Hq, N, D]; k, v [B, Hkv, N, D]: 8 query heads share 2 KV heads (GQA, never repeated)
    q, k, v = structured_qkv(1, 8, 2, n, 64, dtype=dtype, device=dev, seed=0)

    # one pattern per query head; the budgets are absolute counts (tokens, columns, diagonals, blocks)
    heads = [
        mk.HeadPattern.vertical_slash(64, 256),
        mk.HeadPattern.vertical_slash(32, 128),
        mk.HeadPattern.vertical_slash(128, 512),
        mk.HeadPattern.block_sparse(top_k=4),
        mk.HeadPattern.block_sparse(top_k=8),
        mk.HeadPattern.a_shape(sink_tokens=64, window_tokens=256),
        mk.HeadPattern.a_shape(sink_tokens=16, window_tokens=128),
        mk.HeadPattern.dense(),
    ]

    t0 = time.perf_counter()
    out, index = mk.sparse_prefill(q, k, v, heads, return_index=True)  # one attention launch
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_sparse = time.perf_counter() - t0
    ref = mk.dense_attention(q, k, v)
    print(
        f"N={n} device={dev} dtype={dtype}: sparse_prefill {1e3 * t_sparse:.1f} ms (incl. estimation)"
    )

    # the exact pairs the kernel attended to, for a sample of query rows, and the dense softmax
    rows = torch.linspace(0, n - 1, min(n, 128)).long().to(dev)
    mask = mk.sparse_prefill_mask(q, k, heads, query_rows=rows)  # bool [1, Hq, R, N]
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # for the check only
    scores = (q[:, :, rows].float() @ kf.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.arange(n, device=dev)[None, :] <= rows[:, None]
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    density = mk.index_density(index)[0]  # exact, over every query row

    print(f"{'head':>4}  {'pattern':34s} {'density':>8} {'recall':>7} {'rel.err':>8}")
    for h, pat in enumerate(heads):
        recall = float((p[0, h] * mask[0, h]).sum(-1).mean())
        err = float(
            (out[0, h, rows] - ref[0, h, rows]).float().norm() / ref[0, h, rows].float().norm()
        )
        print(f"{h:4d}  {pat.describe():34s} {float(density[h]):8.3f} {recall:7.3f} {err:8.4f}")

    # a dense head is dense attention, whatever the other heads do
    torch.testing.assert_close(out[0, 7], ref[0, 7], rtol=2e-2, atol=2e-2)
    # the primitives, on their own: estimate an index, then attend over it
    vi, si = mk.estimate_vertical_slash(q, k, num_vertical=64, num_slash=256)
    o_vs = mk.vertical_slash_attention(q, k, v, vi, si)
    torch.testing.assert_close(o_vs[0, 0], out[0, 0], rtol=2e-2, atol=2e-2)
    print(
        "checks passed: the dense head equals dense attention; the primitives match sparse_prefill"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
