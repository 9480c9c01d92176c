"""Search a pattern config for a model: capture Q/K/V on a calibration prompt, pick per-head patterns.

    python examples/search_config.py                        # CPU: tiny random Llama, 1K tokens
    python examples/search_config.py --synthetic            # no transformers: synthetic heads
    python examples/search_config.py --model ORG/MODEL --calib calib.txt --out org-model.json

The HF path streams each layer's post-RoPE Q/K/V (``minference_hf.search_model_config``) into
``minference_patterns.search_config``; the synthetic path feeds the search directly with
``structured_qkv`` layers, as you would with Q/K/V captured by your own framework. The config is
saved, loaded back, summarised and (with matplotlib) drawn. On the tiny random model the chosen
patterns mean nothing; on a real model calibrate at the lengths you serve (see the search guide).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import minference_patterns as mp
import torch


def synthetic_layers(num_layers: int, n: int):
    """Per layer (q, k, v): 4 query / 2 KV heads mixing the synthetic generator's head kinds."""
    from minference_kernels.synthetic import structured_qkv

    for layer in range(num_layers):
        a = structured_qkv(1, 2, 1, n, 64, kind="local", seed=2 * layer)
        b = structured_qkv(1, 2, 1, n, 64, kind="block", seed=2 * layer + 1)
        yield tuple(torch.cat([x, y], dim=1) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model path or Hugging Face id (default: tiny random Llama)")
    ap.add_argument("--calib", help="calibration text file (with --model)")
    ap.add_argument("--synthetic", action="store_true", help="search synthetic heads instead")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration length without --calib")
    ap.add_argument("--budget", type=float, default=0.3, help="cost ceiling relative to dense")
    ap.add_argument("--out", help="output config (default: a temporary file)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "searched.json"

    if args.synthetic:
        cfg = mp.search_config(
            synthetic_layers(2, args.tokens),
            model_id="synthetic/demo",
            budget=args.budget,
            calibration=f"structured_qkv, {args.tokens} tokens",
            num_layers=2,
            num_rows=128,
        )
    else:
        import minference_hf

        if args.model:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not args.calib:
                ap.error("--model needs --calib")
            tok = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
            model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
            ids = tok(Path(args.calib).read_text(), return_tensors="pt").input_ids.to(model.device)
            calibration = f"{Path(args.calib).name}, {ids.shape[1]} tokens"
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=64, max_position_embeddings=8192)  # fmt: skip
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, 512, (1, args.tokens), generator=gen)
            calibration = f"random tokens, {args.tokens}"
        cfg = minference_hf.search_model_config(
            model, ids, model_id=args.model or "tiny-random-llama", budget=args.budget,
            calibration=calibration,
        )  # fmt: skip

    cfg.save(out)
    back = mp.load(out)
    assert back == cfg
    print(f"saved {out}")
    print(mp.summarize(back))
    extra = back.provenance.extra or {}
    print(f"mean recall {extra['mean_recall']:.3f}, mean relative cost {extra['mean_relative_cost']:.3f}, "
          f"heads over budget {extra['heads_over_budget']}")  # fmt: skip
    try:
        png = mp.plot_config(back, out.with_suffix(".png"))
        print(f"picture: {out.with_suffix('.png')} ({png.get_size_inches()[0]:.0f}x"
              f"{png.get_size_inches()[1]:.0f} in)")  # fmt: skip
    except ImportError:
        print("(no matplotlib: skipped the picture)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
