"""Generate the documentation's figures and generated pages from real computations (CPU, < 1 min).

    python docs/gen_figures.py            # writes docs/img/gen/*.png and docs/snippets/*.md

Everything drawn here is computed by the project's own code on synthetic heads
(``minference_kernels.synthetic.structured_qkv``), the shipped pattern configs and the benchmark
JSON; nothing is hand-drawn. The figures are deterministic (fixed seeds), so re-running the script
gives the same pictures. ``nox -s docs`` runs it before ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import minference_kernels as mk
import minference_patterns as mp
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from minference_kernels.ops.block_select import block_scores
from minference_kernels.ops.vs_scores import select_vertical_slash, vs_scores_torch
from minference_kernels.synthetic import structured_qkv
from minference_patterns.plot import KIND_COLORS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
IMG = DOCS / "img" / "gen"
SNIPPETS = DOCS / "snippets"
# the layer benchmark's current result, as declared in benchmarks/sources.json (key "layer")
BENCH_JSON = (
    ROOT
    / "benchmarks"
    / "results"
    / json.loads((ROOT / "benchmarks" / "sources.json").read_text())["layer"]["files"][0]
)
DPI = 110
# PNG metadata without the matplotlib version, so the files only change when the pictures do
META = {"Software": None}


def _save(fig: Figure, name: str) -> None:
    FigureCanvasAgg(fig)
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=DPI, bbox_inches="tight", metadata=META)


def _grid(ax, n: int, step: int = 64) -> None:
    for x in range(step, n, step):
        ax.axhline(x - 0.5, color="0.75", lw=0.5)
        ax.axvline(x - 0.5, color="0.75", lw=0.5)


def _causal(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def _dense_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of every row of a single head, ``[N, N]`` float64 (small N only)."""
    s = (q.double() @ k.double().T) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~_causal(q.shape[0]), float("-inf"))
    return torch.softmax(s, -1)


# --------------------------------------------------------------------------------------------
# concepts: the three kinds


def fig_kinds_exact() -> None:
    """The exact pair sets of the three kinds on a 256-token toy prompt (4 blocks of 64)."""
    n = 256
    causal = _causal(n)
    a = mk.streaming_mask(16, 48, n)[0, 0]
    vi = torch.tensor([[[0, 1, 2, 3, 100, 170]]])
    si = torch.tensor([[[0, 1, 2, 40, 130]]])
    vs = mk.vertical_slash_mask(vi, si, n)[0, 0]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    named = causal & (torch.isin(j, vi[0, 0]) | torch.isin(i - j, si[0, 0]))
    bi = torch.tensor([[[[0, -1], [1, 0], [2, 0], [3, 1]]]])
    bs = mk.block_sparse_mask(bi, n, 64)[0, 0]

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    total = float(causal.sum())

    def show(ax, img, title):
        ax.imshow(img, interpolation="nearest")
        _grid(ax, n)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")

    def rgb(mask_lo: torch.Tensor, mask_hi: torch.Tensor | None, color) -> torch.Tensor:
        img = torch.ones(n, n, 3)
        img[~causal] = torch.tensor([0.93, 0.93, 0.93])
        light = torch.tensor([1 - 0.35 * (1 - c) for c in color])
        img[mask_lo] = light
        if mask_hi is not None:
            img[mask_hi] = torch.tensor(color)
        return img.numpy()

    show(
        axes[0],
        rgb(a, a, KIND_COLORS["a_shape"]),
        f"A-shape: streaming_mask(sink=16, window=48)\ndensity {a.sum() / total:.1%} (exact)",
    )
    show(
        axes[1],
        rgb(vs, named, KIND_COLORS["vertical_slash"]),
        "vertical-slash: columns {0..3, 100, 170}, diagonals {0, 1, 2, 40, 130}\n"
        f"dark: named pairs ({named.sum() / total:.1%}); light: added by 64-key tiles "
        f"(total {vs.sum() / total:.1%})",
    )
    show(
        axes[2],
        rgb(bs, bs, KIND_COLORS["block_sparse"]),
        "block-sparse: block_indices [[0], [1, 0], [2, 0], [3, 1]]\n"
        f"density {bs.sum() / total:.1%} (exact)",
    )
    fig.suptitle(
        "Exact (query, key) pairs computed, from minference_kernels' *_mask functions "
        "(N = 256, grey lines: 64-token blocks, grey area: non-causal)",
        fontsize=10,
    )
    _save(fig, "kinds_exact.png")


def fig_heads() -> None:
    """plot_head on structured synthetic heads of each kind (N = 2048)."""
    cases = [
        ("local", mk.HeadPattern.a_shape(64, 256), "head_a_shape.png"),
        ("vertical_slash", mk.HeadPattern.vertical_slash(64, 512), "head_vertical_slash.png"),
        ("block", mk.HeadPattern.block_sparse(6), "head_block_sparse.png"),
    ]
    for kind, pattern, name in cases:
        q, k, _ = structured_qkv(1, 1, 1, 2048, 64, kind=kind, seed=1)
        fig = mp.plot_head(
            q,
            k,
            pattern,
            title=f"structured_qkv(kind={kind!r}), N = 2048: dense attention vs the pattern's mask",
            dpi=DPI,
        )
        _save(fig, name)


def fig_config_map() -> None:
    """plot_config of a shipped config with varied budgets."""
    cfg = mp.load("gradientai/Llama-3-8B-Instruct-262k")
    fig = mp.plot_config(cfg, seq_len=131072, dpi=DPI)
    _save(fig, "config_llama3_262k.png")


# --------------------------------------------------------------------------------------------
# concepts: online estimation


def _vs_recall(p: torch.Tensor, vi: torch.Tensor, si: torch.Tensor) -> tuple[float, float]:
    n = p.shape[0]
    m = mk.vertical_slash_mask(vi, si, n)[0, 0]
    return float((p * m).sum() / n), float(m.sum() / _causal(n).sum())


def fig_estimation_vs() -> dict:
    """Vertical and slash scores of the last 64 queries, and estimated vs all-query selection."""
    n = 2048
    q, k, _ = structured_qkv(1, 1, 1, n, 64, kind="vertical_slash", seed=3)
    scale = 1 / math.sqrt(64)
    vert, sl = vs_scores_torch(q, k, 64, scale)
    nv, ns = 32, 256
    vi, si = mk.estimate_vertical_slash(q, k, nv, ns)
    p = _dense_probs(q[0, 0], k[0, 0])

    fig = Figure(figsize=(10, 8), layout="constrained")
    gs = fig.add_gridspec(2, 2)
    ax1, ax2 = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
    ax3 = fig.add_subplot(gs[1, :])
    x = torch.arange(n)
    ax1.plot(x, vert[0, 0], lw=0.6, color="0.4")
    ax1.scatter(vi[0, 0], vert[0, 0, vi[0, 0]], s=10, color=KIND_COLORS["vertical_slash"], zorder=3)
    ax1.set_yscale("log")
    ax1.set_xlabel("key position j")
    ax1.set_ylabel("vertical score (sum of p over last 64 queries)")
    ax1.set_title(f"columns: top {nv} kept (dots; the first 30 are always kept)", fontsize=9)
    ax2.plot(x, sl[0, 0].clamp(min=1e-8), lw=0.6, color="0.4")
    ax2.scatter(si[0, 0], sl[0, 0, si[0, 0]].clamp(min=1e-8), s=6, color="tab:red", zorder=3)
    ax2.set_yscale("log")
    ax2.set_xlabel("diagonal offset o = i - j")
    ax2.set_ylabel("slash score")
    ax2.set_title(f"diagonals: top {ns} kept (dots; the nearest 100 always)", fontsize=9)

    # estimated (last 64 queries) vs the same selection rule fed with every query's attention
    full_v, full_s = vs_scores_torch(q, k, n, scale)
    rows = []
    for bv, bs_ in [(32, 64), (32, 128), (32, 256), (64, 512), (128, 1024)]:
        v_e, s_e = mk.estimate_vertical_slash(q, k, bv, bs_)
        ve, _, se, _ = select_vertical_slash(full_v, full_s, bv, bs_)
        rows.append(((bv, bs_), _vs_recall(p, v_e, s_e), _vs_recall(p, ve, se)))
    for idx, label, marker in ((1, "estimated from the last 64 queries", "o"),
                               (2, "same rule on all 2048 queries' attention", "s")):  # fmt: skip
        ax3.plot([r[idx][1] for r in rows], [r[idx][0] for r in rows], marker=marker, label=label)
    for (bv, bs_), (rec, dens), _ in rows:
        ax3.annotate(f"({bv},{bs_})", (dens, rec), fontsize=7, xytext=(4, -10),
                     textcoords="offset points")  # fmt: skip
    ax3.set_xlabel("density (share of causal pairs computed)")
    ax3.set_ylabel("recall (attention mass kept, all rows)")
    ax3.set_title("vertical_slash(v, s) budgets: estimate vs hindsight", fontsize=9)
    ax3.legend(fontsize=7, loc="lower right")
    ax3.grid(alpha=0.3)
    fig.suptitle(
        "Vertical-slash estimation on structured_qkv(kind='vertical_slash'), N = 2048", fontsize=10
    )
    _save(fig, "estimation_vs.png")
    return {"vs_budgets": [(list(b), e, h) for b, e, h in rows]}


def fig_estimation_block() -> dict:
    """Pooled block scores, the chosen key blocks, and the true attention mass per block pair."""
    n, bsz, top_k = 2048, 64, 4
    q, k, _ = structured_qkv(1, 1, 1, n, 64, kind="block", seed=2)
    scores, _ = block_scores(q, k, bsz)
    bi = mk.estimate_block_sparse(q, k, top_k, bsz)[0, 0]
    p = _dense_probs(q[0, 0], k[0, 0])
    nb = n // bsz
    mass = p.reshape(nb, bsz, nb, bsz).sum((1, 3)) / bsz  # mean row mass per block pair
    m = mk.block_sparse_mask(bi[None, None], n, bsz)[0, 0]
    recall = float((p * m).sum() / n)

    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    sc = scores[0, 0].clone()
    sc[torch.isinf(sc)] = float("nan")
    im1 = ax1.imshow(sc.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im1, ax=ax1, fraction=0.046, pad=0.04)
    ax1.set_title("pooled scores mean(q_block) . mean(k_block)", fontsize=9)
    logm = torch.log10(mass.clamp(min=1e-6)).masked_fill(mass == 0, float("nan"))
    im2 = ax2.imshow(logm.numpy(), cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
    fig.colorbar(im2, ax=ax2, fraction=0.046, pad=0.04)
    ax2.set_title(
        f"true attention mass per block pair (log10); boxes: top_k={top_k} chosen\n"
        f"recall {recall:.3f}, density {float(m.sum() / _causal(n).sum()):.1%}",
        fontsize=9,
    )
    for ax in (ax1, ax2):
        for qb in range(nb):
            for kb in bi[qb].tolist():
                if kb >= 0:
                    ax.add_patch(Rectangle((kb - 0.5, qb - 0.5), 1, 1, fill=False,
                                           ec="tab:orange" if ax is ax1 else "cyan", lw=1.0))  # fmt: skip
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(
        "Block-sparse estimation on structured_qkv(kind='block'), N = 2048, blocks of 64",
        fontsize=10,
    )
    _save(fig, "estimation_block.png")
    return {"block_recall": recall}


# --------------------------------------------------------------------------------------------
# concepts: the offline search


def _mixed_layer(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One synthetic layer of 8 query / 4 KV heads: two heads of each generator kind."""
    kinds = ["local", "vertical_slash", "block", "mixed"]
    order = kinds[seed % 4 :] + kinds[: seed % 4]
    parts = [
        structured_qkv(1, 2, 1, n, 64, kind=kd, seed=seed * 10 + i) for i, kd in enumerate(order)
    ]
    return tuple(torch.cat([p[j] for p in parts], 1) for j in range(3))  # type: ignore[return-value]


SEARCH_N = 4096
SEARCH_BUDGET = 0.2
SEARCH_ROWS = 128


def fig_search() -> dict:
    q, k, v = _mixed_layer(SEARCH_N, 0)
    res = mp.search_layer(q, k, v, budget=SEARCH_BUDGET, num_rows=SEARCH_ROWS)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    gen_kind = ["local", "vertical_slash", "block", "mixed"]
    for ax, h in zip(axes, (0, 2, 4, 6)):
        r = res[h]
        for kind in mk.KINDS:
            pts = [c for c in r.candidates if c.pattern.kind == kind]
            if pts:
                ax.scatter([c.cost for c in pts], [c.recall for c in pts], s=22,
                           color=KIND_COLORS[kind], label=kind, alpha=0.85)  # fmt: skip
        ax.scatter([r.cost], [r.recall], s=180, marker="*", color="gold", ec="k", zorder=5,
                   label="chosen")  # fmt: skip
        ax.axvline(SEARCH_BUDGET, color="k", ls="--", lw=0.8, label=f"budget {SEARCH_BUDGET}")
        ax.set_xscale("log")
        ax.set_xlabel("cost relative to dense (analytic cost model, real mask)")
        ax.set_ylabel(f"recall on {SEARCH_ROWS} sampled rows")
        ax.set_title(
            f"head {h} (generator kind {gen_kind[h // 2]!r}): chose {r.pattern.describe()}",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"search_layer on a synthetic layer (N = {SEARCH_N}, budget {SEARCH_BUDGET}): every "
        "candidate of default_candidates(N), scored on the kernels' own masks",
        fontsize=10,
    )
    _save(fig, "search_candidates.png")

    return {
        "search_heads": [(r.head, r.pattern.describe(), r.recall, r.cost) for r in res],
    }


# --------------------------------------------------------------------------------------------
# guides: long prompts


def fig_density_vs_length() -> None:
    # the benchmark's index ran the config's sizes unchanged (absolute budgets); draw the same
    cfg = mp.load("meta-llama/Llama-3.1-8B-Instruct").with_budget_policy(mp.BudgetPolicy.absolute())
    from minference_patterns.summary import summary_dict

    ns = [2**e for e in range(14, 21)]
    nominal = [summary_dict(cfg, n)["density"] for n in ns]
    bench = json.loads(BENCH_JSON.read_text())
    meas = sorted(
        (r["n"], r["density"])
        for r in bench["rows"]
        if r["inputs"] == "structured" and r["method"] == "llama3.1-config"
    )
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(ns, nominal, marker="o", label="nominal (from the budgets, before tile rounding)")
    ax.plot([m[0] for m in meas], [m[1] for m in meas], marker="s",
            label=f"measured by the kernels' index ({bench['device']} benchmark, structured inputs)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [_fmt_n(n) for n in ns])
    ax.set_xlabel("prompt length N")
    ax.set_ylabel("density (share of causal pairs computed)")
    ax.set_title(
        "Shipped Llama-3.1-8B config, every head vertical_slash(512, 2048), absolute budgets",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, "density_vs_length.png")


GIB = 2**30


def _fmt_n(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 else f"{n // 1024}K"


def memory_table() -> str:
    """Memory model of one bf16 pre-fill of a Llama-3.1-8B-shaped model (docs/guides/hf.md)."""
    L, h, m, hq, hkv, d, vocab = 32, 4096, 14336, 32, 8, 128, 128256
    params = 8_030_261_248  # Llama-3.1-8B parameter count
    lines = [
        "| N | KV cache | activations, one pass | activations, 32K chunks | all-position logits (fp32) "
        "| dense attention FLOP per layer |",
        "|---|---|---|---|---|---|",
    ]
    for n in (131072, 262144, 524288, 1048576):
        kv = 2 * L * hkv * n * d * 2
        act = lambda t: t * (3 * h + 2 * m + (hq + 2 * hkv) * d) * 2
        logits = n * vocab * 4
        flop = 4 * d * hq * n * (n + 1) / 2
        lines.append(
            f"| {_fmt_n(n)} | {kv / GIB:.0f} GiB | {act(n) / GIB:.0f} GiB | "
            f"{act(min(n, 32768)) / GIB:.1f} GiB | {logits / GIB:.0f} GiB | {flop / 1e12:,.0f} TFLOP |"
        )
    lines.append("")
    lines.append(
        f"Weights: {params * 2 / GIB:.1f} GiB (bf16). Model: L={L}, hidden {h}, MLP {m}, "
        f"{hq} query / {hkv} KV heads of dim {d}, vocabulary {vocab}; bf16 (2 bytes) except the "
        "logits row."
    )
    return "\n".join(lines) + "\n"


def long_prefill_table() -> str:
    """``minference_hf.estimate_memory`` / ``plan_offload`` for a Llama-3-8B-shaped model built on
    the meta device (no weights), bf16, batch 1, default chunk and reserve (docs/guides/long-context.md)."""
    try:
        from minference_hf import estimate_memory, plan_offload
    except ImportError:  # pragma: no cover - minference-hf not installed
        return "(minference-hf is not installed where these docs were built.)\n"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=1 << 20,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    budgets = (("80 GB H100", 75 * GIB), ("141 GB H200", 135 * GIB))
    g = lambda b: f"{b / GIB:.1f}"
    lines = [
        "| N | KV per layer | KV, 32 layers | activations + chunk | plain `model(...)` peak "
        "| `long_prefill`, cache on the GPU | "
        + " | ".join(f"{name} ({budget // GIB} GiB): layers on GPU, GPU peak, host KV"
                     for name, budget in budgets)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(budgets),
    ]  # fmt: skip
    for n in (131072, 262144, 524288, 1048576):
        est = estimate_memory(model, n)
        cells = [
            _fmt_n(n),
            g(est.kv_per_layer),
            g(est.num_layers * est.kv_per_layer),
            g(est.activations + est.chunk),
            g(est.standard_forward),
            g(est.gpu_peak),
        ]
        for _, budget in budgets:
            try:
                plan = plan_offload(model, n, offload_kv="auto", device_budget=budget)
                cells.append(f"{plan.gpu_kv_layers}/32, {g(plan.gpu_peak)}, {g(plan.host_kv)}")
            except MemoryError:
                cells.append("does not fit")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"GiB. Weights {g(est.weights)} GiB (bf16, {est.weights // 2:,} parameters), batch 1, "
        "`chunk_size` 16384, 1024 tokens of decode reserve in every cache layer. The budgets are "
        '`device_budget=` values: about what `offload_kv="auto"` finds on an otherwise empty '
        "card after the CUDA context and its 3 GiB margin."
    )
    return "\n".join(lines) + "\n"


def kv_table() -> str:
    """KV cache of one sequence (bf16) for every shipped model's attention shape."""
    from minference_patterns.registry import SHIPPED_MODELS

    lines = [
        "| model id | layers | KV heads x head dim | KV cache at 128K | at 512K | at 1M |",
        "|---|---|---|---|---|---|",
    ]
    seen = set()
    for m in SHIPPED_MODELS:
        if m.file in seen:
            continue
        seen.add(m.file)
        per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2
        cells = [f"{per_token * n / GIB:.0f} GiB" for n in (2**17, 2**19, 2**20)]
        lines.append(
            f"| {m.model_id} | {m.num_layers} | {m.num_kv_heads} x {m.head_dim} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def bench_figures() -> None:
    """Time breakdown of the Llama-3.1 config layer from the benchmark JSON."""
    bench = json.loads(BENCH_JSON.read_text())
    rows = sorted(
        (r for r in bench["rows"] if r["inputs"] == "structured" and r["method"] == "llama3.1-config"),
        key=lambda r: r["n"],
    )  # fmt: skip
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    xs = range(len(rows))
    series = [
        ("estimation + index (build_index)", "index_ms", "tab:orange"),
        ("attention kernel", "kernel_ms", KIND_COLORS["vertical_slash"]),
        ("sparse total (timed end to end)", "total_ms", "navy"),
        ("cuDNN SDPA (dense)", "cudnn_ms", "0.45"),
    ]
    w = 0.2
    for i, (label, key, color) in enumerate(series):
        off = (i - 1.5) * w
        ax.bar([x + off for x in xs], [r[key] for r in rows], w, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"{r['n'] // 1024}K" for r in rows])
    ax.set_xlabel("N")
    ax.set_ylabel("ms per layer (log)")
    ax.set_title(
        f"Llama-3.1 config, one layer, {bench['device']}, torch {bench['torch']}, "
        f"{bench['date']}; medians of separate timings",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    _save(fig, "bench_breakdown.png")


# --------------------------------------------------------------------------------------------
# reference pages generated from code


def _md(text: str) -> str:
    """Schema prose for a Markdown table: brackets would read as reference links."""
    return text.replace("[", "\\[").replace("]", "\\]")


def schema_page() -> str:
    schema = mp.json_schema()
    props = schema["properties"]
    req = set(schema["required"])
    out = [
        "<!-- generated by docs/gen_figures.py from minference_patterns.json_schema(); do not edit -->",
        "",
        f"**{schema['title']}**, JSON Schema draft {schema['$schema'].split('/')[-2]}."
        f" {schema['description']}",
        "",
        "| field | type | required | notes |",
        "|---|---|---|---|",
    ]

    def typ(p: dict) -> str:
        if "$ref" in p:
            return "object (`" + p["$ref"].split("/")[-1] + "`)"
        if "const" in p:
            return f"`{json.dumps(p['const'])}`"
        t = p.get("type", "")
        t = " or ".join(t) if isinstance(t, list) else t
        if "items" in p:
            t += " of lists of head objects" if p["items"].get("type") == "array" else ""
        bounds = []
        if "minimum" in p:
            bounds.append(f">= {p['minimum']}")
        if "maximum" in p:
            bounds.append(f"<= {p['maximum']}")
        return t + (f" ({', '.join(bounds)})" if bounds else "")

    for name, p in props.items():
        out.append(
            f"| `{name}` | {typ(p)} | {'yes' if name in req else 'no'} | {_md(p.get('description', ''))} |"
        )
    out += ["", "Head objects (`layers[layer][head]`), one of:", "",
            "| kind | required fields | optional | constraints |", "|---|---|---|---|"]  # fmt: skip
    defs = schema["$defs"]
    for alt in defs["head"]["oneOf"]:
        kp = alt["properties"]
        kind = kp["kind"]["const"]
        fields = [f for f in kp if f not in ("kind", "score")]
        cons = []
        for f in fields:
            ref = kp[f].get("$ref", "")
            if ref.endswith("count"):
                cons.append(f"`{f}` >= 0")
            elif ref.endswith("positive"):
                cons.append(f"`{f}` >= 1")
            elif kp[f].get("multipleOf"):
                cons.append(f"`{f}` multiple of {kp[f]['multipleOf']} (default {kp[f]['default']})")
        if "not" in alt:
            cons.append("not both zero")
        out.append(
            f"| `{kind}` | {', '.join(f'`{f}`' for f in alt.get('required', [])) or '—'} | "
            f"`score`{''.join(f', `{f}`' for f in fields if f not in alt.get('required', []))} | "
            f"{'; '.join(cons) or '—'} |"
        )
    out += ["", "`budget_policy`:", "", "| field | type | default | range |", "|---|---|---|---|"]
    for f, p in defs["budget_policy"]["properties"].items():
        rng = ", ".join(x for x in (f">= {p['minimum']}" if "minimum" in p else "",
                                    f"<= {p['maximum']}" if "maximum" in p else "") if x)  # fmt: skip
        typ = " or ".join(p["type"]) if isinstance(p["type"], list) else p["type"]
        out.append(f"| `{f}` | {typ} | `{json.dumps(p['default'])}` | {rng or '—'} |")
    out += ["", "`provenance` (only `source` is required):", ""]
    out.append(
        ", ".join(f"`{f}`" for f in defs["provenance"]["properties"])
        + f". `source`: {defs['provenance']['properties']['source']['description']}."
    )
    out += ["", "The full schema:", "", "```json", json.dumps(schema, indent=2), "```", ""]
    return "\n".join(out)


def cli_page() -> str:
    # argparse wraps help to the terminal width and may colour it: fix both so the page is stable
    os.environ["COLUMNS"] = "100"
    os.environ["NO_COLOR"] = "1"
    from minference_patterns.cli import _parser as patterns_parser

    out = ["<!-- generated by docs/gen_figures.py from the argparse parsers; do not edit -->", ""]

    def section(title: str, parser) -> None:
        out.extend([f"### `{title}`", "", "```text", parser.format_help().rstrip(), "```", ""])

    try:
        from minference_hf.cli import build_parser

        hf = build_parser()
        out += ["## `minference` (minference-hf)", ""]
        section("minference", hf)
        for name, sp in _subparsers(hf).items():
            section(f"minference {name}", sp)
    except ImportError:  # pragma: no cover - minference-hf not installed
        out += ["(minference-hf is not installed where these docs were built.)", ""]
    pp = patterns_parser()
    out += ["## `minference-patterns` (minference-patterns)", ""]
    section("minference-patterns", pp)
    for name, sp in _subparsers(pp).items():
        section(f"minference-patterns {name}", sp)
    return "\n".join(out)


def _subparsers(parser) -> dict:
    import argparse as ap

    for action in parser._actions:
        if isinstance(action, ap._SubParsersAction):
            return dict(action.choices)
    return {}


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated step names (default: all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    steps: dict[str, Callable[[], object]] = {
        "kinds": fig_kinds_exact,
        "heads": fig_heads,
        "config": fig_config_map,
        "estimation_vs": fig_estimation_vs,
        "estimation_block": fig_estimation_block,
        "search": fig_search,
        "density": fig_density_vs_length,
        "bench": bench_figures,
    }
    only = set(args.only.split(",")) if args.only else None
    SNIPPETS.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for name, fn in steps.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        info = fn()
        extra = f" {info}" if info else ""
        print(f"[gen_figures] {name}: {time.perf_counter() - t0:.1f} s{extra}", flush=True)
    for name, text in (
        ("memory_8b.md", memory_table()),
        ("kv_shipped.md", kv_table()),
        ("long_prefill_8b.md", long_prefill_table()),
        ("config_schema.md", schema_page()),
        ("cli.md", cli_page()),
    ):
        (SNIPPETS / name).write_text(text)
    print(f"[gen_figures] done in {time.perf_counter() - t_all:.1f} s -> {IMG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
