"""Recall against computed density for every index shape we can build, and the oracle bounds.

Issue 3 asks for MInference's recall at VS(1000, 6096) at >= 5x less time than cuDNN. With the
kernel's rate fixed, time is proportional to the computed density, so the question is: which
index reaches that recall at the lowest density, and how low can any index go? Per N this prints,
on the layer benchmark's structured heads (or on captured ``q``/``k``, ``--qk``):

* **vs top-k**: the shipped estimator (top-k columns and diagonals, 64-wide greedy tile cover);
* **vs aligned tiles**: a prototype that scores 64-key relative tiles directly (a tile at offset
  ``-64m`` collects the slash mass ``sum_d slash[64m + d] (64 - |d|) / 64``) and keeps the best;
  it is the exact objective of the tile cover, so it bounds what smarter slash selection gains;
* **block-sparse**: the shipped pooled-block estimator at several ``top_k``, and the sampled one
  (``scoring="sampled"``: the exact attention of a few rows per query block; ``--no-sampled``
  skips it, its PyTorch path is slow on a CPU);
* **vs coverage**: VS(1000, 6096) with ``coverage=`` 0.9 / 0.95 / 0.99 (adaptive budgets);
* **oracle tiles / oracle keys**: the best possible recall at a density, per head, given the exact
  attention of the sampled rows, when every 64-key aligned tile (resp. every key) of every sampled
  row can be chosen freely. Any index that shares a tile set across a 64-row block is below the
  tile oracle.

Recall is the attention mass of the computed pairs on sampled query rows; density is the share
of causal pairs computed over the sampled rows' blocks (``index_density``), as in
``bench_layer.py``. Runs on CPU (slow at 128K: ~25 minutes on 2 cores) or CUDA. Writes
``recall_frontier.json`` and ``recall_frontier.png`` to ``--out``.

    python benchmarks/recall_frontier.py --n 32768 --out /tmp/rf
    python benchmarks/recall_frontier.py --qk layer7.pt   # {"q": [1,Hq,N,D], "k": [1,Hkv,N,D]}
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import minference_kernels as mk
import torch
import torch.nn.functional as F
from minference_kernels.index import BLOCK
from minference_kernels.ops.attention import index_mask
from minference_kernels.ops.index_build import assemble, vertical_slash_pieces
from minference_kernels.ops.vs_scores import select_vertical_slash, vs_scores_torch
from minference_kernels.synthetic import structured_qkv

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import write_json  # noqa: E402
from bench_layer import sample_rows  # noqa: E402

HQ, HKV, D = 32, 8, 128
TARGETS = (0.64, 0.711, 0.807, 0.9)


def load_qk(path: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A captured layer (``real_heads.py --save-qk``: ``q [1, Hq, N, D]``, ``k [1, Hkv, N, D]``
    and the model's attention ``scale``), with the scale folded into ``q`` so that the default
    ``1 / sqrt(D)`` of the estimators and of :func:`exact_probs` applies (dtype kept)."""
    d = torch.load(path, map_location=device)
    q, k = d["q"], d["k"]
    scale = float(d.get("scale", q.shape[-1] ** -0.5))
    if abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        q = (q.float() * (scale * q.shape[-1] ** 0.5)).to(q.dtype)
    return q, k


def exact_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Causal softmax of the sampled rows: ``[Hq, R, N]`` float32 (batch 0)."""
    g = q.shape[1] // k.shape[1]
    out = []
    for h in range(q.shape[1]):  # a head at a time: [R, N] scores, not [Hq, R, N] twice
        s = q[0, h, rows].float() @ k[0, h // g].float().T * q.shape[-1] ** -0.5
        s = s.masked_fill(
            torch.arange(k.shape[2], device=q.device)[None] > rows[:, None], -math.inf
        )
        out.append(torch.softmax(s, -1))
    return torch.stack(out)


def tile_values(slash: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]`` slash scores -> ``[B, H, ceil(N/64)]``: the mass of the relative tile at
    offset ``-64m``."""
    b, h, n = slash.shape
    tri = (BLOCK - torch.arange(-BLOCK + 1, BLOCK, device=slash.device).abs()).float() / BLOCK
    x = F.pad(slash.reshape(b * h, 1, n), (BLOCK - 1, BLOCK - 1))
    return F.conv1d(x, tri.view(1, 1, -1), stride=BLOCK).reshape(b, h, -1)


def oracle_curve(units: torch.Tensor, cost: torch.Tensor, total: float) -> dict:
    """Best mean recall per density when each unit (mass ``units [H, U]``, already divided by the
    row count, cost ``cost [U]`` pairs) is taken by mass per pair: ``{density: recall}`` points."""
    grid = [0.01, 0.02, 0.04, 0.07, 0.1, 0.13, 0.16, 0.2, 0.27, 0.35, 0.5]
    at = {t: [] for t in TARGETS}
    on_grid = {d: [] for d in grid}
    for u in units:  # one head at a time: at 1M tokens all heads' sort does not fit 80 GB
        order = (u / cost).argsort(descending=True)
        m = u[order].cumsum(-1)
        c = cost[order].cumsum(-1) / total
        del order
        last = m.shape[-1] - 1
        for t in TARGETS:
            at[t].append(c[(m < t).sum().clamp(max=last)].item())
        for d in grid:
            on_grid[d].append(m[(c < d).sum().clamp(max=last)].item())
    pts: dict = {f"density_at_{t}": sum(v) / len(v) for t, v in at.items()}
    pts["curve"] = [(d, sum(v) / len(v)) for d, v in on_grid.items()]
    return pts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32768, help="tokens (structured heads)")
    ap.add_argument("--qk", help="a torch.save'd dict with q [1,Hq,N,D] and k [1,Hkv,N,D]")
    ap.add_argument(
        "--profile",
        default="legacy",
        choices=("legacy", "real"),
        help="structured heads: 'legacy' or 'real' (calibrated against captured heads)",
    )
    ap.add_argument("--label", help="what --qk holds, for the report (default: its path)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=".")
    ap.add_argument(
        "--no-sampled", action="store_true", help="skip sampled block scoring (slow on a CPU)"
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    t0 = time.time()
    if a.qk:
        q, k = load_qk(a.qk, dev)
        source = a.label or a.qk
    else:
        q, k, _ = structured_qkv(
            1, HQ, HKV, a.n, D, dtype=torch.bfloat16, seed=a.n % 97, device=dev, profile=a.profile
        )
        source = "structured_qkv (bench_layer's heads)"
        if a.profile != "legacy":
            source = f"structured_qkv, profile {a.profile!r} (bench_layer's heads, calibrated)"
    n, hq = q.shape[2], q.shape[1]
    rows = sample_rows(n, device=dev)
    p = exact_probs(q, k, rows)
    blocks = sorted(set((rows // BLOCK).tolist()))
    vert, sl = vs_scores_torch(q, k, 64, q.shape[-1] ** -0.5)
    print(
        f"[{time.time() - t0:.0f}s] N={n}, {hq} heads, {rows.numel()} rows ({source})", flush=True
    )
    res: dict = dict(
        n=n, heads=hq, source=source, profile=None if a.qk else a.profile, device=str(dev),
        methods={},
    )  # fmt: skip

    def record(name, idx):
        dens = mk.index_density(idx, blocks).mean().item()
        rec = (p * index_mask(idx, rows)[0]).sum(-1).mean().item()
        res["methods"].setdefault(name.split("(")[0].strip(), []).append((dens, rec, name))
        print(
            f"[{time.time() - t0:4.0f}s] {name:32s} density {dens:.4f}  recall {rec:.3f}",
            flush=True,
        )

    def vs_index(v_idx, v_ok, s_idx, s_ok):
        rt, rc, cols, ct = vertical_slash_pieces(v_idx, s_idx, "torch", v_ok, s_ok)
        return assemble(
            batch=1, heads=hq, n_q=n, n_kv=n, device=dev,
            rel_tiles=rt, rel_count=rc, cols=cols, col_total=ct,
        )  # fmt: skip

    for nv, ns in ((100, 800), (512, 2048), (1000, 6096)):
        record(f"vs top-k ({nv}, {ns})", vs_index(*select_vertical_slash(vert, sl, nv, ns)))
    w = tile_values(sl)
    w[..., :2] = math.inf  # the diagonal tile and the one below it: the local window
    for nt in (32, 64, 110, 200):
        v_idx, v_ok, _, _ = select_vertical_slash(vert, sl, 512, 1)
        s_idx = torch.topk(w, min(nt, w.shape[-1]), -1).indices * BLOCK
        record(f"vs aligned tiles (512, {nt} tiles)", vs_index(v_idx, v_ok, s_idx, s_idx >= 0))
    for frac in (0.02, 0.05, 0.1, 0.15):
        heads = [mk.HeadPattern.block_sparse(max(1, math.ceil(frac * n / 64)))] * hq
        record(f"block-sparse ({frac:.0%} of blocks)", mk.build_index(q, k, heads, validate=False))
    if not a.no_sampled:
        for frac in (0.02, 0.05, 0.1):
            top_k = max(1, math.ceil(frac * n / 64))
            heads = [mk.HeadPattern.block_sparse(top_k, scoring="sampled")] * hq
            record(
                f"block-sparse sampled ({frac:.0%} of blocks)",
                mk.build_index(q, k, heads, validate=False),
            )
    vs = [mk.HeadPattern.vertical_slash(1000, 6096)] * hq
    for cov in (0.9, 0.95, 0.99):
        record(f"vs coverage ({cov}, at most 1000, 6096)", mk.build_index(q, k, vs, coverage=cov))

    del q, k, vert, sl  # room for the oracles' sorts at 1M tokens
    r = rows.numel()
    total = float((rows + 1).sum())
    nt = -(-n // BLOCK)
    pt = F.pad(p, (0, nt * BLOCK - n)).view(hq, r, nt, BLOCK).sum(-1) / r
    tcost = (rows[:, None] + 1 - BLOCK * torch.arange(nt, device=dev)[None]).clamp(0, BLOCK).float()
    keep = (tcost > 0).reshape(-1)
    res["oracle_tiles"] = oracle_curve(pt.reshape(hq, -1)[:, keep], tcost.reshape(-1)[keep], total)
    causal = (torch.arange(n, device=dev)[None] <= rows[:, None]).reshape(-1)
    pk = (p / r).reshape(hq, -1)[:, causal]
    res["oracle_keys"] = oracle_curve(pk, torch.ones(pk.shape[-1], device=dev), total)
    for name in ("oracle_tiles", "oracle_keys"):
        need = ", ".join(f"{t}: {res[name][f'density_at_{t}']:.4f}" for t in TARGETS)
        print(f"{name:12s} density needed for recall {need}", flush=True)
    write_json(out / "recall_frontier.json", res)
    plot(res, out / "recall_frontier.png")
    print(f"[{time.time() - t0:.0f}s] wrote {out}/recall_frontier.json and .png", flush=True)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in res["methods"].items():
        xs, ys, _ = zip(*sorted(pts))
        ax.plot(xs, ys, "o-", label=name)
    for name, style in (("oracle_tiles", "k--"), ("oracle_keys", "k:")):
        xs, ys = zip(*res[name]["curve"])
        ax.plot(xs, ys, style, label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("computed density (share of causal pairs)")
    ax.set_ylabel("recall (attention mass kept)")
    ax.set_title(f"Recall against density, N={res['n']:,} ({res['heads']} heads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
