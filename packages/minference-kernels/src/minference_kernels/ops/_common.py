"""PyTorch helpers shared by the references of :mod:`minference_kernels.ops`."""

from __future__ import annotations

import torch


def softcap_(s: torch.Tensor, softcap: float | None, scale: float = 1.0) -> torch.Tensor:
    """Soft-cap the logits ``scale * s`` in place, in ``s``'s units: ``s <- softcap * tanh(scale
    * s / softcap) / scale`` (``scale = 1``: ``s`` holds the logits themselves). ``softcap=None``:
    ``s`` unchanged. Apply it before masking (``tanh(-inf)`` would unmask a pair)."""
    if softcap is None:
        return s
    return s.mul_(scale / softcap).tanh_().mul_(softcap / scale)
