"""The plugin against the installed vLLM, without starting an engine."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm


@pytest.fixture()
def registry():
    """Run ``register()`` fresh and undo its registry overrides afterwards."""
    from minference_vllm import _compat, _plugin

    _plugin._reset_for_tests()
    yield _compat
    for slot in ("CPU_ATTN", "CUSTOM", "FLASH_ATTN"):
        _compat.clear_registration(slot)
    _plugin._reset_for_tests()


def test_register_overrides_cpu_attn(registry) -> None:
    from minference_vllm import _plugin, register

    register()
    register()  # idempotent: vLLM calls it in every process, maybe more than once
    assert registry.registered_path("CPU_ATTN") == _plugin.CPU_BACKEND
    assert registry.registered_path("CUSTOM") == _plugin.CPU_BACKEND
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = AttentionBackendEnum.CPU_ATTN.get_class()
    assert backend.get_name() == "CPU_ATTN"  # the layer looks itself up by this name
    assert issubclass(backend.get_impl_cls(), CPUAttentionBackendImpl)


def test_register_disabled_and_out_of_range(registry, monkeypatch) -> None:
    from minference_vllm import _plugin

    monkeypatch.setenv("MINFERENCE_VLLM_DISABLE", "1")
    _plugin.register()
    assert registry.registered_path("CPU_ATTN").startswith("vllm.")

    monkeypatch.delenv("MINFERENCE_VLLM_DISABLE")
    _plugin._reset_for_tests()
    monkeypatch.setattr(registry, "SUPPORTED_VLLM", ((9, 0), (9, 1)))
    _plugin.register()
    assert registry.registered_path("CPU_ATTN").startswith("vllm.")

    _plugin._reset_for_tests()
    monkeypatch.setenv("MINFERENCE_VLLM_SKIP_VERSION_CHECK", "1")
    _plugin.register()
    assert registry.registered_path("CPU_ATTN") == _plugin.CPU_BACKEND


def test_installed_version_is_in_tested_range() -> None:
    from minference_vllm import _compat
    from minference_vllm._plugin import version_supported

    assert version_supported(_compat.vllm_version(), *_compat.SUPPORTED_VLLM)


def test_cuda_backend_classes() -> None:
    """The GPU classes import on CPU too; names and CUDA-graph limits are what vLLM needs."""
    from minference_vllm.backends import cuda
    from vllm.v1.attention.backend import AttentionCGSupport

    assert cuda.MInferenceFlashAttentionBackend.get_name() == "CUSTOM"
    assert cuda.MInferenceFlashAttentionDefaultBackend.get_name() == "FLASH_ATTN"
    impl = cuda.MInferenceFlashAttentionBackend.get_impl_cls()
    assert impl is cuda.MInferenceFlashAttentionImpl
    builder = cuda.MInferenceFlashAttentionBackend.get_builder_cls()
    support = builder.get_cudagraph_support(None, None)
    assert support.value <= AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE.value
    assert builder.supports_update_block_table is False


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"kv_cache_dtype": "fp8"}, "fp8"),
        ({"sliding_window": 128}, "sliding-window"),
        ({"alibi_slopes": [0.5] * 4}, "ALiBi"),
        ({"sinks": torch.zeros(4)}, "sinks"),
        ({"logits_soft_cap": 50.0}, "soft-capping"),
    ],
)
def test_impl_rejects_unsupported_layers(override: dict, match: str) -> None:
    from minference_vllm.backends.cpu import MInferenceCPUAttentionImpl
    from vllm.config import VllmConfig, set_current_vllm_config

    kwargs = dict(
        num_heads=4,
        head_size=64,
        scale=0.125,
        num_kv_heads=2,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype="auto",
    )
    kwargs.update(override)
    config = VllmConfig(additional_config={"minference": {"config": "unused.json"}})
    with set_current_vllm_config(config), pytest.raises(ValueError, match=match) as info:
        MInferenceCPUAttentionImpl(**kwargs)
    assert "minference" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("block_size", "head_size"), [(16, 64), (32, 64), (128, 128), (32, 80)])
def test_probe_real_cpu_cache(dtype: torch.dtype, block_size: int, head_size: int) -> None:
    """The layout probe recovers K/V written by vLLM's CPU cache op, in every ISA's packing."""
    from minference_vllm.kvcache import gather_kv, probe_layout
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads = 2
    isa = _get_attn_isa(dtype, block_size, head_size)

    def write(k, v, cache, slots):
        nb = cache.shape[0]
        kc, vc = cache.view(nb, heads, 2 * block_size, head_size).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)

    cache = torch.zeros(6, heads, block_size, 2 * head_size, dtype=dtype)
    layout = probe_layout(
        write, cache, block_size=block_size, num_kv_heads=heads, head_size=head_size
    )
    n = 2 * block_size + 3
    key = torch.randn(n, heads, head_size).to(dtype)
    value = torch.randn(n, heads, head_size).to(dtype)
    blocks = torch.tensor([4, 1, 5], dtype=torch.int32)
    slots = blocks[torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
    write(key, value, cache, slots)
    k, v = gather_kv(cache, layout, blocks, n)
    assert torch.equal(k, key.transpose(0, 1)), isa
    assert torch.equal(v, value.transpose(0, 1)), isa


def _common(q_lens: list[int], seq_lens: list[int]):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32)
    n_tok = starts[-1]
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(),
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(q_lens),
        num_actual_tokens=n_tok,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=torch.arange(len(q_lens) * 8, dtype=torch.int32).view(-1, 8),
        slot_mapping=torch.arange(n_tok, dtype=torch.int64) + 1000,
        positions=torch.arange(n_tok, dtype=torch.int64),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
    )


def test_select_requests_non_contiguous() -> None:
    from minference_vllm import _compat

    # decode | long chunk (sparse) | short prompt | decode
    common = _common([1, 100, 20, 1], [500, 300, 20, 40])
    assert _compat.request_lengths(common) == ([0, 1, 101, 121, 122], [500, 300, 20, 40])
    selected = _compat.select_requests(common, [0, 2, 3])
    assert selected is not None
    sub, tokens = selected
    assert isinstance(tokens, torch.Tensor)
    assert tokens.tolist() == [0, *range(101, 121), 121]
    assert sub.num_reqs == 3 and sub.num_actual_tokens == 22 and sub.max_query_len == 20
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 21, 22]
    assert sub.query_start_loc.tolist() == [0, 1, 21, 22]
    assert sub.seq_lens.tolist() == [500, 20, 40]
    assert sub.seq_lens_cpu_upper_bound.tolist() == [500, 20, 40]
    assert sub.block_table_tensor[:, 0].tolist() == [0, 16, 24]
    assert sub.slot_mapping.tolist() == [t + 1000 for t in tokens.tolist()]
    assert sub.positions.tolist() == tokens.tolist()


def test_select_requests_contiguous_and_unknown_fields() -> None:
    from minference_vllm import _compat

    common = _common([1, 1, 100], [50, 60, 300])
    selected = _compat.select_requests(common, [0, 1])
    assert selected is not None and selected[1] == slice(0, 2)
    # a field the compat layer does not know how to split: the batch stays dense
    odd = common.replace(rswa_prefix_lens=torch.ones(3, dtype=torch.int32))
    assert _compat.select_requests(odd, [0, 1]) is None
    # per-token causality is never taken by the sparse path
    assert _compat.request_lengths(common.replace(causal=torch.ones(3, dtype=torch.bool))) is None
