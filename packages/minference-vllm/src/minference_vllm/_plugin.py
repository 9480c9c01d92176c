"""The ``vllm.general_plugins`` entry point."""

from __future__ import annotations

import logging
import os
import re
import threading

from .settings import ENV_DISABLE, ENV_REPLACE_DEFAULT, ENV_SKIP_VERSION_CHECK, env_flag

__all__ = ["CPU_BACKEND", "CUDA_BACKEND", "CUDA_DEFAULT_BACKEND", "parse_version", "register"]

# vLLM configures the "vllm" logger; a child of it prints in vLLM's format.
logger = logging.getLogger("vllm.minference")

CPU_BACKEND = "minference_vllm.backends.cpu.MInferenceCPUAttentionBackend"
CUDA_BACKEND = "minference_vllm.backends.cuda.MInferenceFlashAttentionBackend"
CUDA_DEFAULT_BACKEND = "minference_vllm.backends.cuda.MInferenceFlashAttentionDefaultBackend"

_lock = threading.Lock()
_registered = False


def parse_version(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string (``"0.32.1rc1+cpu"`` -> ``(0, 32, 1)``)."""
    match = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ValueError(f"cannot parse version {version!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def version_supported(version: str, low: tuple[int, ...], high: tuple[int, ...]) -> bool:
    """Whether ``low <= version < high`` (release numbers only)."""
    v = parse_version(version)
    return low <= v < high


def register() -> None:
    """Install the sparse pre-fill backend in vLLM's attention backend registry.

    vLLM calls this in every process it starts (API server, engine core, workers); repeated calls
    do nothing. On CPU the ``CPU_ATTN`` entry (the only one vLLM picks there) and the ``CUSTOM``
    slot point at :mod:`minference_vllm.backends.cpu`. On CUDA the ``CUSTOM`` slot points at
    :mod:`minference_vllm.backends.cuda` (select it with ``--attention-backend CUSTOM``), and with
    ``MINFERENCE_VLLM_REPLACE_DEFAULT=1`` so does the default ``FLASH_ATTN`` entry.

    The backend is inert until a pattern config is given (``--additional-config
    '{"minference": {"config": ...}}'`` or ``MINFERENCE_VLLM_CONFIG``). With
    ``MINFERENCE_VLLM_DISABLE=1``, or a vLLM outside the tested range, nothing is registered
    (``MINFERENCE_VLLM_SKIP_VERSION_CHECK=1`` registers anyway).
    """
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
        if env_flag(os.environ, ENV_DISABLE):
            logger.info("minference: disabled by %s", ENV_DISABLE)
            return
        from . import _compat as compat

        version = compat.vllm_version()
        low, high = compat.SUPPORTED_VLLM
        if not version_supported(version, low, high):
            span = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
            if not env_flag(os.environ, ENV_SKIP_VERSION_CHECK):
                logger.warning(
                    "minference: vLLM %s is outside the tested range %s; the sparse pre-fill "
                    "backend is NOT registered (set %s=1 to try it anyway)",
                    version,
                    span,
                    ENV_SKIP_VERSION_CHECK,
                )
                return
            logger.warning("minference: vLLM %s is outside the tested range %s", version, span)
        platform = compat.platform_name()
        if platform == "cpu":
            compat.register("CPU_ATTN", CPU_BACKEND)
            compat.register("CUSTOM", CPU_BACKEND)
        elif platform == "cuda":
            compat.register("CUSTOM", CUDA_BACKEND)
            if env_flag(os.environ, ENV_REPLACE_DEFAULT):
                compat.register("FLASH_ATTN", CUDA_DEFAULT_BACKEND)
        else:
            logger.warning("minference: no sparse pre-fill backend for platform %r", platform)
            return
        logger.debug("minference: attention backend registered on %s", platform)


def _reset_for_tests() -> None:
    global _registered
    with _lock:
        _registered = False
