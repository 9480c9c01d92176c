"""Is the hybrid path exact on the GPU? A Gemma-3-270M-shaped model (random weights) patched with a
dense config (local layers through the Triton streaming kernel, global layers dense) against the
unpatched model (SDPA with the window mask), in float32 and in bf16, each against the float32
SDPA reference: logits of the last 512 positions, max error relative to the largest logit, and
top-1 agreement. In bf16 the unpatched SDPA run is measured the same way: the gap between the two
bf16 rows is what the streaming kernel adds beyond bf16 rounding.

    PYTHONPATH=packages/minference-kernels/src:packages/minference-patterns/src:packages/minference-hf/src \\
        python3 benchmarks/gpu_hybrid_exactness.py --lengths 4096,16384 --out results/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import minference_hf
import torch
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig
from transformers import Gemma3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import commit, write_json  # noqa: E402
from bench_hybrid import LAYERS, gemma3_270m_config  # noqa: E402

KEEP = 512


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=KEEP, use_cache=False).logits[0].float()


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {
        "max_rel_err": float((out - ref).abs().max() / ref.abs().max()),
        "top1_agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res: dict = {"benchmark": "gpu_hybrid_exactness", "argv": sys.argv[1:], "commit": commit(),
                 "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "model": "Gemma-3-270M shape, random weights", "runs": []}  # fmt: skip
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(gemma3_270m_config(max(lengths))).to("cuda").eval()
    cfg = PatternConfig.uniform(LAYERS, 4, HeadPattern.dense(), num_kv_heads=1, head_dim=256)
    for n in lengths:
        ids = torch.randint(0, 262144, (1, n), device="cuda")
        row: dict = {"n": n}
        model.float()
        ref = _logits(model, ids)
        minference_hf.patch(model, cfg, min_sparse_len=1 << 40)
        row["minference_fp32"] = _compare(_logits(model, ids), ref)
        row["local_calls"] = minference_hf.get_plan(model).stats.local_calls
        minference_hf.unpatch(model)
        model.to(torch.bfloat16)
        row["sdpa_bf16"] = _compare(_logits(model, ids), ref)
        minference_hf.patch(model, cfg, min_sparse_len=1 << 40)
        row["minference_bf16"] = _compare(_logits(model, ids), ref)
        minference_hf.unpatch(model)
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
