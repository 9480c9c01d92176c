"""Count first for keys chosen per query block (issue 20): their attention and a plain estimate, 128K.

``block_oracle.py`` finds that keys chosen per 64-row query block by its pooled queries keep the
Llama-3.1 config's recall with far fewer computed pairs on real heads than any choice of 64-key
tiles. No kernel runs such an index yet. This measures, on a GPU, the two costs that decide whether
one would pay, at the Llama-3.1-8B layer shape:

* **attention over gathered keys**: the shipped kernel's column pass. Heads are
  ``vertical_slash(V, 64)`` on random ``q``/``k``, whose last-64 column scores pick keys all over
  the prompt, so query block ``m`` attends to about ``V * (m + 1) / MB`` gathered keys plus its
  diagonal tile: the per-block count of a per-block key index of density ``V / N``. Beside it,
  ``block_sparse`` heads (contiguous 64-key tiles) at similar densities. Each timed interleaved
  with cuDNN (the kernel alone, ``attention_triton.attend`` on a built index, and the whole
  ``sparse_prefill``); achieved TFLOP/s on the kept pairs next to cuDNN's on the causal pairs.
* **keys listed per block** (a probe: the shipped kernel with one edit, its column pass reading
  block ``m``'s own key list instead of the head's): the same per-block key counts, each block's
  keys drawn independently of every other block's. ``shared s``: a share ``s`` of each block's
  keys comes from one sorted key set per head (the heavy columns every block of a real head
  shares), the rest spread evenly over the block's earlier keys. The ``vertical_slash`` rows above
  are the fully shared end (every block reads the head's columns), ``shared 0`` the other end
  (whether L2 reuse sets the rate of gathered keys). On the captured heads, consecutive blocks of
  a head choose mostly the same keys (``shared 0.8`` is nearer them than ``0``). The probe is
  checked against float64 attention over its mask first.
* **the estimate**: per query block, ``G`` pooled queries (``G`` groups of rows, each group's mean)
  against every earlier key, one GEMM per chunk of query blocks (``G > 1``: softmax per group,
  summed), then ``torch.topk`` of the block's key budget, at ``G = 1`` and ``4``; the GEMM alone and
  with the selection. A fused selection would cost less; this is the plain upper line.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \\
        python benchmarks/block_keys_cost.py --out DIR [--n 131072] [--rounds 3]

Writes DIR/block_keys_cost.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import math
import statistics
import sys
import tempfile
from pathlib import Path

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from bench_layer import HKV, HQ, D
from minference_kernels.index import BLOCK
from minference_kernels.ops import attention_triton
from minference_kernels.ops.attention import index_mask

# (old, new) text edits that turn the shipped kernel module into the per-block probe: the column
# pass reads block m's own key list, ``cols [B, H, MB, C]`` (its first ``col_count[b, h, m]``)
_EDITS = (
    ("from .._validate import", "from minference_kernels._validate import"),
    ("from ..index import", "from minference_kernels.index import"),
    ("from ._triton_common import", "from minference_kernels.ops._triton_common import"),
    (
        "cidx = tl.load(COLS + bh * n_cols + offs_c, mask=c_ok, other=0)",
        "cidx = tl.load(COLS + (bh * MB + m).to(tl.int64) * n_cols + offs_c, mask=c_ok, other=0)",
    ),
)


def pooled_topk(
    q, k, density: float, groups: int, chunk: int, select: bool, scale: float | None = None
) -> list:
    """The plain estimate over all query blocks: ``G`` pooled queries per block against the keys
    before it, and (``select``) the best keys of each block of a chunk, as many as the chunk's
    largest budget ``ceil(density * end) - 64`` (an upper bound on the work; block ``m``'s keys are
    the first ``min(64 m, ceil(density * 64 (m + 1)) - 64)``, as ``minference eval``'s
    ``blockkeys:D:G`` chooses them for whole blocks). Returns the chunks' ``[B, H, blocks, k]``
    indices (none without ``select``)."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    mb = -(-n // BLOCK)
    picked = []
    for m0 in range(0, mb, chunk):
        m1 = min(mb, m0 + chunk)
        end = min(n, m1 * BLOCK)
        rows = q[:, :, m0 * BLOCK : end]
        pad = (m1 - m0) * BLOCK - rows.shape[2]
        if pad:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
        qg = rows.view(b, hq, m1 - m0, groups, BLOCK // groups, d).float().mean(4)
        qg = (qg * (d**-0.5 if scale is None else scale)).to(q.dtype)  # the scale, folded in
        # [B, Hkv, g * blocks * G, D] against the keys up to the chunk's end, no K copy per head
        qg = qg.view(b, k.shape[1], g * (m1 - m0) * groups, d)
        s = torch.matmul(qg, k[:, :, :end].transpose(-1, -2)).view(b, hq, m1 - m0, groups, end)
        starts = torch.arange(m0, m1, device=q.device) * BLOCK
        early = torch.arange(end, device=q.device)[None] < starts[:, None]  # [blocks, end]
        s = s.masked_fill(~early[None, None, :, None], float("-inf"))
        score = s[:, :, :, 0] if groups == 1 else torch.softmax(s.float(), -1).sum(3)
        if select:
            kmax = max(1, min((m1 - 1) * BLOCK, math.ceil(density * end) - BLOCK))
            picked.append(score.topk(kmax, -1).indices)
    return picked


def probe_kernel():
    """The shipped attention module with the per-block column edit (written to a temporary
    file: Triton compiles from source files)."""
    src = inspect.getsource(attention_triton)
    for old, new in _EDITS:
        if src.count(old) != 1:
            raise RuntimeError(
                f"the kernel source changed; the probe edit no longer applies: {old!r}"
            )
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / "probe_block_keys_triton.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("probe_block_keys_triton", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def block_key_lists(
    hq: int, n: int, density: float, shared: float, device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block key lists of a per-block index of density about ``density``: block ``m`` (rows
    ``64 m ..``) lists ``k_m = clamp(ceil(density * 64 (m + 1)) - 128, 0, 64 m - 64)`` distinct keys
    before its previous tile (that tile and its own are the index's relative tiles). A share
    ``shared`` of them comes from one sorted random key set per head of ``shared * density * n``
    keys (as many as lie below the limit), the rest one key per equal stratum of the keys left of
    the limit. Returns ``cols [1, H, MB, C]`` int32 (sorted, padded with ``n``) and
    ``col_count [1, H, MB]`` int32 (``k_m``, less the rare stratum key that met a shared key)."""
    g = torch.Generator(device=device).manual_seed(seed)
    mb = -(-n // BLOCK)
    m = torch.arange(mb, device=device)
    lim = (m * BLOCK - BLOCK).clamp(min=0)
    km = torch.minimum((torch.ceil(density * BLOCK * (m + 1)) - 2 * BLOCK).clamp(min=0).long(), lim)
    c = max(1, int(km.max()))
    j = torch.arange(c, device=device)
    ns = round(shared * density * n)
    cols = torch.empty((1, hq, mb, c), dtype=torch.int32, device=device)
    count = torch.empty((1, hq, mb), dtype=torch.int32, device=device)
    for h in range(hq):
        s_h = torch.randperm(n, generator=g, device=device)[:ns].sort().values
        cs = torch.minimum(torch.searchsorted(s_h, lim), km) if ns else torch.zeros_like(km)
        kr = (km - cs).clamp(min=1)
        r = (j[None, :] - cs[:, None]).clamp(min=0)
        u = torch.rand((mb, c), generator=g, device=device)
        strat = ((r + u) * lim[:, None] / kr[:, None]).long()
        own = s_h[j.clamp(max=max(ns - 1, 0))][None, :].expand(mb, c) if ns else strat
        vals = torch.where(j[None, :] < cs[:, None], own, strat)
        vals = torch.where(j[None, :] < km[:, None], vals, n).sort(-1).values
        dup = torch.zeros_like(vals, dtype=torch.bool)
        dup[:, 1:] = vals[:, 1:] == vals[:, :-1]
        vals = vals.masked_fill(dup, n).sort(-1).values  # a shared key a stratum met: once
        cols[0, h] = vals.to(torch.int32)
        count[0, h] = (vals < n).sum(-1).to(torch.int32)
    return cols, count


def tiles_only_index(q, k):
    """A built index with only relative tiles: ``vertical_slash(1, 64)``, its one column dropped.
    :func:`with_lists` gives it each block's key list (the probe's layout)."""
    base = mk.build_index(q, k, [mk.HeadPattern.vertical_slash(1, 64)] * q.shape[1], validate=False)
    return dataclasses.replace(base, col_count=torch.zeros_like(base.col_count))


def with_lists(tiles_only, cols: torch.Tensor, count: torch.Tensor):
    """``tiles_only`` with the per-block lists in ``cols`` / ``col_count``."""
    return dataclasses.replace(tiles_only, cols=cols, col_count=count)


def per_block_mask(tiles_only, cols: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``bool [1, H, n_q, n_kv]``: the relative tiles' pairs plus each block's listed keys."""
    mask = index_mask(tiles_only)
    n, nk = mask.shape[2], mask.shape[3]
    for m in range(cols.shape[2]):
        r0, r1 = m * BLOCK, min(n, (m + 1) * BLOCK)
        for h in range(cols.shape[1]):
            keys = cols[0, h, m, : int(count[0, h, m])].long()
            keys = keys[keys < nk]
            mask[0, h, r0:r1, keys] = True
    return mask


def check_probe(
    probe,
    hq: int,
    hkv: int,
    n: int,
    d: int,
    device,
    dtype=torch.bfloat16,
    tol: float = 2e-2,
    density: float = 0.6,
) -> dict:
    """The probe against float64 attention over its mask, at a small odd ``n``; raises past
    ``tol`` (largest error relative to the largest output)."""
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (
        torch.randn(1, h, n, d, generator=g, device=device).to(dtype) for h in (hq, hkv, hkv)
    )
    tiles_only = tiles_only_index(q, k)
    vv = v.double().repeat_interleave(hq // hkv, 1)
    s = (q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * d**-0.5
    out = {}
    for shared in (0.0, 0.5):
        cols, count = block_key_lists(hq, n, density, shared, device)
        got = probe.attend(q, k, v, with_lists(tiles_only, cols, count), d**-0.5).double()
        mask = per_block_mask(tiles_only, cols, count)
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        out[f"shared {shared:g}"] = dict(max_rel_err=err, listed=int(count.sum()))
        if not err < tol:
            raise AssertionError(f"probe disagrees with float64 attention: {err} (shared {shared})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--densities", default="0.02,0.03,0.045,0.06", help="gathered-key densities")
    ap.add_argument("--tile-fracs", default="0.04,0.06,0.09", help="block_sparse shares")
    ap.add_argument("--probe-densities", default="0.02,0.045,0.07,0.1", help="keys per block")
    ap.add_argument("--shared", default="0,0.5,0.8", help="shares of per-head keys in those lists")
    ap.add_argument("--estimate-density", type=float, default=0.045)
    ap.add_argument("--chunk", type=int, default=64, help="query blocks per estimation GEMM")
    a = ap.parse_args()
    n = a.n
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, n, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    causal_flops = 4 * D * HQ * n * (n + 1) / 2
    rows: dict[str, list] = {}
    for d in filter(None, a.densities.split(",")):
        rows[f"gathered keys {float(d):g}"] = [
            mk.HeadPattern.vertical_slash(round(float(d) * n), 64)
        ] * HQ
    for f in filter(None, a.tile_fracs.split(",")):
        t = max(1, math.ceil(float(f) * n / BLOCK))
        rows[f"tiles {float(f):g}"] = [mk.HeadPattern.block_sparse(t)] * HQ

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=400, return_mode="median")

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cudnn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=True
    )
    info, idxs = {}, {}
    for name, heads in rows.items():
        idx = mk.build_index(q, k, heads, validate=False)
        dens = mk.index_density(idx, list(range(0, idx.num_blocks, 37))).mean().item()
        cc = idx.col_count[0].float()  # [H, MB]: gathered keys per block
        info[name] = dict(density=dens, mean_gathered_per_block=cc.mean().item())
        idxs[name] = idx
        print(f"{name}: density {dens:.4f}, gathered keys per block {cc.mean().item():.0f}",
              flush=True)  # fmt: skip
    probe = probe_kernel()
    checks = check_probe(probe, 8, 2, 1000, D, q.device)
    print(f"probe against float64 attention: {checks}", flush=True)
    mb = -(-n // BLOCK)
    rows_in_block = torch.full((mb,), BLOCK, dtype=torch.float64, device=q.device)
    rows_in_block[-1] = n - BLOCK * (mb - 1)
    probes: dict[str, mk.SparseIndex] = {}
    tiles_only = tiles_only_index(q, k)  # the relative tiles every list is added to
    tile_pairs = mk.index_density(tiles_only).mean().item() * n * (n + 1) / 2
    for d in filter(None, a.probe_densities.split(",")):
        for sh in filter(None, a.shared.split(",")):
            name = f"keys per block {float(d):g}, shared {float(sh):g}"
            cols, count = block_key_lists(HQ, n, float(d), float(sh), q.device)
            listed = (count[0].double() * rows_in_block).sum(-1).mean().item()  # per head
            dens = (tile_pairs + listed) / (n * (n + 1) / 2)
            cc = count[0].float()
            info[name] = dict(density=dens, mean_gathered_per_block=cc.mean().item())
            probes[name] = with_lists(tiles_only, cols, count)
            print(f"{name}: density {dens:.4f}, listed keys per block {cc.mean().item():.0f}",
                  flush=True)  # fmt: skip
    runs: dict[str, list] = {name: [] for name in [*rows, *probes]}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        bench(cudnn)
        for r in range(a.rounds):
            for name, heads in rows.items():
                idx = idxs[name]
                t_c = bench(cudnn)
                t_k = bench(lambda: attention_triton.attend(q, k, v, idx, D**-0.5))
                t_p = bench(lambda: mk.sparse_prefill(q, k, v, heads, validate=False))
                runs[name].append(dict(cudnn_ms=t_c, kernel_ms=t_k, pipeline_ms=t_p))
            for name, pidx in probes.items():
                t_c = bench(cudnn)
                t_k = bench(lambda: probe.attend(q, k, v, pidx, D**-0.5))
                runs[name].append(dict(cudnn_ms=t_c, kernel_ms=t_k))
            print(f"round {r + 1}/{a.rounds} done", flush=True)
    log: dict = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        args=vars(a), n=n, heads=HQ, kv_heads=HKV, head_dim=D, rows={}, estimate={},
    )  # fmt: skip
    for name, rs in runs.items():
        med = {key: statistics.median(x[key] for x in rs) for key in rs[0]}
        kr = [x["cudnn_ms"] / x["kernel_ms"] for x in rs]
        dens = info[name]["density"]
        log["rows"][name] = dict(
            **info[name], runs=rs, **med, kernel_ratio=statistics.median(kr),
            kernel_tflops_kept=causal_flops * dens / med["kernel_ms"] / 1e9,
            cudnn_tflops=causal_flops / med["cudnn_ms"] / 1e9,
        )  # fmt: skip
        x = log["rows"][name]
        line = (f"{name:36s} density {dens:.4f} kernel {med['kernel_ms']:.2f} ms "
                f"({x['kernel_ratio']:.2f}x, {x['kernel_tflops_kept']:.0f} TF/s kept)")  # fmt: skip
        if "pipeline_ms" in med:
            x["pipeline_ratio"] = statistics.median(t["cudnn_ms"] / t["pipeline_ms"] for t in rs)
            line += f" pipeline {med['pipeline_ms']:.2f} ms ({x['pipeline_ratio']:.2f}x)"
        print(f"{line}; cuDNN {med['cudnn_ms']:.1f} ms ({x['cudnn_tflops']:.0f} TF/s)", flush=True)
    log["probe_checks"] = checks
    del idxs, probes
    torch.cuda.empty_cache()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for groups in (1, 4):
            for select in (False, True):
                t_c = bench(cudnn)
                t_e = bench(lambda: pooled_topk(q, k, a.estimate_density, groups, a.chunk, select))
                key = f"G={groups}" + (" + top-k" if select else " GEMM")
                log["estimate"][key] = dict(ms=t_e, cudnn_ms=t_c, share_of_cudnn=t_e / t_c)
                print(f"estimate {key}: {t_e:.2f} ms = {t_e / t_c:.4f} of cuDNN's {t_c:.1f} ms",
                      flush=True)  # fmt: skip
    write_json(f"{a.out}/block_keys_cost.json", log)


if __name__ == "__main__":
    main()
