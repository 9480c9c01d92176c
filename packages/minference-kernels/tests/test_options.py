"""PrefillOptions: one validator per setting, run once when the object is made; its defaults are
the kernels' defaults."""

from __future__ import annotations

import dataclasses
import inspect
import math

import minference_kernels as mk
import pytest
from minference_kernels import PrefillOptions
from minference_kernels import options as opt

# (setting, bad value, exception type, text the message must hold besides the setting's name)
BAD = [
    ("min_sparse_len", 0, ValueError, ">= 1"),
    ("min_sparse_len", -5, ValueError, ">= 1"),
    ("min_sparse_len", 1.5, TypeError, "int"),
    ("min_sparse_len", True, TypeError, "int"),
    ("min_sparse_len", "32768", TypeError, "int"),
    ("min_sparse_query", 0, ValueError, ">= 1"),
    ("min_sparse_query", None, TypeError, "int"),
    ("last_q", 0, ValueError, ">= 1"),
    ("last_q", 129, ValueError, "<= 128"),
    ("last_q", 64.0, TypeError, "int"),
    ("last_q", False, TypeError, "int"),
    ("backend", "cuda", ValueError, "'auto'"),
    ("backend", None, ValueError, "'auto'"),
    ("coverage", "0.5", TypeError, "'0.5'"),
    ("coverage", True, TypeError, "True"),
    ("coverage", 0.0, ValueError, "(0, 1]"),
    ("coverage", 1.5, ValueError, "(0, 1]"),
    ("coverage", math.nan, ValueError, "(0, 1]"),
    ("block_allocation", "pooled", ValueError, "'query_block', 'head', 'layer'"),
    ("block_allocation", True, ValueError, "'query_block'"),
    ("block_allocation", None, ValueError, "'query_block'"),
    ("max_density", 0, ValueError, "(0, 1]"),
    ("max_density", 2.0, ValueError, "(0, 1]"),
    ("max_density", "0.6", TypeError, "'0.6'"),
]


@pytest.mark.parametrize(("name", "value", "exc", "text"), BAD)
def test_every_validator_rejects_bad_input_naming_the_setting(name, value, exc, text):
    with pytest.raises(exc) as err:
        PrefillOptions(**{name: value})
    assert name in str(err.value)
    assert text in str(err.value)
    # replace() runs the same validator
    with pytest.raises(exc, match=name):
        PrefillOptions().replace(**{name: value})


def test_every_setting_has_a_bad_value_case():
    names = {f.name for f in dataclasses.fields(PrefillOptions)}
    assert names == {b[0] for b in BAD}


def test_defaults_are_the_module_constants():
    o = PrefillOptions()
    assert o.min_sparse_len == opt.DEFAULT_MIN_SPARSE_LEN == 32768
    assert o.min_sparse_query == opt.DEFAULT_MIN_SPARSE_QUERY == 64
    assert o.last_q == opt.DEFAULT_LAST_Q == 64
    assert o.backend == opt.DEFAULT_BACKEND == "auto"
    assert o.coverage is opt.DEFAULT_COVERAGE is None
    assert o.block_allocation == opt.DEFAULT_BLOCK_ALLOCATION == "query_block"
    assert o.max_density == opt.DEFAULT_MAX_DENSITY == 0.6


def test_kernel_defaults_are_the_options_defaults():
    """sparse_prefill, build_index and sparse_prefill_mask default to PrefillOptions' values (a
    re-declared default in the kernels fails here)."""
    o = PrefillOptions()
    for fn in (mk.sparse_prefill, mk.build_index, mk.sparse_prefill_mask):
        params = inspect.signature(fn).parameters
        for name, value in o.kernel_kwargs(cuda=False).items():
            if name in params and name != "max_density":
                assert params[name].default == value, (fn.__name__, name)
    assert set(o.kernel_kwargs(cuda=True)) <= set(inspect.signature(mk.sparse_prefill).parameters)


def test_frozen_and_replace_validates():
    o = PrefillOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.last_q = 32  # type: ignore[misc]
    p = o.replace(last_q=32, coverage=1)
    assert p.last_q == 32 and p.coverage == 1.0 and isinstance(p.coverage, float)
    assert o.last_q == 64
    with pytest.raises(TypeError, match="unknown PrefillOptions setting.*threshold"):
        o.replace(threshold=8192)


def test_round_trip_and_kernel_kwargs():
    o = PrefillOptions(min_sparse_len=1000, coverage=0.9, block_allocation="layer")
    assert PrefillOptions(**o.to_dict()) == o
    assert o.kernel_kwargs(cuda=True)["max_density"] == 0.6
    assert o.kernel_kwargs(cuda=False)["max_density"] is None
    assert o.kernel_kwargs(cuda=False)["block_allocation"] == "layer"


def test_wants_sparse():
    o = PrefillOptions(min_sparse_len=100, min_sparse_query=8)
    assert o.wants_sparse(8, 100)
    assert not o.wants_sparse(7, 100)
    assert not o.wants_sparse(8, 99)
    assert not PrefillOptions(min_sparse_len=1, min_sparse_query=1).wants_sparse(1, 10)


def test_kernels_use_the_same_validators():
    """The kernels reject what the options reject, with the same message."""
    import torch

    q = torch.randn(1, 1, 8, 16)
    heads = [mk.HeadPattern.vertical_slash(4, 4)]
    for name, value in (("coverage", "0.5"), ("last_q", 129), ("block_allocation", "pooled")):
        with pytest.raises((TypeError, ValueError)) as a:
            mk.sparse_prefill(q, q, q, heads, **{name: value})
        with pytest.raises((TypeError, ValueError)) as b:
            PrefillOptions(**{name: value})
        assert str(a.value) == str(b.value)
