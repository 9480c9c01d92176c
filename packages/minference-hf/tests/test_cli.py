"""The ``minference`` CLI on the embedded default model, end to end (no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from minference_hf.cli import build_parser, main
from minference_hf.niah import build_prompt, parse_depths, parse_length
from minference_hf.tiny import build_tokenizer


def test_default_generate_end_to_end(tmp_path):
    """The README's first command, as a fresh process: the embedded model, sparse pre-fill,
    dense comparison, and a clear untrained notice."""
    out = tmp_path / "gen.json"
    proc = subprocess.run(
        [sys.executable, "-m", "minference_hf", "generate", "--tiny", "--compare-dense",
         "--max-new-tokens", "4", "--json", str(out)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    assert "UNTRAINED" in proc.stdout
    assert "time to first token" in proc.stdout and "outputs agree" in proc.stdout
    res = json.loads(out.read_text())
    assert res["untrained"] is True
    assert res["prompt_tokens"] > res["min_sparse_len"]
    assert res["minference"]["sparse_calls"] == 4  # one per layer of the tiny model
    assert res["dense"]["sparse_calls"] == 0
    assert res["minference"]["new_tokens"] == 4


def test_generate_below_threshold_reports_dense(capsys):
    assert (
        main(
            ["generate", "--tiny", "--max-new-tokens", "2", "--prompt-tokens", "300", "--no-warmup"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "[dense (prompt below the threshold)]" in text


def test_default_niah_writes_json_and_heatmaps(tmp_path):
    out = tmp_path / "niah"
    rc = main(["niah", "--tiny", "--lengths", "512,1100", "--depths", "0,1", "--out-dir", str(out),
               "--max-new-tokens", "4", "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "niah.json").read_text())
    assert res["untrained"] is True
    assert res["lengths"] == [512, 1100] and res["depths"] == [0.0, 1.0]
    assert set(res["methods"]) == {"dense", "sparse"}
    assert len(res["cases"]) == 2 * 2 * 2
    sparse_cases = [c for c in res["cases"] if c["method"] == "sparse"]
    # the default model's threshold is 1024 tokens: the 1100-token cells go sparse
    assert [c["sparse_calls"] for c in sparse_cases] == [0, 0, 4, 4]
    assert all(c["sparse_calls"] == 0 for c in res["cases"] if c["method"] == "dense")
    for m in ("dense", "sparse"):
        png = out / f"niah_{m}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(res["methods"][m]["scores"]) == 2


def test_default_search_writes_a_loadable_config(tmp_path):
    import minference_patterns

    out = tmp_path / "cfg.json"
    assert (
        main(["search", "--tiny", "--out", str(out), "--max-tokens", "512", "--no-progress"]) == 0
    )
    cfg = minference_patterns.load(out)
    assert (cfg.num_layers, cfg.num_heads) == (4, 8)


def test_cli_errors_are_one_clear_line(capsys):
    with pytest.raises(SystemExit, match="--tiny and --model exclude each other"):
        main(["generate", "--tiny", "--model", "smollm2-135m"])
    assert main(["generate", "--model", "/nonexistent/model.gguf"]) == 2
    assert "error: MissingModelError: GGUF file not found: /nonexistent/model.gguf" in (
        capsys.readouterr().err
    )
    rc = main(["generate", "--tiny", "--config", "acme/NoSuchModel-7B", "--max-new-tokens", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: UnknownModelError: no shipped pattern config for 'acme/NoSuchModel-7B'" in err


def test_parse_helpers():
    assert parse_length("8k") == 8192 and parse_length("128K") == 131072
    assert parse_length("1m") == 1 << 20 and parse_length("3000") == 3000
    with pytest.raises(ValueError):
        parse_length("lots")
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError):
        parse_depths("0,1.5")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_prompt_places_needle_at_depth(depth):
    tok = build_tokenizer()
    ids, answer = build_prompt(tok, 3000, depth)
    assert len(ids) == 3000
    text = tok.decode(ids)
    assert text.count(answer) == 1
    where = text.index(answer) / len(text)
    assert abs(where - depth) < 0.1


def test_generate_and_niah_with_a_local_model_directory(tmp_path, capsys):
    """The --model path: AutoModelForCausalLM / AutoTokenizer from a saved directory, a config
    file, chunked pre-fill with a sparse threshold, and NIAH on it."""
    from minference_hf.tiny import build_model, default_pattern_config

    model_dir = tmp_path / "tiny-model"
    build_model(num_layers=4).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    cfg = default_pattern_config().save(tmp_path / "cfg.json")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All work and no play makes a dull model. " * 40)
    out = tmp_path / "gen.json"
    rc = main(["generate", "--model", str(model_dir), "--prompt-file", str(prompt),
               "--config", str(cfg), "--min-sparse-len", "512", "--chunk-size", "1024",
               "--max-new-tokens", "3", "--compare-dense", "--json", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["untrained"] is False and "UNTRAINED" not in capsys.readouterr().out
    assert res["prompt_tokens"] == 1 + 40 * len("All work and no play makes a dull model. ")
    # chunks of 1024 + 617 tokens: both at least 512 keys, so 2 sparse calls per layer
    assert res["minference"]["sparse_calls"] == 2 * 4
    assert res["dense"]["sparse_calls"] == 0
    rc = main(["niah", "--model", str(model_dir), "--config", str(cfg), "--lengths", "700",
               "--depths", "0.5", "--min-sparse-len", "512", "--max-new-tokens", "2",
               "--out-dir", str(tmp_path / "niah"), "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "niah" / "niah.json").read_text())
    assert [c["sparse_calls"] for c in res["cases"]] == [0, 4]


def _generate_json(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    rc = main(["generate", "--tiny", "--prompt-tokens", "1100", "--max-new-tokens", "4", "--no-warmup",
               "--no-progress", "--json", str(out), *extra])  # fmt: skip
    assert rc == 0
    return json.loads(out.read_text())


def test_generate_offload_kv_on_matches_off(tmp_path, capsys):
    """--offload-kv on: layer-by-layer pre-fill with every cache layer in host memory, the same
    sparse calls and tokens as the model(...) pre-fill."""
    off = _generate_json(tmp_path, "off", "--offload-kv", "off")
    text = capsys.readouterr().out
    assert "pre-fill: model(...), one pass (--offload-kv off)" in text
    on = _generate_json(tmp_path, "on", "--offload-kv", "on", "--prefill-chunk", "300")
    text = capsys.readouterr().out
    assert (
        "pre-fill: long_prefill, layer by layer (KV cache 0/4 layers on the device, 4 in host "
        in text
    )
    assert "memory (predicted): 1100 tokens: GPU peak ~" in text
    assert off["prefill"]["path"] == "model" and "memory" not in off["prefill"]
    assert on["prefill"]["path"] == "long_prefill" and on["prefill"]["chunk_size"] == 300
    mem = on["prefill"]["memory"]
    assert mem["seq_len"] == 1100 and mem["gpu_kv_layers"] == 0 and mem["num_layers"] == 4
    assert mem["host_kv"] == 4 * mem["kv_per_layer"] > 0
    assert on["minference"]["sparse_calls"] == off["minference"]["sparse_calls"] == 4
    assert on["minference"]["token_ids"] == off["minference"]["token_ids"]
    assert len(on["minference"]["token_ids"]) == 4


def test_generate_offload_kv_auto_follows_free_gpu_memory(tmp_path, capsys, monkeypatch):
    """auto on CPU: model(...); where a plain forward does not fit the free (CUDA) memory:
    long_prefill with automatic placement (all layers stay resident on CPU: no budget there)."""
    import minference_hf.cli as cli

    plain = _generate_json(tmp_path, "auto-cpu")
    assert "(--offload-kv auto: cpu, not CUDA)" in capsys.readouterr().out
    assert plain["prefill"]["path"] == "model"
    monkeypatch.setattr(cli, "_free_device_memory", lambda device: 1 << 20)
    tight = _generate_json(tmp_path, "auto-tight")
    text = capsys.readouterr().out
    assert "pre-fill: long_prefill, layer by layer (KV cache 4/4 layers on the device" in text
    assert "a plain forward would need ~" in text
    assert tight["prefill"]["path"] == "long_prefill"
    assert tight["minference"]["token_ids"] == plain["minference"]["token_ids"]
    monkeypatch.setattr(cli, "_free_device_memory", lambda device: 1 << 40)
    roomy = _generate_json(tmp_path, "auto-roomy")
    assert "pre-fill: model(...), one pass (--offload-kv auto: a plain forward needs" in (
        capsys.readouterr().out
    )
    assert roomy["prefill"]["path"] == "model"


def test_generate_plan_memory_error_is_one_clear_line(capsys, monkeypatch):
    import minference_hf.layerwise as layerwise

    def no_room(*args, **kwargs):
        raise MemoryError("long_prefill of 1100 tokens needs ~9.0 GiB of activations")

    monkeypatch.setattr(layerwise, "plan_offload", no_room)
    rc = main(
        [
            "generate",
            "--tiny",
            "--offload-kv",
            "on",
            "--prompt-tokens",
            "1100",
            "--max-new-tokens",
            "1",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "minference generate: error: MemoryError: long_prefill of 1100 tokens needs" in err


@pytest.mark.parametrize(
    "args,words",
    [
        (["--offload-kv", "on", "--chunk-size", "512"], "--offload-kv on .* exclude each other"),
        (["--offload-kv", "off", "--prefill-chunk", "512"], "which --offload-kv off does not use"),
        (["--chunk-size", "512", "--prefill-chunk", "512"], "which --chunk-size does not use"),
        (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    ],
)
def test_generate_prefill_argument_errors(args, words):
    with pytest.raises(SystemExit, match=words):
        main(["generate", "--tiny", "--max-new-tokens", "1", *args])
    with pytest.raises(SystemExit):  # argparse: not a choice
        build_parser().parse_args(["generate", "--offload-kv", "yes"])


def test_niah_gives_the_model_back_with_its_whole_plan(tmp_path):
    """A model patched with non-default settings comes back from ``run_niah`` with all of them
    (block_allocation was dropped before)."""
    from minference_hf import get_plan, patch
    from minference_hf.niah import run_niah
    from minference_hf.tiny import build_model, default_pattern_config

    model = build_model(num_layers=2)
    cfg = default_pattern_config(num_layers=2)
    patch(model, cfg, min_sparse_len=700, block_allocation="layer", coverage=0.9, last_q=32)
    before = get_plan(model).options
    res = run_niah(model, build_tokenizer(), lengths=[300], depths=[0.5], sparse_config=cfg,
                   out_dir=tmp_path, max_new_tokens=1, progress=False)  # fmt: skip
    # the sparse run itself used the model's settings (it re-patched with query_block before)
    assert res["options"] == before.to_dict()
    assert res["options"]["block_allocation"] == "layer"
    plan = get_plan(model)
    assert plan is not None and plan.options == before
    assert plan is not None and plan.config is cfg
    assert (plan.block_allocation, plan.coverage, plan.min_sparse_len, plan.last_q) == (
        "layer",
        0.9,
        700,
        32,
    )


def test_version_flag(capsys):
    import minference_hf

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"minference {minference_hf.__version__}"


def _option_actions(parser):
    """Every (command path, option action) of ``parser`` and its subcommands."""
    import argparse

    out = []
    todo = [("minference", parser)]
    while todo:
        name, p = todo.pop()
        for a in p._actions:  # argparse has no public walk over its actions
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}", sub) for n, sub in a.choices.items()]
            elif a.option_strings:
                out.append((name, p, a))
    return out


def test_every_cli_option_has_help_and_shows_its_default():
    actions = _option_actions(build_parser())
    assert {n for n, _, _ in actions} == {
        "minference", "minference generate", "minference search", "minference niah",
        "minference eval",
    }  # fmt: skip
    for name, parser, a in actions:
        assert a.help and a.help.strip(), f"{name} {a.option_strings} has no help"
        if a.default not in (None, False, True) and a.default != "==SUPPRESS==":
            text = parser.format_help()
            flat = " ".join(text.split())
            assert f"(default: {a.default})" in flat, (
                f"{name} {a.option_strings}: its default {a.default!r} is not shown"
            )


def test_cli_flag_defaults_are_the_options_defaults():
    """generate and niah take every PrefillOptions setting under its own name, with its
    default: a flag that re-declares one differently fails here."""
    import dataclasses

    from minference_kernels import PrefillOptions

    defaults = PrefillOptions()
    for cmd in ("generate", "niah"):
        args = build_parser().parse_args([cmd])
        for f in dataclasses.fields(PrefillOptions):
            if f.name in ("min_sparse_len", "max_density"):
                continue  # device-dependent default (CPU crossover) / not a CLI setting
            assert getattr(args, f.name) == getattr(defaults, f.name), (cmd, f.name)
        assert args.min_sparse_len is None  # resolved by the device's measured crossover


def test_cli_options_flags_reach_the_plan(tmp_path):
    out = tmp_path / "gen.json"
    rc = main(["generate", "--tiny", "--max-new-tokens", "1", "--prompt-tokens", "300",
               "--no-warmup", "--no-progress", "--last-q", "32", "--block-allocation", "layer",
               "--coverage", "0.9", "--min-sparse-query", "16", "--json", str(out)])  # fmt: skip
    assert rc == 0
    opts = json.loads(out.read_text())["options"]
    assert (opts["last_q"], opts["block_allocation"], opts["coverage"]) == (32, "layer", 0.9)
    assert opts["min_sparse_query"] == 16


def test_cli_bad_option_is_one_clear_line(capsys):
    assert main(["generate", "--tiny", "--last-q", "200", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "last_q must be <= 128, got 200" in err and "Traceback" not in err


def test_niah_and_eval_without_matplotlib(tmp_path):
    """Without the [plot] extra the JSON is still written and a one-line note replaces the
    heatmaps (matplotlib blocked in a fresh process)."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from minference_hf.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    niah = tmp_path / "niah"
    proc = subprocess.run(
        [sys.executable, "-c", code, "niah", "--tiny", "--lengths", "300", "--depths", "0.5",
         "--max-new-tokens", "1", "--no-progress", "--out-dir", str(niah)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "niah: no plot: matplotlib is not installed" in proc.stdout
    res = json.loads((niah / "niah.json").read_text())
    assert res["methods"]["sparse"]["heatmap"] is None and "matplotlib" in res["note"]
    assert not list(niah.glob("*.png"))
    ev = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-c", code, "eval", "--tiny", "--lengths", "300", "--seeds", "1",
         "--tasks", "passkey", "--depths", "0.5", "--max-new-tokens", "1", "--no-progress",
         "--methods", "dense,vs:16:32", "--out-dir", str(ev)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "eval: no plot: matplotlib is not installed" in proc.stdout
    assert (ev / "eval.json").exists() and not (ev / "eval.png").exists()


def test_eval_json_records_provenance(tmp_path, monkeypatch):
    """``minference eval`` writes where its result was made: commit, command line, device and
    versions (the same fields as the benchmark scripts' provenance block)."""
    monkeypatch.setenv("MINFERENCE_COMMIT", "abc1234")
    monkeypatch.setattr(sys, "argv", ["minference", "eval", "--tiny"])
    args = ["eval", "--tiny", "--lengths", "300", "--seeds", "1", "--tasks", "lm", "--tail",
            "8", "--methods", "dense", "--no-progress", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    prov = json.loads((tmp_path / "eval.json").read_text())["provenance"]
    assert prov["commit"] == "abc1234" and prov["dirty"] is None
    assert prov["argv"] == ["minference", "eval", "--tiny"]
    assert prov["command"] == ["minference", *args]
    assert prov["device"]["cpu"] and prov["device"]["gpu"] is None
    assert prov["versions"]["python"] and prov["versions"]["torch"]
    assert prov["versions"]["minference-hf"] and prov["utc"].endswith("Z")


def test_provenance_commit_only_inside_a_checkout(tmp_path, monkeypatch):
    """Outside a checkout of the project (an installed wheel) no commit is claimed; inside one,
    the checkout's own HEAD."""
    import shutil

    from minference_hf import _provenance

    monkeypatch.delenv("MINFERENCE_COMMIT", raising=False)
    wheel = tmp_path / "site-packages" / "minference_hf" / "_provenance.py"
    assert _provenance.commit(wheel) is None and _provenance.dirty(wheel) is None
    if shutil.which("git") is None:
        return
    repo = tmp_path / "repo"
    here = repo / "packages" / "minference-hf" / "src" / "minference_hf" / "_provenance.py"
    here.parent.mkdir(parents=True)
    here.write_text("# stand-in\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert _provenance.commit(here) is None  # a repository without a commit yet
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert _provenance.commit(here) == head and _provenance.dirty(here) is False
    here.write_text("# changed\n")
    assert _provenance.dirty(here) is True
