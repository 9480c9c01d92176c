"""Block scoring on real heads: which estimate of "where a query block's attention goes" picks
the key blocks the attention really uses? (CPU; captured Q/K of a trained model.)

For each head of each captured layer, the true attention of every row is summed per (query block,
key block) of 64; a scorer ranks the key blocks of each query block, the top ``K`` are kept (the
diagonal block always, the first key block too where marked ``+sink``), and the recall is the
attention mass of all rows inside the kept blocks. The **oracle** ranks by the true mass (the best
any block selection can do at that budget). Scorers:

* ``pooled``: mean-pooled q . mean-pooled k (minference's estimator before v0.3, MInference's);
* ``pooled+sink``: the same with key block 0 always kept;
* ``flex``: softmax over the pooled scores (FlexPrefill's query-aware estimate), key block 0 kept;
* ``antidiag(S)``: XAttention's strided antidiagonal scoring with stride S (the sum of q_i . k_j
  over the antidiagonals of each S x S sub-block, softmax over the strided rows, summed per
  block), key block 0 kept;
* ``sampled(r)``: the exact softmax attention of ``r`` rows of each query block spread over the
  block (every ``64 / r``-th row), summed per key block, key block 0 kept.

    python benchmarks/block_scoring.py --heads DIR --out benchmarks/results/block_scoring_smollm2_8k.json

``DIR`` holds ``*.pt`` files with ``q [1, Hq, N, D]``, ``k [1, Hkv, N, D]`` and ``scale`` (written
by ``benchmarks/real_heads.py --save-qk DIR``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _provenance import write_json

B = 64


def block_mass(q, k, scale):
    """``[MB, MB]`` true attention mass per (query block, key block), summed over rows."""
    n = q.shape[0]
    mb = n // B
    out = torch.zeros(mb, mb)
    for r0 in range(0, n, 1024):
        r1 = min(n, r0 + 1024)
        s = q[r0:r1] @ k.T * scale
        causal = torch.arange(n)[None, :] <= torch.arange(r0, r1)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        out[r0 // B : r1 // B] = p.view(r1 - r0, mb, B).sum(-1).view((r1 - r0) // B, B, mb).sum(1)
    return out


def score_pooled(q, k, scale):
    mb = q.shape[0] // B
    return q.view(mb, B, -1).mean(1) @ k.view(mb, B, -1).mean(1).T * scale


def score_flex(q, k, scale):
    s = score_pooled(q, k, scale)
    mb = s.shape[0]
    causal = torch.arange(mb)[None, :] <= torch.arange(mb)[:, None]
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1)


def score_antidiag(q, k, scale, stride):
    n, d = q.shape
    m = n // stride
    qr = q.view(m, stride, d).flip(1).reshape(m, stride * d)
    kr = k.view(m, stride, d).reshape(m, stride * d)
    s = qr @ kr.T * (scale / stride)
    causal = torch.arange(m)[None, :] <= torch.arange(m)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    g = B // stride
    mb = n // B
    return p.view(mb, g, mb, g).sum((1, 3))


def score_sampled(q, k, scale, r):
    n = q.shape[0]
    mb = n // B
    rows = (torch.arange(mb)[:, None] * B + torch.arange(B // r - 1, B, B // r)[None, :]).flatten()
    s = q[rows] @ k.T * scale
    causal = torch.arange(n)[None, :] <= rows[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return p.view(mb, r, mb, B).sum((1, 3))


def recall_at(score, mass, k, sink: bool):
    mb = mass.shape[0]
    causal = torch.arange(mb)[None, :] <= torch.arange(mb)[:, None]
    rank = score.masked_fill(~causal, float("-inf")).clone()
    rank[torch.eye(mb, dtype=torch.bool)] = float("inf")
    if sink:
        rank[1:, 0] = torch.finfo(rank.dtype).max
    top = rank.topk(min(k, mb), -1).indices
    keep = torch.zeros(mb, mb, dtype=torch.bool).scatter_(1, top, True) & causal
    return float((mass * keep).sum() / mass.sum()), float(
        keep.sum() * B * B / (mb * mb * B * B / 2)
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", required=True)
    ap.add_argument("--ks", default="4,8,16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ks = [int(x) for x in args.ks.split(",")]
    rows = []
    for path in sorted(Path(args.heads).glob("*.pt")):
        d = torch.load(path)
        q, k, scale = d["q"][0].float(), d["k"][0].float(), float(d["scale"])
        hq, n, _ = q.shape
        n = n // B * B
        g = hq // k.shape[0]
        for h in range(hq):
            qh, kh = q[h, :n], k[h // g, :n]
            mass = block_mass(qh, kh, scale)
            scorers = {
                "oracle": (mass, False),
                "pooled": (score_pooled(qh, kh, scale), False),
                "pooled+sink": (score_pooled(qh, kh, scale), True),
                "flex": (score_flex(qh, kh, scale), True),
                "antidiag(8)": (score_antidiag(qh, kh, scale, 8), True),
                "antidiag(16)": (score_antidiag(qh, kh, scale, 16), True),
                "sampled(1)": (score_sampled(qh, kh, scale, 1), True),
                "sampled(2)": (score_sampled(qh, kh, scale, 2), True),
                "sampled(4)": (score_sampled(qh, kh, scale, 4), True),
            }
            for name, (sc, sink) in scorers.items():
                for kk in ks:
                    rec, dens = recall_at(sc, mass, kk, sink)
                    rows.append({"file": path.name, "head": h, "scorer": name, "k": kk,
                                 "recall": rec, "block_density": dens})  # fmt: skip
        print(f"{path.name}: done", flush=True)
    summary = {}
    for kk in ks:
        orc = {
            (r["file"], r["head"]): r["recall"]
            for r in rows
            if r["scorer"] == "oracle" and r["k"] == kk
        }
        for name in dict.fromkeys(r["scorer"] for r in rows):
            sel = [r for r in rows if r["scorer"] == name and r["k"] == kk]
            ratio = [r["recall"] / orc[(r["file"], r["head"])] for r in sel]
            summary[f"{name}@{kk}"] = {
                "recall_mean": sum(r["recall"] for r in sel) / len(sel),
                "recall_min": min(r["recall"] for r in sel),
                "of_oracle_mean": sum(ratio) / len(ratio),
                "of_oracle_min": min(ratio),
            }
            s = summary[f"{name}@{kk}"]
            print(f"K={kk:>2} {name:>13}: recall {s['recall_mean']:.3f} (min {s['recall_min']:.3f}); "
                  f"of oracle {s['of_oracle_mean']:.3f} (min {s['of_oracle_min']:.3f})")  # fmt: skip
    write_json(args.out, {"benchmark": "block_scoring", "heads": args.heads,
                          "summary": summary, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
