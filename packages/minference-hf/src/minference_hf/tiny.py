"""The embedded default model: a tiny, UNTRAINED Llama-style model and a byte-level tokenizer.

Both are built in code (no download), so ``minference generate`` and ``minference niah`` run end
to end on a fresh CPU-only machine. The weights are random (fixed seed): the text it produces is
gibberish and it cannot retrieve a needle; it exercises the machinery, nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_MODEL_NAME = "minference-tiny-random-llama"
UNTRAINED_NOTICE = (
    "NOTE: using the embedded default model (tiny Llama-style, 4 layers, RANDOM UNTRAINED "
    "weights, byte-level tokenizer). Its outputs are gibberish and it cannot retrieve needles; "
    "it only exercises the pipeline. Without --tiny the commands run a trained model (SmolLM2-135M)."
)

_SPECIALS = ("<pad>", "<s>", "</s>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (3 special tokens + 256 bytes, no merges), built without files.

    Every UTF-8 byte is one token; ``<s>`` is prepended to each encoded text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1 << 30,
    )


def build_model(
    *, seed: int = 0, num_layers: int = 4, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """The tiny random Llama: hidden 256, 8 query heads / 2 KV heads (GQA), head dim 64.

    Args:
        seed: weight initialisation seed (same seed, same weights).
        num_layers: decoder layers.
        dtype: parameter dtype.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(_SPECIALS) + 256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1 << 20,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype)  # type: ignore[arg-type]  # transformers types PreTrainedModel.to through functools.wraps
    return model.eval()


def default_pattern_config(num_layers: int = 4, num_heads: int = 8) -> PatternConfig:
    """A demo pattern config for the tiny model: every head vertical-slash (64 columns,
    256 diagonals). Not searched: the model is untrained, so there is nothing to search for."""
    from minference_kernels import HeadPattern
    from minference_patterns import PatternConfig

    return PatternConfig.uniform(
        num_layers,
        num_heads,
        HeadPattern.vertical_slash(64, 256),
        model_id=DEFAULT_MODEL_NAME,
        num_kv_heads=2,
        head_dim=64,
    )
