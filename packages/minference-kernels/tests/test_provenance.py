"""The private provenance reader shared by ``minference eval`` and the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from minference_kernels import _provenance


def test_block_fields_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINFERENCE_COMMIT", raising=False)
    block = _provenance.block(None, ["prog", "--flag"])
    assert set(block) == {"commit", "dirty", "argv", "device", "versions", "utc"}
    assert block["commit"] is None and block["dirty"] is None
    assert block["argv"] == ["prog", "--flag"]
    assert block["device"]["cpu"] and "gpu" in block["device"]
    assert set(_provenance.VERSIONED) <= set(block["versions"])
    assert block["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert _provenance.commit(tmp_path) is None  # not a repository
    assert _provenance.dirty(tmp_path) is None


def test_commit_and_dirty_of_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINFERENCE_COMMIT", raising=False)

    def git(*args: str) -> str:
        return subprocess.check_output(["git", "-C", str(tmp_path), *args], text=True).strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    assert _provenance.commit(tmp_path) == git("rev-parse", "--short", "HEAD")
    assert _provenance.dirty(tmp_path) is False
    (tmp_path / "f.txt").write_text("b")
    assert _provenance.dirty(tmp_path) is True
    # the result file being written is not counted (a script's second save of partial results)
    assert _provenance.dirty(tmp_path, (tmp_path / "f.txt",)) is False
    assert _provenance.dirty(tmp_path, (tmp_path / "other.txt",)) is True
    assert _provenance.dirty(tmp_path, (Path("/elsewhere/f.txt"),)) is True
    assert _provenance.block(tmp_path, [], (tmp_path / "f.txt",))["dirty"] is False
    (tmp_path / "sub").mkdir()  # asked from a folder of the checkout: still the whole checkout
    assert _provenance.dirty(tmp_path / "sub", (tmp_path / "f.txt",)) is False
    assert _provenance.dirty(tmp_path / "sub", (tmp_path / "sub" / "x",)) is True
    monkeypatch.setenv("MINFERENCE_COMMIT", "abc1234")  # a copied tree: the named commit wins
    assert _provenance.commit(tmp_path) == "abc1234" and _provenance.dirty(tmp_path) is None
    assert _provenance.commit(None) == "abc1234"
