"""Run a public layer function on its input's GPU.

Triton launches a kernel on the *current* CUDA device. Under transformers' ``device_map`` (a
model's layers spread over several GPUs) a layer's tensors sit on ``cuda:1`` while the current
device is still ``cuda:0``; a launch would then fail or read another device's memory. Every public
layer function of :mod:`minference_kernels.api` and :mod:`minference_kernels.varlen` is wrapped by
:func:`on_input_device`, which makes the first tensor argument's device current for the call
(PyTorch's own ops need nothing: they follow their tensors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

F = TypeVar("F", bound=Callable[..., Any])


def on_input_device(fn: F) -> F:
    """``fn`` with ``torch.cuda.device(x.device)`` around the call when its first argument ``x``
    is a CUDA tensor on another device than the current one (no-op on CPU and on the current
    device)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if (
            isinstance(x, torch.Tensor)
            and x.is_cuda
            and x.device.index is not None
            and x.device.index != torch.cuda.current_device()
        ):
            with torch.cuda.device(x.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return cast(F, wrapper)
