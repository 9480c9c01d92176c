"""Block scoring on real heads: which estimate of "where a query block's attention goes" picks
the key blocks the attention really uses? (CPU; captured Q/K of a trained model.)

For each head of each captured layer, the true attention of every row is summed per (query block,
key block) of 64; a scorer ranks the key blocks of each query block, the top ``K`` are kept (the
diagonal block always, the first key block too where marked ``+sink``), and the recall is the
attention mass of all rows inside the kept blocks. The **oracle** ranks by the true mass (the best
any block selection can do at that budget); ``oracle+sink`` is the oracle made to keep key block 0
(what forcing the sink block costs even a perfect ranking). Scorers:

* ``pooled``: mean-pooled q . mean-pooled k (minference's estimator before v0.3, MInference's);
* ``pooled+sink``: the same with key block 0 always kept (``scoring="pooled"``, the default);
* ``flex``: softmax over the pooled scores (FlexPrefill's query-aware estimate), key block 0 kept
  (the softmax keeps each row's order: it ranks as ``pooled+sink``);
* ``antidiag(S)``: XAttention's strided antidiagonal scoring with stride S (the sum of q_i . k_j
  over the antidiagonals of each S x S sub-block, softmax over the strided rows, summed per
  block), key block 0 kept;
* ``sampled(r)+sink``: the exact softmax attention of ``r`` rows of each query block spread over
  the block (every ``64 / r``-th row, the last one the block's last row), summed per key block,
  key block 0 kept (``scoring="sampled"`` before v0.3.0-f);
* ``sampled(r)``: the same without forcing key block 0 (``scoring="sampled"`` since v0.3.0-f: the
  sampled rows see the sinks themselves).

The summary also gives each scorer's estimate FLOPs as a share of the dense causal layer's
(``4 D`` per causal pair: ``q k^T`` and ``p v``): ``r / 128`` for ``sampled(r)`` (``2 D`` per
sampled row and causal key), ``1 / (2 S)`` for ``antidiag(S)`` (``2 S D`` per pair of strided
rows), ``1 / (2 * 64^2)`` for the pooled ones (``2 D`` per causal block pair; pooling not counted).

    python benchmarks/block_scoring.py --heads DIR --out benchmarks/results/block_scoring_smollm2_8k.json

``DIR`` holds ``*.pt`` files with ``q [1, Hq, N, D]``, ``k [1, Hkv, N, D]`` and ``scale`` (written
by ``benchmarks/real_heads.py --save-qk DIR``, or by this script first with ``--capture MODEL``:
one forward pass of ``MODEL`` over ``--n`` tokens of the calibration text, the layers of
``--layers``, sliding-window layers skipped), or ``--structured PROFILES``: heads of
``minference_kernels.synthetic.structured_qkv`` (one file per profile, e.g. ``real,legacy``: the
generator calibrated against SmolLM2's captured heads, and the original one; 8 query / 2 KV heads,
head dim 64, ``--n`` tokens).

    python benchmarks/block_scoring.py --capture smollm2-135m --layers 0,1,2,5,10,15,20,25,29 \
        --heads /tmp/qk_smollm2 --out benchmarks/results/block_scoring_smollm2_8k.json
    python benchmarks/block_scoring.py --capture gemma3-270m \
        --heads /tmp/qk_gemma3 --out benchmarks/results/block_scoring_gemma3_8k.json
    python benchmarks/block_scoring.py --structured real,legacy \
        --heads /tmp/qk_structured --out benchmarks/results/block_scoring_structured_8k.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _provenance import write_json

B = 64


def block_mass(q, k, scale):
    """``[MB, MB]`` true attention mass per (query block, key block), summed over rows."""
    n = q.shape[0]
    mb = n // B
    out = torch.zeros(mb, mb)
    for r0 in range(0, n, 1024):
        r1 = min(n, r0 + 1024)
        s = q[r0:r1] @ k.T * scale
        causal = torch.arange(n)[None, :] <= torch.arange(r0, r1)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        out[r0 // B : r1 // B] = p.view(r1 - r0, mb, B).sum(-1).view((r1 - r0) // B, B, mb).sum(1)
    return out


def score_pooled(q, k, scale):
    mb = q.shape[0] // B
    return q.view(mb, B, -1).mean(1) @ k.view(mb, B, -1).mean(1).T * scale


def score_flex(q, k, scale):
    s = score_pooled(q, k, scale)
    mb = s.shape[0]
    causal = torch.arange(mb)[None, :] <= torch.arange(mb)[:, None]
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1)


def score_antidiag(q, k, scale, stride):
    n, d = q.shape
    m = n // stride
    qr = q.view(m, stride, d).flip(1).reshape(m, stride * d)
    kr = k.view(m, stride, d).reshape(m, stride * d)
    s = qr @ kr.T * (scale / stride)
    causal = torch.arange(m)[None, :] <= torch.arange(m)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    g = B // stride
    mb = n // B
    return p.view(mb, g, mb, g).sum((1, 3))


def score_sampled(q, k, scale, r):
    n = q.shape[0]
    mb = n // B
    rows = (torch.arange(mb)[:, None] * B + torch.arange(B // r - 1, B, B // r)[None, :]).flatten()
    s = q[rows] @ k.T * scale
    causal = torch.arange(n)[None, :] <= rows[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return p.view(mb, r, mb, B).sum((1, 3))


def flops_of_dense(name: str) -> float | None:
    """A scorer's estimate FLOPs as a share of the dense causal layer's (module doc)."""
    arg = name.split("(")[1].split(")")[0] if "(" in name else None
    if name.startswith("sampled"):
        return int(arg) / (2 * B)
    if name.startswith("antidiag"):
        return 1 / (2 * int(arg))
    if name.startswith("oracle"):
        return None
    return 1 / (2 * B**2)


def recall_at(score, mass, k, sink: bool):
    mb = mass.shape[0]
    causal = torch.arange(mb)[None, :] <= torch.arange(mb)[:, None]
    rank = score.masked_fill(~causal, float("-inf")).clone()
    rank[torch.eye(mb, dtype=torch.bool)] = float("inf")
    if sink:
        rank[1:, 0] = torch.finfo(rank.dtype).max
    top = rank.topk(min(k, mb), -1).indices
    keep = torch.zeros(mb, mb, dtype=torch.bool).scatter_(1, top, True) & causal
    return float((mass * keep).sum() / mass.sum()), float(
        keep.sum() * B * B / (mb * mb * B * B / 2)
    )


def capture(model: str, n: int, layers: str | None, out_dir: str) -> str:
    """Save the post-RoPE q / k (float16) and scale of ``model``'s layers to ``out_dir/L<i>.pt``
    (as ``real_heads.py --save-qk``, without its search); returns a description for the result."""
    from minference_hf.capture import capture_qkv
    from minference_hf.models import load_model
    from minference_hf.patching import _attention_modules, _sliding_layer_ids, attention_shape
    from minference_hf.texts import real_token_ids, text_fingerprint

    lm = load_model(model, device="cpu")
    scales = [m.scaling for m in _attention_modules(lm.model) if hasattr(m, "scaling")]
    scale = float(scales[0]) if scales else attention_shape(lm.model).head_dim ** -0.5
    tok = lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + real_token_ids(tok, n - len(bos), "calibration")
    sliding = set(_sliding_layer_ids(lm.model))
    want = None if not layers else {int(x) for x in layers.split(",")}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    kept = []
    for c in capture_qkv(lm.model, torch.tensor([ids])):
        if c.layer in sliding or (want is not None and c.layer not in want):
            continue
        torch.save({"q": c.q.half(), "k": c.k.half(), "scale": scale},
                   Path(out_dir) / f"L{c.layer:02d}.pt")  # fmt: skip
        kept.append(c.layer)
    return (f"{lm.name}, {len(ids)} tokens of {text_fingerprint('calibration')}, layers "
            f"{','.join(map(str, kept))} (captured by block_scoring.py --capture)")  # fmt: skip


def structured(profiles: str, n: int, out_dir: str) -> str:
    """Save ``structured_qkv`` heads of each profile to ``out_dir/<profile>.pt``; a description."""
    from minference_kernels.synthetic import structured_qkv

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for prof in profiles.split(","):
        q, k, _ = structured_qkv(1, 8, 2, n, 64, profile=prof, seed=0)
        torch.save({"q": q.half(), "k": k.half(), "scale": 64**-0.5}, Path(out_dir) / f"{prof}.pt")
    return (f"minference_kernels.synthetic.structured_qkv(1, 8, 2, {n}, 64, seed=0), profiles "
            f"{profiles} (written by block_scoring.py --structured)")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", required=True)
    ap.add_argument("--ks", default="4,8,16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--capture", metavar="MODEL", help="capture MODEL's q/k into --heads first")
    ap.add_argument("--n", type=int, default=8192, help="tokens of the capture")
    ap.add_argument("--layers", help="layers of the capture (default: every non-sliding layer)")
    ap.add_argument("--structured", metavar="PROFILES", help="write structured heads into --heads")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = args.heads
    if args.capture:
        source = capture(args.capture, args.n, args.layers, args.heads)
        print(source, flush=True)
    elif args.structured:
        source = structured(args.structured, args.n, args.heads)
        print(source, flush=True)
    ks = [int(x) for x in args.ks.split(",")]
    rows = []
    for path in sorted(Path(args.heads).glob("*.pt")):
        d = torch.load(path)
        q, k, scale = d["q"][0].float(), d["k"][0].float(), float(d["scale"])
        hq, n, _ = q.shape
        n = n // B * B
        g = hq // k.shape[0]
        for h in range(hq):
            qh, kh = q[h, :n], k[h // g, :n]
            mass = block_mass(qh, kh, scale)
            scorers = {
                "oracle": (mass, False),
                "oracle+sink": (mass, True),
                "pooled": (score_pooled(qh, kh, scale), False),
                "pooled+sink": (score_pooled(qh, kh, scale), True),
                "flex": (score_flex(qh, kh, scale), True),
                "antidiag(8)": (score_antidiag(qh, kh, scale, 8), True),
                "antidiag(16)": (score_antidiag(qh, kh, scale, 16), True),
            }
            for r in (1, 2, 4):
                sampled = score_sampled(qh, kh, scale, r)
                scorers[f"sampled({r})+sink"] = (sampled, True)
                scorers[f"sampled({r})"] = (sampled, False)
            for name, (sc, sink) in scorers.items():
                for kk in ks:
                    rec, dens = recall_at(sc, mass, kk, sink)
                    rows.append({"file": path.name, "head": h, "scorer": name, "k": kk,
                                 "recall": rec, "block_density": dens})  # fmt: skip
        print(f"{path.name}: done", flush=True)
    summary = {}
    for kk in ks:
        orc = {
            (r["file"], r["head"]): r["recall"]
            for r in rows
            if r["scorer"] == "oracle" and r["k"] == kk
        }
        for name in dict.fromkeys(r["scorer"] for r in rows):
            sel = [r for r in rows if r["scorer"] == name and r["k"] == kk]
            ratio = [r["recall"] / orc[(r["file"], r["head"])] for r in sel]
            summary[f"{name}@{kk}"] = {
                "flops_of_dense": flops_of_dense(name),
                "recall_mean": sum(r["recall"] for r in sel) / len(sel),
                "recall_min": min(r["recall"] for r in sel),
                "of_oracle_mean": sum(ratio) / len(ratio),
                "of_oracle_min": min(ratio),
                "worst_head": "{file}:{head}".format(**sel[ratio.index(min(ratio))]),
            }
            s = summary[f"{name}@{kk}"]
            print(f"K={kk:>2} {name:>13}: recall {s['recall_mean']:.3f} (min {s['recall_min']:.3f}); "
                  f"of oracle {s['of_oracle_mean']:.3f} (min {s['of_oracle_min']:.3f}, {s['worst_head']})")  # fmt: skip
    write_json(args.out, {"benchmark": "block_scoring", "heads": source,
                          "summary": summary, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
