"""The one place that maps a backend to an operation's implementation.

The Triton modules of :mod:`minference_kernels.ops` are imported here, on first use only: Triton
is optional (Linux x86_64), and importing a Triton module is what needs it. Callers pass the
PyTorch reference and the name of its Triton twin, so no module imports its Triton twin (which may
import its reference for a fallback) by name and the imports stay free of loops.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# the Triton modules of this package, each beside its PyTorch reference ("<op>.py")
TRITON_MODULES = (
    "attention_triton",
    "block_sampled_triton",
    "block_select_triton",
    "head_rank_triton",
    "index_build_triton",
    "vs_scores_triton",
)


def triton_module(name: str) -> ModuleType:
    """The Triton module ``minference_kernels.ops.<name>`` (one of :data:`TRITON_MODULES`),
    imported on first use."""
    if name not in TRITON_MODULES:
        raise ValueError(f"unknown Triton module {name!r}; one of {', '.join(TRITON_MODULES)}")
    return importlib.import_module(f"{__package__}.{name}")


def pick(backend: str, reference: F, triton: str) -> F:
    """The implementation of an operation for ``backend`` (already resolved: ``"torch"`` or
    ``"triton"``): ``reference`` (the PyTorch function) for ``"torch"``, else the function
    ``triton`` (``"<module>.<function>"``, a module of :data:`TRITON_MODULES`) -- same arguments,
    same results."""
    if backend == "torch":
        return reference
    if backend != "triton":
        raise ValueError(f"backend must be 'torch' or 'triton' here, got {backend!r}")
    module, _, func = triton.partition(".")
    return getattr(triton_module(module), func)
