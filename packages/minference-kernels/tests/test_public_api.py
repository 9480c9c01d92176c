"""The public API of minference-kernels is pinned (docs/api-policy.md).

Other libraries depend on this package: a name added to or removed from ``__all__``, or a changed
signature of an exported function, must be a decision (a CHANGELOG entry, a deprecation first for
a removal), not an accident. When the change is intended, update the tables below in the same
commit as the CHANGELOG entry.
"""

from __future__ import annotations

import inspect
from importlib import metadata

import minference_kernels as mk

#: ``minference_kernels.__all__``, the stable API (see docs/api-policy.md)
PUBLIC = [
    "BLOCK",
    "KINDS",
    "HeadPattern",
    "PatternKind",
    "PrefillOptions",
    "SparseIndex",
    "block_sparse_attention",
    "block_sparse_mask",
    "build_index",
    "check_softcap",
    "dense_attention",
    "dense_mask",
    "estimate_block_sparse",
    "estimate_vertical_slash",
    "index_density",
    "sparse_prefill",
    "sparse_prefill_mask",
    "sparse_prefill_varlen",
    "streaming_attention",
    "streaming_mask",
    "vertical_slash_attention",
    "vertical_slash_mask",
]

#: The leading parameters every caller may pass by position, per function. Parameters after these
#: may be added (keyword-only or with a default) in a minor release; these may not change.
POSITIONAL = {
    "dense_attention": ["q", "k", "v", "scale"],
    "vertical_slash_attention": ["q", "k", "v", "vertical_indices", "slash_indices", "scale"],
    "vertical_slash_mask": ["vertical_indices", "slash_indices", "n"],
    "block_sparse_attention": ["q", "k", "v", "block_indices", "block_size", "scale"],
    "block_sparse_mask": ["block_indices", "n", "block_size"],
    "streaming_attention": ["q", "k", "v", "sink_tokens", "window_tokens", "scale"],
    "streaming_mask": ["sink_tokens", "window_tokens", "n"],
    "estimate_vertical_slash": ["q", "k", "num_vertical", "num_slash", "last_q"],
    "estimate_block_sparse": ["q", "k", "top_k", "block_size"],
    "sparse_prefill": ["q", "k", "v", "heads"],
    "sparse_prefill_mask": ["q", "k", "heads"],
    "sparse_prefill_varlen": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "heads", "scale"],
    "build_index": ["q", "k", "heads"],
    "dense_mask": ["n"],
}


def test_all_is_pinned():
    assert mk.__all__ == PUBLIC


def test_every_public_name_exists_and_is_documented():
    for name in mk.__all__:
        obj = getattr(mk, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_leading_parameters_are_stable():
    for name, params in POSITIONAL.items():
        sig = inspect.signature(getattr(mk, name))
        got = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        assert got[: len(params)] == params, f"{name}{sig}"


def test_softcap_is_keyword_only_everywhere_it_exists():
    for name in set(mk.__all__) - {"check_softcap"}:  # the validator takes it as its argument
        obj = getattr(mk, name)
        if inspect.isfunction(obj) and "softcap" in inspect.signature(obj).parameters:
            assert (
                inspect.signature(obj).parameters["softcap"].kind is inspect.Parameter.KEYWORD_ONLY
            )


def test_version_is_the_installed_metadata():
    """``__version__`` comes from ``__about__`` (the one version source) and the installed
    distribution's metadata agrees: hatch read the same file."""
    from minference_kernels import __about__

    assert mk.__version__ == __about__.__version__ == metadata.version("minference-kernels")
