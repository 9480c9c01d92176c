"""Length-policy results -> docs/snippets/length_policy.md and docs/img/gen/length_policy.png.

Also writes docs/snippets/frontier.md from ``benchmarks/results/recall_frontier_*_h200.json``.
Reads ``benchmarks/results/length_policy_cpu.json`` (``benchmarks/length_policy.py``: recall at
fixed budgets against the prompt length, and the fitted growth exponents) and, when present,
``benchmarks/results/bench_length_policy_h200.json`` (``benchmarks/bench_length_policy_gpu.py``:
the measured policy's cost in speed). Every figure in the generated text comes from those files.

    python benchmarks/report_length_policy.py
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "docs" / "snippets" / "length_policy.md"
FRONTIER = ROOT / "docs" / "snippets" / "frontier.md"
IMG = ROOT / "docs" / "img" / "gen"
FAMILIES = {
    "vertical_slash": "vertical-slash (v, 4v)",
    "block_pooled": "block-sparse, pooled scoring",
    "block_sampled": "block-sparse, sampled scoring",
}


def fitted_exponent(res: dict) -> float:
    """The shipped exponent: the largest per-estimator median over the real-head sources (those
    with a ``model``; the synthetic generator is reported, not fitted to), rounded up to a
    multiple of 0.05 (the rule ``MEASURED_LONGER_EXPONENT`` follows; a test checks it)."""
    meds = [
        f["median_exponent"]
        for src in res["sources"].values()
        if "model" in src
        for f in src["fit"].values()
        if f["median_exponent"] is not None
    ]
    return math.ceil(max(meds) * 20 - 1e-9) / 20


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def recall_table(name: str, src: dict) -> list[str]:
    per = src["per_length"]
    lengths = sorted(per, key=int)
    what = src.get("model") or src.get("generator")
    out = [
        f"**{name}** ({what}; {len(per[lengths[0]][next(iter(per[lengths[0]]))]['recall'])} "
        "heads), mean recall over heads at fixed budgets:",
        "",
        "| budget | " + " | ".join(f"{int(n) // 1024}K" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    info = {
        m: (r["family"], r["budget"])
        for n in lengths
        for m, r in per[n].items()
        if r["family"] in FAMILIES
    }
    names = sorted(info, key=lambda m: (list(FAMILIES).index(info[m][0]), info[m][1]))
    for m in names:
        cells = []
        for n in lengths:
            r = per[n].get(m)
            cells.append("—" if r is None else f"{mean(r['recall']):.3f}")
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    out.append("")
    fits = []
    for fam, label in FAMILIES.items():
        f = src["fit"].get(fam)
        if f and f["median_exponent"] is not None:
            fits.append(
                f"{label}: median {f['median_exponent']:.2f} (max {f['max_exponent']:.2f}, "
                f"{len(f['points'])} points from {f['n0'] // 1024}K)"
            )
    out += ["Fitted growth exponents: " + "; ".join(fits) + ".", ""]
    return out


def gpu_table(res: dict) -> list[str]:
    out = [
        f"Cost in speed ({res['device']}, torch {res['versions']['torch']}, triton "
        f"{res['versions']['triton']}, commit `{res['commit']}`; layer 0 of each config on the "
        "layer benchmark's structured heads, 32 query / 8 KV heads, head dim 128, bf16; "
        f"`measured` = `BudgetPolicy.measured(reference_length={res['reference_length']})`, "
        f"exponent {res['exponent']}; speed-up over cuDNN timed interleaved, median of "
        f"{res['argv']['rounds']} rounds):",
        "",
        "| N | config [policy] | ms | cuDNN ms | speed-up | density | recall | rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['n'] // 1024}K | {r['method']} | {r['total_ms']:.1f} | {r['cudnn_ms']:.1f} | "
            f"{r['speedup_median']:.2f}x | {r['density']:.4f} | {r['recall']:.3f} | "
            f"{r['rel_err']:.3f} |"
        )
    return out + [""]


def frontier_png(res: dict, path: Path) -> bool:
    """Recall against density per estimator at each real source's longest length, with the
    per-row oracle as the upper line (sources measured without the oracle are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = [
        (name, src)
        for name, src in res["sources"].items()
        if any(
            r["family"] == "oracle"
            for r in src["per_length"][max(src["per_length"], key=int)].values()
        )
    ]
    if not srcs:
        return False
    fig, axes = plt.subplots(1, len(srcs), figsize=(5.5 * len(srcs), 4), squeeze=False)
    for ax, (name, src) in zip(axes[0], srcs, strict=True):
        n = max(src["per_length"], key=int)
        per = src["per_length"][n]
        for fam, style in (*((f, "o-") for f in FAMILIES), ("oracle", "k--")):
            pts = sorted(
                (mean(r["density"]), mean(r["recall"])) for r in per.values() if r["family"] == fam
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=FAMILIES.get(fam, "oracle (each row's top keys)"))
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("density (share of causal pairs, sampled rows)")
        ax.set_ylabel("recall (mean over heads)")
        ax.set_title(f"{name}, {int(n) // 1024}K tokens", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _frontier_args(r: dict) -> str:
    """The arguments a frontier file was made with (older files keep them as one string)."""
    if "argv" in r:
        return r["argv"]
    return " ".join(r["provenance"]["argv"][1:])


def frontier_snippet() -> list[str]:
    """Recall against density per estimator on the layer benchmark's structured heads, one block
    per file of the ``recall_frontier`` key, with the per-row and per-tile oracles."""
    out = []
    for path in _sources.paths("recall_frontier"):
        r = json.loads(path.read_text())
        tag = f"{r['n'] // 1024}k"
        if r.get("profile") not in (None, "legacy"):
            tag += f"_{r['profile']}"
        out += [
            f"**{r['n'] // 1024}K tokens**, {r['heads']} heads, {r['source']}; "
            f"`python benchmarks/recall_frontier.py {_frontier_args(r)}`, {_sources.cite(path, r)}:",
            "",
            "| estimator | index | density | recall |",
            "|---|---|---|---|",
        ]
        for fam, pts in r["methods"].items():
            for dens, rec, name in sorted(pts):
                out.append(f"| {fam} | {name} | {dens:.4f} | {rec:.3f} |")
        targets = [k for k in r["oracle_keys"] if k.startswith("density_at_")]
        out += [
            "",
            "Density the oracles need for a recall of "
            + ", ".join(t.removeprefix("density_at_") for t in targets)
            + ": each row's own top keys "
            + ", ".join(f"{r['oracle_keys'][t]:.4f}" for t in targets)
            + "; the best 64-key tiles of each row "
            + ", ".join(f"{r['oracle_tiles'][t]:.4f}" for t in targets)
            + ".",
            "",
            f"![recall against density at {r['n'] // 1024}K, {r['source']}]"
            f"(../img/gen/recall_frontier_{tag}.png)",
            "",
        ]
        png = path.with_suffix(".png")
        if png.exists():
            IMG.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, IMG / f"recall_frontier_{tag}.png")
    return out


def main() -> int:
    (res,) = _sources.load("length_policy_cpu")
    runs = [*res.get("earlier_runs", []), res]
    cmds = "; ".join(
        f"`python benchmarks/length_policy.py {' '.join(r['argv'])}` at commit `{r['commit']}`"
        for r in runs
    )
    lines = [
        "<!-- generated by benchmarks/report_length_policy.py; do not edit -->",
        "",
        f"{cmds} ({res['device']}, torch {res['versions']['torch']}; the later runs replace the "
        f"sources they name); recall = attention mass kept on {res['rows']} stratified query rows "
        "per length.",
        "",
    ]
    for name, src in res["sources"].items():
        lines += recall_table(name, src)
    lines += [
        f"Shipped exponent (the largest median on real heads above, rounded up to 0.05): "
        f"**{fitted_exponent(res):.2f}**.",
        "",
    ]
    for gpu in _sources.load("length_policy_gpu"):
        lines += gpu_table(gpu)
    IMG.mkdir(parents=True, exist_ok=True)
    if frontier_png(res, IMG / "frontier_real_heads.png"):
        lines += [
            "![recall against density per estimator on real heads, with the oracle]"
            "(../img/gen/frontier_real_heads.png)",
            "",
        ]
    SNIPPET.write_text("\n".join(lines))
    FRONTIER.write_text(
        "\n".join(
            ["<!-- generated by benchmarks/report_length_policy.py; do not edit -->", ""]
            + frontier_snippet()
        )
    )
    png = _sources.paths("length_policy_cpu")[0].with_suffix(".png")
    if png.exists():
        IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, IMG / "length_policy.png")
    print(f"wrote {SNIPPET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
