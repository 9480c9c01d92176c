"""``long_prefill`` / ``generate_long`` on CPU: the layer-by-layer pre-fill gives the logits and
the KV cache of ``model(...)`` for every supported architecture and cache placement, decoding from
its cache matches ``model.generate``, the sparse path is the same as in ``model(...)``, bad input
is a clear error, and the memory model is sane for a Llama-3-8B-shaped model (built on ``meta``)."""

from __future__ import annotations

import functools

import minference_hf
import pytest
import torch
from conftest import (
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    VOCAB,
    full_budget_config,
    make_model,
    sparse_config,
)
from minference_hf import (
    MemoryEstimate,
    OffloadedKVCache,
    UnsupportedModelError,
    estimate_memory,
    generate_long,
    long_prefill,
    plan_offload,
)
from minference_hf.caches import HostKVLayer, ResidentKVLayer, cache_kwarg, new_cache
from minference_hf.generation import greedy_generate

GIB = 1 << 30
N = 300  # not a multiple of CHUNK
CHUNK = 77
B = 2


def _ids(b: int = B, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


@functools.cache
def _reference(arch: str):
    """The model, the prompt, ``model(ids)``'s last logits and its DynamicCache (computed once)."""
    model = make_model(arch)
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): new_cache(model)})
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    return model, ids, out.logits[:, -1], cache


def _expected_offloaded(offload) -> tuple[int, ...]:
    if offload is True:
        return tuple(range(LAYERS))
    if offload is False:
        return ()
    return tuple(range(LAYERS - offload, LAYERS))  # an int offloads the last layers


# ---- same logits and cache as model(...) ---------------------------------------------------


@pytest.mark.parametrize("offload", [False, True, 1], ids=["resident", "offloaded", "one-layer"])
def test_prefill_matches_forward_logits_and_cache(arch, offload):
    model, ids, ref_logits, ref_cache = _reference(arch)
    res = long_prefill(model, ids, offload_kv=offload, chunk_size=CHUNK, reserve_tokens=5)

    assert res.logits.shape == (B, VOCAB) and res.logits.dtype == torch.float32
    torch.testing.assert_close(res.logits, ref_logits, atol=1e-5, rtol=1e-5)

    cache = res.cache
    assert isinstance(cache, OffloadedKVCache)
    assert cache.offloaded == _expected_offloaded(offload)
    assert res.seq_len == N and cache.get_seq_length() == N
    assert res.memory.gpu_kv_layers == LAYERS - len(cache.offloaded)
    assert len(cache.layers) == LAYERS
    for i, layer in enumerate(cache.layers):
        kind = HostKVLayer if i in cache.offloaded else ResidentKVLayer
        assert type(layer) is kind, i
        assert layer.capacity == N + 5
        assert layer.keys.shape == (B, KV_HEADS, N, HEAD_DIM)
        torch.testing.assert_close(layer.keys, ref_cache.layers[i].keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.values, ref_cache.layers[i].values, atol=1e-6, rtol=1e-6)
    per_layer = 2 * B * KV_HEADS * (N + 5) * HEAD_DIM * 4
    assert cache.host_bytes == len(cache.offloaded) * per_layer
    assert len(res.layer_seconds) == LAYERS


def test_chunk_larger_than_prompt_and_single_token_prompt():
    model, ids, ref_logits, _ = _reference("llama")
    res = long_prefill(model, ids, offload_kv=True, chunk_size=10 * N)
    torch.testing.assert_close(res.logits, ref_logits, atol=1e-5, rtol=1e-5)
    one = ids[:, :1]
    with torch.no_grad():
        ref1 = model(one).logits[:, -1]
    torch.testing.assert_close(long_prefill(model, one).logits, ref1, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_keeps_every_layer_resident():
    model, ids, ref_logits, _ = _reference("qwen2")
    res = long_prefill(model, ids, offload_kv="auto", chunk_size=CHUNK)
    assert res.cache.offloaded == () and res.memory.gpu_kv_layers == LAYERS
    assert res.peak_gpu_bytes is None  # CPU: nothing measured
    torch.testing.assert_close(res.logits, ref_logits, atol=1e-5, rtol=1e-5)


# ---- decoding from the cache ---------------------------------------------------------------


@pytest.mark.parametrize("offload", [True, 1])
def test_generate_long_matches_generate(offload):
    model, ids, _, _ = _reference("llama")
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    out = generate_long(model, ids, offload_kv=offload, max_new_tokens=6, do_sample=False)
    assert out.shape == (B, N + 6)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("offload", [True, False, "auto"])
def test_greedy_generate_long_prefill_matches_in_memory(offload):
    model, ids, _, _ = _reference("phi3")
    ref = greedy_generate(model, ids[:1], max_new_tokens=6, eos_token_id=[])
    res = greedy_generate(model, ids[:1], max_new_tokens=6, eos_token_id=[], offload_kv=offload)
    assert len(res.token_ids) == 6
    assert res.token_ids == ref.token_ids
    torch.testing.assert_close(res.first_logits, ref.first_logits, atol=1e-5, rtol=1e-5)
    res2 = greedy_generate(
        model, ids[:1], max_new_tokens=6, eos_token_id=[], offload_kv=offload, prefill_chunk=CHUNK
    )
    assert res2.token_ids == ref.token_ids


def test_greedy_generate_offload_excludes_chunked_prefill():
    model, ids, _, _ = _reference("llama")
    with pytest.raises(ValueError, match="exclude each other"):
        greedy_generate(model, ids[:1], max_new_tokens=2, chunk_size=100, offload_kv=True)


def test_decoding_past_the_reserve_grows_the_buffers():
    """reserve_tokens=2, then 6 decode steps: both layer kinds reallocate and stay exact."""
    model, ids, _, _ = _reference("qwen3")
    ck = cache_kwarg(model)
    res = long_prefill(model, ids, offload_kv=1, chunk_size=CHUNK, reserve_tokens=2)
    cache = res.cache
    assert isinstance(cache.layers[-1], HostKVLayer)
    assert isinstance(cache.layers[0], ResidentKVLayer)
    ref_cache = new_cache(model)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True, **{ck: ref_cache})
        nxt = ref.logits[:, -1].argmax(-1)
        assert torch.equal(res.logits.argmax(-1), nxt)
        for step in range(6):
            a = model(input_ids=nxt[:, None], use_cache=True, **{ck: cache}).logits[:, -1]
            b = model(input_ids=nxt[:, None], use_cache=True, **{ck: ref_cache}).logits[:, -1]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
            nxt = b.argmax(-1)
    assert cache.get_seq_length() == N + 6
    for i, layer in enumerate(cache.layers):
        assert layer.capacity >= N + 6 > N + 2, i
        torch.testing.assert_close(layer.keys, ref_cache.layers[i].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, ref_cache.layers[i].values, atol=1e-5, rtol=1e-5)


# ---- patched models: the same sparse attention ---------------------------------------------

SPARSE_N = 600
SPARSE_FROM = 256


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_patched_model_uses_the_same_sparse_attention(arch):
    model = make_model(arch)
    ids = _ids(n=SPARSE_N, seed=3)
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    minference_hf.patch(model, sparse_config(), min_sparse_len=SPARSE_FROM)
    stats = model.minference_plan.stats
    with torch.no_grad():
        out = model(ids, use_cache=True)
    sparse = out.logits[:, -1]
    before = stats.sparse_calls
    assert before == LAYERS
    res = long_prefill(model, ids, offload_kv=True, chunk_size=CHUNK)
    assert stats.sparse_calls == before + LAYERS and stats.dense_calls == 0
    torch.testing.assert_close(res.logits, sparse, atol=1e-5, rtol=1e-5)
    # the layer-1 keys depend on layer 0's (sparse) attention output
    ref_cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    torch.testing.assert_close(res.cache.layers[1].keys, ref_cache.layers[1].keys)
    # non-vacuous: this config is far from dense on random tokens
    assert (sparse - dense).abs().max() > 1e-2


def test_patched_full_budget_matches_unpatched_dense():
    model = make_model("mistral")
    ids = _ids(n=SPARSE_N, seed=4)
    with torch.no_grad():
        dense = model(ids).logits[:, -1]
    minference_hf.patch(model, full_budget_config(), min_sparse_len=SPARSE_FROM)
    res = long_prefill(model, ids, offload_kv=1, chunk_size=CHUNK)
    assert model.minference_plan.stats.sparse_calls == LAYERS
    torch.testing.assert_close(res.logits, dense, atol=1e-4, rtol=1e-4)


# ---- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_model(arch):
    model = make_model(arch, dtype=torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    ref = out.logits[:, -1].float()
    res = long_prefill(model, ids, offload_kv=1, chunk_size=CHUNK)
    assert res.logits.dtype == torch.float32
    torch.testing.assert_close(res.logits, ref, atol=3e-2, rtol=3e-2)
    ref_cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    for i, layer in enumerate(res.cache.layers):
        assert layer.keys.dtype == torch.bfloat16
        torch.testing.assert_close(layer.keys, ref_cache.layers[i].keys, atol=3e-2, rtol=3e-2)
    # bf16 element size in the memory model
    assert res.memory.kv_per_layer == 2 * B * (N + 1024) * KV_HEADS * HEAD_DIM * 2


# ---- clear errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_ids,words",
    [
        (lambda ids: ids[0], r"input_ids must be a \[B, N\] tensor"),
        (lambda ids: ids[:, None], r"input_ids must be a \[B, N\] tensor"),
        (lambda ids: [[5, 6, 7], [5, 6]], r"input_ids must be a \[B, N\] tensor"),  # ragged
        (lambda ids: ids.float(), "integer token ids"),
        (lambda ids: ids[:, :0], "empty"),
        (lambda ids: ids + VOCAB, r"out of range \[0, 512\)"),
        (lambda ids: ids - 10, r"out of range \[0, 512\)"),
    ],
    ids=["1d", "3d", "ragged", "float", "empty", "too-big", "negative"],
)
def test_bad_input_ids(make_ids, words):
    model, ids, _, _ = _reference("llama")
    with pytest.raises(ValueError, match=words):
        long_prefill(model, make_ids(ids))


def test_ids_on_another_device():
    model, ids, _, _ = _reference("llama")
    with pytest.raises(ValueError, match="input_ids are on meta but the model is on cpu"):
        long_prefill(model, ids.to("meta"))


@pytest.mark.parametrize("chunk", [0, -5, True, 1.5])
def test_bad_chunk_size(chunk):
    model, ids, _, _ = _reference("llama")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        long_prefill(model, ids, chunk_size=chunk)


@pytest.mark.parametrize(
    "offload,words",
    [
        (-1, r"offload_kv=-1 must be in \[0, 2\]"),
        (LAYERS + 1, r"offload_kv=3 must be in \[0, 2\]"),
        ("yes", "offload_kv must be True, False, 'auto' or an int, got 'yes'"),
        (None, "offload_kv must be True, False, 'auto' or an int"),
    ],
)
def test_bad_offload_kv(offload, words):
    model, ids, _, _ = _reference("llama")
    with pytest.raises(ValueError, match=words):
        long_prefill(model, ids, offload_kv=offload)
    with pytest.raises(ValueError, match=words):
        plan_offload(model, N, offload_kv=offload)


def test_training_mode_is_rejected():
    model = make_model("llama").train()
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        long_prefill(model, _ids())


def test_eager_attention_is_rejected():
    model = make_model("llama")
    model.config._attn_implementation = "eager"
    with pytest.raises(UnsupportedModelError, match="eager attention"):
        long_prefill(model, _ids())


def test_sliding_window_that_bites_is_rejected_per_layer():
    # Qwen2 keeps the window on the attention module of its sliding layers
    model = make_model("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=0)
    with pytest.raises(UnsupportedModelError, match=r"layer 0 uses sliding-window attention"):
        long_prefill(model, _ids())


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_sliding_window_in_the_config_that_bites_is_rejected(arch):
    # Mistral and Phi-3 keep the window in model.config only
    model = make_model(arch, sliding_window=64)
    with pytest.raises(UnsupportedModelError, match=r"layer 0 .*sliding-window.*window 64"):
        long_prefill(model, _ids())


def test_sliding_window_longer_than_the_prompt_is_exact():
    model = make_model("mistral", sliding_window=4 * N)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    res = long_prefill(model, ids, offload_kv=True, chunk_size=CHUNK)
    torch.testing.assert_close(res.logits, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_structure():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    ).eval()
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel has no `model.layers`"):
        long_prefill(gpt2, _ids())
    with pytest.raises(UnsupportedModelError, match="model.layers"):
        estimate_memory(gpt2, N)
    # a base model without the LM head
    base = make_model("llama")
    with pytest.raises(UnsupportedModelError, match="model.layers"):
        long_prefill(base.model, _ids())
    # an extra submodule in a decoder layer is named
    model = make_model("llama")
    model.model.layers[1].extra_norm = torch.nn.LayerNorm(8)
    with pytest.raises(UnsupportedModelError, match=r"decoder layer 1 .*\['extra_norm'\]"):
        long_prefill(model, _ids())


def test_generate_long_argument_errors():
    model, ids, _, _ = _reference("llama")
    with pytest.raises(ValueError, match="N >= 2"):
        generate_long(model, ids[:, :1], max_new_tokens=2)
    with pytest.raises(ValueError, match="do not pass past_key_values"):
        generate_long(model, ids, max_new_tokens=2, past_key_values=new_cache(model))


def test_crop_removes_tokens_like_dynamic_cache():
    model, ids, _, _ = _reference("llama")
    cache = long_prefill(model, ids, offload_kv=1).cache
    cache.crop(-1)
    assert cache.get_seq_length() == N - 1


@pytest.mark.parametrize("offload", [True, False])
def test_crop_semantics(offload):
    model, ids, _, ref_cache = _reference("llama")
    cache = long_prefill(model, ids, offload_kv=offload).cache
    cache.crop(0)  # no-op
    assert cache.get_seq_length() == N
    cache.crop(-10)  # negative: remove that many tokens
    assert cache.get_seq_length() == N - 10
    cache.crop(N - 30)  # positive: the legacy final absolute length
    assert cache.get_seq_length() == N - 30
    cache.crop(N)  # longer than the cache: nothing to remove
    assert cache.get_seq_length() == N - 30
    cache.crop(-(2 * N))  # removing more than there is empties it
    assert cache.get_seq_length() == 0
    cache = long_prefill(model, ids, offload_kv=offload).cache
    cache.crop(-7)
    for layer, ref in zip(cache.layers, ref_cache.layers):
        assert layer.keys.shape[2] == layer.values.shape[2] == N - 7
        torch.testing.assert_close(layer.keys, ref.keys[:, :, : N - 7], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, ref.values[:, :, : N - 7], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "resident"])
def test_beam_search_matches_generate(offload):
    model, ids, _, _ = _reference("llama")
    kw = dict(max_new_tokens=6, num_beams=2, do_sample=False)
    ref = model.generate(ids, **kw)
    out = generate_long(model, ids, offload_kv=offload, **kw)
    assert torch.equal(out, ref)


def test_assisted_decoding_is_rejected():
    model = make_model("llama")
    ids = torch.randint(3, 500, (1, 40))
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        generate_long(model, ids, max_new_tokens=4, prompt_lookup_num_tokens=3)


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "resident"])
def test_batch_reindexing_keeps_buffers(offload):
    model, ids, _, ref_cache = _reference("llama")
    cache = long_prefill(model, ids, offload_kv=offload, reserve_tokens=5).cache
    layer, ref = cache.layers[0], ref_cache.layers[0]
    pinned = layer._kbuf.is_pinned()
    cap = layer.capacity
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(layer.keys, ref.keys.flip(0), atol=1e-5, rtol=1e-5)
    cache.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4 and layer.capacity == cap
    torch.testing.assert_close(
        layer.values, ref.values.flip(0).repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5
    )
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert layer.keys.shape[0] == 2 and layer._kbuf.is_pinned() == pinned
    torch.testing.assert_close(layer.keys, ref.keys[[1, 0]], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == N


# ---- memory model --------------------------------------------------------------------------


def test_plan_offload_tiny_budget_is_a_memory_error():
    model, _, _, _ = _reference("llama")
    with pytest.raises(MemoryError, match=r"GiB of activations .* GiB are available"):
        plan_offload(model, N, device_budget=1 << 20)
    # a budget that holds the weights and activations but not the cache: auto offloads all
    est = estimate_memory(model, N, gpu_kv_layers=0)
    tight = est.weights + est.activations + est.chunk + est.kv_per_layer // 2
    plan = plan_offload(model, N, device_budget=tight)
    assert plan.gpu_kv_layers == 0 and plan.gpu_peak <= tight


def test_estimate_memory_grows_with_seq_len_and_counts_layers():
    model, _, _, _ = _reference("llama")
    lengths = [1, 64, 300, 1000, 5000, 50_000]
    ests = [estimate_memory(model, n, chunk_size=1024) for n in lengths]
    for a, b in zip(ests, ests[1:]):
        assert b.weights == a.weights
        assert b.kv_per_layer > a.kv_per_layer
        assert b.activations > a.activations
        assert b.chunk >= a.chunk  # capped by the chunk size
        assert b.standard_forward > a.standard_forward
        assert b.gpu_peak > a.gpu_peak
    assert ests[-1].chunk == ests[-2].chunk  # both past the chunk size
    for g in range(LAYERS + 1):
        e = estimate_memory(model, 1000, gpu_kv_layers=g)
        assert isinstance(e, MemoryEstimate)
        assert e.gpu_kv_layers == g and e.num_layers == LAYERS
        assert e.host_kv == (LAYERS - g) * e.kv_per_layer
        assert e.gpu_peak == e.weights + e.activations + e.chunk + g * e.kv_per_layer
    assert estimate_memory(model, 1000).gpu_kv_layers == LAYERS  # default: all on the device
    # batch scales the per-token parts
    one, two = estimate_memory(model, 1000), estimate_memory(model, 1000, batch=2)
    assert two.kv_per_layer == 2 * one.kv_per_layer
    assert "1000 tokens: GPU peak ~" in one.summary()


def test_plan_offload_explicit_counts():
    model, _, _, _ = _reference("llama")
    assert plan_offload(model, N, offload_kv=True).gpu_kv_layers == 0
    assert plan_offload(model, N, offload_kv=False).gpu_kv_layers == LAYERS
    assert plan_offload(model, N, offload_kv=1).gpu_kv_layers == LAYERS - 1
    assert plan_offload(model, N, offload_kv=0).gpu_kv_layers == LAYERS


@pytest.fixture(scope="module")
def llama3_8b():
    """A Llama-3-8B-shaped model on the meta device (no memory, no weights), in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=1 << 20,
        rope_theta=500000.0,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


M1 = 1 << 20


def test_llama3_8b_memory_at_1m(llama3_8b):
    est = estimate_memory(llama3_8b, M1, reserve_tokens=0)
    assert est.num_layers == 32
    assert est.weights == 8_030_261_248 * 2  # Llama-3-8B parameters, bf16
    assert est.kv_per_layer == 4 * GIB  # 2 x 1M x 8 heads x 128 x 2 bytes
    with_reserve = estimate_memory(llama3_8b, M1)
    assert 4 * GIB < with_reserve.kv_per_layer < 4.01 * GIB
    assert 14.9 * GIB < est.weights < 16 * GIB
    # residual + q + out + k + v in bf16 at 1M: 28 GiB, plus the coverage bytes, the RoPE tables
    assert 28.5 * GIB < est.activations < 29.5 * GIB
    assert est.standard_forward > est.gpu_peak  # whole cache + full-length MLP


def test_llama3_8b_auto_plan_on_an_80_gib_budget(llama3_8b):
    budget = 80 * GIB
    plan = plan_offload(llama3_8b, M1, device_budget=budget, offload_kv="auto")
    assert 0 < plan.gpu_kv_layers < plan.num_layers  # some layers offloaded, not all
    assert plan.gpu_peak <= budget
    assert plan.gpu_peak + plan.kv_per_layer > budget  # the fewest layers offloaded
    assert plan.host_kv == (32 - plan.gpu_kv_layers) * plan.kv_per_layer
    # a shorter prompt fits entirely; a budget below weights + activations does not plan
    assert plan_offload(llama3_8b, 1 << 17, device_budget=budget).gpu_kv_layers == 32
    with pytest.raises(MemoryError, match="GiB"):
        plan_offload(llama3_8b, M1, device_budget=40 * GIB)
