"""Input checks shared by every public function. Errors name the offending argument."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)
BACKENDS = ("auto", "triton", "torch")
#: The values of ``block_allocation`` (see :func:`minference_kernels.sparse_prefill`).
ALLOCATIONS = ("query_block", "head", "layer")
#: ``last_q`` is at most this: the estimation rows live in one tile of the score kernels.
MAX_LAST_Q = 128


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    n_q: int
    n_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def q_offset(self) -> int:
        """Absolute position of query row 0 (queries are the last ``n_q`` of ``n_kv`` positions)."""
        return self.n_kv - self.n_q


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


# elements scanned per step of check_finite: bounds its temporary to 64 MiB of bools, where one
# pass over q at 1M tokens x 32 heads x 128 would allocate 4 GiB
_FINITE_CHUNK = 1 << 26


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds a NaN or an Inf (one host sync)."""
    if x.numel() <= _FINITE_CHUNK:
        ok = torch.isfinite(x).all()
    else:  # slices along the longest dimension (works for strided views too)
        dim = max(range(x.dim()), key=lambda i: x.shape[i])
        step = max(1, _FINITE_CHUNK // (x.numel() // x.shape[dim]))
        ok = torch.ones((), dtype=torch.bool, device=x.device)
        for s in range(0, x.shape[dim], step):
            ok &= torch.isfinite(x.narrow(dim, s, min(step, x.shape[dim] - s))).all()
    if not bool(ok):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, *, check_values: bool = True
) -> Shape:
    """Check ``q [B, Hq, Nq, D]``, ``k/v [B, Hkv, Nk, D]`` and return their geometry."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        _check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    for name, x in named[1:]:
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must match")
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if bk != b:
        raise ValueError(f"k batch {bk} != q batch {b}")
    if dk != d:
        raise ValueError(f"k head dim {dk} != q head dim {d}")
    if b < 1 or hq < 1 or hkv < 1 or d < 1:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} / k {tuple(k.shape)}")
    if nq < 1 or nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={nq}, Nk={nk}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if nq > nk:
        raise ValueError(
            f"q has {nq} positions but k has {nk}: q must hold the last Nq <= Nk positions"
        )
    if check_values:
        for name, x in named:
            check_finite(name, x)
    return Shape(b, hq, hkv, nq, nk, d)


def check_index(
    x: object, name: str, shape: Shape, *, ndim: int, low: int, high: int, dim2: int | None = None
) -> torch.Tensor:
    """Check an index tensor ``[B, Hq, ...]`` of integers in ``[low, high)``."""
    x = _check_tensor(x, name)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int32/int64), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.shape[0] != shape.batch or x.shape[1] != shape.heads_q:
        raise ValueError(
            f"{name} must start with [B={shape.batch}, Hq={shape.heads_q}], got {tuple(x.shape)}"
        )
    if dim2 is not None and x.shape[2] != dim2:
        raise ValueError(f"{name} dim 2 must be {dim2}, got shape {tuple(x.shape)}")
    if x.device.type != "meta" and x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < low or hi >= high:
            bad = lo if lo < low else hi
            raise ValueError(f"{name} holds {bad}, outside the valid range [{low}, {high - 1}]")
    return x


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def check_softcap(softcap: object) -> float | None:
    """Attention-logit soft-capping (Gemma 2): ``None`` (off) passes as ``None``; otherwise a real
    number (not a bool or a string), finite and ``> 0``, returned as a float. With it every
    attention logit becomes ``softcap * tanh(logit / softcap)`` (``logit = scale * q.k``) before the
    causal mask and the softmax. Anything else raises a ``TypeError`` / ``ValueError`` naming
    ``softcap`` and the value."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(
            f"softcap must be a positive finite number or None, got {type(softcap).__name__} "
            f"{softcap!r}"
        )
    try:
        value = float(softcap)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not (0.0 < value < math.inf):  # NaN fails both
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    return value


def check_int(x: object, name: str, *, low: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")
    return x


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` on CPU. ``triton`` on CPU needs TRITON_INTERPRET=1."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton"
        )
    return backend


# One validator per sparse pre-fill setting: the kernels' functions and
# :class:`minference_kernels.PrefillOptions` (hence every integration) call these, so a setting is
# accepted or rejected the same way in every layer. ``name`` is what the error calls the setting.


def check_allocation(allocation: object, name: str = "block_allocation") -> str:
    """``allocation`` if it is one of :data:`ALLOCATIONS`, else a ``ValueError`` naming ``name``."""
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}"
        )
    return allocation


def check_share(value: object, name: str) -> float | None:
    """``None``, or a real number (not a bool or a string) in (0, 1] (NaN is not), returned as a
    float; else a ``TypeError``/``ValueError`` naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number in (0, 1] or None, got {type(value).__name__} {value!r}"
        )
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def check_coverage(coverage: object, name: str = "coverage") -> float | None:
    """The adaptive budgets' share of the estimated attention mass: :func:`check_share`."""
    return check_share(coverage, name)


def check_last_q(last_q: object, name: str = "last_q") -> int:
    """An int in ``[1, MAX_LAST_Q]`` (not a bool), else a ``TypeError``/``ValueError`` naming
    ``name``."""
    check_int(last_q, name, low=1)
    assert isinstance(last_q, int)
    if last_q > MAX_LAST_Q:
        raise ValueError(f"{name} must be <= {MAX_LAST_Q}, got {last_q}")
    return last_q


def check_layer_settings(
    coverage: object,
    max_density: object,
    last_q: object,
    block_allocation: object,
    dense_below: object,
) -> None:
    """The per-call settings of :func:`~minference_kernels.sparse_prefill` and
    :func:`~minference_kernels.sparse_prefill_varlen`, each through its one validator."""
    check_coverage(coverage)
    check_share(max_density, "max_density")
    check_last_q(last_q)
    check_allocation(block_allocation)
    check_int(dense_below, "dense_below")


def check_backend(backend: object, name: str = "backend") -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ``ValueError`` naming ``name``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend
