"""The published JSON Schema agrees with the code, the docs and the shipped files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import minference_patterns as mp
import pytest
from minference_kernels import KINDS
from minference_patterns.config import _KIND_STRINGS, _TOP_LEVEL, KIND_FIELDS
from minference_patterns.registry import SHIPPED_MODELS, shipped_path

DOC = Path(__file__).resolve().parents[3] / "docs" / "patterns" / "config-reference.md"


def test_schema_matches_the_codec():
    s = mp.json_schema()
    assert set(s["properties"]) == set(_TOP_LEVEL)
    assert s["properties"]["schema_version"]["maximum"] == mp.SCHEMA_VERSION
    head = s["$defs"]["head"]
    assert head["properties"]["kind"]["enum"] == list(KIND_FIELDS) == list(KINDS)
    for branch in head["oneOf"]:
        kind = branch["properties"]["kind"]["const"]
        strings = set(_KIND_STRINGS.get(kind, {}))
        assert set(branch["properties"]) == {"kind", "score", *KIND_FIELDS[kind], *strings}
        for name, allowed in _KIND_STRINGS.get(kind, {}).items():
            assert branch["properties"][name]["enum"] == list(allowed)
        required = {f for f, default in KIND_FIELDS[kind].items() if default is None}
        assert set(branch.get("required", [])) == required
    policy_fields = set(mp.BudgetPolicy.__dataclass_fields__)
    assert set(s["$defs"]["budget_policy"]["properties"]) == policy_fields
    assert set(mp.BudgetPolicy(reference_length=8192).to_dict()) == policy_fields
    assert set(s["$defs"]["provenance"]["properties"]) == set(mp.Provenance.__dataclass_fields__)


@pytest.mark.skipif(not DOC.exists(), reason="docs not in this checkout")
def test_docs_publish_the_same_schema():
    text = DOC.read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    schemas = [json.loads(b) for b in blocks if '"$schema"' in b]
    assert schemas == [mp.json_schema()]


def test_shipped_files_validate_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = mp.json_schema()
    for m in SHIPPED_MODELS:
        jsonschema.validate(json.loads(shipped_path(m).read_text()), schema)
