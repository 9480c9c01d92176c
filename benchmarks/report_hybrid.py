"""Hybrid (sliding-window + global) model results -> docs/snippets/hybrid.md, a PNG, README lines.

Reads ``benchmarks/results/bench_hybrid_*.json`` (``benchmarks/bench_hybrid.py``, GPU) and
``benchmarks/results/eval_gemma3*.json`` (``minference eval --model gemma3-270m``); every figure in
the generated text comes from those files.

    python benchmarks/report_hybrid.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "docs" / "snippets" / "hybrid.md"
IMG = ROOT / "docs" / "img" / "gen"
README = ROOT / "README.md"
BEGIN, END = "<!-- hybrid:begin -->", "<!-- hybrid:end -->"
MODES = {
    "sdpa": "transformers SDPA (unpatched)",
    "exact": "minference, global layers dense",
    "sparse": "minference, global layers sparse",
    "sparse_softcap": "... with soft-capping",
}

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_real import eval_table, per_length_table  # noqa: E402


def bench_table(res: dict) -> list[str]:
    args = " ".join(res["argv"])
    out = [
        f"**{res['model']}**, window {res['window']}, {res['device']}, torch "
        f"{res['versions']['torch']}, transformers {res['versions']['transformers']}, triton "
        f"{res['versions']['triton']}; `python benchmarks/bench_hybrid.py {args}` at commit "
        f"`{res['commit'][:10]}`. Medians of the timed rounds (interleaved; one warm-up round).",
        "",
    ]
    chk = res.get("check")
    if chk:
        out += [
            f"Check at {chk['n']} tokens (bf16, random weights): global-dense minference against "
            f"SDPA, last 256 positions' logits: max error {chk['max_rel_err']:.1e} of the largest "
            f"logit, top-1 agreement {chk['top1_agree']:.3f}, {chk['local_calls']} local-layer "
            f"calls through the streaming kernel, {chk['fallback_calls']} fallbacks. (Random "
            "weights give near-tied logits, so bf16 rounding flips some top-1s; the fp32 tests "
            "on Gemma-3-270M's real weights agree to 3e-6.)",
            "",
        ]
    out += [
        "| tokens | run | time to first token | local-layer attention | global-layer attention "
        "| rest | peak memory | vs SDPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in res["runs"]:
        for mode, s in run["summary"].items():
            if "error" in s:
                out.append(f"| {run['n']} | {MODES.get(mode, mode)} | {s['error']} | | | | | |")
                continue
            out.append(
                f"| {run['n']} | {MODES.get(mode, mode)} | {s['ttft_s']:.3f} s | "
                f"{s['local_attn_s']:.3f} s | {s['global_attn_s']:.3f} s | {s['rest_s']:.3f} s | "
                f"{s['peak_gib']:.1f} GiB | {s.get('speedup_vs_sdpa', 1.0):.2f}x |"
            )
    return out


def exactness_table(res: dict) -> list[str]:
    out = [
        f"**{res['model']}**, {res['device']}, torch {res['torch']}: logits of the last 512 "
        "positions against unpatched SDPA in float32 (max error relative to the largest logit; "
        "top-1 agreement). minference runs a dense config: local layers through the Triton "
        "streaming kernel, global layers dense. The bf16 rows measure each path in bf16 against "
        "the same float32 reference: bf16 rounding alone (SDPA in bf16) moves random-weight "
        "top-1s this much.",
        "",
        "| tokens | minference fp32 | SDPA bf16 | minference bf16 |",
        "|---|---|---|---|",
    ]
    for r in res["runs"]:
        cell = lambda c: f"{c['max_rel_err']:.1e} / {c['top1_agree']:.3f}"  # noqa: E731
        out.append(
            f"| {r['n']} | {cell(r['minference_fp32'])} | {cell(r['sdpa_bf16'])} | "
            f"{cell(r['minference_bf16'])} |"
        )
    return out


def draw(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    modes = [m for m in MODES if all(m in r["summary"] for r in runs)]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        x = range(len(modes))
        bottom = [0.0] * len(modes)
        for part, color in (("local_attn_s", "#d62728"), ("global_attn_s", "#1f77b4"),
                            ("rest_s", "#7f7f7f")):  # fmt: skip
            vals = [run["summary"][m].get(part, 0.0) for m in modes]
            ax.bar(
                x, vals, bottom=bottom, color=color, label=part.replace("_s", "").replace("_", " ")
            )
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(list(x), [m.replace("_", "\n") for m in modes], fontsize=8)
        ax.set_title(f"{run['n'] // 1024}K tokens")
        ax.set_ylabel("seconds (time to first token)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Gemma-3-270M-shaped pre-fill, {res['device']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_lines(res: dict) -> list[str]:
    lines = []
    for run in res["runs"]:
        s = run["summary"]
        if "sdpa" not in s or "exact" not in s or "ttft_s" not in s["exact"]:
            continue
        loc = s["sdpa"]["local_attn_s"] / max(s["exact"]["local_attn_s"], 1e-9)
        sp = s.get("sparse", {})
        extra = (
            f", {sp['speedup_vs_sdpa']:.1f}x with the global layers sparse as well"
            if "speedup_vs_sdpa" in sp
            else ""
        )
        lines.append(
            f"- Gemma-3-270M shape, {run['n'] // 1024}K tokens, {res['device']}: exact local "
            f"layers (streaming kernel) {s['exact']['speedup_vs_sdpa']:.1f}x faster pre-fill than "
            f"transformers' SDPA (local-layer attention {loc:.0f}x, peak memory "
            f"{s['sdpa']['peak_gib']:.1f} -> {s['exact']['peak_gib']:.1f} GiB){extra}."
        )
    return lines


def main() -> int:
    benches = _sources.paths("hybrid")
    evals = _sources.paths("eval_gemma3")
    text = [
        "<!-- generated by benchmarks/report_hybrid.py from benchmarks/results; do not edit -->",
        "",
    ]
    readme: list[str] = []
    for path in benches:
        res = json.loads(path.read_text())
        png = IMG / f"{path.stem}.png"
        draw(res, png)
        text += [f"### Pre-fill speed: `{path.name}`", "", *bench_table(res), ""]
        text += [f"![{path.stem}](../img/gen/{png.name})", ""]
        readme += readme_lines(res)
    for path in _sources.paths("hybrid_exactness"):
        text += [
            f"### Exactness on the GPU: `{path.name}`",
            "",
            *exactness_table(json.loads(path.read_text())),
            "",
        ]
    for path in evals:
        res = json.loads(path.read_text())
        text += [f"### Accuracy: `{path.name}`", "", *eval_table(res), "", *per_length_table(res)]
        text.append("")
        try:
            from minference_hf.evaluate import plot_eval

            png = IMG / f"{path.stem}.png"
            plot_eval(res, png)
            text += [f"![accuracy against density](../img/gen/{png.name})", ""]
        except ImportError:  # minference-hf not installed: the tables only
            print("minference_hf not importable: no accuracy figure", file=sys.stderr)
    SNIPPET.parent.mkdir(parents=True, exist_ok=True)
    SNIPPET.write_text("\n".join(text).rstrip() + "\n")
    print(f"wrote {SNIPPET}")
    if README.exists() and readme:
        old = README.read_text()
        if BEGIN in old and END in old:
            head, rest = old.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            new = head + BEGIN + "\n" + "\n".join(readme) + "\n" + END + tail
            if new != old:
                README.write_text(new)
                print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
