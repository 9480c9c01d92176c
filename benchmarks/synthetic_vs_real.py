"""The synthetic generator against real heads: the same oracle statistics (share of a row's keys
for 90/95/99% of its mass, first-4-token mass) on ``minference_kernels.synthetic.structured_qkv``
heads of SmolLM2's shape (9 query / 3 KV heads, head dim 64) at 8K, for each generator kind, next to
the captured real heads' table (``benchmarks/results/real_heads_smollm2_8k.json``). CPU.

    python benchmarks/synthetic_vs_real.py --out benchmarks/results/synthetic_vs_real_8k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from minference_kernels.synthetic import structured_qkv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_heads import oracle_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("share90_mean", "share95_mean", "share99_mean", "sink4_mass")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, a.n, (256,), generator=g).unique()
    synth = {}
    for kind in ("mixed", "vertical_slash", "block", "local"):
        stats = []
        for seed in range(a.seeds):
            q, k, _ = structured_qkv(1, 9, 3, a.n, 64, kind=kind, seed=seed)
            stats += oracle_stats(q, k, rows, 64**-0.5)
        synth[kind] = {key: sum(s[key] for s in stats) / len(stats) for key in KEYS}
        print(kind, {k: round(v, 4) for k, v in synth[kind].items()}, flush=True)
    real_path = ROOT / "benchmarks" / "results" / "real_heads_smollm2_8k.json"
    real = {}
    if real_path.exists():
        t = json.loads(real_path.read_text())
        heads = [h["oracle"] for layer in t["layers"] for h in layer["heads"]]
        real["all layers"] = {key: sum(h[key] for h in heads) / len(heads) for key in KEYS}
        for lo, hi in ((0, 3), (3, 12), (12, 30)):
            hs = [
                h["oracle"]
                for layer in t["layers"]
                if lo <= layer["layer"] < hi
                for h in layer["heads"]
            ]
            real[f"layers {lo}-{hi - 1}"] = {key: sum(h[key] for h in hs) / len(hs) for key in KEYS}
        for name, v in real.items():
            print("real", name, {k: round(x, 4) for k, x in v.items()}, flush=True)
    Path(a.out).write_text(json.dumps({"benchmark": "synthetic_vs_real", "n": a.n, "seeds": a.seeds,
                                       "synthetic": synth, "real_smollm2": real}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
