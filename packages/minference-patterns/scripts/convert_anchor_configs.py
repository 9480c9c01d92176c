#!/usr/bin/env python3
"""Regenerate the shipped configs from MInference's published files.

    python packages/minference-patterns/scripts/convert_anchor_configs.py [SOURCE_DIR]

SOURCE_DIR (default ``../shared/anchor-configs`` relative to the repository root) holds
MInference's ``minference/configs/*.json`` files (MIT licence, Microsoft) and LICENSE-MInference.
Writes ``src/minference_patterns/configs/*.json`` (our format) and copies the licence next to them;
also copies the sources into ``tests/data/minference/`` for the round-trip tests.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from minference_patterns import BudgetPolicy, Provenance, __version__, from_minference
from minference_patterns.registry import SHIPPED_MODELS

PKG = Path(__file__).resolve().parents[1]
OUT = PKG / "src" / "minference_patterns" / "configs"
TEST_DATA = PKG / "tests" / "data" / "minference"
#: The longest length of the RULER evaluation MInference published with these configs (4K-128K).
ANCHOR_REFERENCE_LENGTH = 131072


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else PKG.parents[1].parent / "shared" / "anchor-configs"
    OUT.mkdir(parents=True, exist_ok=True)
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for m in SHIPPED_MODELS:
        if m.file in done:
            continue
        done.add(m.file)
        aliases = [x.model_id for x in SHIPPED_MODELS if x.file == m.file and x is not m]
        extra = {
            "source_repository": "microsoft/MInference",
            "source_path": f"minference/configs/{m.source_file}",
            "source_file": m.source_file,
        }
        if aliases:
            extra["also_for"] = aliases
        prov = Provenance(
            source="minference",
            license="MIT, Copyright (c) Microsoft Corporation (see LICENSE-MInference)",
            tool="minference-patterns (converted)",
            tool_version=__version__,
            notes=(
                "Converted from MInference's published config. MInference did not publish the "
                "calibration data, length or budget of its search; its file names suggest a "
                "KV-retrieval calibration prompt and an output-fit objective. The sizes are "
                "absolute token counts; the 4th element of each entry is kept as the score."
            ),
            extra=extra,
        )
        cfg = from_minference(
            src / m.source_file,
            model_id=m.model_id,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            provenance=prov,
            # sizes as published up to the longest RULER length MInference evaluated them at,
            # grown beyond it as measured (docs/patterns/budget-policy.md)
            budget_policy=BudgetPolicy.measured(reference_length=ANCHOR_REFERENCE_LENGTH),
        )
        cfg.validate_against(num_layers=m.num_layers, num_heads=m.num_heads)
        cfg.save(OUT / m.file)
        shutil.copyfile(src / m.source_file, TEST_DATA / m.source_file)
        print(f"{m.source_file} -> {m.file} ({cfg.num_layers} x {cfg.num_heads})")
    shutil.copyfile(src / "LICENSE-MInference", OUT / "LICENSE-MInference")
    shutil.copyfile(src / "LICENSE-MInference", TEST_DATA / "LICENSE-MInference")
    shutil.copyfile(src / "MODELS.json", TEST_DATA / "MODELS.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
