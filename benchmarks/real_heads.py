"""Real-head statistics and the candidate table of the pattern search, on a trained model (CPU).

Captures post-RoPE Q/K/V of a known PyPI-shipped model (``minference_hf.models``) on the
calibration half of the real text (``minference_hf.texts``), then per layer and query head, on
``--rows`` stratified query rows:

* the **oracle**: how many keys each row needs for 90 / 95 / 99% of its attention mass, as a share
  of the row's causal keys (median and mean over rows) -- the density a perfect per-row index needs;
* every **candidate** of the offline search (``minference_patterns.search_layer``: A-shape,
  vertical-slash and block-sparse budgets, estimated online exactly as at inference): recall
  (attention mass kept, mean over rows), relative output error, density and relative cost.

Writes one JSON (``--out``). ``derive_config`` (and ``--derive T1,T2``) turns the table into pattern
configs without searching again: per head, the cheapest candidate whose recall reaches the
threshold (``dense`` if none does), i.e. the search with ``min_score=T`` and no budget.

    python benchmarks/real_heads.py --model smollm2-135m --n 8192 \
        --out benchmarks/results/real_heads_smollm2_8k.json --derive 0.95,0.98,0.99
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from _provenance import commit, write_json


def oracle_stats(q, k, rows, scale, fracs=(0.9, 0.95, 0.99)):
    """Per query head: median / mean share of causal keys a row needs for each mass fraction,
    and the mass of the first 4 keys (sinks)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    n = k.shape[2]
    rows = rows.to(q.device)
    causal = torch.arange(n, device=q.device)[None, :] <= rows[:, None]
    out = []
    for h in range(hq):
        s = q[0, h, rows].float() @ k[0, h // g].float().T * scale
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        srt = p.sort(-1, descending=True).values.cumsum(-1)
        rec = {"sink4_mass": float(p[:, :4].sum(-1).mean())}
        for f in fracs:
            need = (srt < f).sum(-1) + 1
            share = need.double() / (rows + 1).double()
            rec[f"keys{int(f * 100)}_median"] = float(need.double().median())
            rec[f"share{int(f * 100)}_median"] = float(share.median())
            rec[f"share{int(f * 100)}_mean"] = float(share.mean())
        out.append(rec)
    return out


def derive_config(table: dict, threshold: float, key: str = "recall"):
    """A :class:`minference_patterns.PatternConfig` from a table written by this script: per
    head the cheapest candidate whose ``key`` reaches ``threshold`` (``output``: 1 - error)."""
    from minference_kernels import HeadPattern
    from minference_patterns import PatternConfig, Provenance

    def pat(c):
        kind, a = c["kind"], c["args"]
        return getattr(HeadPattern, kind)(*a) if kind != "dense" else HeadPattern.dense()

    layers, scores = [], []
    m = table["model"]
    for layer in table["layers"]:
        if layer.get("fixed") == "dense":  # a sliding-window layer: not searched
            layers.append((HeadPattern.dense(),) * m["num_heads"])
            scores.append((None,) * m["num_heads"])
            continue
        heads, sc = [], []
        for head in layer["heads"]:
            ok = []
            for c in head["candidates"]:
                val = c["recall"] if key == "recall" else 1.0 - (c["output_error"] or 0.0)
                if val >= threshold:
                    ok.append(c)
            best = min(ok, key=lambda c: c["cost"]) if ok else None
            heads.append(pat(best) if best else HeadPattern.dense())
            sc.append(
                (best["recall"] if key == "recall" else 1.0 - best["output_error"]) if best else 1.0
            )
        layers.append(tuple(heads))
        scores.append(tuple(sc))
    return PatternConfig(
        model_id=m["model_id"],
        num_layers=len(layers),
        num_heads=m["num_heads"],
        num_kv_heads=m["num_kv_heads"],
        head_dim=m["head_dim"],
        layers=tuple(layers),
        context_length=table["n"],
        scores=tuple(scores),
        provenance=Provenance(
            source="search",
            calibration=table["calibration"],
            budget=None,
            objective=key,
            tool="minference-patterns",
            tool_version=table["versions"]["minference_patterns"],
            date=table["date"],
            extra={
                "rule": f"per head, the cheapest candidate whose {key} >= {threshold} on "
                f"{table['rows']} stratified rows of the calibration prompt (dense if none)",
                "min_score": threshold,
                "table": table["table_file"],
                "commit": table["commit"],
                "last_q": table["last_q"],
                "cost_model": table["cost_model"],
            },
        ),
    )


def main(argv: list[str] | None = None) -> int:
    import minference_patterns
    from minference_hf.capture import capture_qkv
    from minference_hf.models import load_model
    from minference_hf.patching import _attention_modules, attention_shape
    from minference_hf.texts import real_token_ids, text_fingerprint
    from minference_patterns.cost import AnalyticCostModel
    from minference_patterns.search import _sample_rows, search_layer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="short name or .gguf file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--layers", help="comma-separated layer indices (default all)")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--derive",
        help="thresholds, e.g. 0.95,o0.97 (recall, or with 'o' 1 - output error): write one "
        "config per threshold next to --out",
    )
    ap.add_argument("--configs-dir", help="write the derived configs here instead")
    ap.add_argument("--from-table", action="store_true", help="only derive from an existing --out")
    ap.add_argument(
        "--save-qk",
        help="also save each searched layer's q/k/v (float16) and scale to DIR/L<layer>.pt "
        "(input of benchmarks/block_scoring.py)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.from_table:
        table = json.loads(out.read_text())
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        lm = load_model(args.model, device=args.device)
        shape = attention_shape(lm.model)
        scales = [m.scaling for m in _attention_modules(lm.model) if hasattr(m, "scaling")]
        scale = float(scales[0]) if scales else shape.head_dim**-0.5
        tok = lm.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = bos + real_token_ids(tok, args.n - len(bos), "calibration")
        want = None if not args.layers else {int(x) for x in args.layers.split(",")}
        cm = AnalyticCostModel()
        table = {
            "benchmark": "real_heads",
            "model": {
                "name": args.model,
                "model_id": lm.name,
                "num_layers": shape.num_layers,
                "num_heads": shape.num_heads,
                "num_kv_heads": shape.num_kv_heads,
                "head_dim": shape.head_dim,
            },
            "n": len(ids),
            "rows": args.rows,
            "calibration": text_fingerprint("calibration") + f", first {len(ids)} tokens",
            "last_q": 64,
            "cost_model": cm.describe(),
            "commit": commit(),
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "versions": {
                "torch": torch.__version__,
                "minference_patterns": minference_patterns.__version__,
                "python": sys.version.split()[0],
            },
            "table_file": out.name,
            "layers": [],
        }
        t0 = time.perf_counter()
        x = torch.tensor([ids], device=args.device)
        from minference_hf.patching import _sliding_layer_ids

        sliding = set(_sliding_layer_ids(lm.model))
        table["sliding_layers"] = sorted(sliding)
        for c in capture_qkv(lm.model, x):
            if want is not None and c.layer not in want:
                continue
            if c.layer in sliding:  # local by construction: dense in the config, not searched
                table["layers"].append({"layer": c.layer, "fixed": "dense", "heads": []})
                continue
            if args.save_qk:
                Path(args.save_qk).mkdir(parents=True, exist_ok=True)
                torch.save(
                    {"q": c.q.half().cpu(), "k": c.k.half().cpu(), "v": c.v.half().cpu(),
                     "scale": scale},
                    Path(args.save_qk) / f"L{c.layer:02d}.pt",
                )  # fmt: skip
            rows = _sample_rows(len(ids), args.rows, 0, c.layer)
            orc = oracle_stats(c.q, c.k, rows, scale)
            res = search_layer(c.q, c.k, c.v, layer=c.layer, budget=1.0, scale=scale)
            heads = []
            for h, r in enumerate(res):
                cands = []
                for cs in r.candidates:
                    p = cs.pattern
                    a = {
                        "dense": [],
                        "a_shape": [p.sink_tokens, p.window_tokens],
                        "vertical_slash": [p.num_vertical, p.num_slash],
                        "block_sparse": [p.top_k, p.block_size],
                    }[p.kind]
                    cands.append(
                        {
                            "kind": p.kind,
                            "args": a,
                            "pattern": p.describe(),
                            "recall": cs.recall,
                            "output_error": cs.output_error,
                            "density": cs.density,
                            "cost": cs.cost,
                        }
                    )
                heads.append({"head": h, "oracle": orc[h], "candidates": cands})
            table["layers"].append({"layer": c.layer, "heads": heads})
            o = [hh["oracle"]["share95_median"] for hh in heads]  # fmt: skip
            print(
                f"layer {c.layer:>2}: oracle 95% share median over heads "
                f"{sorted(o)[len(o) // 2]:.4f} (max {max(o):.4f}); sink mass "
                f"{sum(hh['oracle']['sink4_mass'] for hh in heads) / len(heads):.2f} "
                f"[{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
        table["seconds"] = time.perf_counter() - t0
        write_json(out, table)
        print(f"wrote {out}")
    if args.derive:
        for spec in args.derive.split(","):
            key = "output" if spec.startswith("o") else "recall"
            t = float(spec.lstrip("o"))
            cfg = derive_config(table, t, key)
            name = out.stem + f"_config_{key[0]}{int(round(t * 1000))}.json"
            p = Path(args.configs_dir) / name if args.configs_dir else out.with_name(name)
            p.parent.mkdir(parents=True, exist_ok=True)
            cfg.save(p)
            dens = [
                c["density"]
                for li, layer in enumerate(table["layers"])
                for h, head in enumerate(layer["heads"])
                for c in head["candidates"]
                if c["pattern"] == cfg.layers[li][h].describe()
            ]
            print(
                f"threshold {t}: {cfg.kind_counts()}, mean density on the calibration rows "
                f"{sum(dens) / max(1, len(dens)):.3f} -> {p}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
