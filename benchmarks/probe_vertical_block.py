"""GPU probe: a hybrid index of global columns and per-block tiles, timed beside the Llama-3.1 config.

``block_oracle.py`` finds that on real heads the vertical-slash estimate's columns plus block-sparse
tiles chosen per query block (``cols + pooled``) reach the config's recall at well under its
computed pairs, while block-sparse tiles alone do not. The shipped kernel can run such an index
(columns and absolute tiles are both index parts) except for one thing: a key that is both a column
and inside a selected tile would be counted twice. This probe measures what the hybrid would cost
before any product change: it builds the index from the public estimators (columns from
``estimate_vertical_slash(num_slash=1)``, tiles from ``estimate_block_sparse``, pooled) and runs a
*probe variant* of the shipped attention kernel, generated at run time from its source, that masks
column keys out of the absolute tiles (a per-head int8 column map). It checks that variant against
an exact masked softmax on small odd shapes, then times, interleaved with cuDNN at ``--n`` on
``bench_layer``'s heads: the config's pipeline, block-sparse alone at each ``--topks``, and the
hybrid at each (``--columns``), and for one budget its time split into the column scores, the
block estimate, the whole index and the kernel (with and without the column mask). Only tiles
that hold a column take the masked path (a per-tile flag). Recall on ``bench_layer``'s
sample rows; density over their whole blocks. Not a shipped path.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \\
        python benchmarks/probe_vertical_block.py --out DIR [--profile legacy] [--n 131072]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import statistics
import sys
import tempfile
from pathlib import Path

import minference_kernels as mk
import minference_patterns as mp
import torch
import triton
from _provenance import write_json
from bench_layer import CONFIG_ID, HQ, dense_probs, sample_rows, structured_layer
from minference_kernels.index import BLOCK, sorted_unique
from minference_kernels.ops import attention_triton, index_build
from minference_kernels.ops.attention import index_mask
from minference_kernels.ops.block_select import block_topk
from minference_kernels.ops.vs_scores import vs_scores

# (old, new) text edits that turn the shipped kernel module into the probe variant
_EDITS = (
    ("from .._validate import", "from minference_kernels._validate import"),
    ("from ..index import", "from minference_kernels.index import"),
    ("from ._triton_common import", "from minference_kernels.ops._triton_common import"),
    ("    ABS_CNT,\n    SINK,", "    ABS_CNT,\n    COLMAP,\n    ABS_FLAG,\n    SINK,"),
    (
        "    HAS_SOFTCAP: tl.constexpr,\n):",
        "    HAS_SOFTCAP: tl.constexpr,\n    SKIP_COLS: tl.constexpr,\n):",
    ),
    (
        "            need = (st + BLOCK_N - 1 > a0) | (st + BLOCK_N > Nk)\n"
        "        else:\n            need = True\n        if need:",
        "            need = (st + BLOCK_N - 1 > a0) | (st + BLOCK_N > Nk)\n"
        "        else:\n            need = True\n"
        "        if SKIP_COLS:\n"
        "            flag = tl.load(ABS_FLAG + (bh * MB + m).to(tl.int64) * n_abs + t)\n"
        "            if flag != 0:\n"
        "                hit = tl.load(COLMAP + bh.to(tl.int64) * Nk + offs_n, mask=kv_ok, other=0)\n"
        "                s = tl.where(hit[None, :] == 0, s, float('-inf'))\n"
        "        if need:",
    ),
    (
        "softcap: float | None = None, **cfg",
        "softcap: float | None = None, colmap=None, absflag=None, **cfg",
    ),
    (
        "            index.abs_count,\n            index.sink,",
        "            index.abs_count,\n            index.abs_count if colmap is None else colmap,\n"
        "            index.abs_count if colmap is None else absflag,\n"
        "            index.sink,",
    ),
    (
        "        HAS_SOFTCAP=softcap is not None,\n",
        "        HAS_SOFTCAP=softcap is not None,\n        SKIP_COLS=colmap is not None,\n",
    ),
)


def probe_kernel():
    """The shipped attention module with the column map added (written to a temporary file:
    Triton compiles from source files)."""
    src = inspect.getsource(attention_triton)
    for old, new in _EDITS:
        if src.count(old) != 1:
            raise RuntimeError(
                f"the kernel source changed; the probe edit no longer applies: {old!r}"
            )
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / "probe_attention_triton.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("probe_attention_triton", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def hybrid_index(q, k, columns: int, top_k: int):
    """Columns (the top ``columns`` of the vertical-slash estimate's column scores, last 64
    queries) + pooled block-sparse tiles (``top_k`` per query block), through the passes
    ``build_index`` runs (no input validation), and the column map with, per absolute tile, a
    flag: whether it holds a column (only those tiles take the masked path).
    Returns ``(index, colmap [B, H, Nk] int8, absflag [B, H, MB, A] int8)``."""
    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    be = "triton" if q.is_cuda else "torch"
    vert, _ = vs_scores(q, k, 64, q.shape[-1] ** -0.5, be)
    v = vert.topk(min(columns, n), -1).indices
    blocks = block_topk(q, k, min(top_k, -(-n // BLOCK)), BLOCK, backend=be)
    tiles, count = index_build.block_sparse_pieces(blocks, BLOCK, n, n, ascending=True)
    cols, total = sorted_unique(v, distinct=True)
    idx = index_build.assemble(
        batch=b, heads=h, n_q=n, n_kv=n, device=q.device, cols=cols, col_total=total,
        abs_tiles=tiles, abs_count=count,
    )  # fmt: skip
    colmap = torch.zeros((b, h, n), dtype=torch.int8, device=q.device)
    colmap.scatter_(2, v, torch.ones_like(v, dtype=torch.int8))
    nt = -(-n // BLOCK)
    has_col = torch.nn.functional.pad(colmap, (0, nt * BLOCK - n)).view(b, h, nt, BLOCK).amax(-1)
    at = idx.abs_tiles.long()
    flag = has_col.gather(2, (at // BLOCK).clamp(0, nt - 1).flatten(2)).view_as(at)
    return idx, colmap, flag.contiguous()


def check_small(kern, device) -> list[dict]:
    """The probe kernel against an exact masked softmax over the index's pairs (odd shapes)."""
    out = []
    for n, hq, hkv, d, cols, top_k in ((1000, 4, 2, 64, 40, 3), (777, 2, 1, 96, 30, 2)):
        g = torch.Generator().manual_seed(n)
        q, k, v = (
            torch.randn(1, h, n, d, generator=g).to(device, torch.float16) for h in (hq, hkv, hkv)
        )
        k[:, :, 5] *= 4  # a heavy column inside key tile 0, which every block keeps
        idx, colmap, flag = hybrid_index(q, k, cols, top_k)
        # the map marks the columns (distinct, at most ``cols`` per head); a tile's flag says
        # whether it holds one
        assert int(colmap.sum()) == int(idx.cols.lt(n).sum()) <= hq * cols
        tiles = idx.abs_tiles.long().clamp(0, n - 1)
        holds = (
            colmap.gather(
                2,
                (tiles[..., None] + torch.arange(BLOCK, device=device)).clamp(0, n - 1).flatten(2),
            )
            .view(*tiles.shape, BLOCK)
            .amax(-1)
        )
        valid = torch.arange(tiles.shape[-1], device=device) < idx.abs_count[..., None]
        assert torch.equal(flag.bool() & valid, holds.bool() & valid)
        mask = index_mask(idx)[0]
        kr, vr = (x.float().repeat_interleave(hq // hkv, 1)[0] for x in (k, v))
        s = (q.float()[0] @ kr.transpose(-1, -2) * d**-0.5).masked_fill(~mask, -math.inf)
        ref = torch.softmax(s, -1) @ vr
        err = (
            (kern.attend(q, k, v, idx, d**-0.5, colmap=colmap, absflag=flag)[0].float() - ref)
            .abs()
            .max()
        )
        twice = (kern.attend(q, k, v, idx, d**-0.5)[0].float() - ref).abs().max()
        out.append(
            dict(n=n, hq=hq, hkv=hkv, d=d, max_err=err.item(), max_err_unmasked=twice.item())
        )
        print(out[-1], flush=True)
        if err > 2e-2:
            raise AssertionError(f"probe kernel wrong: {out[-1]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--profile", default="legacy")
    ap.add_argument("--topks", default="48,56,64,80")
    ap.add_argument("--columns", default="128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--check",
        action="store_true",
        help="only check the probe kernel and index on small shapes (CUDA, or the CPU under "
        "TRITON_INTERPRET=1) and exit",
    )
    a = ap.parse_args()
    kern = probe_kernel()
    if a.check:
        check_small(kern, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        print("the probe kernel matches the exact masked softmax")
        return
    dev = torch.device("cuda")
    log: dict = dict(
        args=vars(a), device=torch.cuda.get_device_name(), small=check_small(kern, dev)
    )
    n = a.n
    q, k, v = structured_layer(n, a.profile)
    scale = q.shape[-1] ** -0.5
    rows = sample_rows(n)
    p = dense_probs(q, k, rows)
    blocks = sorted(set((rows // BLOCK).tolist()))

    def quality(idx) -> dict:
        pairs = causal = 0
        for m in blocks:
            r = torch.arange(m * BLOCK, min((m + 1) * BLOCK, n), device=dev)
            pairs += index_mask(idx, r)[0].sum().item() / idx.sink.shape[1]
            causal += (r + 1).sum().item()
        return dict(
            density=pairs / causal, recall=(p * index_mask(idx, rows)[0]).sum(-1).mean().item()
        )

    cfg = list(mp.load(CONFIG_ID).heads_for_layer(0, n))
    meth = {"llama3.1-config": lambda: mk.sparse_prefill(q, k, v, cfg, validate=False)}
    info = {"llama3.1-config": quality(mk.build_index(q, k, cfg, validate=False))}
    for t in (int(x) for x in a.topks.split(",")):
        heads = [mk.HeadPattern.block_sparse(t)] * HQ
        meth[f"block_sparse({t})"] = lambda h=heads: mk.sparse_prefill(q, k, v, h, validate=False)
        info[f"block_sparse({t})"] = quality(mk.build_index(q, k, heads, validate=False))
        for c in (int(x) for x in a.columns.split(",")):
            name = f"cols({c}) + pooled({t})"

            def run(c=c, t=t):
                idx, colmap, flag = hybrid_index(q, k, c, t)
                return kern.attend(q, k, v, idx, scale, colmap=colmap, absflag=flag)

            meth[name] = run
            info[name] = quality(hybrid_index(q, k, c, t)[0])
        print({m: info[m] for m in info if str(t) in m}, flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=400, return_mode="median")

    def cudnn():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )

    runs: dict = {m: [] for m in meth}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        bench(cudnn)
        for r in range(a.rounds):
            for name, fn in meth.items():
                t_c, t_m = bench(cudnn), bench(fn)
                runs[name].append(dict(cudnn_ms=t_c, ms=t_m, ratio=t_c / t_m))
            print(f"round {r + 1}/{a.rounds}", flush=True)
    split = {}
    for c in (int(x) for x in a.columns.split(",")):
        t = int(a.topks.split(",")[len(a.topks.split(",")) // 2])
        idx, colmap, flag = hybrid_index(q, k, c, t)
        be = "triton"
        split[f"cols({c}) + pooled({t})"] = dict(
            column_scores_ms=bench(lambda: vs_scores(q, k, 64, scale, be)),
            block_estimate_ms=bench(lambda: block_topk(q, k, t, BLOCK, backend=be)),
            whole_index_ms=bench(lambda: hybrid_index(q, k, c, t)),
            kernel_ms=bench(lambda: kern.attend(q, k, v, idx, scale, colmap=colmap, absflag=flag)),
            kernel_unmasked_ms=bench(lambda: kern.attend(q, k, v, idx, scale)),
        )
        print(split, flush=True)
    log.update(n=n, profile=a.profile, split=split, methods={})
    for name, rs in runs.items():
        log["methods"][name] = dict(
            **info[name], runs=rs, ms=statistics.median(x["ms"] for x in rs),
            ratio_median=statistics.median(x["ratio"] for x in rs),
        )  # fmt: skip
        d = log["methods"][name]
        print(
            f"{name:26s} {d['ms']:7.2f} ms  x{d['ratio_median']:5.2f}  density {d['density']:.4f}"
            f"  recall {d['recall']:.3f}",
            flush=True,
        )
    write_json(Path(a.out) / f"probe_vertical_block_{a.profile}.json", log)


if __name__ == "__main__":
    main()
