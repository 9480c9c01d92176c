"""What the shipped Llama-3.1 config keeps on the legacy and the calibrated synthetic heads.

Issue 20's speed target (>= 10x over cuDNN at 128K on the Llama-3.1 config) was measured on
``bench_layer``'s legacy heads, where the config's index keeps 11% of the causal pairs
(results/bench_interleaved_128k_v030d_h200.json: 6.71x). The legacy heads are far more diffuse than
trained ones; ``structured_qkv(profile="real")`` is fitted to SmolLM2's captured heads. The
sparse layer's time is close to proportional to the pairs it keeps (plus a fixed estimation +
index cost), so the density on calibrated heads predicts the speed the GPU would measure. Per
profile and length: the density and recall (on ``bench_layer``'s 96 sample rows) of the config's
layer-0 index, and the oracle's recall at that density (each sampled row's best keys, as many as
the index kept for that row on average).

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \
        python benchmarks/density_by_profile.py --ns 32768,131072 --out results/density_by_profile_cpu.json

Runs on the CPU (the PyTorch backend) or a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import platform
import time

import minference_kernels as mk
import minference_patterns as mp
import torch
from _provenance import write_json
from bench_layer import CONFIG_ID, HKV, HQ, D, dense_probs, sample_rows
from minference_kernels.index import BLOCK
from minference_kernels.ops.attention import index_mask
from minference_kernels.synthetic import structured_qkv


def oracle_recall(p: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean over heads and rows of the mass of each row's best ``kept[h, r]`` keys."""
    s = p.sort(-1, descending=True).values.cumsum(-1)  # [H, R, N]
    k = kept.clamp(min=1).long() - 1
    return s.gather(-1, k[..., None]).squeeze(-1).mean().item()


def named_mask(q, k, heads, rows: torch.Tensor) -> torch.Tensor | None:
    """The (row, key) pairs a vertical-slash layer's estimate *names* on the sampled ``rows``:
    its columns and diagonals, before the index rounds slashes up to 64-wide tiles, ``bool [H, R,
    N]`` (``None`` unless every head is vertical-slash)."""
    if any(h.kind != "vertical_slash" for h in heads):
        return None
    n, g = k.shape[2], q.shape[1] // k.shape[1]
    keys = torch.arange(n, device=q.device)
    out = torch.zeros((len(heads), rows.numel(), n), dtype=torch.bool, device=q.device)
    for h, hp in enumerate(heads):
        v, s = mk.estimate_vertical_slash(
            q[:, h : h + 1], k[:, h // g : h // g + 1], hp.num_vertical, hp.num_slash
        )
        out[h][:, v[0, 0]] = True
        out[h] |= torch.isin(rows[:, None] - keys[None, :], s[0, 0])
    return out & (keys[None, None, :] <= rows[None, :, None])


def measure(n: int, profile: str, device: str) -> dict:
    t0 = time.time()
    q, k, v = structured_qkv(
        1, HQ, HKV, n, D, dtype=torch.float32, device=device, seed=n % 97, kind="mixed",
        profile=profile,
    )  # fmt: skip
    rows = sample_rows(n, device=device)
    p = dense_probs(q, k, rows)
    blocks = sorted(set((rows // BLOCK).tolist()))
    out = {}
    for name, heads in {
        "llama3.1-config": list(mp.load(CONFIG_ID).heads_for_layer(0, n)),
        "vs(1000,6096)": [mk.HeadPattern.vertical_slash(1000, 6096)] * HQ,
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
        named = named_mask(q, k, heads, rows)
        if named is not None:
            # what 64-wide slash tiles add to the pairs the estimate names (sampled rows)
            causal_pairs = (rows + 1).sum().item() * len(heads)
            out[name].update(
                named_density=named.sum().item() / causal_pairs,
                tile_density=kept.sum().item() / causal_pairs,
                named_recall=(p * named).sum(-1).mean().item(),
            )
            print(
                f"   named {out[name]['named_density']:.4f} (recall {out[name]['named_recall']:.3f})"
                f", computed in tiles {out[name]['tile_density']:.4f}",
                flush=True,
            )
        print(
            f"N={n} {profile:7s} {name:16s} density {out[name]['density']:.4f} "
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
        for profile in a.profiles.split(","):
            log["results"][f"{profile}@{n}"] = measure(n, profile, a.device)
            write_json(a.out, log)


if __name__ == "__main__":
    main()
