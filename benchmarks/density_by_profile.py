"""What the shipped Llama-3.1 config keeps on synthetic heads (legacy, calibrated) and real ones.

Issue 20's speed target (>= 10x over cuDNN at 128K on the Llama-3.1 config) was measured on
``bench_layer``'s legacy heads, where the config's index keeps 11% of the causal pairs
(results/bench_interleaved_128k_v030d_h200.json: 6.71x). The legacy heads are far more diffuse than
trained ones; ``structured_qkv(profile="real")`` is fitted to SmolLM2's captured heads. The
sparse layer's time is close to proportional to the pairs it keeps (plus a fixed estimation +
index cost), so the density on calibrated heads predicts the speed the GPU would measure. Per
profile and length: the density and recall (on ``bench_layer``'s 96 sample rows) of the config's
layer-0 index, and the oracle's recall at that density (each sampled row's best keys, as many as
the index kept for that row on average). For the vertical-slash config also the pairs its estimate
names before the 64-wide tile rounding, and the bytes behind both in K/V rows per 64-row block
(:func:`key_rows`): tile rounding multiplies the pairs far more than the loads.

``--captured LABEL=FILE,...`` measures the same on real heads: layers captured from a trained model
by ``real_heads.py --save-qk`` (post-RoPE ``q``/``k`` and the model's ``scale``), at their own length
and head shape. Every head gets the config's layer-0 pattern (all of its heads share one), so the
question asked is the same: how many pairs does this index compute on such heads, and how much of
their attention does it keep. The synthetic heads have a Llama-3-8B layer's shape; the density and
the tile rounding are per head, so the shapes need not match.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \
        python benchmarks/density_by_profile.py --ns 8192,16384,32768,65536,131072 \
        --captured gemma3-270m-L05=DIR/L05.pt,...,smollm2-135m-L03=DIR2/L03.pt,... \
        --out results/density_by_profile_cpu.json

(the shipped file: Gemma-3-270M's global layers 5, 11 and 17 captured at 8K, 16K and 32K, and
SmolLM2-135M's layers 3, 10, 15, 20 and 25 at 8K, each label ``MODEL-L<layer>``; the report groups
the layers of a model by the part before ``-L``).

Runs on the CPU (the PyTorch backend) or a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import minference_kernels as mk
import minference_patterns as mp
import torch
from _provenance import write_json
from bench_layer import CONFIG_ID, HKV, HQ, D, sample_rows
from minference_kernels.index import BLOCK
from minference_kernels.ops.attention import index_mask
from minference_kernels.synthetic import structured_qkv
from recall_frontier import exact_probs, load_qk


def oracle_recall(p: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean over heads and rows of the mass of each row's best ``kept[h, r]`` keys."""
    s = p.sort(-1, descending=True).values.cumsum(-1)  # [H, R, N]
    k = kept.clamp(min=1).long() - 1
    return s.gather(-1, k[..., None]).squeeze(-1).mean().item()


def named_lists(q, k, heads) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per head, the columns and the diagonal offsets the vertical-slash estimate selects (before
    the index rounds slashes up to 64-wide tiles); ``None`` unless every head is vertical-slash."""
    if any(h.kind != "vertical_slash" for h in heads):
        return None
    g = q.shape[1] // k.shape[1]
    out = []
    for h, hp in enumerate(heads):
        v, s = mk.estimate_vertical_slash(
            q[:, h : h + 1], k[:, h // g : h // g + 1], hp.num_vertical, hp.num_slash
        )
        out.append((v[0, 0], s[0, 0]))
    return out


def named_mask(lists, n: int, rows: torch.Tensor) -> torch.Tensor:
    """The (row, key) pairs the estimate *names* (``lists``: :func:`named_lists`) on the sampled
    ``rows``: its columns and diagonals, ``bool [H, R, N]``."""
    keys = torch.arange(n, device=rows.device)
    out = torch.zeros((len(lists), rows.numel(), n), dtype=torch.bool, device=rows.device)
    for h, (v, s) in enumerate(lists):
        out[h][:, v] = True
        out[h] |= torch.isin(rows[:, None] - keys[None, :], s)
    return out & (keys[None, None, :] <= rows[None, :, None])


def _rows_of_intervals(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """``bool [MB, n]``: the keys inside any interval ``[lo, hi]`` of each row (``lo > hi``: empty)."""
    mb = lo.shape[0]
    ok = lo <= hi
    diff = torch.zeros((mb, n + 1), dtype=torch.int32, device=lo.device)
    one = ok.to(torch.int32)
    diff.scatter_add_(1, torch.where(ok, lo, n).clamp(0, n), one)
    diff.scatter_add_(1, torch.where(ok, hi + 1, n).clamp(0, n), -one)
    return torch.cumsum(diff, 1)[:, :n] > 0


def key_rows(lists, idx: mk.SparseIndex, blocks: list[int]) -> tuple[float, float]:
    """Bytes, counted in K/V rows: per (head, 64-row block) on ``blocks``, the distinct keys the
    block must load for the pairs the estimate names (each diagonal ``s`` needs keys ``a0 - s ..
    a1 - s``, each column its key) and the keys the index loads (its relative tiles, each 64 keys
    from ``a0 + r``, and the columns outside them). Means over heads and blocks. Equal counts
    mean the tiles cost no extra loads, however many more pairs they compute."""
    n = idx.n_kv
    dev = idx.rel_tiles.device
    a0 = torch.tensor(blocks, device=dev, dtype=torch.int64)[:, None] * BLOCK
    a1 = (a0 + BLOCK - 1).clamp(max=n - 1)
    named = loaded = 0
    for h, (v, s) in enumerate(lists):
        cols = torch.zeros((len(blocks), n), dtype=torch.bool, device=dev)
        cols[:, v] = True
        cols &= torch.arange(n, device=dev)[None, :] <= a1
        need = _rows_of_intervals((a0 - s[None, :]).clamp(min=0), a1 - s[None, :], n) | cols
        r = idx.rel_tiles[0, h, : int(idx.rel_end[0, h].max())].to(torch.int64)
        tiles = _rows_of_intervals(
            (a0 + r[None, :]).clamp(min=0), torch.minimum(a0 + r + BLOCK - 1, a1), n
        )
        named += need.sum().item()
        loaded += (tiles | cols).sum().item()
    count = len(lists) * len(blocks)
    return named / count, loaded / count


def measure(n: int, profile: str, device: str) -> dict:
    """A synthetic profile (bench_layer's layer shape) at ``n`` tokens."""
    q, k, v = structured_qkv(
        1, HQ, HKV, n, D, dtype=torch.float32, device=device, seed=n % 97, kind="mixed",
        profile=profile,
    )  # fmt: skip
    out = measure_qk(q, k, profile)
    out["heads"] = f"synthetic, profile {profile!r} ({HQ} query / {HKV} KV heads, head dim {D})"
    return out


def measure_qk(q: torch.Tensor, k: torch.Tensor, label: str) -> dict:
    """The config's and MInference's default vertical-slash index on one layer's heads (attention
    scale ``1 / sqrt(D)``): density, recall and the oracle's recall at that density, named pairs
    against tile-rounded pairs."""
    t0 = time.time()
    n, hq, device = k.shape[2], q.shape[1], q.device
    rows = sample_rows(n, device=device)
    p = exact_probs(q, k, rows)
    blocks = sorted(set((rows // BLOCK).tolist()))
    out = {}
    layer0 = list(mp.load(CONFIG_ID).heads_for_layer(0, n))
    if len({h.describe() for h in layer0}) != 1:  # real layers have fewer heads than the config
        raise ValueError(f"{CONFIG_ID}'s layer 0 mixes patterns; no one pattern to give {hq} heads")
    for name, heads in {
        "llama3.1-config": layer0[:1] * hq,
        "vs(1000,6096)": [mk.HeadPattern.vertical_slash(1000, 6096)] * hq,
    }.items():
        idx = mk.build_index(q, k, heads, validate=False, backend="torch")
        m = index_mask(idx, rows)[0]  # [H, R, N] bool
        kept = m.sum(-1)
        out[name] = dict(
            density=mk.index_density(idx, blocks).mean().item(),
            recall=(p * m).sum(-1).mean().item(),
            oracle_recall=oracle_recall(p, kept),
            kept_keys_per_row=kept.float().mean().item(),
        )
        lists = named_lists(q, k, heads)
        if lists is not None:
            named = named_mask(lists, n, rows)
            rows_named, rows_tiles = key_rows(lists, idx, blocks)
            # what 64-wide slash tiles add to the pairs the estimate names (sampled rows)
            causal_pairs = (rows + 1).sum().item() * len(heads)
            out[name].update(
                named_density=named.sum().item() / causal_pairs,
                tile_density=kept.sum().item() / causal_pairs,
                named_recall=(p * named).sum(-1).mean().item(),
                rows_named=rows_named,
                rows_tiles=rows_tiles,
            )
            print(
                f"   named {out[name]['named_density']:.4f} (recall {out[name]['named_recall']:.3f})"
                f", computed in tiles {out[name]['tile_density']:.4f}; K/V rows per block: "
                f"named {rows_named:.0f}, loaded {rows_tiles:.0f}",
                flush=True,
            )
        print(
            f"N={n} {label:12s} {name:16s} density {out[name]['density']:.4f} "
            f"recall {out[name]['recall']:.3f} oracle {out[name]['oracle_recall']:.3f} "
            f"({time.time() - t0:.0f} s)",
            flush=True,
        )
    # share of each sampled row's keys that hold 90% of its mass (how sharp the heads are)
    s = p.sort(-1, descending=True).values.cumsum(-1)
    causal = (rows + 1).float()[None, :]
    out["keys_for_90pct"] = ((s < 0.9).sum(-1) + 1).div(causal).mean().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="32768,131072")
    ap.add_argument("--profiles", default="legacy,real")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--captured",
        help="captured real layers, LABEL=FILE,... (files from real_heads.py --save-qk), measured "
        "at their own length beside the synthetic profiles",
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    log = dict(
        args=vars(a),
        device=torch.cuda.get_device_name()
        if a.device == "cuda"
        else platform.processor() or platform.machine(),
        torch=torch.__version__,
        config=CONFIG_ID,
        results={},
    )
    for n in (int(x) for x in a.ns.split(",")):
        for profile in filter(None, a.profiles.split(",")):
            log["results"][f"{profile}@{n}"] = measure(n, profile, a.device)
            write_json(a.out, log)
    for spec in filter(None, (a.captured or "").split(",")):
        label, path = spec.split("=", 1)
        q, k = (x.float() for x in load_qk(path, a.device))  # the model's scale folded into q
        r = measure_qk(q, k, label)
        r["heads"] = (
            f"captured, {Path(path).name} ({q.shape[1]} query / {k.shape[1]} KV heads, "
            f"head dim {q.shape[-1]})"
        )
        log["results"][f"{label}@{k.shape[2]}"] = r
        write_json(a.out, log)


if __name__ == "__main__":
    main()
