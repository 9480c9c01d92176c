"""Pictures of real heads: the attention mass of captured heads summed over blocks (CPU).

Reads ``*.pt`` captures (``q [1, Hq, N, D]``, ``k [1, Hkv, N, D]``, ``scale``; written by
``benchmarks/real_heads.py --save-qk DIR``) and writes, for the chosen layers and heads, the
attention mass of every (query block, key block) pair of ``--block`` positions, each query block's
row normalised to sum to 1, as a small JSON that ``benchmarks/report_real.py`` draws.

    python benchmarks/real_head_maps.py --heads DIR --layers 0,5,15,25 --out \
        benchmarks/results/real_head_maps_smollm2_8k.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _provenance import write_json


def block_map(q, k, scale, block):
    n = q.shape[0] // block * block
    q, k = q[:n], k[:n]
    m = n // block
    out = torch.zeros(m, m)
    pos = torch.arange(n)
    for r0 in range(0, n, 1024):
        r1 = min(n, r0 + 1024)
        s = q[r0:r1] @ k.T * scale
        s.masked_fill_(pos[None, :] > pos[r0:r1, None], float("-inf"))
        p = torch.softmax(s, -1).view(r1 - r0, m, block).sum(-1)
        out[r0 // block : r1 // block] += p.view((r1 - r0) // block, block, m).sum(1)
    return out / out.sum(-1, keepdim=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", required=True)
    ap.add_argument("--layers", default="0,5,15,25")
    ap.add_argument("--per-layer", type=int, default=3, help="query heads per layer (0, 1, ...)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    maps = []
    for layer in (int(x) for x in a.layers.split(",")):
        path = next(p for p in Path(a.heads).glob("*.pt") if p.stem.endswith(f"L{layer:02d}"))
        d = torch.load(path)
        q, k = d["q"][0].float(), d["k"][0].float()
        g = q.shape[0] // k.shape[0]
        for h in range(a.per_layer):
            m = block_map(q[h], k[h // g], float(d["scale"]), a.block)
            maps.append(
                {
                    "layer": layer,
                    "head": h,
                    "map": [[round(x, 5) for x in row] for row in m.tolist()],
                }
            )
            print(f"layer {layer} head {h}", flush=True)
    write_json(a.out, {"model": a.model, "tokens": int(q.shape[1]), "block": a.block,
                       "maps": maps})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
