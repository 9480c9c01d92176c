"""The CPU (PyTorch) streaming path: chunked over each chunk's own keys, against float64 attention
over :func:`streaming_mask` on shapes that cross chunk boundaries (sinks inside and outside the
window range, windows of 1 and longer than the prompt, queries that are the last of the keys,
GQA, batch, soft-capping) and against the general index path."""

from __future__ import annotations

import pytest
import torch
from kernels_testlib import reference
from minference_kernels import streaming_attention, streaming_mask
from minference_kernels.api import _attend, streaming_index
from minference_kernels.ops import attention

CASES = [
    # (b, hq, hkv, nq, nk, d, sink, window, softcap)
    (1, 4, 1, 700, 700, 64, 0, 100, None),
    (2, 4, 2, 613, 613, 80, 4, 37, None),
    (1, 8, 1, 300, 900, 96, 16, 300, None),  # queries are the last 300 of 900 keys
    (1, 2, 2, 530, 530, 64, 600, 50, None),  # a sink longer than the prompt: every key
    (1, 4, 4, 520, 520, 128, 3, 1, None),  # window 1: the diagonal (and the sink)
    (1, 4, 2, 400, 400, 256, 0, 5000, None),  # the window covers everything: causal
    (2, 4, 1, 600, 600, 64, 8, 128, 3.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_streaming_equals_float64_reference(case):
    b, hq, hkv, nq, nk, d, sink, window, softcap = case
    g = torch.Generator().manual_seed(nq + d)
    q = torch.randn(b, hq, nq, d, generator=g) * 1.5
    k = torch.randn(b, hkv, nk, d, generator=g) * 1.5
    v = torch.randn(b, hkv, nk, d, generator=g)
    out = streaming_attention(q, k, v, sink, window, softcap=softcap)
    mask = streaming_mask(sink, window, nq, n_kv=nk)
    ref = reference(q, k, v, mask, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    # the general index path (per-block gathers) computes the same pairs
    full = lambda x: torch.full((b, hq), min(x, nk), dtype=torch.int64)
    idx = streaming_index(b, hq, nq, nk, full(sink), full(window), q.device)
    general = _attend(q, k, v, idx, d**-0.5, "torch", softcap)
    torch.testing.assert_close(out, general, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_streaming_low_precision_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 333, 64, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    out = streaming_attention(q.to(dtype), k.to(dtype), v.to(dtype), 2, 64)
    assert out.dtype == dtype
    ref = reference(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(),
                    streaming_mask(2, 64, 333))  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_chunk_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 500, 64, generator=g)
    k, v = torch.randn(1, 1, 500, 64, generator=g), torch.randn(1, 1, 500, 64, generator=g)
    outs = [attention.streaming(q, k, v, 4, 90, 0.125, chunk=c) for c in (1, 64, 97, 256, 1024)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)
