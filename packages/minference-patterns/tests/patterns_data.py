from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "minference"


@pytest.fixture(scope="session")
def minference_dir() -> Path:
    """MInference's published configs (copies, MIT licence), used as conversion sources."""
    return DATA


@pytest.fixture(scope="session")
def models_map() -> dict[str, str]:
    """MODELS.json's model id -> MInference file map."""
    return json.loads((DATA / "MODELS.json").read_text())["models"]
