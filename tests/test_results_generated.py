"""The generated results (benchmarks/RESULTS.md, the README's results block, the docs' result
snippets) match the result files declared in benchmarks/sources.json, and result files written
now carry their provenance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _provenance  # noqa: E402
import _sources  # noqa: E402
import results  # noqa: E402
import run  # noqa: E402


def test_generated_results_are_current() -> None:
    stale = [
        str(p.relative_to(ROOT))
        for p, text in results.outputs().items()
        if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"stale, run python benchmarks/results.py: {stale}"


def test_stale_readme_block_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    text = results.README.read_text()
    begin = text.index(results.BEGIN) + len(results.BEGIN)
    readme.write_text(
        text[:begin] + "\n- 99.9x faster, typed by hand\n" + text[text.index(results.END) :]
    )
    monkeypatch.setattr(results, "README", readme)
    new = results.outputs()[readme]
    assert "typed by hand" not in new and new != readme.read_text()
    assert results.main(["--check"]) == 1


def test_every_source_file_exists_and_every_headline_has_a_source() -> None:
    keys = _sources.table()
    for key in keys:
        assert _sources.paths(key)  # raises on a missing file
    for h in results.HEADLINES:
        assert h.source in keys, h.key


def test_every_current_result_file_is_declared() -> None:
    """A JSON result in benchmarks/results/ feeds a declared key, or it belongs in archive/; logs
    and plots go with the JSON of the same name."""
    declared = {p.name for key in _sources.table() for p in _sources.paths(key)}
    stems = {name.rsplit(".", 1)[0] for name in declared}
    orphans = [
        p.name
        for p in sorted(_sources.RESULTS.iterdir())
        if p.is_file() and p.name not in declared and p.name.rsplit(".", 1)[0] not in stems
    ]
    assert not orphans, f"not in benchmarks/sources.json (declare or git mv to archive/): {orphans}"


def test_every_suite_feeds_a_declared_key() -> None:
    keys = _sources.table()
    for steps in run.SUITES.values():
        for step in steps:
            assert (ROOT / "benchmarks" / step.script).exists(), step.script
            assert step.key is None or step.key in keys, step.key


def test_write_json_records_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINFERENCE_COMMIT", "abc1234")
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--n", "5"])
    path = tmp_path / "r.json"
    _provenance.write_json(path, {"rows": [1]})
    prov = json.loads(path.read_text())["provenance"]
    assert prov["commit"] == "abc1234"
    assert prov["argv"] == ["bench_x.py", "--n", "5"]
    assert prov["device"]["cpu"]
    assert set(_provenance.VERSIONED) <= set(prov["versions"]) and prov["versions"]["python"]


def test_write_json_does_not_count_its_own_file_as_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script saving partial results into a tracked file more than once is not dirty by that."""
    seen: list[tuple[Path, ...]] = []
    monkeypatch.setattr(
        _provenance._core, "dirty", lambda root, ignore=(): seen.append(ignore) or False
    )
    path = tmp_path / "r.json"
    _provenance.write_json(path, {"rows": [1]})
    _provenance.write_text(tmp_path / "r.txt", "x")
    assert seen == [(path,), (tmp_path / "r.txt",)]


def test_old_results_say_they_predate_provenance() -> None:
    prov = _provenance.read_provenance({"device": "NVIDIA H200", "rows": []})
    assert prov["commit"] == _provenance.PRE_PROVENANCE
    assert prov["device"] == "NVIDIA H200"
