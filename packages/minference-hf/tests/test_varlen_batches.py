"""Padded and packed batches go through one sparse_prefill_varlen call per layer and give each
sample's own result: a batch of different lengths (left / right padding, or several sequences
packed in one row with position_ids restarting, or flash-attn's cu_seq_lens kwargs) equals each
sample run alone through the same patched model."""

from __future__ import annotations

import minference_hf
import minference_kernels
import pytest
import torch
from conftest import LAYERS, make_model, padded_batch, sparse_config

THRESHOLD = 256
LENGTHS = [600, 450, 200]  # the last is below the threshold: dense, alone


@pytest.fixture
def varlen_calls(monkeypatch):
    """Count the calls of minference_kernels.sparse_prefill_varlen (and the sequences in each)."""
    calls: list[int] = []
    real = minference_kernels.sparse_prefill_varlen

    def spy(q, k, v, cu_q, cu_k, *a, **kw):
        calls.append(int(cu_q.numel()) - 1)
        return real(q, k, v, cu_q, cu_k, *a, **kw)

    monkeypatch.setattr(minference_kernels, "sparse_prefill_varlen", spy)
    return calls


def _patched(arch: str = "llama"):
    model = make_model(arch)
    minference_hf.patch(model, sparse_config(), min_sparse_len=THRESHOLD)
    return model


def _alone(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], use_cache=False).logits[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(side, varlen_calls):
    model = _patched()
    batch = padded_batch(LENGTHS, side, seed=3)
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each sample's own positions (left padding too)
    stats = model.minference_plan.stats
    stats.reset()
    with torch.no_grad():
        out = model(**batch, position_ids=pos, use_cache=False).logits
    # one varlen call per layer, holding the two long samples; the short one ran dense
    assert varlen_calls == [2] * LAYERS
    assert stats.sparse_calls == 2 * LAYERS and stats.dense_calls == LAYERS
    assert stats.fallback_calls == 0
    for b in range(len(LENGTHS)):
        real = mask[b].bool()
        ref = _alone(model, batch["input_ids"][b][real])
        torch.testing.assert_close(out[b][real], ref, atol=2e-5, rtol=2e-5)


def _packed_row(lengths: list[int], seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 512, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, ids, pos


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_row_equals_each_sequence_alone(how, varlen_calls, caplog):
    model = _patched("qwen2")
    seqs, ids, pos = _packed_row(LENGTHS)
    extra = {}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        extra = dict(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)
        )
    stats = model.minference_plan.stats
    stats.reset()
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits[0]
    assert varlen_calls == [2] * LAYERS
    assert stats.sparse_calls == 2 * LAYERS and stats.dense_calls == LAYERS
    assert stats.fallback_calls == 0 and "packed" not in caplog.text
    start = 0
    for s in seqs:
        ref = _alone(model, s)
        torch.testing.assert_close(out[start : start + len(s)], ref, atol=2e-5, rtol=2e-5)
        start += len(s)


def test_packed_rows_in_a_batch():
    """Two packed rows (batch 2): the sequences of both rows in one varlen call per layer."""
    model = _patched()
    s1, ids1, pos1 = _packed_row([300, 300], seed=1)
    s2, ids2, pos2 = _packed_row([280, 320], seed=2)
    with torch.no_grad():
        out = model(
            input_ids=torch.cat([ids1, ids2]), position_ids=torch.cat([pos1, pos2]), use_cache=False
        ).logits
    assert model.minference_plan.stats.fallback_calls == 0
    for row, seqs in enumerate((s1, s2)):
        start = 0
        for s in seqs:
            ref = _alone(model, s)
            torch.testing.assert_close(out[row, start : start + len(s)], ref, atol=2e-5, rtol=2e-5)
            start += len(s)


def test_a_custom_mask_is_not_taken_for_packing():
    """position_ids that restart under a mask that is not their block-diagonal causal mask: not
    a packed batch we can prove, so the dense fallback (with its warning), not varlen."""
    from minference_hf.attention import _packed_segments

    n = 300
    pos = torch.cat([torch.arange(100), torch.arange(200)])[None]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    assert _packed_segments(causal, {"position_ids": pos}, 1, n, n) is None
    seg = (torch.arange(n) >= 100).long()
    block = causal & (seg[:, None] == seg[None, :])
    assert _packed_segments(block, {"position_ids": pos}, 1, n, n) == [0, 100, 300]
    assert _packed_segments(block, {}, 1, n, n) is None  # nothing says where sequences start
