"""Real-model results -> docs/snippets/real_models.md, two PNGs and the README's real-model lines.

Reads the result files that ``benchmarks/sources.json`` names under ``eval`` (written by
``minference eval``), ``real_heads``, ``real_head_maps``, ``synthetic_vs_real``,
``block_scoring_real``, ``bench_block_scoring``, ``sampled_scoring_rows``, ``block_oracle``
and ``interleaved_vblock``; every figure in the
generated text comes from those files.

    python benchmarks/report_real.py
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "docs" / "snippets" / "real_models.md"
IMG = ROOT / "docs" / "img" / "gen"
README = ROOT / "README.md"
BEGIN, END = "<!-- real-models:begin -->", "<!-- real-models:end -->"
#: The methods the README lists (the shipped SmolLM2 config as measured, and the per-row oracle at
#: the issue's density target); the docs list every method.
README_METHODS = ("config=real_heads_smollm2_8k_config_o970.json", "oracle:0.2")


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def eval_table(res: dict) -> list[str]:
    lens = ", ".join(str(n) for n in res["lengths"])
    out = [
        f"**{res['model']}**, lengths {lens} tokens, {len(res['seeds'])} seed(s), pass-key depths "
        f"{', '.join(f'{d:g}' for d in res['depths'])}, perplexity and agreement over the last "
        f"{res['tail']} positions; text: {res['text']}; {res['device']}, torch {res['torch']}.",
        "",
        "| method | density | pass key | multi-key | dense-solved kept | perplexity / dense | "
        "top-1 agreement (min) | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in res["summary"].items():
        kept = f"{s['dense_solved_kept']}/{s['dense_solved']}"
        dens = _f(s["density"], ".3f") if name != "dense" else "1 (dense)"
        if s.get("cases_below_threshold"):
            dens += f" ({s['cases_below_threshold']} cases below the threshold ran dense)"
        out.append(
            f"| `{name}` | {dens} | {_f(s['passkey_accuracy'], '.2f')} | "
            f"{_f(s['multikey_accuracy'], '.2f')} | {kept} | {_f(s['ppl_ratio'], '.4f')} | "
            f"{_f(s['top1_agree'], '.4f')} ({_f(s['top1_agree_min'], '.4f')}) | "
            f"{_f(s['kl'], '.2e')} |"
        )
    return out


def per_length_table(res: dict) -> list[str]:
    """Per prompt length: density, perplexity ratio, top-1 agreement and the retrieval cases dense
    solves that each method keeps."""
    out = [
        "Per length:",
        "",
        "| length | method | density | perplexity / dense | top-1 agreement | dense-solved kept |",
        "|---|---|---|---|---|---|",
    ]
    for n in res["lengths"]:
        cases = [c for c in res["cases"] if c["length"] == n]
        dense = [c for c in cases if c["method"] == "dense"]
        solved = {
            (c["task"], c["seed"], c["depth"]) for c in dense if c["task"] != "lm" and c["correct"]
        }
        nll = {c["seed"]: c["nll"] for c in dense if c["task"] == "lm"}
        for m in res["methods"]:
            mine = [c for c in cases if c["method"] == m["name"]]
            lm = [c for c in mine if c["task"] == "lm"]
            dens = [c["density"] for c in mine if c["density"] is not None]
            ratio = [math.exp(c["nll"] - nll[c["seed"]]) for c in lm if c["seed"] in nll]
            top1 = [c["top1_agree"] for c in lm if c["top1_agree"] is not None]
            kept = sum(
                1 for c in mine
                if c["task"] != "lm" and c["correct"] and (c["task"], c["seed"], c["depth"]) in solved
            )  # fmt: skip
            d = f"{sum(dens) / len(dens):.3f}" if dens else "1 (dense)"
            r = f"{sum(ratio) / len(ratio):.4f}" if ratio else "-"
            t = f"{sum(top1) / len(top1):.4f}" if top1 else "-"
            out.append(f"| {n} | `{m['name']}` | {d} | {r} | {t} | {kept}/{len(solved)} |")
    return out


def heads_table(t: dict) -> list[str]:
    """Per layer: the oracle's share of keys for 95% of each row's mass, and the best recall
    each estimated kind reaches at <= 15% density."""
    out = [
        f"**{t['model']['model_id']}**, {t['n']} tokens of {t['calibration']}, {t['rows']} "
        "stratified query rows per layer. *Oracle*: share of a row's causal keys holding 95% of "
        "its attention (mean over heads of the per-head mean over rows). Recall: attention mass "
        "kept by the best candidate of each kind with density <= 15%, as estimated online "
        "(mean over heads / worst head).",
        "",
        "| layer | first-4-token mass | oracle 95% share | A-shape | vertical-slash | block-sparse |",
        "|---|---|---|---|---|---|",
    ]
    for layer in t["layers"]:
        heads = layer["heads"]
        if not heads:  # a sliding-window layer, not searched
            continue
        cells = []
        for kind in ("a_shape", "vertical_slash", "block_sparse"):
            best = [
                max(
                    (
                        c["recall"]
                        for c in h["candidates"]
                        if c["kind"] == kind and c["density"] <= 0.15
                    ),
                    default=0.0,
                )
                for h in heads
            ]
            cells.append(f"{sum(best) / len(best):.3f} / {min(best):.3f}")
        sink = sum(h["oracle"]["sink4_mass"] for h in heads) / len(heads)
        orc = sum(h["oracle"]["share95_mean"] for h in heads) / len(heads)
        out.append(f"| {layer['layer']} | {sink:.2f} | {orc:.3f} | " + " | ".join(cells) + " |")
    return out


def draw_heads(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searched = [layer for layer in t["layers"] if layer["heads"]]
    layers = [layer["layer"] for layer in searched]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    orc = [
        sum(h["oracle"]["share95_mean"] for h in layer["heads"]) / len(layer["heads"])
        for layer in searched
    ]
    ax.plot(layers, orc, "k-o", ms=3, label="oracle: keys for 95% of a row's mass")
    for kind, color in (("a_shape", "C0"), ("vertical_slash", "C1"), ("block_sparse", "C2")):
        need = []
        for layer in searched:
            per = []
            for h in layer["heads"]:
                ok = [
                    c["density"]
                    for c in h["candidates"]
                    if c["kind"] == kind and c["recall"] >= 0.95
                ]
                per.append(min(ok) if ok else 1.0)
            need.append(sum(per) / len(per))
        ax.plot(layers, need, "-o", ms=3, color=color, label=f"{kind}: density for recall 0.95")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of causal pairs")
    ax.set_title(
        f"{t['model']['model_id']}, {t['n']} tokens: what a row needs vs what estimation keeps",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def draw_maps(d: dict, path: Path) -> None:
    """A grid of real heads' attention maps (block mass, each query block's row summing to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    layers = sorted({m["layer"] for m in d["maps"]})
    heads = sorted({m["head"] for m in d["maps"]})
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(2.6 * len(heads), 2.6 * len(layers)))
    for m in d["maps"]:
        ax = axes[layers.index(m["layer"])][heads.index(m["head"])]
        a = np.array(m["map"], dtype=float)
        causal = np.tril(np.ones_like(a, dtype=bool))
        a = np.where(causal, np.clip(a, 1e-4, 1.0), np.nan)  # white: not causal
        ax.imshow(a, norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="magma", interpolation="nearest")
        ax.set_title(f"layer {m['layer']}, head {m['head']}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{d['model']}: attention mass per {d['block']}x{d['block']} block, {d['tokens']} tokens "
        "(rows: query blocks; log scale)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def readme_lines(evals: list[dict]) -> list[str]:
    out = []
    for res in evals:
        d = res["summary"].get("dense", {})
        for name, s in res["summary"].items():
            if name not in README_METHODS or s["density"] is None:
                continue
            out.append(
                f"- {res['model']}, {'/'.join(str(n) for n in res['lengths'])} tokens, `{name}` "
                f"(density {s['density']:.3f}): pass keys {s['dense_solved_kept']}/"
                f"{s['dense_solved']} of those dense finds (dense {d.get('passkey_accuracy', 0):.2f}"
                f" accuracy), perplexity x{s['ppl_ratio']:.3f} of dense, top-1 agreement "
                f"{s['top1_agree']:.3f}."
            )
    return out


# the model each block_scoring_real file was captured from, by a part of its name
BLOCK_SCORING_MODELS = {
    "smollm2": "SmolLM2-135M (9 of its 30 layers, 81 heads)",
    "gemma3": "Gemma-3-270M (global layers 5, 11, 17; 12 heads)",
    "structured": "structured synthetic heads (`structured_qkv`, profiles `real` and `legacy`; "
    "16 heads)",
}


def block_scoring_snippet() -> list[str]:
    """The block scorings against the block oracle, and their GPU cost."""
    out: list[str] = []
    for p in _sources.paths("block_scoring_real"):
        summ = json.loads(p.read_text())["summary"]
        names = list(dict.fromkeys(k.split("@")[0] for k in summ if k.split("@")[0] != "oracle"))
        ks = sorted({int(k.split("@")[1]) for k in summ})
        model = next((m for key, m in BLOCK_SCORING_MODELS.items() if key in p.name), p.stem)
        out += [
            f"Share of the block oracle's recall, mean (worst head), {model} at 8K (`{p.name}`):",
            "",
            "| key blocks kept (of 128) | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for k in ks:
            cells = [
                f"{summ[f'{n}@{k}']['of_oracle_mean']:.3f} ({summ[f'{n}@{k}']['of_oracle_min']:.3f})"
                for n in names
            ]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        flops = [summ[f"{n}@{ks[0]}"].get("flops_of_dense") for n in names]
        if any(f is not None for f in flops):  # the estimate's FLOPs / the dense causal layer's
            cells = ["" if f is None else f"{f:.2g}" for f in flops]
            out.append("| estimate FLOPs / dense layer | " + " | ".join(cells) + " |")
        out.append("")
    for p in _sources.paths("bench_block_scoring"):
        d = json.loads(p.read_text())
        out += [
            "GPU cost per layer with the PyTorch sampled path, before the fused kernel (32 query /"
            f" 8 KV heads, head dim 128, bf16; {d['device']}, `{p.name}`):",
            "",
            "| N | dense cuDNN ms | pooled estimate ms | sampled estimate ms | sampled / dense |",
            "|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            out.append(
                f"| {r['n']} | {r['dense_ms']:.1f} | {r['pooled_ms']:.1f} | {r['sampled_ms']:.1f} "
                f"| {r['sampled_share_of_dense']:.2f} |"
            )
        out.append("")
    for p in _sources.paths("sampled_scoring_rows"):
        out += sampled_kernel_table(p, json.loads(p.read_text()))
    out += sampled_rows_eval_table(_sources.paths("eval_sampled_rows"))
    return out


def sampled_rows_eval_table(paths: list[Path]) -> list[str]:
    """Sampled block scoring with several rows per query block through a whole model, against
    dense (``benchmarks/eval_sampled_rows.py``; pooled scoring at the same budget beside them).
    Per file and length: each sparse method's density, perplexity ratio, top-1 agreement and KL;
    a method with a case that did not go sparse says so (it is not a sparse result)."""
    if not paths:
        return []
    res = [json.loads(p.read_text()) for p in paths]
    r0 = res[0]
    tasks = sorted({t for r in res for t in r["tasks"]})
    out = [
        f"Through the whole model: {r0['model']}, every head `block:K` (pooled) or "
        f"`block:K:sampled` with {' / '.join(str(r['sampled_rows']) for r in res)} sampled rows "
        "per query block, against the model's dense "
        f"attention; tasks {', '.join(tasks)}"
        + ("" if {"passkey", "multikey"} & set(tasks) else " (no retrieval task in these files)")
        + f", {len(r0['seeds'])} seed(s), perplexity, top-1 "
        f"agreement and KL over the last {r0['tail']} positions; {r0['device']}, torch "
        f"{r0['torch']}. Files: "
        + "; ".join(_sources.cite(p, r) for p, r in zip(paths, res))
        + ".",
        "",
        "| length | method | sampled rows | density | perplexity / dense | top-1 agreement | KL |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    seen = set()  # the pooled method runs in every file: one row per length
    for r in res:
        dense = {
            (c["length"], c["seed"]): c["nll"]
            for c in r["cases"]
            if c["method"] == "dense" and c["task"] == "lm"
        }
        for m in r["methods"]:
            if not m["sparse"]:
                continue
            sampled = m["name"].endswith(":sampled")
            for n in r["lengths"]:
                lm = [c for c in r["cases"] if c["method"] == m["name"] and c["length"] == n
                      and c["task"] == "lm"]  # fmt: skip
                if not lm or (not sampled and (n, m["name"]) in seen):
                    continue
                seen.add((n, m["name"]))
                ran_dense = sum(not c["went_sparse"] for c in lm)
                dens = [c["density"] for c in lm if c["density"] is not None]
                ratio = [math.exp(c["nll"] - dense[(n, c["seed"])]) for c in lm]
                top1 = [c["top1_agree"] for c in lm]
                kl = [c["kl"] for c in lm]
                d = f"{sum(dens) / len(dens):.3f}" if dens else "-"
                if ran_dense:
                    d += f" ({ran_dense} case(s) ran dense: not a sparse result)"
                rows.append(
                    (n, not sampled, r["sampled_rows"] if sampled else 0,
                     f"| {n} | `{m['name']}` | {r['sampled_rows'] if sampled else '-'} | {d} | "
                     f"{sum(ratio) / len(ratio):.4f} | {sum(top1) / len(top1):.4f} | "
                     f"{sum(kl) / len(kl):.2e} |")
                )  # fmt: skip
    out += [row for *_, row in sorted(rows, key=lambda t: t[:3])]
    return out + [""]


def sampled_kernel_table(p: Path, d: dict) -> list[str]:
    """The fused sampled-scoring kernel: its time and rate, and the estimation's share of a sparse
    layer (``benchmarks/bench_sampled_scoring.py``)."""
    out = [
        "With the fused Triton kernel (`ops.block_sampled_triton`; same layer shape, structured inputs, a "
        "layer of `block_sparse` heads keeping 8% of the key blocks per query block, interleaved "
        f"medians; {d['device']}, `{p.name}`). Kernel rate: 2 D FLOPs per (sampled row, causal "
        "key), one pass; cuDNN's: 4 D per causal pair.",
        "",
        "| N | scoring | kernel ms (TFLOP/s) | estimate ms | estimate + index ms | sparse layer ms "
        "| (estimate + index) / layer | recall / oracle, mean (worst head) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in d["timings"]:
        ms, n, rec = t["ms"], t["n"], t.get("recall", {})
        dense = f"{ms['dense_cudnn']:.1f} ({t['tflops']['dense_cudnn']:.0f})"
        out.append(f"| {n} | dense cuDNN | {dense} | | | | | |")
        rows = [("pooled", None)] + [
            (f"sampled({k.split('_r')[1]})", k.split("_r")[1])
            for k in ms
            if k.startswith("kernel_r")
        ]
        for name, r in rows:
            key = "pooled" if r is None else f"sampled_r{r}"
            kern = (
                ""
                if r is None
                else (f"{ms[f'kernel_r{r}']:.2f} ({t['tflops'][f'kernel_r{r}_useful']:.0f})")
            )
            est = ms["est_pooled" if r is None else f"est_sampled_r{r}"]
            idx = ms[f"index_{key}"]
            lay = ms[f"layer_{key}"]
            rc = rec.get(key)
            rc = f"{rc['of_oracle_mean']:.3f} ({rc['of_oracle_min_head']:.3f})" if rc else ""
            out.append(
                f"| {n} | {name} | {kern} | {est:.2f} | {idx:.2f} | {lay:.1f} | {idx / lay:.2f} "
                f"| {rc} |"
            )
        if "est_sampled_torch_r4" in ms:
            out.append(f"| {n} | sampled(4), PyTorch path | | {ms['est_sampled_torch_r4']:.1f} "
                       "| | | | |")  # fmt: skip
    out.append("")
    return out


def _density_series(d: dict) -> dict[str, list[tuple[int, dict]]]:
    """The config's rows of a ``density_by_profile`` file by heads label, sorted by length."""
    series: dict[str, list[tuple[int, dict]]] = {}
    for key, r in d["results"].items():
        label, n = key.rsplit("@", 1)
        if "llama3.1-config" in r:
            series.setdefault(label, []).append((int(n), r["llama3.1-config"]))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in series.items()}


def draw_density_by_length(d: dict, path: Path) -> None:
    """The Llama-3.1 config's computed density and recall against length, per heads label:
    synthetic profiles as thick lines, captured layers thin, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _density_series(d)
    colours: dict[str, str] = {}
    palette = ["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, pts in series.items():
        group = label.rsplit("-L", 1)[0]
        captured = group != label
        c = colours.setdefault(group, palette[len(colours) % len(palette)])
        xs = [n for n, _ in pts]
        kw = dict(color=c, marker="o" if captured else "s", lw=1 if captured else 2.5,
                  ms=3 if captured else 5, alpha=0.75 if captured else 1.0)  # fmt: skip
        first = label == next(k for k in series if k.rsplit("-L", 1)[0] == group)
        name = (
            (f"{group} (captured layers)" if captured else f"synthetic: {label}") if first else None
        )
        a1.plot(xs, [m["density"] for _, m in pts], label=name, **kw)
        a1.plot(xs, [m["named_density"] for _, m in pts], ls=":", **{**kw, "marker": None})
        a2.plot(xs, [m["recall"] for _, m in pts], label=name, **kw)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    a1.set_yscale("log")
    a1.set_ylabel("share of causal pairs (solid: computed, dotted: named)")
    a1.set_title("pairs the config's layer-0 index computes", fontsize=10)
    a2.set_ylabel("recall (attention mass kept, sampled rows)")
    a2.set_title("attention it keeps", fontsize=10)
    a1.legend(fontsize=7)
    fig.suptitle(
        "Llama-3.1 config, layer 0 (vertical-slash), on synthetic and real heads", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def profile_density_section(p: Path, d: dict) -> list[str]:
    """The shipped Llama-3.1 config's index on synthetic heads (and captured real ones)."""
    heads = {key.rsplit("@", 1)[0]: r.get("heads") for key, r in d["results"].items()}
    real = sorted({k for k, v in heads.items() if v and v.startswith("captured")})
    out = [
        f"### `{p.name}`: what the Llama-3.1 config keeps on "
        + ("synthetic and real heads" if real else "legacy and calibrated heads"),
        "",
        "Layer 0 of the shipped `meta-llama/Llama-3.1-8B-Instruct` config (measured length policy) "
        "on one Llama-3-8B-shaped layer (32 query / 8 KV heads, head dim 128) of synthetic heads: "
        "`legacy` is the generator every GPU speed table used, `real` the profile calibrated "
        "against SmolLM2's captured heads at 8K (extrapolated to these lengths). Density: share of "
        "the causal pairs the index visits; recall and the oracle's recall at the same number of "
        "keys per row, on 96 sampled rows (`benchmarks/density_by_profile.py`, PyTorch backend).",
        "",
    ]
    if real:
        shapes: dict[str, tuple[str, list[str]]] = {}
        for k in real:
            model, layer = k.rsplit("-L", 1)
            shape = heads[k][heads[k].find("(") + 1 : heads[k].rfind(")")]
            shapes.setdefault(model, (shape, []))[1].append(layer)
        out[-2] += (
            " Real heads: layers captured from trained models on the calibration text, every "
            "head given the config's layer-0 pattern at the layer's own length ("
            + "; ".join(f"{m}: layers {', '.join(ls)}, {sh}" for m, (sh, ls) in shapes.items())
            + ")."
        )
    out += [
        "| heads | N | index | density | recall | oracle at that density | of oracle "
        "| named pairs (recall) | tile rounding | K/V rows per block: named / loaded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = None
    for key, r in d["results"].items():
        profile, n = key.rsplit("@", 1)
        for name, m in r.items():
            if not isinstance(m, dict):
                continue
            named, tiles, rows = "", "", ""
            if "named_density" in m:
                ratio = m["tile_density"] / m["named_density"]
                named = f"{m['named_density']:.4f} ({m['named_recall']:.3f})"
                tiles = f"{ratio:.1f}x"
            if "rows_named" in m:
                rows = f"{m['rows_named']:.0f} / {m['rows_tiles']:.0f}"
                if name == "llama3.1-config" and (worst is None or ratio > worst[0]):
                    worst = (ratio, profile, int(n) // 1024, m)
            out.append(
                f"| {profile} | {int(n) // 1024}K | {name} | {m['density']:.4f} | "
                f"{m['recall']:.3f} | {m['oracle_recall']:.3f} | "
                f"{m['recall'] / m['oracle_recall']:.3f} | {named} | {tiles} | {rows} |"
            )
    out += [
        "",
        "Named pairs: the columns and diagonals the vertical-slash estimate selects, counted "
        "pair by pair, with the recall they alone hold. Tile rounding: the pairs the index "
        "computes over those it names. The kernel computes each slash as part of a 64 x 64 tile "
        "of keys at a fixed offset from the query block, so a diagonal with no selected "
        "neighbours costs 64 times its own pairs. K/V rows per block: the distinct keys a 64-row "
        "query block must load for the named pairs (a diagonal needs one key per row, a column "
        "one key) and the keys the index loads (tiles and the columns outside them), means over "
        "heads and the sampled blocks: the bytes behind the pairs.",
    ]
    if real:
        series = _density_series(d)
        synth = {k: dict(v) for k, v in series.items() if k not in real}
        models: dict[str, dict[int, list[float]]] = {}
        for k in real:
            for n, m in series.get(k, []):
                models.setdefault(k.rsplit("-L", 1)[0], {}).setdefault(n, []).append(m["density"])
        out += [
            "",
            "The config's computed density, real heads against synthetic ones at the same length:",
            "",
        ]
        for model, by_n in models.items():
            for n, ds in sorted(by_n.items()):
                others = ", ".join(
                    f"{lab} {v[n]['density']:.3f}" for lab, v in synth.items() if n in v
                )
                out.append(
                    f"- {n // 1024}K: {model} {min(ds):.3f}-{max(ds):.3f} over {len(ds)} layers"
                    + (f" (synthetic: {others})" if others else "")
                )
    if worst is not None:
        ratio, profile, n, m = worst

        def name_of(label: str) -> str:
            h = heads.get(label) or ""
            return f"synthetic `{label}`" if not h.startswith("captured") else f"captured `{label}`"

        out += [
            "",
            f"On the {name_of(profile)} heads at {n}K, the config names {m['named_density']:.2%} of the "
            f"causal pairs but computes {m['tile_density']:.2%} ({ratio:.1f}x). The extra pairs "
            f"raise recall from {m['named_recall']:.3f} to {m['recall']:.3f}.",
        ]
        if "rows_named" in m:
            out[-1] += (
                f" In bytes the tiles cost far less than in pairs: they load "
                f"{m['rows_tiles'] / m['rows_named']:.2f}x the K/V rows the named pairs need, "
                "because a diagonal needs one key per query row whichever way it is computed. A "
                "kernel that computed only the named pairs would gain only the tiles' arithmetic, "
                "not their loads; `benchmarks/tile_floor.py` measures that split on a GPU."
            )
    return out + [""]


def synthetic_section(p: Path, d: dict) -> list[str]:
    """The synthetic generator (legacy kinds and the calibrated profile) against real heads."""
    legacy = ("mixed", "vertical_slash", "block", "local")
    pairs = {"real": "all layers", "real_early": "layers 0-2", "real_mid": "layers 3-11",
             "real_late": "layers 12-29"}  # fmt: skip
    out = [
        f"### `{p.name}`: the synthetic generator against real heads",
        "",
        f"Oracle statistics at {d['n']} tokens, SmolLM2's head shape: the share of a row's "
        "causal keys holding 90 / 95 / 99% of its attention, and the mass on the first 4 "
        "tokens (means over heads and rows; `benchmarks/synthetic_vs_real.py`). "
        "`kind=...`: the legacy generator (`structured_qkv`'s default profile); "
        "`profile=...`: the profile calibrated against these real heads "
        "(`benchmarks/fit_synthetic.py`), each next to the real layer group it was fitted to.",
        "",
        "| heads | keys for 90% | keys for 95% | keys for 99% | first-4-token mass |",
        "|---|---|---|---|---|",
    ]
    synth, real = d["synthetic"], d["real_smollm2"]
    rows = [(f"synthetic `kind={k}`", v) for k, v in synth.items() if k in legacy]
    rows += [
        (f"synthetic `{k}`", v) for k, v in synth.items() if k not in legacy and k not in pairs
    ]
    for prof, group in pairs.items():
        if prof in synth:
            rows.append((f"calibrated `profile={prof}`", synth[prof]))
        if group in real:
            rows.append((f"SmolLM2, {group}", real[group]))
    rows += [(f"SmolLM2, {k}", v) for k, v in real.items() if k not in pairs.values()]
    for name, v in rows:
        out.append(
            f"| {name} | {v['share90_mean']:.3f} | {v['share95_mean']:.3f} | "
            f"{v['share99_mean']:.3f} | {v['sink4_mass']:.3f} |"
        )
    out.append("")
    cal = d.get("calibrated_profile", {})
    cands = cal.get("candidates") or []
    if cands:
        short = {c: c.replace("vertical_slash", "VS").replace("block_sparse", "block")
                 .replace("a_shape", "A").replace("sink=", "").replace("window=", "")
                 .replace("v=", "").replace("s=", "").replace("top_k=", "")
                 .replace("block=", "") for c in cands}  # fmt: skip
        out += [
            "The same heads seen by the offline search's candidates as estimated at inference: "
            "recall (attention mass kept; density, the share of causal pairs, in brackets for "
            "the vertical-slash budgets whose slash picks can scatter).",
            "",
            "| heads | " + " | ".join(short[c] for c in cands) + " |",
            "|---|" + "---|" * len(cands),
        ]
        real_groups = cal.get("real_smollm2_groups", {})
        for prof, v in cal.get("synthetic", {}).items():
            grp = cal.get("compared_with", {}).get(prof)
            match = [(k, r) for k, r in real_groups.items() if grp and k.startswith(grp)]
            for name, st in [(f"calibrated `profile={prof}`", v)] + [
                (f"SmolLM2, {k}", r) for k, r in match
            ]:
                cells = []
                for c in cands:
                    cell = f"{st[f'recall {c}']:.2f}"
                    if c.startswith("vertical_slash"):
                        cell += f" ({st[f'density {c}']:.2f})"
                    cells.append(cell)
                out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    dens = d.get("llama31_budget_density")
    if dens:
        gens = dens["generators"]
        out += [
            f"The shipped Llama-3.1 config's budgets ({', '.join(dens['patterns'])}) at "
            f"{dens['n']} tokens on one Llama-3-8B-shaped layer (32 query / 8 KV heads, head dim "
            "128) keep "
            + "; ".join(
                f"{g['density']:.3f} of the causal pairs at recall {g['recall']:.3f} on "
                + (f"`profile={n}`" if n == "real" else f"the legacy `kind={n.split()[-1]}`")
                for n, g in gens.items()
            )
            + f" (exact density over every query block, recall on {dens['recall_rows']} rows).",
            "",
        ]
    return out


#: issue 20's 10x at 128K on the Llama-3.1 config needs the config's recall at this share of its
#: computed pairs, if the kernel's rate and the estimation's cost stay as measured (DECISIONS v0.3.0-i)
TEN_X_SHARE = 0.69

_ORACLE_COLUMNS = (
    "oracle block keys", "oracle block tiles", "cols + oracle tiles",
    "pooled", "vertical_block", "sampled", "cols + sampled",
    "pooled-query keys", "4-pooled-query keys",
)  # fmt: skip


def draw_block_oracle(d: dict, path: Path) -> None:
    """One panel per layer: recall against computed density of each method, the config a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(d["results"])
    cols = min(5, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        r = d["results"][label]
        for name, curve in r["curves"].items():
            xs, ys = zip(*curve)
            ax.plot(xs, ys, "--" if "oracle" in name else "-", marker=".", label=name)
        ax.plot(r["config"]["density"], r["config"]["recall"], "k*", ms=11, label="config")
        ax.set_xscale("log")
        ax.set_title(f"{label} ({r['n'] // 1024}K)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("recall")
    for ax in axes[-1]:
        ax.set_xlabel("computed density")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Whole 64-row query blocks: per-block oracles and estimators vs the config")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def block_oracle_section(p: Path, d: dict) -> list[str]:
    """The share of the config's computed pairs that each per-block bound and estimator needs for
    the config's recall (``block_oracle.py``)."""
    share = lambda v: "never" if v is None else f"{v:.2f}"  # noqa: E731
    out = [
        f"### `{p.name}`: what a per-block index could save over the Llama-3.1 config",
        "",
        f"Whole 64-row query blocks ({d['args']['blocks']} per layer), exact attention of every "
        "row. For each method, the share of the config's computed pairs it needs to keep the "
        "config's recall (below 1: fewer pairs than the config; `never`: not within the budgets "
        f"tried). Issue 20's 10x at 128K needs about {TEN_X_SHARE} at the kernel's measured rate "
        "(for keys chosen per block a guide only: neither their gathered-key attention nor their "
        "estimate has been timed; `benchmarks/block_keys_cost.py` is that measurement). "
        "Oracles: the best keys (`oracle block keys`) or 64-key tiles (`oracle block tiles`) "
        "that the block's rows share, chosen with their exact attention; `cols + oracle tiles`: "
        f"the `vertical_block` head's {d['args']['columns']} columns plus the best tiles. "
        "Estimators: the shipped `block_sparse(t)` (`pooled`) and "
        f"`vertical_block({d['args']['columns']}, t)`, and this script's sampled scoring (4 rows "
        "per block) alone and with the same columns; and keys, not tiles, chosen per block (no "
        "shipped kernel runs such an index yet): the diagonal tile plus the best earlier keys by "
        "the logits of the block's mean query (`pooled-query keys`) or by the summed softmax of "
        "the mean queries of 4 groups of its rows (`4-pooled-query keys`) "
        "(`benchmarks/block_oracle.py`, CPU).",
        "",
        "| heads | N | config density | config recall | " + " | ".join(_ORACLE_COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(_ORACLE_COLUMNS),
    ]
    for label, r in d["results"].items():
        out.append(
            f"| {label} | {r['n'] // 1024}K | {r['config']['density']:.4f} | "
            f"{r['config']['recall']:.3f} | "
            + " | ".join(share(r["need_share"].get(c)) for c in _ORACLE_COLUMNS)
            + " |"
        )
    real = {k: r for k, r in d["results"].items() if not k.startswith("synthetic")}
    if real:

        def summary(method: str) -> str:
            v = {k: r["need_share"][method] for k, r in real.items()}
            got = [x for x in v.values() if x is not None]
            below = [k for k, x in v.items() if x is not None and x < 0.99]
            span = f"{min(got):.2f}-{max(got):.2f}" if got else "never"
            ten = [k for k, x in v.items() if x is not None and x <= TEN_X_SHARE]
            return (
                f"`{method}` needs {span} of the config's pairs, at least 1% fewer than the "
                f"config on {len(below)} of {len(v)} layers"
                + (f" ({', '.join(below)})" if below else "")
                + f", at most {TEN_X_SHARE} on {len(ten)}"
            )

        out += [
            "",
            f"On the {len(real)} captured layers: {summary('pooled')}; "
            f"{summary('vertical_block')}"
            + "".join(
                f"; {summary(m)}"
                for m in ("pooled-query keys", "4-pooled-query keys")
                if all(m in r["need_share"] for r in real.values())
            )
            + ".",
        ]
    return out + [""]


_PROFILES = {
    "legacy": "legacy synthetic heads",
    "real": "calibrated synthetic heads (profile `real`)",
}


def _ratio_table(d: dict, groups: tuple[tuple[str, str], ...]) -> list[str]:
    """One interleaved result (``bench_interleaved.py`` or the probe): a row per method, then the
    fastest of each ``(label, name prefix)`` group at the config's recall or above."""
    cfg = d["methods"]["llama3.1-config"]
    out = [
        f"`{d['_name']}`: {_PROFILES.get(d['profile'], d['profile'])}, {d['n'] // 1024}K tokens, "
        f"{d['device']}",
        "",
        "| method | ms | x over cuDNN | density | recall |",
        "|---|---|---|---|---|",
    ]
    for name, m in d["methods"].items():
        out.append(
            f"| {name} | {m['ms']:.2f} | {m['ratio_median']:.2f} | {m['density']:.4f} | "
            f"{m['recall']:.3f} |"
        )
    at = {
        n: m
        for n, m in d["methods"].items()
        if n != "llama3.1-config" and m["recall"] >= cfg["recall"]
    }
    lines = []
    for label, prefix in groups:
        if not any(n.startswith(prefix) for n in d["methods"]):
            continue
        ok = [n for n in at if n.startswith(prefix)]
        if ok:
            best = max(ok, key=lambda n: at[n]["ratio_median"])
            lines.append(f"{label} `{best}` {at[best]['ratio_median']:.2f}x")
        else:
            lines.append(f"{label}: none of the budgets tried")
    return out + [
        "",
        f"Fastest at the config's recall ({cfg['recall']:.3f}) or above: "
        + "; ".join(lines)
        + f" (the config: {cfg['ratio_median']:.2f}x over cuDNN).",
    ]


def vertical_block_section(paths: list[Path]) -> list[str]:
    """``vertical_block`` heads through the shipped pipeline (``bench_interleaved.py --vblock``)."""
    out = [
        "### `vertical_block` heads on a GPU (the shipped pipeline)",
        "",
        "`HeadPattern.vertical_block(V, K)` on every head of the layer benchmark's layer at 128K, "
        "through `sparse_prefill` (estimation, index and the kernel, column keys masked out of "
        "the tiles that hold one), timed right after cuDNN in each of the rounds "
        "(`benchmarks/bench_interleaved.py --vblock`); beside the Llama-3.1 config and "
        "block-sparse heads. Recall and density on the benchmark's sample rows.",
        "",
    ]
    for p in paths:
        d = dict(json.loads(p.read_text()), _name=p.name)
        out += _ratio_table(
            d, (("block-sparse", "block_sparse"), ("vertical-block", "vertical_block"))
        )
        out.append("")
    return out


def main() -> int:
    parts = [
        "<!-- generated by benchmarks/report_real.py from benchmarks/results; do not edit -->",
        "",
    ]
    evals = []
    for p in _sources.paths("eval"):  # hybrid models (eval_gemma3): benchmarks/report_hybrid.py
        res = json.loads(p.read_text())
        evals.append(res)
        parts += [f"### `{p.name}`", "", *eval_table(res), "", *per_length_table(res), ""]
        try:
            from minference_hf.evaluate import plot_eval

            png = IMG / f"{p.stem}.png"
            IMG.mkdir(parents=True, exist_ok=True)
            plot_eval(res, png)
            parts += [f"![accuracy against density]({'../img/gen/' + png.name})", ""]
        except ImportError:
            pass
    for p in _sources.paths("real_heads"):
        t = json.loads(p.read_text())
        parts += [f"### `{p.name}`", "", *heads_table(t), ""]
        png = IMG / f"{p.stem}.png"
        draw_heads(t, png)
        parts += [f"![oracle vs estimation]({'../img/gen/' + png.name})", ""]
    for p in _sources.paths("real_head_maps"):
        d = json.loads(p.read_text())
        png = IMG / f"{p.stem}.png"
        draw_maps(d, png)
        parts += [
            f"### `{p.name}`",
            "",
            f"Real heads as captured ({d['source']}): sinks (the first column), the local band, "
            "and content-dependent columns and blocks that move with the query.",
            "",
            f"![real heads]({'../img/gen/' + png.name})",
            "",
        ]
    for p in _sources.paths("synthetic_vs_real"):
        parts += synthetic_section(p, json.loads(p.read_text()))
    for p in _sources.paths("density_by_profile"):
        d = json.loads(p.read_text())
        parts += profile_density_section(p, d)
        if any(len(v) > 2 for v in _density_series(d).values()):
            png = IMG / f"{p.stem}.png"
            draw_density_by_length(d, png)
            parts += [f"![density by length]({'../img/gen/' + png.name})", ""]
    for p in _sources.paths("block_oracle"):
        d = json.loads(p.read_text())
        parts += block_oracle_section(p, d)
        png = IMG / f"{p.stem}.png"
        draw_block_oracle(d, png)
        parts += [f"![per-block oracles]({'../img/gen/' + png.name})", ""]
    parts += vertical_block_section(_sources.paths("interleaved_vblock"))
    SNIPPET.write_text("\n".join(parts))
    bs = block_scoring_snippet()
    (SNIPPET.parent / "block_scoring.md").write_text(
        "<!-- generated by benchmarks/report_real.py; do not edit -->\n\n" + "\n".join(bs)
    )
    print(f"wrote {SNIPPET}")
    if README.exists():
        text = README.read_text()
        if BEGIN in text and END in text:
            body = "\n".join(readme_lines(evals)) or "- (no real-model results yet)"
            new = re.sub(
                re.escape(BEGIN) + ".*?" + re.escape(END),
                lambda _: f"{BEGIN}\n{body}\n{END}",
                text,
                flags=re.S,
            )
            README.write_text(new)
            print(f"updated {README}")
    return 0 if math.isfinite(0.0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
