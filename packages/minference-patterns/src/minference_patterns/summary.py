"""Text summaries of a config (``minference-patterns show``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .config import PatternConfig
from .density import nominal_density

__all__ = ["DEFAULT_SEQ_LEN", "summarize", "summary_dict"]

#: Length used for densities when neither the caller nor the config gives one.
DEFAULT_SEQ_LEN = 131072


def _seq_len(config: PatternConfig, seq_len: int | None) -> int:
    n = seq_len or config.context_length or DEFAULT_SEQ_LEN
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"seq_len must be a positive int, got {n!r}")
    return n


def summary_dict(config: PatternConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Kinds, budgets and nominal densities per layer at ``seq_len`` (JSON-ready).

    Budgets are those :meth:`PatternConfig.heads_for_layer` returns at ``seq_len`` (after the
    budget policy); densities are :func:`~minference_patterns.density.nominal_density` estimates
    (from the budgets, before the kernels' tile rounding).
    """
    n = _seq_len(config, seq_len)
    layers = []
    all_d = []
    for li in range(config.num_layers):
        heads = config.heads_for_layer(li, n)
        dens = [nominal_density(h, n) for h in heads]
        all_d.extend(dens)
        counts = Counter(h.describe() for h in heads)
        layers.append(
            {
                "layer": li,
                "density": sum(dens) / len(dens),
                "patterns": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            }
        )
    kinds = Counter(
        h.kind for li in range(config.num_layers) for h in config.heads_for_layer(li, n)
    )
    return {
        "model_id": config.model_id,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "context_length": config.context_length,
        "seq_len": n,
        "budget_policy": config.budget_policy.to_dict(),
        "provenance": config.provenance.to_dict(),
        "kinds_stored": {k: v for k, v in config.kind_counts().items() if v},
        "kinds_at_seq_len": dict(kinds),
        "density": sum(all_d) / len(all_d),
        "layers": layers,
    }


def summarize(config: PatternConfig, seq_len: int | None = None) -> str:
    """Human-readable summary: shape, provenance, kinds, per-layer budgets and density."""
    s = summary_dict(config, seq_len)
    n = s["seq_len"]
    shape = [f"{s['num_layers']} layers x {s['num_heads']} query heads"]
    if s["num_kv_heads"]:
        shape.append(f"{s['num_kv_heads']} KV heads")
    if s["head_dim"]:
        shape.append(f"head dim {s['head_dim']}")
    prov = s["provenance"]
    lines = [
        f"{s['model_id']}: " + ", ".join(shape),
        f"searched at: {s['context_length'] or 'unknown length'}; source: {prov['source']}"
        + (f" ({prov['license']})" if prov.get("license") else "")
        + (f", budget {prov['budget']}" if prov.get("budget") is not None else ""),
        "budget policy: " + ", ".join(f"{k}={v}" for k, v in s["budget_policy"].items()),
        "stored kinds: " + ", ".join(f"{k} {v}" for k, v in s["kinds_stored"].items()),
        f"at {n} tokens: "
        + ", ".join(f"{k} {v}" for k, v in s["kinds_at_seq_len"].items())
        + f"; expected density {100 * s['density']:.2f}% (nominal, before tile rounding)",
        "",
        "layer  density  patterns at this length (x heads)",
    ]
    for layer in s["layers"]:
        pats = ", ".join(f"{p} x{c}" for p, c in layer["patterns"].items())
        lines.append(f"{layer['layer']:5d}  {100 * layer['density']:6.2f}%  {pats}")
    return "\n".join(lines)
