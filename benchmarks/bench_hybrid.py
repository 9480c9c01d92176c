"""End-to-end pre-fill of a Gemma-3-shaped hybrid model (5 sliding-window layers : 1 global) on a GPU.

Run from the repository root on a CUDA machine (no download: the model is built from its config)::

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:packages/minference-hf/src \\
        python3 benchmarks/bench_hybrid.py --lengths 32768,65536,131072 --out results/hybrid.json

The model has Gemma-3-270M's shape (18 layers: 15 local with window 512 and 3 global; 4 query
heads / 1 KV head of dim 256; hidden 640; vocab 262144) with random weights, in bf16: the weights
do not change the work, only the sparse estimate's choices (accuracy is measured on the real
270M weights on the CPU, ``minference eval``). ``max_position_embeddings`` is raised to the
longest length. Per length, in one process, timed interleaved (``--repeats`` rounds of all modes):

* ``sdpa``: the unpatched model, ``attn_implementation="sdpa"`` as transformers users run it:
  local layers get a full ``[N, N]`` boolean window mask (SDPA's masked kernel, quadratic), global
  layers ``is_causal`` (flash / cuDNN);
* ``exact``: patched with a dense config: local layers through the streaming kernel (exact,
  ``O(N W)``), global layers dense (the same SDPA as above);
* ``sparse``: patched with ``vertical_slash(--vertical, --slash)`` on every global head (local
  layers as in ``exact``);
* ``sparse_softcap`` (with ``--softcap C``): ``sparse`` with ``attn_logit_softcapping=C`` (the
  cost of the cap in the kernels; the SDPA baseline cannot cap logits, so it has no twin).

Time to first token (one forward, last-position logits only) and its split into local-layer
attention, global-layer attention and the rest (CUDA events around each attention module), peak
memory. ``--check N`` first compares ``exact`` with ``sdpa`` at N tokens (last 256 positions'
logits; the streaming kernel and SDPA's masked kernel in bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA init

import minference_hf  # noqa: E402
import torch  # noqa: E402
from _provenance import commit, write_json  # noqa: E402
from minference_kernels import HeadPattern  # noqa: E402
from minference_patterns import PatternConfig  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

WINDOW = 512
LAYERS = 18


def gemma3_270m_config(max_len: int, softcap: float | None = None) -> Gemma3TextConfig:
    """Gemma-3-270M's architecture (as its GGUF declares it)."""
    return Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=WINDOW,
        layer_types=[
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(LAYERS)
        ],
        query_pre_attn_scalar=256,
        max_position_embeddings=max(max_len, 32768),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        attn_logit_softcapping=softcap,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


class AttentionTimer:
    """CUDA events around every attention module: seconds in local and in global layers."""

    def __init__(self, model: torch.nn.Module, local: set[int]) -> None:
        self.local = local
        self.events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._open: dict[int, torch.cuda.Event] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            self.handles.append(attn.register_forward_pre_hook(self._pre(i)))
            self.handles.append(attn.register_forward_hook(self._post(i)))

    def _pre(self, i: int):
        def hook(_m, _args):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open[i] = ev

        return hook

    def _post(self, i: int):
        def hook(_m, _args, _out):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((i, self._open.pop(i), ev))

        return hook

    def split(self) -> tuple[float, float]:
        torch.cuda.synchronize()
        loc = glo = 0.0
        for i, a, b in self.events:
            t = a.elapsed_time(b) / 1e3
            if i in self.local:
                loc += t
            else:
                glo += t
        self.events = []
        return loc, glo

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(model, ids, keep: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits


def _patch(model, mode: str, args) -> None:
    if minference_hf.get_plan(model) is not None:
        minference_hf.unpatch(model)
    if mode == "sdpa":
        return
    pat = HeadPattern.dense() if mode == "exact" else HeadPattern.vertical_slash(
        args.vertical, args.slash
    )  # fmt: skip
    cfg = PatternConfig.uniform(LAYERS, 4, pat, num_kv_heads=1, head_dim=256, model_id=mode)
    # exact: global layers never take the sparse path (dense SDPA, as in the baseline)
    threshold = 1 << 40 if mode == "exact" else args.min_sparse_len
    minference_hf.patch(model, cfg, min_sparse_len=threshold)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vertical", type=int, default=1000)
    ap.add_argument("--slash", type=int, default=6096)
    ap.add_argument("--min-sparse-len", type=int, default=32768)
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--check", type=int, default=8192, help="0: no check")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    res: dict = {
        "benchmark": "bench_hybrid",
        "argv": sys.argv[1:],
        "commit": commit(),
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "transformers": __import__("transformers").__version__,
            "triton": __import__("triton").__version__,
        },
        "model": "Gemma-3-270M shape, random weights, bf16",
        "window": WINDOW,
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_json(out, res)

    models = {
        None: Gemma3ForCausalLM(gemma3_270m_config(max(lengths)))
        .to(device="cuda", dtype=torch.bfloat16)
        .eval()
    }
    if args.softcap is not None:
        capped = Gemma3ForCausalLM(gemma3_270m_config(max(lengths), args.softcap))
        capped.load_state_dict(models[None].state_dict())
        models[args.softcap] = capped.to(device="cuda", dtype=torch.bfloat16).eval()
    model = models[None]
    local = {i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"}
    if args.check:
        ids = torch.randint(0, 262144, (1, args.check), device="cuda")
        _patch(model, "sdpa", args)
        ref = _forward(model, ids, 256).float()
        _patch(model, "exact", args)
        got = _forward(model, ids, 256).float()
        st = minference_hf.get_plan(model).stats
        err = float((got - ref).abs().max() / ref.abs().max())
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        res["check"] = {"n": args.check, "max_rel_err": err, "top1_agree": agree,
                        "local_calls": st.local_calls, "fallback_calls": st.fallback_calls}  # fmt: skip
        print(f"check @ {args.check}: exact vs sdpa max rel err {err:.2e}, top-1 {agree:.4f}, "
              f"local calls {st.local_calls}", flush=True)  # fmt: skip
        save()
    modes = ["sdpa", "exact", "sparse"] + (["sparse_softcap"] if args.softcap else [])
    for n in lengths:
        ids = torch.randint(0, 262144, (1, n), device="cuda")
        times: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.repeats + 1):  # round 0 warms up (Triton compiles, cuDNN plans)
            for mode in modes:
                m = models[args.softcap] if mode == "sparse_softcap" else model
                _patch(m, "sparse" if mode == "sparse_softcap" else mode, args)
                timer = AttentionTimer(m, local)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    _forward(m, ids)
                    torch.cuda.synchronize()
                    total = time.perf_counter() - t0
                    loc, glo = timer.split()
                    row = {"ttft_s": total, "local_attn_s": loc, "global_attn_s": glo,
                           "rest_s": total - loc - glo,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
                    plan = minference_hf.get_plan(m)
                    if plan is not None:
                        row["calls"] = {"local": plan.stats.local_calls,
                                        "sparse": plan.stats.sparse_calls,
                                        "dense": plan.stats.dense_calls,
                                        "fallback": plan.stats.fallback_calls}  # fmt: skip
                except torch.cuda.OutOfMemoryError as e:
                    row = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
                finally:
                    timer.remove()
                if rep:
                    times[mode].append(row)
                print(f"N={n} rep {rep} {mode}: {row}", flush=True)
        summary = {}
        for mode, rows in times.items():
            ok = [r for r in rows if "error" not in r]
            if not ok:
                summary[mode] = {"error": rows[0]["error"] if rows else "no run"}
                continue
            med = lambda key: sorted(r[key] for r in ok)[len(ok) // 2]  # noqa: E731
            summary[mode] = {k: med(k) for k in ("ttft_s", "local_attn_s", "global_attn_s",
                                                  "rest_s", "peak_gib")}  # fmt: skip
            summary[mode]["calls"] = ok[-1].get("calls")
        base = summary.get("sdpa", {}).get("ttft_s")
        for s in summary.values():
            if base and "ttft_s" in s:
                s["speedup_vs_sdpa"] = base / s["ttft_s"]
        res["runs"].append({"n": n, "summary": summary, "rounds": times})
        print(f"N={n}: " + json.dumps(summary), flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
