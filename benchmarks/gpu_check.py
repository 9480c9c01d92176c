"""GPU correctness grid (issue 2) + first timings (issue 3). One call on the device machine:

    PYTHONPATH=packages/minference-kernels/src python benchmarks/gpu_check.py --out $OUT

Prints a short table; writes the full log as JSON under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import minference_kernels as mk
import torch
import triton
from _provenance import write_json
from minference_kernels.ops import _triton_common, attention_triton, vs_scores_triton
from minference_kernels.synthetic import structured_qkv


def ref(q, k, v, mask, scale=None):
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    scale = scale or d**-0.5
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), 0.0)
    return p @ vv


def rel(o, r):
    return ((o.double() - r).norm() / r.norm().clamp_min(1e-30)).item()


DEV = "cuda"
T0 = time.time()
QUICK = False
# relative error allowed against float64, per input dtype
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def mixed_heads():
    """One head of every kind (repeat for more heads)."""
    return [
        mk.HeadPattern.vertical_slash(12, 20),
        mk.HeadPattern.a_shape(4, 70),
        mk.HeadPattern.block_sparse(2),
        mk.HeadPattern.dense(),
    ]


def run_case(log, check: str, case: dict, compute, tol: float):
    """``compute()`` gives a relative error; a raise or an error above ``tol`` is recorded in
    ``log["failures"]``. Returns ``(err, ok)``, or ``None`` when it raised."""
    try:
        err = compute()
    except Exception as ex:  # noqa: BLE001
        log["failures"].append({"check": check, **case, "why": repr(ex)[:300]})
        print(f"  {check} {case} failed {repr(ex)[:200]}", flush=True)
        return None
    ok = err <= tol
    if not ok:
        log["failures"].append({"check": check, **case, "err": err})
    print(f"  {check} {case} err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return err, ok


def grid(log):
    torch.manual_seed(0)
    worst = {}
    cases = list(
        itertools.product(
            [1, 17, 63, 64, 65, 200, 333], [(4, 4), (4, 2), (4, 1), (8, 1)], [64, 80, 96, 128]
        )
    )
    n_ok = 0
    for i, (n, (hq, hkv), d) in enumerate(cases):
        if QUICK and i % 5:
            continue
        if i % 20 == 0:
            print(
                f"  case {i}/{len(cases)} passed so far {n_ok} ({time.time() - T0:.0f}s)",
                flush=True,
            )
        b = 1 + i % 3
        nk = n + (i % 2) * 37  # every other case: continuation (Nq < Nk)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            if dt != torch.bfloat16 and i % 4:
                continue
            q = torch.randn(b, hq, n, d, device=DEV, dtype=dt)
            k = torch.randn(b, hkv, nk, d, device=DEV, dtype=dt)
            v = torch.randn(b, hkv, nk, d, device=DEV, dtype=dt)
            vi = torch.randint(0, nk, (b, hq, 9), device=DEV)
            si = torch.randint(0, nk, (b, hq, 6), device=DEV)
            bi = torch.randint(-1, -(-nk // 64), (b, hq, -(-n // 64), 3), device=DEV)
            heads = mixed_heads() * (hq // 4)
            res = {
                "vs": (
                    mk.vertical_slash_attention(q, k, v, vi, si),
                    mk.vertical_slash_mask(vi, si, n, n_kv=nk),
                ),
                "bs": (
                    mk.block_sparse_attention(q, k, v, bi),
                    mk.block_sparse_mask(bi, n, n_kv=nk),
                ),
                "stream": (
                    mk.streaming_attention(q, k, v, 5, 70),
                    mk.streaming_mask(5, 70, n, n_kv=nk, device=DEV),
                ),
                "dense": (mk.dense_attention(q, k, v), mk.dense_mask(n, n_kv=nk, device=DEV)),
                "layer": (mk.sparse_prefill(q, k, v, heads), mk.sparse_prefill_mask(q, k, heads)),
            }
            for name, (o, m) in res.items():
                e = rel(o, ref(q, k, v, m))
                key = (name, str(dt))
                worst[key] = max(worst.get(key, 0), e)
                tol = TOL[dt]
                ok = e < tol and torch.isfinite(o).all().item()
                n_ok += ok
                if not ok:
                    log["failures"].append(
                        dict(case=(b, hq, hkv, n, nk, d, str(dt)), fn=name, err=e)
                    )
    log["grid_worst"] = {f"{a}/{b}": v for (a, b), v in worst.items()}
    log["grid_passed"] = n_ok
    return worst


def check_32k(log):
    out = {}
    n, d = 32768, 128
    q, k, v = structured_qkv(1, 8, 2, n, d, dtype=torch.bfloat16, device=DEV, seed=1)
    rows = torch.cat(
        [torch.arange(0, 64), torch.randint(0, n, (128,)), torch.arange(n - 64, n)]
    ).cuda()
    vi, si = mk.estimate_vertical_slash(q, k, 500, 1000)
    vt, st = mk.estimate_vertical_slash(q, k, 500, 1000, backend="torch")
    out["est_vs_same_vertical_frac"] = (
        torch.tensor(
            [
                len(set(a.tolist()) & set(b.tolist())) / a.numel()
                for a, b in zip(vi.flatten(0, 1), vt.flatten(0, 1))
            ]
        )
        .mean()
        .item()
    )
    out["est_vs_same_slash_frac"] = (
        torch.tensor(
            [
                len(set(a.tolist()) & set(b.tolist())) / a.numel()
                for a, b in zip(si.flatten(0, 1), st.flatten(0, 1))
            ]
        )
        .mean()
        .item()
    )
    bi = mk.estimate_block_sparse(q, k, 16)
    heads = [mk.HeadPattern.vertical_slash(500, 1000)] * 4 + [
        mk.HeadPattern.block_sparse(16),
        mk.HeadPattern.a_shape(64, 1024),
        mk.HeadPattern.dense(),
        mk.HeadPattern.vertical_slash(100, 800),
    ]
    cases = {
        "vs": (
            lambda: mk.vertical_slash_attention(q, k, v, vi, si),
            lambda: mk.vertical_slash_mask(vi, si, n, query_rows=rows),
        ),
        "bs": (
            lambda: mk.block_sparse_attention(q, k, v, bi),
            lambda: mk.block_sparse_mask(bi, n, query_rows=rows),
        ),
        "stream": (
            lambda: mk.streaming_attention(q, k, v, 64, 1024),
            lambda: mk.streaming_mask(64, 1024, n, query_rows=rows, device=DEV),
        ),
        "dense": (
            lambda: mk.dense_attention(q, k, v),
            lambda: mk.dense_mask(n, query_rows=rows, device=DEV),
        ),
        "layer": (
            lambda: mk.sparse_prefill(q, k, v, heads),
            lambda: mk.sparse_prefill_mask(q, k, heads, query_rows=rows),
        ),
    }
    for name, (fn, mfn) in cases.items():
        o = fn()
        m = mfn()
        r = ref(q[:, :, rows], k, v, m)  # ref over sampled rows; mask already has Nk columns
        out[name] = rel(o[:, :, rows], r)
    log["check_32k"] = out
    return out


def big_head_dims(log):
    """Head dims above the tuned range (D = 192, 256; e.g. Gemma's 256): every kernel on odd shapes
    against float64 over the exact masks, and which pipeline depth each launch settled on (a
    launch that does not fit steps down, logged; ``_triton_common._FIT_STAGES``)."""
    torch.manual_seed(1)
    n_ok, worst = 0, 0.0
    # fp32 last: its large tiles compile slowly (and step down the most)
    for dt, d, (n, nk), lq in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32),
        (192, 256),
        ((333, 370), (1100, 1100)),
        (64, 128),
    ):
        b, hq, hkv = 2, 4, 2
        q = torch.randn(b, hq, n, d, device=DEV, dtype=dt)
        k = torch.randn(b, hkv, nk, d, device=DEV, dtype=dt)
        v = torch.randn(b, hkv, nk, d, device=DEV, dtype=dt)
        heads = mixed_heads()
        case = dict(d=d, dtype=str(dt), n=n, nk=nk, last_q=lq)

        def err(q=q, k=k, v=v, heads=heads, lq=lq):
            o = mk.sparse_prefill(q, k, v, heads, last_q=lq)
            if not torch.isfinite(o).all():
                return math.inf
            return rel(o, ref(q, k, v, mk.sparse_prefill_mask(q, k, heads, last_q=lq)))

        got = run_case(log, "big_head_dims", case, err, TOL[dt])
        if got is not None:
            worst, n_ok = max(worst, got[0]), n_ok + got[1]
    stages = {
        f"{k_[0]} {k_[2]} D={dict(k_[3]).get('HEAD_D')} asked {k_[4]}": depth
        for k_, depth in _triton_common._FIT_STAGES.items()
    }
    log["big_head_dims"] = {"passed": n_ok, "worst": worst, "stages": stages}
    return n_ok, worst, stages


def score_grid(log):
    """The Triton vertical-slash score pass against the PyTorch one at the largest ``last_q`` per
    pipeline depth, per dtype, D = 128 (shared memory grows with both; ``last_q = 128`` once asked
    240 KiB). Each (dtype, last_q) pair compiles its own kernels: keep the grid small."""
    from minference_kernels.ops.vs_scores import vs_scores_torch

    worst, n_ok = 0.0, 0
    for dt, lq, n in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32), (64, 128), (300, 4100)
    ):
        d = 128
        q, k, _ = structured_qkv(1, 4, 2, n, d, dtype=dt, device=DEV, seed=lq + n)
        case = dict(dtype=str(dt), last_q=lq, d=d, n=n)

        def err(q=q, k=k, lq=lq, d=d):
            vt, st = vs_scores_triton.vs_scores(q, k, lq, d**-0.5)
            vr, sr = vs_scores_torch(q, k, lq, d**-0.5)
            return max(
                ((vt - vr).abs().max() / vr.abs().max()).item(),
                ((st - sr).abs().max() / sr.abs().max()).item(),
            )

        got = run_case(log, "score_grid", case, err, 2e-3)
        if got is not None:
            worst, n_ok = max(worst, got[0]), n_ok + got[1]
    log["score_grid"] = {"passed": n_ok, "worst": worst}
    return n_ok, worst


def bench(log, ns):
    rows = []
    for n in ns:
        hq, hkv, d = 32, 8, 128
        q, k, v = structured_qkv(1, hq, hkv, n, d, dtype=torch.bfloat16, device=DEV, seed=2)
        flops_dense = 4 * n * n / 2 * d * hq

        def t(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t_cudnn = t(
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True
                )
            )
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_flash = t(
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True
                )
            )
        row = dict(
            n=n, cudnn_ms=t_cudnn, flash_ms=t_flash, cudnn_tflops=flops_dense / t_cudnn / 1e9
        )
        # our kernel with every tile (dense through the sparse kernel): kept-pair rate ceiling
        from minference_kernels._validate import check_qkv
        from minference_kernels.api import _dense_index

        dense_idx = _dense_index(check_qkv(q, k, v, check_values=False), q.device)
        row["ours_dense_ms"] = t(lambda: attention_triton.attend(q, k, v, dense_idx, d**-0.5))
        for nv, ns_ in [(1000, 6096), (512, 2048), (100, 800)]:
            heads = [mk.HeadPattern.vertical_slash(nv, ns_)] * hq
            total = t(lambda: mk.sparse_prefill(q, k, v, heads, validate=False))
            est = t(lambda: mk.build_index(q, k, heads, validate=False))
            idx = mk.build_index(q, k, heads, validate=False)
            kern = t(lambda: attention_triton.attend(q, k, v, idx, d**-0.5))
            blocks = list(range(0, idx.num_blocks, max(1, idx.num_blocks // 64)))
            dens = mk.index_density(idx, blocks).mean().item()
            row[f"vs{nv}_{ns_}"] = dict(
                total_ms=total,
                index_ms=est,
                kernel_ms=kern,
                density=dens,
                speedup=t_cudnn / total,
                kept_tflops=flops_dense * dens / kern / 1e9,
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    log["bench"] = rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ns", default="32768,65536,131072")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--cpu-grid", action="store_true", help="run the grid on CPU (torch path)")
    ap.add_argument("--quick", action="store_true", help="every 5th grid case, no timing table")
    ap.add_argument("--big-d", action="store_true", help="also head dims 192 and 256")
    ap.add_argument(
        "--attn-config",
        default="",
        help="JSON merged into the kernel launch config for this run, e.g. '{\"tma\": true}'",
    )
    a = ap.parse_args()
    if a.attn_config:
        attention_triton.ATTN_CONFIG.update(json.loads(a.attn_config))
        print("attention launch config:", attention_triton.ATTN_CONFIG, flush=True)
    QUICK = a.quick  # module global: grid() reads it
    if a.quick:
        a.ns = ""
    if a.cpu_grid:
        DEV = "cpu"
        log = {"failures": []}
        grid(log)
        print(log["grid_passed"], log["failures"][:5], log["grid_worst"])
        raise SystemExit(0)
    log = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "failures": [],
    }
    t0 = time.time()
    try:
        if not a.skip_grid:
            w = grid(log)
            print(
                "grid passed",
                log["grid_passed"],
                "failures",
                len(log["failures"]),
                f"{time.time() - t0:.0f}s",
            )
            for kk, vv in sorted(w.items()):
                print(f"  worst rel err {kk[0]:7s} {kk[1]:15s} {vv:.2e}")
            print("score grid (passed, worst):", score_grid(log), flush=True)
            print("32K:", check_32k(log), f"{time.time() - t0:.0f}s", flush=True)
        if a.big_d:  # also with --skip-grid
            print("head dims 192/256 (passed, worst, stages):", big_head_dims(log), flush=True)
        if a.ns:
            bench(log, [int(x) for x in a.ns.split(",")])
    finally:
        write_json(f"{a.out}/gpu_check.json", log, default=str)
    print("failures:", log["failures"][:10])
