"""The host-buffer queue behind long_prefill's offload (CPU: plain buffers; pinning is GPU-only)."""

import threading
import time

import pytest
import torch
from minference_hf._pinned import HostBufferQueue, copy_kv


def test_queue_gives_each_layer_its_own_pair_in_order():
    calls: list[str] = []

    def alloc(shape, dtype):
        calls.append(threading.current_thread().name)
        return torch.zeros(shape, dtype=dtype)

    with HostBufferQueue([3, 4, 5, 6], (1, 2, 7, 4), torch.bfloat16, alloc=alloc) as q:
        pairs = [q.get(li) for li in (3, 4, 5, 6)]
    ptrs = {t.data_ptr() for pair in pairs for t in pair}
    assert len(ptrs) == 8  # no buffer shared between layers or between keys and values
    for k, v in pairs:
        assert k.shape == v.shape == (1, 2, 7, 4) and k.dtype == torch.bfloat16
    assert len(calls) == 8 and all(n.startswith("minference-pin") for n in calls)


def test_close_cancels_pending_allocations():
    started = threading.Event()
    release = threading.Event()
    made = []

    def alloc(shape, dtype):
        started.set()
        release.wait(5)
        made.append(1)
        return torch.empty(shape, dtype=dtype)

    q = HostBufferQueue(list(range(10)), (2,), torch.float32, alloc=alloc)
    assert started.wait(5)  # the worker is inside layer 0's first allocation
    pending = q._futures[9]
    closer = threading.Thread(target=q.close)
    closer.start()
    deadline = time.monotonic() + 5
    while not pending.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    closer.join(5)
    assert pending.cancelled() and not closer.is_alive()
    assert len(made) == 2  # the pair in progress finishes; the other nine are never made
    with pytest.raises(KeyError, match="layer 0 was not queued or was already taken"):
        q.get(0)


def test_queue_reports_allocation_errors_at_get():
    def alloc(shape, dtype):
        raise MemoryError("no host memory")

    with HostBufferQueue([0], (2,), torch.float32, alloc=alloc) as q:
        with pytest.raises(MemoryError, match="no host memory"):
            q.get(0)


def test_copy_kv_blockwise_equals_copy():
    buf = torch.zeros(2, 3, 11, 4)
    src = torch.randn(2, 3, 7, 4)
    out = copy_kv(buf[:, :, :7], src)  # a cache's filled part: not contiguous
    assert torch.equal(buf[:, :, :7], src) and torch.equal(buf[:, :, 7:], torch.zeros(2, 3, 4, 4))
    assert out.data_ptr() == buf.data_ptr()
    back = copy_kv(torch.empty(2, 3, 7, 4), buf[:, :, :7])
    assert torch.equal(back, src)
    with pytest.raises(ValueError, match=r"equal \[B, H, N, D\] shapes"):
        copy_kv(buf, src)
