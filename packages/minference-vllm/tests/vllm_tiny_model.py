"""A tiny random Llama (head dim 64) and an offline word-level tokenizer, built in code."""

from __future__ import annotations

import json
from pathlib import Path

NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 64
HIDDEN = NUM_HEADS * HEAD_DIM
WORDS = 500
SPECIAL = ["<unk>", "<s>", "</s>"]
VOCAB = len(SPECIAL) + WORDS


def word_ids(n: int, seed: int) -> list[int]:
    """``n`` pseudo-random ordinary token ids (no special tokens), reproducible from ``seed``."""
    import random

    rng = random.Random(seed)
    return [len(SPECIAL) + rng.randrange(WORDS) for _ in range(n)]


def build_tokenizer(path: Path) -> None:
    """A word-level tokenizer over ``w0 .. w499`` (whitespace split), saved for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
            }
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def build_model(path: Path, seed: int = 0, num_kv_heads: int = NUM_KV_HEADS) -> Path:
    """Save a random ``LlamaForCausalLM`` (2 layers, 4 query / 2 KV heads of dim 64) to ``path``.

    ``num_kv_heads=1`` gives the multi-query variant (fewer KV heads than tensor-parallel ranks).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=num_kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(path)
    return path
