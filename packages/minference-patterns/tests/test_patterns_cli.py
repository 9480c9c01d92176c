"""Summaries, pictures and the ``minference-patterns`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import minference_patterns as mp
import patterns_planted as planted
import pytest
from minference_patterns import HeadPattern, PatternConfig
from minference_patterns.cli import main
from minference_patterns.summary import summary_dict
from patterns_data import MINFERENCE_DIR

PNG = b"\x89PNG\r\n\x1a\n"


def test_import_is_light():
    code = (
        "import sys, minference_patterns as mp; "
        "bad = [m for m in ('matplotlib', 'minference_patterns.search', 'minference_patterns.plot', "
        "'minference_patterns.cost') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_attributes():
    assert callable(mp.search_config) and callable(mp.plot_config) and callable(mp.summarize)
    with pytest.raises(AttributeError):
        mp.no_such_thing  # noqa: B018


def test_summary_of_a_shipped_config():
    cfg = mp.load("microsoft/Phi-3-mini-128k-instruct")
    text = mp.summarize(cfg, 65536)
    assert text.startswith("microsoft/Phi-3-mini-128k-instruct: 32 layers x 32 query heads")
    assert "stored kinds: a_shape 43, vertical_slash 981" in text
    assert "expected density" in text
    assert sum(1 for line in text.splitlines() if line[:5].strip().isdigit()) == 32
    d = summary_dict(cfg, 65536)
    assert 0 < d["density"] < 1 and len(d["layers"]) == 32
    assert sum(sum(layer["patterns"].values()) for layer in d["layers"]) == 32 * 32
    # at a short length the big budgets cover everything and become dense
    assert summary_dict(cfg, 4096)["kinds_at_seq_len"].get("dense", 0) > 0


def test_plot_config(tmp_path):
    fig = mp.plot_config(
        mp.load("THUDM/glm-4-9b-chat-1m"), tmp_path / "a" / "glm.png", seq_len=1 << 20
    )
    assert (tmp_path / "a" / "glm.png").read_bytes()[:8] == PNG
    assert len(fig.axes) == 2
    mixed = PatternConfig(
        model_id="m", num_layers=2, num_heads=4,
        layers=[[HeadPattern.dense(), HeadPattern.a_shape(4, 64), HeadPattern.vertical_slash(30, 100),
                 HeadPattern.block_sparse(2)]] * 2,
    )  # fmt: skip
    fig = mp.plot_config(mixed, None, seq_len=4096)  # no file: just the figure
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["dense", "a_shape", "vertical_slash", "block_sparse"]


def test_plot_head(tmp_path):
    q, k, _ = planted.topic_block_heads(n=512, heads=2)
    path = tmp_path / "head.png"
    fig = mp.plot_head(q, k, HeadPattern.block_sparse(2), path, head=1, max_pixels=128)
    assert path.read_bytes()[:8] == PNG
    title = fig.axes[1].get_title()
    assert title.startswith("block_sparse(top_k=2, block=64): recall ")
    recall = float(title.split("recall ")[1].split(",")[0])
    assert 0.5 < recall <= 1.0
    # 2-D inputs for a single head work too
    mp.plot_head(q[0, 0], k[0, 0], HeadPattern.a_shape(4, 64))
    with pytest.raises(ValueError, match="out of range"):
        mp.plot_head(q, k, HeadPattern.dense(), head=5)
    with pytest.raises(TypeError, match="HeadPattern"):
        mp.plot_head(q, k, "dense")  # type: ignore[arg-type]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_show(capsys):
    code, out, _ = run(capsys, "show", "qwen/qwen2.5-7b-instruct", "--seq-len", "65536")
    assert code == 0 and "Qwen/Qwen2.5-7B-Instruct: 28 layers x 28 query heads" in out
    code, out, _ = run(
        capsys, "show", "Qwen/Qwen2.5-7B-Instruct", "--json", "--policy", "proportional"
    )
    assert code == 0 and json.loads(out)["budget_policy"]["longer_exponent"] == 1.0


def test_cli_plot(tmp_path, capsys):
    out_png = tmp_path / "fig.png"
    code, out, _ = run(capsys, "plot", "01-ai/Yi-9B-200K", "-o", str(out_png))
    assert code == 0 and out_png.read_bytes()[:8] == PNG


def test_cli_validate(tmp_path, capsys):
    good = PatternConfig.uniform(2, 2, HeadPattern.vertical_slash(1, 1)).save(
        tmp_path / "good.json"
    )
    bad = tmp_path / "bad.json"
    d = json.loads(good.read_text())
    d["layers"][1][0]["num_slash"] = -2
    bad.write_text(json.dumps(d))
    code, out, err = run(
        capsys, "validate", str(good), str(MINFERENCE_DIR / "Qwen2.5_7B_Instruct_1M.json")
    )
    assert code == 0 and out.count("ok ") == 2
    code, out, err = run(capsys, "validate", str(good), str(bad))
    assert code == 1
    assert "INVALID" in err and "layer 1, head 0, field 'num_slash'" in err


def test_cli_convert_both_ways(tmp_path, capsys):
    src = MINFERENCE_DIR / "Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern.json"
    ours = tmp_path / "phi.json"
    code, *_ = run(capsys, "convert", str(src), "-o", str(ours), "--context-length", "32768")
    assert code == 0
    cfg = mp.load(ours)
    assert cfg.model_id == "microsoft/Phi-3-mini-128k-instruct" and cfg.context_length == 32768
    back = tmp_path / "phi_minference.json"
    code, *_ = run(capsys, "convert", str(ours), "-o", str(back), "--to", "minference")
    assert code == 0
    assert json.loads(back.read_text()) == json.loads(src.read_text())


def test_cli_list_and_schema(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and len(out.strip().splitlines()) == len(mp.shipped_model_ids())
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out) == mp.json_schema()


def test_cli_errors(capsys, tmp_path):
    code, _, err = run(capsys, "show", "acme/unknown-model")
    assert code == 2 and "minference search --model" in err
    p = tmp_path / "t.json"
    p.write_text('{"schema_version": 1, "layers": [')
    code, _, err = run(capsys, "show", str(p))
    assert code == 2 and "truncated" in err
    with pytest.raises(SystemExit):
        main(["plot", "Qwen/Qwen2.5-7B-Instruct"])  # -o is required


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "minference_patterns.cli", "--version"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == f"minference-patterns {mp.__version__}"


def test_every_cli_option_has_help_and_shows_its_default():
    """Every option and argument of every subcommand has help text; an option with a default
    shows it in ``--help``."""
    import argparse

    from minference_patterns.cli import _parser

    seen = set()
    todo = [("minference-patterns", _parser())]
    while todo:
        name, parser = todo.pop()
        seen.add(name)
        text = " ".join(parser.format_help().split())
        for a in parser._actions:  # argparse has no public walk over its actions
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}", sp) for n, sp in a.choices.items()]
                continue
            assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest} has no help"
            if a.option_strings and a.default not in (None, False, True, argparse.SUPPRESS):
                assert f"(default: {a.default})" in text, (name, a.option_strings)
    assert len(seen) == 7  # the command and its six subcommands
