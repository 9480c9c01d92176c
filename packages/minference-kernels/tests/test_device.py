"""Every public layer function runs on its input's GPU (transformers' ``device_map`` puts layers
on several GPUs while the current device stays ``cuda:0``; Triton launches on the current one)."""

from __future__ import annotations

import inspect

import minference_kernels as mk
import pytest
import torch
from minference_kernels._device import on_input_device

LAYER_FUNCTIONS = [
    "dense_attention",
    "vertical_slash_attention",
    "block_sparse_attention",
    "streaming_attention",
    "estimate_vertical_slash",
    "estimate_block_sparse",
    "build_index",
    "sparse_prefill",
    "sparse_prefill_mask",
    "sparse_prefill_varlen",
]


@pytest.mark.parametrize("name", LAYER_FUNCTIONS)
def test_every_layer_function_is_guarded_and_keeps_its_signature(name):
    fn = getattr(mk, name)
    assert getattr(fn, "__wrapped__", None) is not None, f"{name} is not wrapped by on_input_device"
    assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)
    assert fn.__doc__ == fn.__wrapped__.__doc__ and fn.__name__ == name


def test_guard_is_transparent_on_cpu():
    seen = []

    @on_input_device
    def f(x, y=1, *, z=2):
        seen.append(torch.cuda.is_initialized())
        return x * y + z

    x = torch.arange(4.0)
    assert torch.equal(f(x, 3, z=1), x * 3 + 1)
    assert torch.equal(f(x=x), x + 2)
    assert f(5) == 7  # not a tensor: passed through
    assert seen == [False, False, False]  # never touches CUDA for CPU inputs


needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (device_map across GPUs)"
)


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_layer_on_a_second_gpu_equals_the_first(dt):
    """Inputs on cuda:1 while cuda:0 is current: the Triton kernels run on cuda:1 and give what
    the same inputs give on cuda:0."""
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 8, 2, 1000, 64
    q, k, v = (torch.randn(b, h, n, d, dtype=dt) for h in (hq, hkv, hkv))
    heads = [mk.HeadPattern.vertical_slash(30, 100), mk.HeadPattern.block_sparse(3)] * (hq // 2)
    torch.cuda.set_device(0)
    for fn in (
        lambda q, k, v: mk.sparse_prefill(q, k, v, heads, backend="triton"),
        lambda q, k, v: mk.dense_attention(q, k, v),
        lambda q, k, v: mk.sparse_prefill_varlen(
            q[0].transpose(0, 1).contiguous(),
            k[0].transpose(0, 1).contiguous(),
            v[0].transpose(0, 1).contiguous(),
            torch.tensor([0, 400, n], dtype=torch.int32, device=q.device),
            torch.tensor([0, 400, n], dtype=torch.int32, device=q.device),
            heads,
            backend="triton",
        ),
    ):
        want = fn(*(x.to("cuda:0") for x in (q, k, v)))
        got = fn(*(x.to("cuda:1") for x in (q, k, v)))
        assert got.device == torch.device("cuda:1")
        assert torch.cuda.current_device() == 0
        torch.testing.assert_close(got.to("cuda:0"), want, rtol=0, atol=0)
