"""Tiny random decoder models built from configs (no download) and pattern-config helpers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from minference_kernels import HeadPattern
from minference_patterns import PatternConfig

VOCAB = 512
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64


def _common(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return base


def _llama(**kw: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(**kw)))


def _mistral(**kw: object) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    kw.setdefault("sliding_window", None)
    return MistralForCausalLM(MistralConfig(**_common(**kw)))


def _qwen2(**kw: object) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(**kw)))


def _qwen3(**kw: object) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_common(head_dim=HEAD_DIM, **kw)))


def _phi3(**kw: object) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_common(**kw)))


ARCHS: dict[str, Callable[..., torch.nn.Module]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
}


def make_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kw: object):
    """A tiny random ``arch`` causal LM in eval mode on SDPA attention."""
    torch.manual_seed(seed)
    model = ARCHS[arch](attn_implementation="sdpa", **kw)
    return model.to(dtype).eval()


def full_budget_config(
    num_layers: int = LAYERS, num_heads: int = HEADS, n: int = 8192
) -> PatternConfig:
    """Every kind of head, each with a budget covering all of an ``n``-token prompt, so the
    sparse path must reproduce dense attention."""
    heads = (
        HeadPattern.dense(),
        HeadPattern.vertical_slash(n, n),
        HeadPattern.block_sparse(top_k=(n + 63) // 64),
        HeadPattern.a_shape(0, n),
    )
    row = tuple(heads[h % len(heads)] for h in range(num_heads))
    return PatternConfig(
        model_id="test/full-budget",
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        layers=(row,) * num_layers,
    )


def sparse_config(num_layers: int = LAYERS, num_heads: int = HEADS) -> PatternConfig:
    """A genuinely sparse mix for ~2K-token prompts."""
    heads = (
        HeadPattern.vertical_slash(64, 256),
        HeadPattern.a_shape(64, 256),
        HeadPattern.block_sparse(top_k=6),
        HeadPattern.vertical_slash(32, 128),
    )
    row = tuple(heads[h % len(heads)] for h in range(num_heads))
    return PatternConfig(
        model_id="test/sparse",
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        layers=(row,) * num_layers,
    )


def padded_batch(
    lengths: list[int], side: str, seed: int = 0, vocab: int = VOCAB
) -> dict[str, torch.Tensor]:
    """Random ids for a batch with the given real lengths, padded on ``side`` with id 0."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        tok = torch.randint(3, vocab, (L,), generator=g)
        sl = slice(n - L, n) if side == "left" else slice(0, L)
        ids[b, sl] = tok
        mask[b, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param
