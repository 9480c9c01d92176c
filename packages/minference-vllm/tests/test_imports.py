"""Every module of minference_vllm imports on its own, in a fresh interpreter with none of the
package's modules loaded before it (issue 21; the import graph of all four packages, function-level
imports included, is checked by minference-kernels' ``tests/test_import_graph.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "minference_vllm"

_IMPORT_EACH = """
import importlib, json, sys
failed = []
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m.split(".")[0] == "minference_vllm"]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print(json.dumps(failed))
"""


def _modules() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = ("minference_vllm", *path.relative_to(SRC).with_suffix("").parts)
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


@pytest.mark.vllm
def test_every_module_imports_on_its_own():
    names = _modules()
    assert "minference_vllm._compat" in names and "minference_vllm.backends.cuda" in names
    res = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(failed)
