"""Turn benchmarks/results/bench_layer_*.json into docs/benchmarks.md tables and a speedup plot.

python benchmarks/report.py [benchmarks/results/bench_layer_v020f_h200.json]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fmt_n(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n // 1024}K"


def table(rows: list[dict], inputs: str) -> list[str]:
    out = [
        "| N | method | total ms | index ms | kernel ms | speedup vs cuDNN | density | kept TFLOP/s (cuDNN dense) | recall | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_n = defaultdict(list)
    for r in rows:
        if r["inputs"] == inputs:
            by_n[r["n"]].append(r)
    for n in sorted(by_n):
        first = by_n[n][0]
        out.append(
            f"| {fmt_n(n)} | cuDNN SDPA (dense) | {first['cudnn_ms']:.1f} | | | 1.00x | 1.000 | "
            f"{first['cudnn_tflops']:.0f} | 1.000 | 0 |"
        )
        out.append(
            f"| {fmt_n(n)} | flash SDPA (dense) | {first['flash_ms']:.1f} | | | "
            f"{first['cudnn_ms'] / first['flash_ms']:.2f}x | 1.000 | | 1.000 | |"
        )
        for r in by_n[n]:
            idx = f"{r['index_ms']:.1f}" if "index_ms" in r else ""
            rec = f"{r['recall']:.3f}" if "recall" in r else ""
            err = f"{r['rel_err']:.3f}" if "rel_err" in r else ""
            out.append(
                f"| {fmt_n(n)} | {r['method']} | {r['total_ms']:.1f} | {idx} | {r['kernel_ms']:.1f} | "
                f"{r['speedup']:.2f}x | {r['density']:.3f} | {r['kept_tflops']:.0f} ({r['cudnn_tflops']:.0f}) | "
                f"{rec} | {err} |"
            )
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        if r["inputs"] == "structured":
            series[r["method"]].append((r["n"], r["speedup"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="cuDNN dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("speedup over cuDNN SDPA (layer)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# earlier full or partial runs, kept below the current tables for comparison (newest first)
EARLIER_LAYER_RUNS = (
    (
        "bench_layer_128k_v020e_h200.json",
        "v0.2.0-e kernel (pointer loads; scale folded into the exponent, in-place `p @ v`), 128K",
    ),
    ("bench_layer_h200.json", "v0.2.0-c kernel (pointer loads), every length"),
)

# later files replace earlier rows of the same (method, length)
E2E_FILES = ("e2e_v3_h200.json", "e2e_512k_v3_h200.json", "e2e_1m_v3_h200.json")
E2E_OTHER_CARDS = (("e2e_1m_v2_h100.json", "the v0.2.0-c kernel, pointer loads"),)


# the 128K equal-recall budget sweep (bench_layer --block-fracs) and the interleaved ratios
FRACS_FILE = "bench_layer_128k_fracs_v020h_h200.json"
INTERLEAVED_FILE = "bench_interleaved_128k_v020h_h200.json"
ALLOC_INTERLEAVED_FILE = "bench_interleaved_equal_recall_v020j_h200.json"


def equal_recall_section() -> list[str]:
    """Issue 3's equal-recall point at 128K: the budget sweep and the interleaved ratios."""
    res = ROOT / "benchmarks/results"
    if not (res / FRACS_FILE).exists() or not (res / INTERLEAVED_FILE).exists():
        return []
    fr = json.loads((res / FRACS_FILE).read_text())
    il = json.loads((res / INTERLEAVED_FILE).read_text())
    out = [
        "## Equal recall at 128K, and ratios measured interleaved",
        "",
        f"Budget sweep (`bench_layer.py --block-fracs`, `benchmarks/results/{FRACS_FILE}`; "
        f"**{fr['device']}**, run {fr['date']}): which block-sparse budget lands on the recall "
        "MInference's default VS(1000, 6096) reaches on these heads (issue 3's equal-recall target).",
        "",
        *table(fr["rows"], "structured"),
        "",
        f"The same pipelines timed interleaved (`bench_interleaved.py`, "
        f"`benchmarks/results/{INTERLEAVED_FILE}`; **{il['device']}**, run {il['date']}): each "
        f"method right after its own cuDNN run, {il['rounds']} rounds, so both sides of a ratio "
        "see the same clocks. These ratios are 5-7% below the sequential ones above, mostly "
        "because cuDNN times faster when repeated.",
        "",
        *_interleaved_table(il),
    ]
    if (res / ALLOC_INTERLEAVED_FILE).exists():
        hd = json.loads((res / ALLOC_INTERLEAVED_FILE).read_text())
        out += [
            "",
            f'With `block_allocation="layer"` (the layer\'s tiles spread over its heads and query '
            "blocks by estimated share; "
            f"`benchmarks/results/{ALLOC_INTERLEAVED_FILE}`, **{hd['device']}**, run {hd['date']}). "
            "It reaches the recall with fewer tiles than the per-query-block budget, which pays "
            "for its longer estimation; see benchmarks/NOTES.md, v0.2.0-j, for the breakdown.",
            "",
            *_interleaved_table(hd),
        ]
    return out + [""]


def _interleaved_table(il: dict) -> list[str]:
    """Markdown table of one ``bench_interleaved.py`` log."""
    return [
        "| method | pipeline ms | cuDNN ms | speedup, median (min-max) | density | recall |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {name} | {m['ms']:.1f} | {m['cudnn_ms']:.1f} | **{m['ratio_median']:.2f}x** "
        f"({m['ratio_min']:.2f}-{m['ratio_max']:.2f}) | {m['density']:.3f} | {m['recall']:.4f} |"
        for name, m in il["methods"].items()
    ]


def e2e_section() -> list[str]:
    """Table + PNG of the end-to-end TTFT runs (``benchmarks/bench_e2e.py``), if present."""
    logs = [
        json.loads((ROOT / "benchmarks/results" / f).read_text())
        for f in E2E_FILES
        if (ROOT / "benchmarks/results" / f).exists()
    ]
    if not logs:
        return []
    latest = {(r["method"], r["n"]): r for log in logs for r in log["rows"]}
    rows = list(latest.values())
    ours = [r for r in rows if r["method"] == "minference"]
    dense = {r["n"]: r for r in rows if r["method"] == "dense"}
    out = [
        "## End to end: time to first token (issue 7)",
        "",
        f"`benchmarks/bench_e2e.py` on **{logs[0]['device']}** (torch {logs[0]['torch']}, "
        f"transformers {logs[0]['transformers']}, triton {logs[0]['triton']}; {logs[0]['date']}). "
        "Llama-3.1-8B-shaped model, 32 layers, random bf16 weights with the `structured` construction "
        "(shared embedding direction, query heads tied to their KV group; see the script). Dense SDPA "
        "vs the shipped Llama-3.1-8B config, both through `minference_hf.long_prefill`, same process. "
        "Rows marked *est.*: dense not run; its time is the minference run's non-attention time plus "
        "32 x one measured dense SDPA call at that length. Offloaded layers live in pinned host "
        "memory; *decode s/token* is the median of greedy decode steps 2-4 from the pre-filled "
        "cache (every offloaded layer is streamed back to the GPU each step).",
        "",
        "| N | dense TTFT s | minference TTFT s | speedup | attention s dense / ours | peak GPU GiB "
        "(predicted) | offloaded layers | decode s/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pts = []
    for r in sorted(ours, key=lambda r: r["n"]):
        d = dense.get(r["n"])
        if d is None:
            continue
        est = " (est.)" if d.get("estimated") else ""
        sp = d["ttft_s"] / r["ttft_s"]
        pts.append((r["n"], sp, bool(d.get("estimated"))))
        steps = sorted(r.get("decode_step_s", [])[1:])  # the first step warms up
        dec = f"{steps[len(steps) // 2]:.3f}" if steps else "-"
        out.append(
            f"| {fmt_n(r['n'])} | {d['ttft_s']:.1f}{est} | {r['ttft_s']:.1f} | {sp:.2f}x | "
            f"{d['attention_s']:.1f} / {r['attention_s']:.1f} | {r['peak_gpu_gib']:.1f} "
            f"({r['predicted_peak_gib']:.1f}) | {r['offloaded_layers']} | {dec} |"
        )
    for f, kernel in E2E_OTHER_CARDS:
        path = ROOT / "benchmarks/results" / f
        if not path.exists():
            continue
        other = json.loads(path.read_text())
        rr = {r["method"]: r for r in other["rows"]}
        o, d = rr["minference"], rr["dense"]
        steps = sorted(o.get("decode_step_s", [])[1:])
        out += [
            "",
            f"Same benchmark on **{other['device']}** (80 GB; torch {other['torch']}; "
            f"{other['date']}, {kernel}) at "
            f"{fmt_n(o['n'])} tokens: minference {o['ttft_s']:.1f} s vs dense "
            f"{d['ttft_s']:.1f} s{' (est.)' if d.get('estimated') else ''}, "
            f"**{d['ttft_s'] / o['ttft_s']:.2f}x**; {o['offloaded_layers']} of 32 cache layers in "
            f"pinned host memory ({o['host_kv_gib']:.0f} GiB), peak GPU {o['peak_gpu_gib']:.1f} GiB "
            f"(predicted {o['predicted_peak_gib']:.1f})"
            + (f", decode {steps[len(steps) // 2]:.2f} s/token." if steps else "."),
        ]
    rnd = ROOT / "benchmarks/results/e2e_random_v1_h200.json"
    if rnd.exists():
        rr = {r["method"]: r for r in json.loads(rnd.read_text())["rows"]}
        if {"dense", "minference"} <= rr.keys():
            out += [
                "",
                f"Plain random weights (no attention structure) at {fmt_n(rr['dense']['n'])}: dense "
                f"{rr['dense']['ttft_s']:.2f} s, minference {rr['minference']['ttft_s']:.2f} s — the "
                "estimated index keeps most pairs, so the `max_density` guard runs the layers dense.",
            ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="minference vs dense SDPA")
    for n, sp, est in pts:
        if est:
            ax.annotate("dense est.", (n, sp), textcoords="offset points", xytext=(-30, 8))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT speedup")
    ax.set_title(f"Llama-3-8B-shaped, end to end, {logs[0]['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = ROOT / "docs/img/bench_e2e_speedup.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    out += ["", f"![e2e speedup]({png.relative_to(ROOT / 'docs')})", ""]
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else ROOT / "benchmarks/results/bench_layer_v020f_h200.json"
    log = json.loads(src.read_text())
    rows = log["rows"]
    png = ROOT / "docs/img/bench_layer_speedup.png"
    plot(rows, png, f"One Llama-3-8B layer, bf16, {log['device']}")
    head = [
        "# Benchmarks",
        "",
        f"Layer benchmark, generated by `benchmarks/report.py` from `{src.relative_to(ROOT)}`.",
        "",
        f"- Card: **{log['device']}**; torch {log['torch']}, triton {log['triton']}; run {log['date']}.",
        "- Layer: 32 query heads, 8 KV heads, head dim 128, bf16, batch 1 (Llama-3-8B shaped).",
        "- Inputs: `structured` = `minference_kernels.synthetic.structured_qkv(kind='mixed')` (RoPE slashes,",
        "  anchor verticals, topic blocks); `random` = i.i.d. normal Q/K/V.",
        "- total = estimation + index + one kernel launch (`sparse_prefill`); index = `build_index`;",
        "  kernel = the attention launch alone. Medians of `triton.testing.do_bench`.",
        "- density = share of causal (query, key) pairs the kernel computes (exact, over the query blocks",
        "  of the sampled rows); kept TFLOP/s = 4·D·(kept pairs) / kernel time, next to cuDNN's dense rate",
        "  in the same run; recall = attention mass of the kept pairs and rel. error = output error vs dense,",
        "  both on ~96 sampled query rows.",
        "- FlexAttention row: compiled `flex_attention` with a 128x128 `BlockMask` holding every block that",
        "  the Llama-3.1 config's index touches (the same pairs, rounded up to its block size).",
        "",
        f"![speedup]({png.relative_to(ROOT / 'docs')})",
        "",
        "## Structured inputs",
        "",
    ]
    body = head + table(rows, "structured") + ["", "## Random inputs (reference)", ""]
    body += table(rows, "random") + [""]
    for name, what in EARLIER_LAYER_RUNS:
        path = ROOT / "benchmarks/results" / name
        if not path.exists() or path == src:
            continue
        later = json.loads(path.read_text())
        body += [
            f"## Earlier run: {what}",
            "",
            f"`benchmarks/results/{name}`; card **{later['device']}**, torch {later['torch']}, "
            f"triton {later['triton']}; run {later['date']}. Same inputs and columns as above.",
            "",
            *table(later["rows"], "structured"),
            "",
        ]
    if log.get("errors"):
        body += ["## Errors during the run", ""] + [f"- `{e}`" for e in log["errors"]] + [""]
    body += equal_recall_section()
    body += e2e_section()
    notes = ROOT / "docs/benchmarks_analysis.md"
    if notes.exists():
        body += [notes.read_text()]
    (ROOT / "docs/benchmarks.md").write_text("\n".join(body))
    print("wrote docs/benchmarks.md and", png.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
