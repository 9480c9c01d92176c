"""Recall against prompt length at fixed budgets, and the budget growth that holds it (issue 20).

A config's budgets are absolute sizes chosen at one length. This measures, per estimator and per
budget, the recall (attention mass kept on stratified query rows, mean over heads and rows) at
several prompt lengths, on:

* **real heads**: post-RoPE Q/K of a trained model captured once at the longest length (a causal
  model's prefix of length N has exactly the prefix's Q/K, so shorter lengths are slices);
  Gemma-3-270M's global layers to 32K, SmolLM2-135M to 8K;
* **structured heads**: the calibrated synthetic generator (``profile="real"``) to 128K, a fresh
  draw per length (same seed).

Then the fit: for every budget ``b`` whose recall ``r`` at the shortest length ``N0`` is in
``[0.5, 0.98]``, the budget ``b(N)`` that reaches the same ``r`` at each longer ``N`` (log-linear
interpolation of recall over the budget ladder) gives an exponent ``log(b(N) / b) / log(N / N0)``:
0 means absolute budgets hold their recall, 1 means budgets must grow with the length (constant
density). The median over budgets and lengths per estimator is what a ``BudgetPolicy``'s
``longer_exponent`` should be for that estimator. Writes one JSON and a PNG.

    python benchmarks/length_policy.py --out benchmarks/results/length_policy_cpu.json
    python benchmarks/length_policy.py --sources smollm2 --out /tmp/lp.json   # one source
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import minference_kernels as mk
import torch
from _provenance import commit, write_json
from minference_kernels.synthetic import structured_qkv

#: VS ladders keep MInference's 1 : 4 vertical : slash ratio (shipped configs: 1000 : 4096-6096).
VS_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048)
BLOCK_LADDER = (1, 2, 4, 8, 16, 32, 64)
SOURCES = {
    # name: (model, capture length, lengths, layers (None: all full-attention layers))
    "gemma3": ("gemma3-270m", 32768, (4096, 8192, 16384, 32768), None),
    "smollm2": ("smollm2-135m", 8192, (2048, 4096, 8192), tuple(range(1, 30, 3))),
}
SYNTH_LENGTHS = (16384, 32768, 65536, 131072)
ORACLE_DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def stratified_rows(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` query rows of ``[0, n)``, one uniform draw per equal stratum."""
    from minference_patterns.search import _sample_rows

    return _sample_rows(n, count, seed, 0)


def row_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal softmax of ``rows`` (``Nq == Nk``): ``[Hq, R, N]`` float32, batch 0."""
    g = q.shape[1] // k.shape[1]
    n = k.shape[2]
    causal = torch.arange(n)[None, :] <= rows[:, None]
    out = []
    for h in range(q.shape[1]):
        s = q[0, h, rows].float() @ k[0, h // g].float().T * scale
        out.append(torch.softmax(s.masked_fill(~causal, -math.inf), -1))
    return torch.stack(out)


def methods(n: int, hq: int) -> dict[str, tuple[str, int, list[mk.HeadPattern]]]:
    """``{name: (family, budget, heads)}`` for every budget of the ladders that is sparse at n."""
    out: dict[str, tuple[str, int, list[mk.HeadPattern]]] = {}
    for v in VS_LADDER:
        if 4 * v < n:
            out[f"vs{v}"] = ("vertical_slash", v, [mk.HeadPattern.vertical_slash(v, 4 * v)] * hq)
    nb = -(-n // 64)
    for t in BLOCK_LADDER:
        if t < nb:
            out[f"block{t}"] = ("block_pooled", t, [mk.HeadPattern.block_sparse(t)] * hq)
            out[f"sampled{t}"] = (
                "block_sampled",
                t,
                [mk.HeadPattern.block_sparse(t, scoring="sampled")] * hq,
            )
    return out


def measure(q, k, scale, rows, skip_families=()) -> dict[str, dict]:
    """Per method: recall and density per head (mean over ``rows``)."""
    n, hq = k.shape[2], q.shape[1]
    p = row_probs(q, k, rows, scale)  # [Hq, R, N]
    causal_rows = float((rows + 1).sum())
    # the oracle: each row keeps its own highest-probability keys, the same share of its causal
    # keys as the density (the upper line no index at that density beats)
    top = p.sort(-1, descending=True).values.cumsum(-1)  # [Hq, R, N]
    res = {}
    for d in ORACLE_DENSITIES:
        take = ((rows + 1).double() * d).ceil().long().clamp(min=1) - 1  # [R]
        rec = top.gather(-1, take[None, :, None].expand(hq, -1, 1))[..., 0]
        res[f"oracle{d}"] = {
            "family": "oracle",
            "budget": d,
            "recall": rec.mean(-1).tolist(),
            "density": [float(((take + 1).sum()) / causal_rows)] * hq,
        }
    del top
    for name, (fam, budget, heads) in methods(n, hq).items():
        if fam in skip_families:
            continue
        m = mk.sparse_prefill_mask(q, k, heads, scale=scale, query_rows=rows)[0]  # [Hq, R, N]
        res[name] = {
            "family": fam,
            "budget": budget,
            "recall": (p * m).sum(-1).mean(-1).tolist(),
            "density": (m.sum((-1, -2)).double() / causal_rows).tolist(),
        }
    return res


def capture(
    model: str, n: int, layers
) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], float]:
    """Q/K (float32, CPU) of the model's full-attention layers on the first n calibration tokens."""
    from minference_hf.capture import capture_qkv
    from minference_hf.models import load_model
    from minference_hf.patching import _attention_modules, _sliding_layer_ids
    from minference_hf.texts import real_token_ids

    lm = load_model(model)
    scales = [m.scaling for m in _attention_modules(lm.model) if hasattr(m, "scaling")]
    tok = lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + real_token_ids(tok, n - len(bos), "calibration")
    sliding = set(_sliding_layer_ids(lm.model))
    want = None if layers is None else set(layers)
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in capture_qkv(lm.model, torch.tensor([ids]), to_device="cpu"):
            if c.layer in sliding or (want is not None and c.layer not in want):
                continue
            out.append((c.layer, c.q.float(), c.k.float()))
            print(f"  captured layer {c.layer} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if want is not None and len(out) == len(want):
                break
    return out, float(scales[0])


def fit(per_length: dict[int, dict[str, dict]], lo: float = 0.5, hi: float = 0.98) -> dict:
    """Exponents per family from mean-over-heads recall curves (module doc)."""
    lengths = sorted(per_length)
    n0 = lengths[0]
    fams: dict[str, dict] = {}
    for fam in ("vertical_slash", "block_pooled", "block_sampled"):

        def curve(n, fam=fam):
            pts = sorted(
                (r["budget"], sum(r["recall"]) / len(r["recall"]))
                for r in per_length[n].values()
                if r["family"] == fam
            )
            best, out = 0.0, []
            for b, rec in pts:  # recall is non-decreasing in the budget; enforce it
                best = max(best, rec)
                out.append((b, best))
            return out

        base = curve(n0)
        if not base:
            continue
        rows = []
        for b, r0 in base:
            if not lo <= r0 <= hi:
                continue
            for n in lengths[1:]:
                c = curve(n)
                need = None
                for (b1, r1), (b2, r2) in zip(c, c[1:], strict=False):
                    if r1 <= r0 <= r2 and r2 > r1:
                        t = (r0 - r1) / (r2 - r1)
                        need = math.exp(math.log(b1) + t * (math.log(b2) - math.log(b1)))
                        break
                bound = None
                if need is None and c and c[0][1] >= r0:
                    need = c[0][0]  # the smallest budget already reaches it: an upper bound
                    bound = "upper"
                elif need is None and c:
                    need = c[-1][0]  # even the largest budget falls short: a lower bound
                    bound = "lower"
                exponent = None if need is None else math.log(need / b) / math.log(n / n0)
                rows.append(
                    {
                        "budget": b,
                        "recall_n0": r0,
                        "n": n,
                        "budget_needed": need,
                        "bound": bound,
                        "exponent": exponent,
                    }
                )
        # censored points enter at their bound: where the ladder ran out (a lower bound) the
        # median is, if anything, an underestimate
        exps = sorted(r["exponent"] for r in rows if r["exponent"] is not None)
        fams[fam] = {
            "n0": n0,
            "points": rows,
            "median_exponent": exps[len(exps) // 2] if exps else None,
            "max_exponent": exps[-1] if exps else None,
            "lower_bounds": sum(r["bound"] == "lower" for r in rows),
            "upper_bounds": sum(r["bound"] == "upper" for r in rows),
        }
    return fams


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = list(results["sources"])
    fams = ("vertical_slash", "block_pooled", "block_sampled")
    fig, axes = plt.subplots(len(srcs), 3, figsize=(13, 3.4 * len(srcs)), squeeze=False)
    for i, src in enumerate(srcs):
        per = results["sources"][src]["per_length"]
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            budgets = sorted(
                {r["budget"] for n in per for r in per[n].values() if r["family"] == fam}
            )
            for b in budgets:
                xs, ys = [], []
                for n in sorted(per, key=int):
                    for r in per[n].values():
                        if r["family"] == fam and r["budget"] == b:
                            xs.append(int(n))
                            ys.append(sum(r["recall"]) / len(r["recall"]))
                if xs:
                    ax.plot(xs, ys, marker="o", label=str(b))
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.02)
            e = results["sources"][src]["fit"].get(fam, {}).get("median_exponent")
            ax.set_title(f"{src}: {fam}" + ("" if e is None else f" (fit e={e:.2f})"), fontsize=9)
            ax.set_xlabel("prompt length")
            ax.set_ylabel("recall (mean over heads)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, title="budget", title_fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="gemma3,smollm2,synthetic")
    ap.add_argument("--rows", type=int, default=192, help="stratified query rows per length")
    ap.add_argument("--synth-heads", type=int, default=8)
    ap.add_argument(
        "--synth-lengths", default=",".join(str(n) for n in SYNTH_LENGTHS), help="comma list"
    )
    ap.add_argument(
        "--sampled-max-n",
        type=int,
        default=16384,
        help="measure sampled block scoring up to this length (its PyTorch path is slow on a CPU)",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--refit", action="store_true", help="only recompute the fits of an existing --out"
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="add the --sources to an existing --out (its other sources are kept; argv is logged)",
    )
    args = ap.parse_args(argv)
    if args.refit:
        res = json.loads(Path(args.out).read_text())
        for src in res["sources"].values():
            src["fit"] = fit({int(n): v for n, v in src["per_length"].items()})
        write_json(args.out, res)
        plot(res, Path(args.out).with_suffix(".png"))
        print(f"refitted {args.out}")
        return 0
    torch.manual_seed(0)
    results: dict = {
        "benchmark": "length_policy",
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "device": "cpu",
        "argv": sys.argv[1:] if argv is None else argv,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "rows": args.rows,
        "vs_ratio": "num_slash = 4 * num_vertical",
        "sources": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        earlier = json.loads(out.read_text())
        results["sources"] = earlier["sources"]
        results["earlier_runs"] = [
            *earlier.get("earlier_runs", []),
            {k: earlier[k] for k in ("commit", "date", "argv", "versions")},
        ]
    for src in args.sources.split(","):
        t0 = time.perf_counter()
        per: dict[int, dict[str, dict]] = {}
        if src in SOURCES:
            model, cap_n, lengths, layers = SOURCES[src]
            print(f"[{src}] capturing {model} at {cap_n} tokens", flush=True)
            qk, scale = capture(model, cap_n, layers)
            for n in lengths:
                rows = stratified_rows(n, args.rows)
                merged: dict[str, dict] = {}
                skip = ("block_sampled",) if n > args.sampled_max_n else ()
                for _layer, q, k in qk:
                    res = measure(
                        q[:, :, :n].contiguous(), k[:, :, :n].contiguous(), scale, rows, skip
                    )
                    for name, r in res.items():
                        m = merged.setdefault(name, {**r, "recall": [], "density": []})
                        m["recall"] += r["recall"]
                        m["density"] += r["density"]
                per[n] = merged
                print(f"  [{src}] n={n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            meta = {"model": model, "layers": [layer for layer, _, _ in qk], "scale": scale}
        elif src == "synthetic":
            for n in (int(x) for x in args.synth_lengths.split(",")):
                q, k, _ = structured_qkv(
                    1, args.synth_heads, max(1, args.synth_heads // 4), n, 128, profile="real"
                )
                rows = stratified_rows(n, args.rows)
                skip = ("block_sampled",) if n > args.sampled_max_n else ()
                per[n] = measure(q, k, 128**-0.5, rows, skip)
                print(f"  [synthetic] n={n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            meta = {"generator": "structured_qkv(profile='real')", "heads": args.synth_heads}
        else:
            raise SystemExit(f"unknown source {src!r}")
        results["sources"][src] = {
            **meta,
            "per_length": {str(n): v for n, v in per.items()},
            "fit": fit(per),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        for fam, f in results["sources"][src]["fit"].items():
            print(
                f"  [{src}] {fam}: median exponent {f['median_exponent']}, max "
                f"{f['max_exponent']}, bounds {f['lower_bounds']} lower / "
                f"{f['upper_bounds']} upper",
                flush=True,
            )
        write_json(out, results)  # after each source: partial results stay
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
