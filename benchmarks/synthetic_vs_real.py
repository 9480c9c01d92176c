"""The synthetic generator against real heads: the same oracle statistics (share of a row's keys
for 90/95/99% of its mass, first-4-token mass) on ``minference_kernels.synthetic.structured_qkv``
heads of SmolLM2's shape (9 query / 3 KV heads, head dim 64) at 8K, for each legacy generator kind
and each calibrated profile (``profile="real"`` and its head groups ``real_early`` / ``real_mid`` /
``real_late``), next to the captured real heads' table (``benchmarks/results/real_heads_smollm2_8k.json``,
per layer group). CPU.

With ``--search`` (default on) also the offline search's candidates as estimated at inference
(recall and density of A-shape, vertical-slash and block-sparse budgets, ``fit_synthetic.CANDS``)
for the calibrated groups and the real layer groups. With ``--density-n N`` (0 skips) the share of
causal pairs the shipped Llama-3.1 config (``minference_patterns.load("meta-llama/Llama-3.1-8B-
Instruct")``, layer 0's budgets at N) keeps on one Llama-3-8B-shaped layer (32 query / 8 KV heads,
head dim 128, float32) of each generator, with its recall on sampled rows.

    python benchmarks/synthetic_vs_real.py --out benchmarks/results/synthetic_vs_real_8k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from minference_kernels import synthetic as S
from minference_kernels.synthetic import structured_qkv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import write_json  # noqa: E402
from fit_synthetic import CANDS, GROUPS, real_groups, summary  # noqa: E402
from real_heads import oracle_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("share90_mean", "share95_mean", "share99_mean", "sink4_mass")
LEGACY = ("mixed", "vertical_slash", "block", "local")
CALIBRATED = ("real", "real_early", "real_mid", "real_late")
#: the calibrated profile each real layer group is compared with
GROUP_OF = {"real_early": "early", "real_mid": "mid", "real_late": "late"}


def search_stats(q, k, v, num_rows: int = 96) -> list[dict]:
    """Per head {pattern: (recall, density)} for the candidates of ``fit_synthetic.CANDS``."""
    from minference_kernels import HeadPattern as HP
    from minference_patterns.search import search_layer

    cands = [
        HP.a_shape(64, 64), HP.a_shape(64, 1024), HP.vertical_slash(512, 64),
        HP.vertical_slash(32, 128), HP.vertical_slash(32, 512), HP.block_sparse(4, 64),
    ]  # fmt: skip
    d = q.shape[-1]
    res = search_layer(q, k, v, budget=1.0, candidates=cands, num_rows=num_rows, scale=d**-0.5)
    return [{c.pattern.describe(): (c.recall, c.density) for c in h.candidates} for h in res]


def llama_density(n: int, rows: int = 32) -> dict:
    """Density and recall of the shipped Llama-3.1 config's layer-0 budgets at ``n`` keys on one
    Llama-3-8B-shaped layer of each generator (float32, CPU)."""
    import minference_kernels as mk
    import minference_patterns as mp
    from minference_kernels.ops.attention import index_mask

    hq, hkv, d = 32, 8, 128
    heads = list(mp.load("meta-llama/Llama-3.1-8B-Instruct").heads_for_layer(0, n))
    g = torch.Generator().manual_seed(0)
    sample = torch.cat([torch.tensor([n - 1]), torch.randint(0, n, (rows - 1,), generator=g)])
    sample = sample.unique().sort().values
    causal = torch.arange(n)[None, :] <= sample[:, None]
    out = {
        "n": n,
        "layer": {"heads_q": hq, "heads_kv": hkv, "head_dim": d, "dtype": "float32"},
        "patterns": sorted({p.describe() for p in heads}),
        "recall_rows": int(sample.numel()),
        "generators": {},
    }
    for name, kw in (
        ("legacy mixed", dict(kind="mixed")),
        ("real", dict(profile="real")),
    ):
        t0 = time.time()
        q, k, _ = structured_qkv(1, hq, hkv, n, d, seed=n % 97, **kw)
        idx = mk.build_index(q, k, heads, validate=False)
        dens = mk.index_density(idx)[0]  # [H], exact over every block
        m = index_mask(idx, sample)[0]  # [H, R, n]
        rec = []
        for h in range(hq):
            s = q[0, h, sample] @ k[0, h // (hq // hkv)].T * d**-0.5
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            rec.append(float((p * m[h]).sum(-1).mean()))
        row = {"density": float(dens.mean()), "recall": sum(rec) / hq}
        if kw.get("profile") == "real":
            grp = S._profile_groups("real", hq, n % 97)
            for gname in S.REAL_GROUPS:
                hs = [h for h in range(hq) if grp[h] == gname]
                row[f"density {gname}"] = float(dens[hs].mean())
                row[f"recall {gname}"] = sum(rec[h] for h in hs) / len(hs)
        row["seconds"] = time.time() - t0
        out["generators"][name] = row
        print(f"llama-3.1 budgets at {n}: {name} {row}", flush=True)
        del q, k, idx, m
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--search", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--density-n", type=int, default=32768, help="0: skip")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, a.n, (256,), generator=g).unique()
    synth, calibrated = {}, {}
    for kind in LEGACY + CALIBRATED:
        stats, cands = [], []
        for seed in range(a.seeds):
            kw = dict(kind=kind) if kind in LEGACY else dict(profile=kind)
            q, k, v = structured_qkv(1, 9, 3, a.n, 64, seed=seed, **kw)
            stats += oracle_stats(q, k, rows, 64**-0.5)
            if a.search and kind in CALIBRATED:
                cands += search_stats(q, k, v)
        synth[kind] = {key: sum(s[key] for s in stats) / len(stats) for key in KEYS}
        if kind in CALIBRATED:
            calibrated[kind] = summary(stats, cands or None)
        print(kind, {k: round(v, 4) for k, v in synth[kind].items()}, flush=True)
    real_path = ROOT / "benchmarks" / "results" / "real_heads_smollm2_8k.json"
    real, real_groups_full = {}, {}
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
        rg = real_groups()
        real_groups_full = {f"{name} (layers {lo}-{hi - 1})": rg[name] for name, (lo, hi) in GROUPS.items()}  # fmt: skip
    out = {
        "benchmark": "synthetic_vs_real",
        "n": a.n,
        "seeds": a.seeds,
        "heads": {"heads_q": 9, "heads_kv": 3, "head_dim": 64},
        "rows": int(rows.numel()),
        "synthetic": synth,
        "real_smollm2": real,
        "calibrated_profile": {
            "params": S.REAL_PARAMS,
            "groups": S.REAL_GROUPS,
            "compared_with": GROUP_OF,
            "candidates": list(CANDS) if a.search else [],
            "synthetic": calibrated,
            "real_smollm2_groups": real_groups_full,
        },
    }
    if a.density_n:
        out["llama31_budget_density"] = llama_density(a.density_n)
    out["seconds"] = time.time() - t0
    write_json(a.out, out)
    print(f"wrote {a.out} [{out['seconds']:.0f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
