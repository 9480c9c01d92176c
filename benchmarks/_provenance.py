"""What a benchmark result records about where it ran (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """The short commit hash; ``MINFERENCE_COMMIT`` wins (a copied tree whose ``.git`` is stale,
    as on the device machine); ``"unknown"`` without git."""
    if os.environ.get("MINFERENCE_COMMIT"):
        return os.environ["MINFERENCE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
