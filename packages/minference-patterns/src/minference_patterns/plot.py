"""Pictures: a config as a layers x heads map, one head's attention next to its sparse mask.

Needs matplotlib (``pip install minference-patterns[plot]``), imported on first use. Figures are
drawn with matplotlib's object API (no pyplot, no global backend change) and returned; pass a
``path`` to also save them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minference_kernels.patterns import KINDS, HeadPattern

from .config import PatternConfig
from .density import nominal_density
from .summary import DEFAULT_SEQ_LEN

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

__all__ = ["KIND_COLORS", "plot_config", "plot_head"]

#: Base colour (RGB) of each kind; the shade shows the budget (density).
KIND_COLORS: dict[str, tuple[float, float, float]] = {
    "dense": (0.35, 0.35, 0.35),
    "a_shape": (0.17, 0.63, 0.17),
    "vertical_slash": (0.12, 0.47, 0.71),
    "block_sparse": (0.84, 0.37, 0.0),
    "vertical_block": (0.58, 0.40, 0.74),
}
_MIN_DENSITY = 1e-3


def _matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install 'minference-patterns[plot]'"
        ) from exc
    return Figure, FigureCanvasAgg


def _shade(kind: str, density: float) -> tuple[float, float, float]:
    """Light (low density) to full colour (density 1), on a log scale from 0.1%."""
    base = KIND_COLORS.get(kind, (0.5, 0.5, 0.5))
    d = min(1.0, max(_MIN_DENSITY, density))
    t = 0.15 + 0.85 * (math.log10(d) - math.log10(_MIN_DENSITY)) / -math.log10(_MIN_DENSITY)
    return tuple(1.0 - t * (1.0 - c) for c in base)  # type: ignore[return-value]


def _save(fig: Any, canvas_cls: Any, path: str | os.PathLike[str] | None, dpi: int) -> None:
    canvas_cls(fig)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=dpi, bbox_inches="tight")


def plot_config(
    config: PatternConfig,
    path: str | os.PathLike[str] | None = None,
    *,
    seq_len: int | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Figure:
    """Draw ``config`` as a layers x heads grid coloured by kind, shaded by budget.

    Each cell is one (layer, query head): its hue is the pattern kind, its shade the nominal
    density of the budget at ``seq_len`` (default: the config's ``context_length``, else 128K),
    after the config's budget policy. A side panel shows each layer's mean density.
    """
    Figure, Canvas = _matplotlib()
    from matplotlib.patches import Patch

    n = seq_len or config.context_length or DEFAULT_SEQ_LEN
    img, layer_density = [], []
    for li in range(config.num_layers):
        heads = config.heads_for_layer(li, n)
        dens = [nominal_density(h, n) for h in heads]
        img.append([_shade(h.kind, d) for h, d in zip(heads, dens)])
        layer_density.append(sum(dens) / len(dens))
    width = min(16.0, 3.0 + 0.22 * config.num_heads)
    height = min(14.0, 1.5 + 0.2 * config.num_layers)
    fig = Figure(figsize=(width + 2.0, height))
    gs = fig.add_gridspec(1, 2, width_ratios=[max(4, config.num_heads), 6], wspace=0.08)
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(img, aspect="auto", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(
        title or f"{config.model_id} at {n} tokens (hue: kind, shade: density)", fontsize=9
    )
    kinds_here = [k for k in KINDS if any(h.kind == k for row in config.layers for h in row)]
    adapted = {h.kind for li in range(config.num_layers) for h in config.heads_for_layer(li, n)}
    handles = [
        Patch(color=KIND_COLORS[k], label=k) for k in KINDS if k in adapted or k in kinds_here
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    side = fig.add_subplot(gs[0, 1], sharey=ax)
    side.barh(range(config.num_layers), [100 * d for d in layer_density], color="0.4")
    side.set_xlabel("mean density %")
    side.tick_params(labelleft=False)
    side.set_xlim(0, max(1.0, 100 * max(layer_density)) * 1.1)
    _save(fig, Canvas, path, dpi)
    return fig


def _head_tensors(q: torch.Tensor, k: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be torch tensors")
    if q.dim() == 2 and k.dim() == 2:
        return q[None, None], k[None, None]
    if q.dim() == 4 and k.dim() == 4 and q.shape[0] == 1 and k.shape[0] == 1:
        hq, hkv = q.shape[1], k.shape[1]
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
        if not 0 <= head < hq:
            raise ValueError(f"head {head} out of range for {hq} query heads")
        kv = head // (hq // hkv)
        return q[:, head : head + 1], k[:, kv : kv + 1]
    raise ValueError(
        f"q/k must be [N, D] or [1, H, N, D] (batch 1), got {tuple(q.shape)} and {tuple(k.shape)}"
    )


def _pool(x: torch.Tensor, rbin: torch.Tensor, kbin: torch.Tensor, bins: int) -> torch.Tensor:
    """Max-pool ``x [R, N]`` into ``[bins, bins]`` by row bins ``rbin`` and key bins ``kbin``."""
    import torch

    rows = torch.full((bins, x.shape[1]), float("-inf"))
    rows.scatter_reduce_(0, rbin[:, None].expand(-1, x.shape[1]), x, "amax")
    out = torch.full((bins, bins), float("-inf"))
    return out.scatter_reduce_(1, kbin.expand(bins, -1), rows, "amax")


def plot_head(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: HeadPattern,
    path: str | os.PathLike[str] | None = None,
    *,
    head: int = 0,
    scale: float | None = None,
    last_q: int = 64,
    max_pixels: int = 512,
    title: str | None = None,
    dpi: int = 120,
) -> Figure:
    """Draw one head's dense attention next to the mask its sparse ``pattern`` computes.

    ``q``/``k`` are ``[N, D]``, or ``[1, Hq, N, D]`` / ``[1, Hkv, N, D]`` with ``head`` picking
    the query head (and its KV head). The mask is :func:`minference_kernels.sparse_prefill_mask`
    (the kernel's own estimation). Large prompts are pooled to ``max_pixels`` per side (attention
    by max, mask by any). The title gives the recall (attention mass inside the mask) and the
    density (kept share of the causal pairs).
    """
    import torch
    from minference_kernels import sparse_prefill_mask

    Figure, Canvas = _matplotlib()
    if not isinstance(pattern, HeadPattern):
        raise TypeError(f"pattern must be a HeadPattern, got {type(pattern).__name__}")
    q1, k1 = _head_tensors(q, k, head)
    n, nk, d = q1.shape[2], k1.shape[2], q1.shape[3]
    if n != nk:
        raise ValueError(f"plot_head needs the full prompt: q has {n} rows, k has {nk}")
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    bins = min(n, max_pixels)
    edges = torch.linspace(0, n, bins + 1).long()
    att = torch.full((bins, bins), float("-inf"))
    msk = torch.zeros((bins, bins))
    kbin = torch.bucketize(torch.arange(n), edges[1:], right=True).clamp(max=bins - 1)
    kf = k1[0, 0].float()
    mass = kept = causal = 0.0
    chunk = max(1, (1 << 22) // n)
    with torch.no_grad():
        for r0 in range(0, n, chunk):
            rows = torch.arange(r0, min(n, r0 + chunk))
            s = (q1[0, 0, rows].float() @ kf.T) * sm
            cm = torch.arange(n)[None, :] <= rows[:, None]
            p = torch.softmax(s.masked_fill(~cm, float("-inf")), -1)
            m = (
                sparse_prefill_mask(
                    q1, k1, (pattern,), scale=sm, last_q=last_q, query_rows=rows.to(q1.device)
                )[0, 0].cpu()
                & cm
            )
            mass += float((p * m).sum())
            kept += float(m.sum())
            causal += float(cm.sum())
            rbin = torch.bucketize(rows, edges[1:], right=True).clamp(max=bins - 1)
            logp = torch.log10(p.clamp(min=1e-12)).masked_fill(~cm, float("-inf"))
            att = torch.maximum(att, _pool(logp, rbin, kbin, bins))
            msk = torch.maximum(msk, _pool(m.float(), rbin, kbin, bins))
    recall, density = mass / n, kept / causal
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    shown = att.clamp(min=-6).masked_fill(torch.isinf(att), float("nan"))
    im = ax1.imshow(
        shown.numpy(), cmap="magma", vmin=-6, vmax=0, interpolation="nearest", extent=(0, n, n, 0)
    )
    ax1.set_title("dense attention (log10 p, max-pooled)", fontsize=9)
    fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.04)
    ax2.imshow(
        (msk > 0).numpy(),
        cmap="Greys",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(0, n, n, 0),
    )
    ax2.set_title(
        f"{pattern.describe()}: recall {recall:.4f}, density {100 * density:.1f}%", fontsize=9
    )
    for ax in (ax1, ax2):
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    if title:
        fig.suptitle(title)
    _save(fig, Canvas, path, dpi)
    return fig
