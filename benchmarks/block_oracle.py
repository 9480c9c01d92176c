"""Per-block bounds on what any 64-row index can save over the Llama-3.1 config, and hybrids.

``recall_frontier.py``'s oracles choose tiles (or keys) per sampled *row*, one row per block:
no index the kernel runs can do that, because the 64 rows of a query block share their keys. Here
whole query blocks are sampled, so the bounds are the ones a per-block index faces:

* **oracle block tiles**: per query block, the 64-key aligned tiles with the most attention of the
  block's own rows (the best any block-sparse index could pick);
* **oracle block keys**: per query block, the best single keys shared by its rows (the best any
  index of gathered columns chosen per block could pick; over all heads at once, as the curves'
  recall and density are means over heads);
* **cols + oracle tiles**: the ``vertical_block`` head's columns (``--columns``, from the last 64
  queries' column scores) plus the best tiles: the bound of that kind.

and the estimators: the shipped ones, **pooled** (``block_sparse(t)``: mean-pooled block scores,
the diagonal blocks and key block 0 forced) and **vertical_block** (``vertical_block(columns, t)``:
those columns plus pooled tiles), each built by ``build_index``; and **sampled** (this script's
sampled scoring: 4 evenly spaced rows of each block, exact; the diagonal tile forced), alone and with the same columns (**cols + sampled**); and two estimators of keys per
block, not tiles (an index of gathered keys chosen per query block, which no shipped kernel runs
yet): the diagonal tile plus the best earlier keys ranked by the logits of the block's mean query
(**pooled-query keys**), or by the summed softmax of the mean queries of 4 groups of its rows
(**4-pooled-query keys**), the same computed pairs per block as ``t`` tiles. Each head is given the
config's layer-0 pattern for the config row.

For each method: the computed density (share of the sampled blocks' causal pairs) and the recall
(attention mass kept, mean over heads and rows) at several tile budgets per block, and the density
it needs to reach the config's recall, as a share of the config's computed density
(``need_share``; below ``0.69`` is what issue 20's 10x at 128K needs if the kernel's rate and the
estimation cost stay as they are). Runs on the CPU.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \\
        python benchmarks/block_oracle.py --out results/block_oracle_cpu.json \\
        --captured gemma3-270m-L05=DIR/L05.pt,... --synthetic legacy@131072,real@131072

(captured files: ``real_heads.py --save-qk``; ``report_real.py`` draws the result on the
real-models page).
"""

from __future__ import annotations

import argparse
import math
import time

import minference_kernels as mk
import minference_patterns as mp
import torch
import torch.nn.functional as F
from _provenance import write_json
from bench_layer import CONFIG_ID, HKV, HQ, D, sample_rows
from minference_kernels.index import BLOCK
from minference_kernels.ops.attention import index_mask
from minference_kernels.synthetic import structured_qkv
from recall_frontier import load_qk

#: tiles per query block at which each estimator is evaluated (diagonal and previous included)
BUDGETS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
SAMPLED = 4  # rows per query block of the sampled scoring, as ``scoring="sampled"``
POOLED_GROUPS = 4  # groups of rows per query block, each pooled into one query


def pick_blocks(n: int, count: int, seed: int = 0) -> list[int]:
    """``count`` query blocks: the last one and random others from ``bench_layer``'s sample rows
    (blocks 0 and 1 left out: every index keeps all of their keys)."""
    cand = sorted({r // BLOCK for r in sample_rows(n, count=3 * count, device="cpu").tolist()})
    cand = [m for m in cand if m >= 2 and m != (n - 1) // BLOCK]
    g = torch.Generator().manual_seed(seed)
    chosen = [cand[i] for i in torch.randperm(len(cand), generator=g)[: count - 1].tolist()]
    return sorted(chosen + [(n - 1) // BLOCK])


def _tiles(x: torch.Tensor, nt: int) -> torch.Tensor:
    """``[H, N]`` per key -> ``[H, nt]`` per 64-key tile (sum)."""
    return F.pad(x, (0, nt * BLOCK - x.shape[-1])).view(x.shape[0], nt, BLOCK).sum(-1)


def _greedy_need(units: torch.Tensor, cost: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the fewest pairs that hold ``target [R]`` of the mass, taking ``units [R, U]``
    (mass) at ``cost [U]`` (pairs) best mass per pair first."""
    order = (units / cost).argsort(-1, descending=True)
    m = torch.gather(units, -1, order).cumsum(-1)
    c = torch.gather(cost.expand_as(units), -1, order).cumsum(-1)
    i = (m < target[:, None]).sum(-1).clamp(max=m.shape[-1] - 1)
    return torch.gather(c, -1, i[:, None])[:, 0]


def _need_share(curve: list[tuple[float, float]], recall: float, density: float) -> float | None:
    """The density at which a (density, recall) curve reaches ``recall``, linearly interpolated,
    over ``density``; ``None`` when it never does."""
    pts = sorted(curve)
    if pts[0][1] >= recall:
        return pts[0][0] / density
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 < recall <= r1:
            return (d0 + (recall - r0) / (r1 - r0) * (d1 - d0)) / density
    return None


def measure(q: torch.Tensor, k: torch.Tensor, label: str, blocks: int, columns: int) -> dict:
    t0 = time.time()
    n, hq, hkv = q.shape[2], q.shape[1], k.shape[1]
    g, scale, nt = hq // hkv, q.shape[-1] ** -0.5, -(-n // BLOCK)
    chosen = pick_blocks(n, blocks)
    layer0 = list(mp.load(CONFIG_ID).heads_for_layer(0, n))
    idx = mk.build_index(q, k, layer0[:1] * hq, validate=False, backend="torch")
    # the shipped estimators at every budget: block-sparse (pooled) and vertical-block, whose
    # columns (the same at every budget) the bounds and the sampled hybrid share
    shipped = {
        (kind, t): mk.build_index(q, k, [head] * hq, validate=False, backend="torch")
        for t in BUDGETS
        for kind, head in (
            ("pooled", mk.HeadPattern.block_sparse(t)),
            ("vertical_block", mk.HeadPattern.vertical_block(columns, t)),
        )
    }
    vb = shipped[("vertical_block", BUDGETS[0])]
    colmap = torch.zeros((hq, n), dtype=torch.bool)
    for h in range(hq):
        colmap[h, vb.cols[0, h, : int(vb.col_count[0, h, -1])].long()] = True
    keys = torch.arange(n)
    per_block = []
    for m in chosen:
        r = torch.arange(m * BLOCK, min((m + 1) * BLOCK, n))
        causal = keys[None] <= r[:, None]
        km, ks = torch.empty(hq, n), torch.empty(hq, n)
        pq1, pq4 = torch.empty(hq, n), torch.empty(hq, n)
        samp = torch.linspace(0, r.numel() - 1, SAMPLED).round().long()
        for h in range(hq):
            s = (q[0, h, r].float() @ k[0, h // g].float().T) * scale
            p = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
            km[h], ks[h] = p.sum(0), p[samp].sum(0) * (r.numel() / SAMPLED)
            # key scores from pooled queries, over the keys before the block: the mean query of
            # the block (its logits), and the mean queries of 4 groups of rows (softmax, summed)
            earlier = keys[None] < r[0]
            for out_, groups in ((pq1, 1), (pq4, POOLED_GROUPS)):
                qg = torch.stack([c.mean(0) for c in q[0, h, r].float().chunk(groups)])
                lg = ((qg @ k[0, h // g].float().T) * scale).masked_fill(~earlier, -math.inf)
                out_[h] = lg[0] if groups == 1 else torch.softmax(lg, -1).sum(0)
        per_block.append(
            dict(
                m=m, rows=r.numel(), km=km, cost=causal.sum(0).float(),
                cfg=index_mask(idx, r)[0].any(1), sampled=_tiles(ks, nt),
                cols=colmap & (keys <= r[-1]), pq1=pq1, pq4=pq4,
            )
        )  # fmt: skip
    causal_pairs = sum(b["cost"].sum().item() for b in per_block)
    rows = sum(b["rows"] for b in per_block)

    def evaluate(keep) -> tuple[float, float]:
        mass, pairs = torch.zeros(hq), torch.zeros(hq)
        for b in per_block:
            sel = keep(b)
            mass += (b["km"] * sel).sum(-1)
            pairs += (b["cost"] * sel).sum(-1)
        return (pairs / causal_pairs).mean().item(), (mass / rows).mean().item()

    def index_keys(index: mk.SparseIndex, m: int) -> torch.Tensor:
        """The keys an absolute-tile (+ columns) index gives query block ``m``: ``bool [H, N]``."""
        sel = torch.zeros((hq, n), dtype=torch.bool)
        for h in range(hq):
            for st in index.abs_tiles[0, h, m, : int(index.abs_count[0, h, m])].tolist():
                sel[h, st : st + BLOCK] = True
            sel[h, index.cols[0, h, : int(index.col_count[0, h, m])].long()] = True
        return sel

    def top_tiles(score: torch.Tensor, m: int, budget: int) -> torch.Tensor:
        s = score.clone()
        s[:, m + 1 :] = -math.inf
        s[:, m] = math.inf  # the diagonal tile, as every shipped estimator keeps it
        sel = torch.zeros_like(s, dtype=torch.bool)
        sel.scatter_(1, s.topk(min(budget, m + 1), -1).indices, True)
        return sel.repeat_interleave(BLOCK, -1)[:, :n]

    def top_keys(score: torch.Tensor, m: int, budget: int) -> torch.Tensor:
        """The diagonal tile's keys and the ``(budget - 1) * 64`` best earlier keys by ``score``
        (the same computed pairs as ``budget`` tiles): ``bool [H, N]``."""
        s = score.clone()
        s[:, (m + 1) * BLOCK :] = -math.inf
        s[:, m * BLOCK : (m + 1) * BLOCK] = math.inf
        sel = torch.zeros_like(s, dtype=torch.bool)
        sel.scatter_(1, s.topk(min(budget * BLOCK, (m + 1) * BLOCK, n), -1).indices, True)
        return sel & (keys < (m + 1) * BLOCK)

    methods = {
        "oracle block tiles": lambda b, t: top_tiles(_tiles(b["km"], nt), b["m"], t),
        "cols + oracle tiles": lambda b, t: (
            top_tiles(_tiles(b["km"] * ~b["cols"], nt), b["m"], t) | b["cols"]
        ),
        "pooled": lambda b, t: index_keys(shipped[("pooled", t)], b["m"]),
        "vertical_block": lambda b, t: index_keys(shipped[("vertical_block", t)], b["m"]),
        "sampled": lambda b, t: top_tiles(b["sampled"], b["m"], t),
        "cols + sampled": lambda b, t: top_tiles(b["sampled"], b["m"], t) | b["cols"],
        "pooled-query keys": lambda b, t: top_keys(b["pq1"], b["m"], t),
        f"{POOLED_GROUPS}-pooled-query keys": lambda b, t: top_keys(b["pq4"], b["m"], t),
    }
    cfg_density, cfg_recall = evaluate(lambda b: b["cfg"])
    out: dict = dict(
        n=n, heads=hq, blocks=len(per_block), columns=columns,
        config=dict(density=cfg_density, recall=cfg_recall), curves={}, need_share={},
    )  # fmt: skip
    for name, fn in methods.items():
        curve = [evaluate(lambda b, t=t: fn(b, t)) for t in BUDGETS]
        out["curves"][name] = curve
        out["need_share"][name] = _need_share(curve, cfg_recall, cfg_density)
    # the key oracle: the fewest (head, block, key) units that hold the config's recall, by the
    # same measure as the curves (mass and pairs summed over heads: a head may trade with another)
    units = torch.cat([b["km"] for b in per_block], -1)
    cost = torch.cat([b["cost"] for b in per_block], -1).expand_as(units)
    ok = cost > 0
    target = sum((b["km"] * b["cfg"]).sum() for b in per_block)
    need = _greedy_need(units[ok][None], cost[ok], torch.tensor([float(target)]))[0]
    cfg_pairs = sum((b["cost"] * b["cfg"]).sum() for b in per_block)
    out["need_share"]["oracle block keys"] = float(need / cfg_pairs)
    shares = ", ".join(
        f"{k} {v:.2f}" if v is not None else f"{k} never" for k, v in out["need_share"].items()
    )
    print(
        f"[{time.time() - t0:.0f}s] {label} N={n}: config density {cfg_density:.4f} recall "
        f"{cfg_recall:.3f}; share of its pairs needed for that recall: {shares}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captured", default="", help="LABEL=FILE,... (real_heads.py --save-qk)")
    ap.add_argument("--synthetic", default="", help="PROFILE@N,... (structured_qkv profiles)")
    ap.add_argument("--blocks", type=int, default=24, help="whole query blocks sampled")
    ap.add_argument("--columns", type=int, default=512, help="columns of the hybrids")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    log: dict = dict(args=vars(a), config=CONFIG_ID, budgets=list(BUDGETS), results={})
    for spec in filter(None, a.captured.split(",")):
        label, path = spec.split("=", 1)
        q, k = (x.float() for x in load_qk(path, "cpu"))
        log["results"][label] = measure(q, k, label, a.blocks, a.columns)
        write_json(a.out, log)
    for spec in filter(None, a.synthetic.split(",")):
        profile, n = spec.split("@")
        q, k, _ = structured_qkv(
            1, HQ, HKV, int(n), D, dtype=torch.float32, device="cpu", seed=int(n) % 97,
            kind="mixed", profile=profile,
        )  # fmt: skip
        log["results"][f"synthetic {profile}@{n}"] = measure(q, k, spec, a.blocks, a.columns)
        write_json(a.out, log)


if __name__ == "__main__":
    main()
