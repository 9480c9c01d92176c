"""Where the vertical-slash kernel's time goes: loading K/V tiles or multiplying them (issue 20).

The shipped Llama-3.1 config's index at 128K names about 2% of the causal pairs but computes about
11%, because each diagonal is computed inside a 64 x 64 relative tile. A kernel that computed only
the named pairs would still have to load, for each 64-row block, one K and one V row per row of
every scattered diagonal: ``density_by_profile.py`` counts those rows (``rows_named``) against the
rows the tile cover loads (``rows_tiles``), and the tiles load only 1.2-1.3x the rows the named
pairs need. So a cheaper way to compute scattered diagonals can only gain as much as the kernel's
time is arithmetic rather than loads. This script measures that split on the GPU, on the config's
real index (same heads, same tiles, same launch grid and settings as ``attention_triton.attend``):

* ``kernel``: the sparse attention kernel itself;
* ``loads``: the same loops and the same K/V loads (tensor descriptors where the kernel uses them,
  gathered columns), summed so that nothing is dropped, with no product and no softmax;
* ``math``: the same loops with the products and the online softmax, on one K/V tile loaded once
  per program (a runtime zero keeps the compiler from hoisting the products out of the loop);
* ``narrow``: the kernel's loops and loads, with each relative tile computed only in its four
  16 x 16 blocks on the tile's diagonal (3-D products; no masks), the columns as the kernel does:
  what a kernel computing isolated diagonals in 16-wide pieces would cost at most, if every tile
  were narrow;
* cuDNN's dense causal attention, for the ratios, each timed interleaved with the others.

The floor of any kernel that computes only the named pairs with these 64-row blocks is about
``loads * rows_named / rows_tiles``; ``kernel / loads`` says how far the present kernel is from it.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:benchmarks \
        python benchmarks/tile_floor.py --ns 131072 --out results/tile_floor_h200.json

CUDA only for timings; ``--check`` runs a tiny shape (also under ``TRITON_INTERPRET=1`` on the CPU)
and checks that the probes visit exactly the kernel's tiles and columns.
"""

from __future__ import annotations

import argparse
import time

import minference_kernels as mk
import torch
import triton
import triton.language as tl
from _provenance import write_json
from minference_kernels.index import BLOCK
from minference_kernels.ops import attention_triton
from minference_kernels.ops._triton_common import _load_rows, _online_update, _qk

LOADS, MATH, NARROW = 0, 1, 2
_SUB = 16  # NARROW: rows and keys of each block-diagonal piece of a tile
SUB = tl.constexpr(_SUB)  # the kernel's copy (a global a Triton kernel may read)
_SKIP: set = set()


@triton.jit
def _probe(
    Q, K, V, Out, Visits, DESC_K, DESC_V,
    sqh, sqn, skh, skn, svh, svn,
    REL, REL_END, COLS, COL_CNT, COV, n_rel, n_cols, n_cov,
    H, G, Nk, q_off, MB, zero,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One program per (64-row block, head), like the kernel (batch 1). ``MODE`` LOADS, MATH or
    NARROW (module doc). ``Visits[bh, m]``: tiles + column steps the program walked."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    m = MB - 1 - pid_m
    h = bh % H
    hk = h // G
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_D
    row_ok = offs_m < Nk - q_off
    a0 = m * BLOCK_M + q_off
    k_base = K + hk.to(tl.int64) * skh
    v_base = V + hk.to(tl.int64) * svh
    q = tl.load(
        Q + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # MATH: one tile (the block's own keys) loaded once
    k0 = _load_rows(k_base, a0 + offs_n0, a0 + offs_n0 < Nk, skn, offs_d, d_ok, 1)
    v0 = _load_rows(v_base, a0 + offs_n0, a0 + offs_n0 < Nk, svn, offs_d, d_ok, 1)
    t_end = tl.load(REL_END + bh * MB + m)
    for t in range(0, t_end):
        r = tl.load(REL + bh * n_rel + t)
        if MODE != 1:
            offs_n = a0 + r + offs_n0
            kv_ok = (offs_n >= 0) & (offs_n < Nk)
            if TMA:
                k = DESC_K.load([0, hk, a0 + r, 0]).reshape([BLOCK_N, BLOCK_D])
                v = DESC_V.load([0, hk, a0 + r, 0]).reshape([BLOCK_N, BLOCK_D])
            else:
                k = _load_rows(k_base, offs_n, kv_ok, skn, offs_d, d_ok, 1)
                v = _load_rows(v_base, offs_n, kv_ok, svn, offs_d, d_ok, 1)
            if MODE == 0:
                kk += k.to(tl.float32) + v.to(tl.float32)
            else:  # NARROW: only the tile's SUB x SUB blocks on its diagonal
                q3 = tl.reshape(q, [BLOCK_M // SUB, SUB, BLOCK_D])
                k3 = tl.permute(tl.reshape(k, [BLOCK_N // SUB, SUB, BLOCK_D]), (0, 2, 1))
                s = tl.reshape(tl.dot(q3, k3), [BLOCK_M, SUB])
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                p3 = tl.reshape(p.to(v.dtype), [BLOCK_M // SUB, SUB, SUB])
                pv = tl.dot(p3, tl.reshape(v, [BLOCK_N // SUB, SUB, BLOCK_D]))
                acc = acc * alpha[:, None] + tl.reshape(pv, [BLOCK_M, BLOCK_D])
                m_i = m_new
        else:
            k = k0 + (zero * r).to(k0.dtype)
            acc, m_i, l_i = _online_update(acc, m_i, l_i, _qk(q, k, False), v0, 1.0, False)
    c_cnt = tl.load(COL_CNT + bh * MB + m)
    for c0 in range(0, c_cnt, BLOCK_N):
        offs_c = c0 + offs_n0
        c_ok = offs_c < c_cnt
        if MODE != 1:
            cidx = tl.load(COLS + bh * n_cols + offs_c, mask=c_ok, other=0)
            cov = tl.load(
                COV + bh.to(tl.int64) * n_cov + (cidx - a0 + Nk + BLOCK_N), mask=c_ok, other=1
            )
            c_ok = c_ok & (cov == 0)
            k = _load_rows(k_base, cidx, c_ok, skn, offs_d, d_ok, 1)
            v = _load_rows(v_base, cidx, c_ok, svn, offs_d, d_ok, 1)
            if MODE == 0:
                kk += k.to(tl.float32) + v.to(tl.float32)
            else:
                s = tl.where(c_ok[None, :] & (cidx[None, :] <= offs_m[:, None] + q_off),
                             _qk(q, k, False), float("-inf"))  # fmt: skip
                acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, 1.0, False)
        else:
            k = k0 + (zero * offs_c[:, None]).to(k0.dtype)
            s = tl.where(c_ok[None, :], _qk(q, k, False), float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v0, 1.0, False)
    if MODE == 0:
        out = tl.sum(kk, 0)[None, :] + acc
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        Out + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )  # fmt: skip
    tl.store(Visits + bh * MB + m, t_end + (c_cnt + BLOCK_N - 1) // BLOCK_N)


def probe(q, k, v, idx: mk.SparseIndex, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the probe (batch 1, ``n_q == n_kv``, contiguous ``[1, H, N, D]``): ``(out, visits)``."""
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q)
    mb = idx.num_blocks
    visits = torch.zeros((hq, mb), dtype=torch.int32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    cfg = attention_triton.ATTN_CONFIG
    tma = bool(cfg["tma"]) and attention_triton._tma_ok(k) and attention_triton._tma_ok(v)
    desc_k, desc_v = attention_triton._kv_descriptors(k, v, BLOCK, block_d) if tma else (k, v)
    _probe[(mb, hq)](
        q, k, v, out, visits, desc_k, desc_v,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        idx.rel_tiles, idx.rel_end, idx.cols, idx.col_count, idx.cov,
        idx.rel_tiles.shape[-1], idx.cols.shape[-1], idx.cov.shape[-1],
        hq, hq // hkv, n, 0, mb, 0.0,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_M=BLOCK, BLOCK_N=BLOCK, MODE=mode, TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, visits


def check(device: str) -> None:
    """Tiny shape: the probes walk exactly the kernel's tiles and column steps, and the MATH probe's
    output is the softmax over copies of one tile (finite, rows sum-normalised)."""
    torch.manual_seed(0)
    n, hq, hkv, d = 300, 4, 2, 64
    dt = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, hq, n, d, device=device, dtype=dt)
    k = torch.randn(1, hkv, n, d, device=device, dtype=dt)
    v = torch.randn(1, hkv, n, d, device=device, dtype=dt)
    heads = [mk.HeadPattern.vertical_slash(20, 60)] * hq
    idx = mk.build_index(q, k, heads, backend="torch")
    want = (idx.rel_end + (idx.col_count + BLOCK - 1) // BLOCK)[0]
    for mode in (LOADS, MATH, NARROW):
        try:
            out, visits = probe(q, k, v, idx, mode)
        except Exception as e:  # the 3-D products may not compile on every Triton: time the rest
            if mode != NARROW:
                raise
            print(f"check: the NARROW probe did not run ({type(e).__name__}: {e}); not timed")
            _SKIP.add(NARROW)
            continue
        assert torch.equal(visits.cpu(), want.cpu().to(torch.int32)), (mode, visits, want)
        assert torch.isfinite(out.float()).all()
        if mode == NARROW:
            ref = narrow_reference(q, k, v, idx)
            err = (out.float() - ref).abs().max().item()
            assert err < (2e-2 if device == "cuda" else 1e-4), f"NARROW probe off by {err}"
    print("check: the probes visit the kernel's tiles and column steps", flush=True)


def narrow_reference(q, k, v, idx: mk.SparseIndex) -> torch.Tensor:
    """What the NARROW probe computes, in float64 loops (tiny shapes): per 64-row block, each relative
    tile's 16 x 16 diagonal blocks (keys outside ``[0, N)`` score 0 with value 0, no causal mask) and
    the uncovered columns (causal), softmax with base 2 and no scale. ``[1, H, N, D]`` float32."""
    _, hq, n, _ = q.shape
    g = hq // k.shape[1]
    qd, kd, vd = (x[0].double().cpu() for x in (q, k, v))
    out = torch.zeros(q.shape[1:], dtype=torch.float64)
    rel, end = idx.rel_tiles[0].cpu(), idx.rel_end[0].cpu()
    cols, ccnt, cov = idx.cols[0].cpu(), idx.col_count[0].cpu(), idx.cov[0].cpu()
    for h in range(hq):
        kh, vh = kd[h // g], vd[h // g]
        for m in range(idx.num_blocks):
            a0 = m * BLOCK
            for i in range(min(BLOCK, n - a0)):
                keys, scores = [], []
                for t in range(int(end[h, m])):
                    for j in range(_SUB):
                        key = a0 + int(rel[h, t]) + _SUB * (i // _SUB) + j
                        ok = 0 <= key < n
                        keys.append(key if ok else -1)
                        scores.append(qd[h, a0 + i] @ kh[key] if ok else torch.tensor(0.0).double())
                for c in cols[h, : int(ccnt[h, m])].tolist():
                    if cov[h, c - a0 + n + BLOCK] == 0 and c <= a0 + i:
                        keys.append(c)
                        scores.append(qd[h, a0 + i] @ kh[c])
                if not keys:
                    continue
                w = torch.exp2(torch.stack(scores) - torch.stack(scores).max())
                vals = torch.stack([vh[c] if c >= 0 else torch.zeros_like(vh[0]) for c in keys])
                out[h, a0 + i] = (w[:, None] * vals).sum(0) / w.sum()
    return out[None].float().to(q.device)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="131072")
    ap.add_argument("--profiles", default="legacy,real")
    ap.add_argument("--out")
    ap.add_argument("--check", action="store_true", help="only the tiny check (CPU: interpreter)")
    a = ap.parse_args()
    if a.check:
        check("cuda" if torch.cuda.is_available() else "cpu")
        return
    import minference_patterns as mp
    from bench_layer import CONFIG_ID

    check("cuda")
    log: dict = dict(device=torch.cuda.get_device_name(), config=CONFIG_ID, rows=[])
    for n in (int(x) for x in a.ns.split(",")):
        heads = list(mp.load(CONFIG_ID).heads_for_layer(0, n))
        for profile in a.profiles.split(","):
            log["rows"].append(measure(n, profile, heads))
            if a.out:
                write_json(a.out, log)
            torch.cuda.empty_cache()


def measure(n: int, profile: str, heads: list) -> dict:
    """One layer of ``n`` tokens on ``profile``'s heads: the four times, interleaved (3 rounds)."""
    from bench_layer import D, structured_layer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = time.time()
    q, k, v = structured_layer(n, profile)
    idx = mk.build_index(q, k, heads, validate=False)
    fns = {
        "cudnn": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        ),
        "kernel": lambda: attention_triton.attend(q, k, v, idx, D**-0.5),
        "loads": lambda: probe(q, k, v, idx, LOADS),
        "math": lambda: probe(q, k, v, idx, MATH),
        "narrow": lambda: probe(q, k, v, idx, NARROW),
    }
    if NARROW in _SKIP:
        del fns["narrow"]
    times: dict[str, list[float]] = {name: [] for name in fns}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for _ in range(3):  # interleaved rounds
            for name, fn in fns.items():
                times[name].append(bench(fn))
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    dens = mk.index_density(idx, list(range(0, idx.num_blocks, 37))).mean().item()
    # count first: every tile and column step moves BLOCK K rows and BLOCK V rows (a column step's
    # masked tail moves fewer: an upper bound) and multiplies BLOCK x BLOCK pairs twice over D
    steps = int(probe(q, k, v, idx, LOADS)[1].sum().item())
    moved = steps * 2 * BLOCK * D * k.element_size()
    flops = steps * 4 * BLOCK * BLOCK * D
    rate = {
        "loads_tb_s": moved / med["loads"] / 1e9,
        "kernel_tb_s": moved / med["kernel"] / 1e9,
        "math_tflop_s": flops / med["math"] / 1e9,
        "kernel_tflop_s": flops / med["kernel"] / 1e9,
    }
    print(
        f"N={n} {profile}: cuDNN {med['cudnn']:.2f} ms, kernel {med['kernel']:.2f}, "
        f"loads only {med['loads']:.2f}, math only {med['math']:.2f}, "
        f"narrow {med.get('narrow', float('nan')):.2f} "
        f"(density {dens:.3f}; {time.time() - t0:.0f} s)\n"
        f"  {steps} steps, {moved / 1e9:.0f} GB moved: loads only {rate['loads_tb_s']:.2f} TB/s, "
        f"kernel {rate['kernel_tb_s']:.2f} TB/s; math only {rate['math_tflop_s']:.0f} TFLOP/s, "
        f"kernel {rate['kernel_tflop_s']:.0f} TFLOP/s on the computed tiles",
        flush=True,
    )
    return dict(n=n, profile=profile, ms=med, rounds=times, density=dens, steps=steps,
                bytes_moved=moved, tile_flops=flops, rates=rate)  # fmt: skip


if __name__ == "__main__":
    main()
