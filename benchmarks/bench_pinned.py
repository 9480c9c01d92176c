"""Host-buffer pinning for the KV offload: PyTorch's pinned allocator vs ``pinned_empty``.

Measures, for one 1M-token cache tensor of an 8B model (2 GiB + the 1024-token decode reserve):
the time to allocate it pinned each way, the bytes actually pinned (PyTorch's caching host
allocator rounds to a power of two), the device-to-host copy rate into it, and how much a worker
thread pinning buffers slows GPU work issued from the main thread (the situation inside
``long_prefill``). CUDA only. Writes ``bench_pinned.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from _provenance import write_json
from minference_hf._pinned import copy_kv, pinned_empty

GIB = 1 << 30


def _time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _copy_rate(dst: torch.Tensor, src: torch.Tensor) -> float:
    dst.copy_(src, non_blocking=True)  # warm
    torch.cuda.synchronize()
    _, s = _time(lambda: dst.copy_(src, non_blocking=True))
    return src.numel() * src.element_size() / s / 1e9


def _gpu_work(iters: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--tokens", type=int, default=(1 << 20) + 1024)
    ap.add_argument("--buffers", type=int, default=4, help="buffers pinned by the worker thread")
    args = ap.parse_args()
    shape = (1, 8, args.tokens, 128)
    nbytes = 8 * args.tokens * 128 * 2
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["tensor_gib"] = nbytes / GIB
    src = torch.randn(shape, device="cuda").to(torch.bfloat16)

    t0 = time.perf_counter()
    a = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
    res["torch_pinned_s"] = time.perf_counter() - t0
    res["torch_pinned_stats"] = {
        k: v
        for k, v in torch.cuda.host_memory_stats().items()
        if k.startswith(("allocated_bytes.current", "reserved_bytes.current"))
    }
    res["torch_pinned_copy_gbs"] = _copy_rate(a, src)
    t0 = time.perf_counter()
    b = pinned_empty(shape, torch.bfloat16)
    res["pinned_empty_s"] = time.perf_counter() - t0
    res["pinned_empty_is_pinned"] = bool(b.is_pinned())
    res["pinned_empty_copy_gbs"] = _copy_rate(b, src)
    assert torch.equal(b.cuda(), src) and torch.equal(a.cuda(), src)
    # a cache layer's filled part is a non-contiguous view of its capacity buffer
    part = src[:, :, :-1024]
    _, res["strided_copy_s"] = _time(lambda: b[:, :, :-1024].copy_(part, non_blocking=True))
    _, res["copy_kv_s"] = _time(lambda: copy_kv(b[:, :, :-1024], part, non_blocking=True))
    _, res["strided_fetch_s"] = _time(lambda: b[:, :, :-1024].to("cuda", non_blocking=True))
    dev = torch.empty(part.shape, dtype=part.dtype, device="cuda")
    _, res["copy_kv_fetch_s"] = _time(lambda: copy_kv(dev, b[:, :, :-1024], non_blocking=True))
    assert torch.equal(dev, part)
    a = b = dev = None  # free the pinned and device buffers

    iters = 60
    _gpu_work(5)
    res["gpu_work_alone_s"] = _gpu_work(iters)
    made: list[torch.Tensor] = []

    def worker() -> None:
        for _ in range(args.buffers):
            made.append(pinned_empty(shape, torch.bfloat16))

    th = threading.Thread(target=worker)
    t0 = time.perf_counter()
    th.start()
    res["gpu_work_while_pinning_s"] = _gpu_work(iters)
    th.join()
    res["worker_pinning_s"] = time.perf_counter() - t0
    res["worker_pinned_gib"] = args.buffers * nbytes / GIB
    res["pin_rate_gbs"] = args.buffers * nbytes / res["worker_pinning_s"] / 1e9
    print(json.dumps(res, indent=1))
    print(
        f"| 2 GiB tensor | torch pin_memory {res['torch_pinned_s']:.2f} s | pinned_empty "
        f"{res['pinned_empty_s']:.2f} s | D2H {res['torch_pinned_copy_gbs']:.1f} / "
        f"{res['pinned_empty_copy_gbs']:.1f} GB/s | GPU work alone {res['gpu_work_alone_s']:.2f} s,"
        f" while a worker pins {res['worker_pinned_gib']:.0f} GiB "
        f"{res['gpu_work_while_pinning_s']:.2f} s |"
    )
    print(
        f"| filled part (strided) GPU->host: copy_ {res['strided_copy_s']:.2f} s, copy_kv "
        f"{res['copy_kv_s']:.3f} s | host->GPU: .to {res['strided_fetch_s']:.2f} s, copy_kv "
        f"{res['copy_kv_fetch_s']:.3f} s |"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "bench_pinned.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
