"""A model split over two GPUs (``device_map``, as ``from_pretrained(device_map=...)`` places
it, through accelerate's hooks) gives the single-GPU output, with the sparse path on both GPUs."""

from __future__ import annotations

import minference_hf
import pytest
import torch
from conftest import LAYERS, make_model, sparse_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

THRESHOLD = 1024


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def test_device_map_over_two_gpus_equals_one_gpu():
    accelerate = pytest.importorskip("accelerate")
    ids = torch.randint(3, 200, (1, 2048), generator=torch.Generator().manual_seed(0))
    one = make_model("llama", dtype=torch.bfloat16).to("cuda:0")
    minference_hf.patch(one, sparse_config(), min_sparse_len=THRESHOLD, backend="triton")
    want = _logits(one, ids.to("cuda:0"))
    assert one.minference_plan.stats.sparse_layers == set(range(LAYERS))

    two = make_model("llama", dtype=torch.bfloat16)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0}
    device_map |= {f"model.layers.{i}": 1 for i in range(1, LAYERS)}
    device_map |= {"model.norm": 1, "lm_head": 1}
    two = accelerate.dispatch_model(two, device_map=device_map)
    assert two.model.layers[-1].self_attn.q_proj.weight.device == torch.device("cuda:1")
    minference_hf.patch(two, sparse_config(), min_sparse_len=THRESHOLD, backend="triton")
    torch.cuda.set_device(0)
    got = _logits(two, ids.to("cuda:0"))
    assert two.minference_plan.stats.sparse_layers == set(range(LAYERS))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
