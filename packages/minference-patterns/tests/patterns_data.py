"""Data of the minference-patterns tests: MInference's published configs (copies, MIT licence).

A plain module, not a conftest.py: a module named ``conftest`` would clash with other packages'
when all test suites are collected by one pytest run.
"""

from __future__ import annotations

import json
from pathlib import Path

#: MInference's ``minference/configs/*.json`` files and MODELS.json (model id -> file).
MINFERENCE_DIR = Path(__file__).parent / "data" / "minference"
#: MODELS.json's model id -> MInference file map.
MODELS_MAP: dict[str, str] = json.loads((MINFERENCE_DIR / "MODELS.json").read_text())["models"]
