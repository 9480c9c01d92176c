"""Sparse pre-fill in a HuggingFace transformers model with minference-hf.

    python examples/hf_patch.py                                    # CPU: tiny random Llama, no download
    python examples/hf_patch.py --model meta-llama/Llama-3.1-8B-Instruct --prompt-file long.txt

Without ``--model`` the model is a tiny, randomly initialised Llama built from a config (2 layers,
8 query / 2 KV heads), with a uniform pattern config and a low sparse threshold so that a
1K-token prompt takes the sparse path; its text is meaningless. With ``--model`` the model's
shipped pattern config is used (or ``--config``) and the default threshold (32K tokens).
Needs ``pip install minference-hf``.
"""

from __future__ import annotations

import argparse

import minference_hf
import torch
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model path or Hugging Face id (default: tiny random Llama)")
    ap.add_argument("--prompt-file", help="text file with a long prompt (with --model)")
    ap.add_argument("--config", help="pattern config: file or shipped model id")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not args.prompt_file:
            ap.error("--model needs --prompt-file")
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        ids = tok(open(args.prompt_file).read(), return_tensors="pt").input_ids.to(model.device)
        minference_hf.patch(model, config=args.config)  # None: the shipped config of the model id
    else:
        model = tiny_model()
        ids = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(1))
        # one pattern per (layer, query head); here every head vertical-slash, 32 columns and
        # 128 diagonals. A real model takes a shipped or searched config instead.
        config = PatternConfig.uniform(
            2, 8, HeadPattern.vertical_slash(32, 128), model_id="tiny", num_kv_heads=2, head_dim=32
        )
        minference_hf.patch(model, config=config, min_sparse_len=512)

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    plan = model.minference_plan
    print(plan.summary())
    sparse_tokens = out[0, ids.shape[1] :].tolist()
    assert plan.stats.sparse_calls > 0, "the pre-fill did not take the sparse path"
    assert plan.stats.dense_calls > 0, "decode steps run dense"

    minference_hf.unpatch(model)  # back to the previous attn_implementation (sdpa)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    dense_tokens = dense[0, ids.shape[1] :].tolist()
    same = sum(a == b for a, b in zip(sparse_tokens, dense_tokens))
    print(f"prompt {ids.shape[1]} tokens; greedy tokens equal to dense: {same}/{len(dense_tokens)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
