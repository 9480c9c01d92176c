"""Plugin settings and the checks that run before any sparse pre-fill.

Nothing here imports vLLM, so every rule can be tested (and read) on its own:

* :func:`resolve_settings` reads ``--additional-config '{"minference": {...}}'`` with an
  environment-variable fallback and returns ``None`` when MInference is not configured (the plugin
  then runs the platform's attention unchanged).
* :func:`layer_index` turns a vLLM layer name into the decoder layer index of the pattern config.
* :func:`heads_for_rank` gives one tensor-parallel rank its slice of a layer's query-head patterns.
* :func:`unsupported_reasons` lists the layer settings the sparse kernels cannot honour.
* :func:`load_patterns` loads (once per process) and checks a pattern config against the model.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minference_kernels import HeadPattern
    from minference_patterns import PatternConfig

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "ENV_BLOCK_ALLOCATION",
    "ENV_CONFIG",
    "ENV_COVERAGE",
    "ENV_DISABLE",
    "ENV_LAST_Q",
    "ENV_MIN_QUERY_LEN",
    "ENV_REPLACE_DEFAULT",
    "ENV_SKIP_VERSION_CHECK",
    "ENV_THRESHOLD",
    "ENV_TRACE",
    "ModelShape",
    "PluginSettings",
    "heads_for_rank",
    "layer_index",
    "load_patterns",
    "plan_batch",
    "resolve_settings",
    "unsupported_reasons",
]

#: Key of this plugin's section in vLLM's ``--additional-config`` JSON.
ADDITIONAL_CONFIG_KEY = "minference"

#: Pattern config (a path to a JSON config, or a model id known to ``minference_patterns.load``).
ENV_CONFIG = "MINFERENCE_VLLM_CONFIG"
#: Context length (cached + new tokens) from which a pre-fill chunk takes the sparse path.
ENV_THRESHOLD = "MINFERENCE_VLLM_THRESHOLD"
#: Fewest query tokens a chunk needs to take the sparse path (decode steps never do).
ENV_MIN_QUERY_LEN = "MINFERENCE_VLLM_MIN_QUERY_LEN"
#: Number of last queries used to estimate each head's index.
ENV_LAST_Q = "MINFERENCE_VLLM_LAST_Q"
#: ``minference_kernels`` backend: ``auto`` (Triton on CUDA, PyTorch on CPU), ``torch``, ``triton``.
ENV_KERNEL_BACKEND = "MINFERENCE_VLLM_KERNEL_BACKEND"
#: Append one JSON line per sparse pre-fill call to this file (debugging, tests).
ENV_TRACE = "MINFERENCE_VLLM_TRACE"
#: Block-sparse heads: ``query_block`` (top_k key blocks per query block) or ``head`` (the same
#: number per head, spread by estimated attention share).
ENV_BLOCK_ALLOCATION = "MINFERENCE_VLLM_BLOCK_ALLOCATION"
#: Adaptive vertical-slash budgets: each head keeps the columns and diagonals that hold this share
#: of its estimated attention mass, at most its configured budget (e.g. ``0.95``).
ENV_COVERAGE = "MINFERENCE_VLLM_COVERAGE"
#: ``1``: ``register()`` does nothing (the plugin stays installed but inactive).
ENV_DISABLE = "MINFERENCE_VLLM_DISABLE"
#: ``1`` on CUDA: also replace the default ``FLASH_ATTN`` entry, not only the ``CUSTOM`` slot.
ENV_REPLACE_DEFAULT = "MINFERENCE_VLLM_REPLACE_DEFAULT"
#: ``1``: register even when the installed vLLM is outside the tested range.
ENV_SKIP_VERSION_CHECK = "MINFERENCE_VLLM_SKIP_VERSION_CHECK"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """Read a boolean environment variable (``1/true/yes/on`` or ``0/false/no/off``/unset)."""
    raw = environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={environ.get(name)!r} is not a boolean; use 1 or 0")


@dataclass(frozen=True)
class PluginSettings:
    """What the plugin needs to know, from ``--additional-config`` or the environment.

    Attributes:
        config: the pattern config, a path to a JSON file or a model id that
            ``minference_patterns.load`` knows.
        threshold: a pre-fill chunk takes the sparse path when its request's context length
            (tokens already cached plus the chunk) is at least this many tokens. Shorter contexts
            use the platform's dense attention: sparse estimation does not pay off there.
        min_query_len: a chunk also needs at least this many query tokens; decode steps (one token)
            and short speculative-decoding verifications always use the dense path.
        last_q: how many of the chunk's last queries estimate each head's index.
        kernel_backend: ``minference_kernels`` backend (``auto``, ``torch`` or ``triton``).
        trace: a file to which every sparse pre-fill call appends one JSON line, or ``None``.
        block_allocation: ``minference_kernels.sparse_prefill``'s ``block_allocation``:
            ``query_block`` (default), ``head`` or ``layer`` (the heads of one call, i.e. this
            worker's heads of the layer, pool their budgets).
        coverage: ``minference_kernels.sparse_prefill``'s ``coverage``: ``None`` (default, the
            config's fixed budgets) or a share in (0, 1] of each vertical-slash head's estimated
            attention mass to keep, at most its configured budget.
    """

    config: str
    threshold: int = 8192
    min_query_len: int = 64
    last_q: int = 64
    kernel_backend: str = "auto"
    trace: str | None = None
    block_allocation: str = "query_block"
    coverage: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, str) or not self.config.strip():
            raise ValueError("minference: 'config' must be a non-empty path or model id")
        for name, low in (("threshold", 1), ("min_query_len", 1), ("last_q", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"minference: '{name}' must be an int, got {val!r}")
            if val < low:
                raise ValueError(f"minference: '{name}' must be >= {low}, got {val}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                "minference: 'kernel_backend' must be 'auto', 'torch' or 'triton', "
                f"got {self.kernel_backend!r}"
            )
        if self.trace is not None and not isinstance(self.trace, str):
            raise TypeError(f"minference: 'trace' must be a path string, got {self.trace!r}")
        from minference_kernels.estimate import check_allocation, check_coverage

        check_allocation(self.block_allocation, "minference: 'block_allocation'")
        check_coverage(self.coverage, "minference: 'coverage'")


_ENV_FIELDS: dict[str, str] = {
    "config": ENV_CONFIG,
    "threshold": ENV_THRESHOLD,
    "min_query_len": ENV_MIN_QUERY_LEN,
    "last_q": ENV_LAST_Q,
    "kernel_backend": ENV_KERNEL_BACKEND,
    "trace": ENV_TRACE,
    "block_allocation": ENV_BLOCK_ALLOCATION,
    "coverage": ENV_COVERAGE,
}
_INT_FIELDS = {"threshold", "min_query_len", "last_q"}
_FLOAT_FIELDS = {"coverage"}


def _env_value(name: str, var: str, raw: str) -> Any:
    if name in _FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a number") from None
    if name not in _INT_FIELDS:
        return raw
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not an integer") from None


def resolve_settings(
    additional_config: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> PluginSettings | None:
    """Build the settings from vLLM's ``additional_config`` and the environment.

    ``additional_config["minference"]`` (a dict, or a JSON string of one) wins field by field over
    the ``MINFERENCE_VLLM_*`` variables. Without a ``config`` from either source the plugin is not
    configured and this returns ``None``. Unknown keys and bad values raise ``ValueError``.
    """
    environ = os.environ if environ is None else environ
    section: Any = None
    if additional_config:
        section = additional_config.get(ADDITIONAL_CONFIG_KEY)
    if isinstance(section, str):
        try:
            section = json.loads(section)
        except json.JSONDecodeError as exc:
            raise ValueError(f"additional_config['minference'] is not valid JSON: {exc}") from None
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise TypeError(
            "additional_config['minference'] must be an object such as "
            '{"config": "patterns.json", "threshold": 32768}, '
            f"got {type(section).__name__}"
        )
    known = {f.name for f in fields(PluginSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) in additional_config['minference']: {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for name, var in _ENV_FIELDS.items():
        if name in section and section[name] is not None:
            values[name] = section[name]
        elif environ.get(var, "").strip():
            values[name] = _env_value(name, var, environ[var].strip())
    if "config" not in values:
        return None
    return PluginSettings(**values)


_LAYER_RE = re.compile(r"^\d+$")


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM attention layer name.

    ``"model.layers.7.self_attn.attn"`` gives 7. A name with no or several integer components is
    rejected: the pattern config is indexed by decoder layer, and guessing would silently apply
    another layer's patterns.
    """
    ints = [int(part) for part in layer_name.split(".") if _LAYER_RE.match(part)]
    if len(ints) != 1:
        raise ValueError(
            f"cannot tell the decoder layer index of attention layer {layer_name!r}: "
            f"expected exactly one integer component, found {len(ints)}"
        )
    return ints[0]


def heads_for_rank(
    heads: Sequence[HeadPattern], tp_size: int, tp_rank: int
) -> tuple[HeadPattern, ...]:
    """The query-head patterns that tensor-parallel rank ``tp_rank`` of ``tp_size`` computes.

    vLLM splits the query heads of a layer into ``tp_size`` contiguous, equal slices (rank ``r``
    holds heads ``r * n .. (r + 1) * n - 1`` with ``n = num_heads // tp_size``); key/value heads
    are split the same way, or replicated when there are fewer of them than ranks. Only the query
    heads carry patterns, so the slice is all this needs.
    """
    heads = tuple(heads)
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"invalid tensor-parallel rank {tp_rank} of {tp_size}")
    if len(heads) % tp_size:
        raise ValueError(
            f"{len(heads)} query heads cannot be split evenly over tensor_parallel_size={tp_size}"
        )
    per_rank = len(heads) // tp_size
    return heads[tp_rank * per_rank : (tp_rank + 1) * per_rank]


#: KV cache dtypes the sparse path reads (it needs unquantised keys and values).
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float")


def unsupported_reasons(
    *,
    kv_cache_dtype: str,
    sliding_window: int | None,
    has_alibi: bool,
    has_sinks: bool,
    logits_soft_cap: float | None,
    attn_type: str,
    decoder_attn_type: str = "decoder",
) -> list[str]:
    """The reasons, if any, why a layer with these settings cannot take the sparse path.

    The patterns and kernels assume plain causal softmax attention over an unquantised KV cache:
    no fp8 cache, no sliding window (the window would clash with the patterns' local band), no
    ALiBi bias, no learned attention sinks, no logit soft-capping, decoder self-attention only.
    """
    reasons = []
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(
            f"kv_cache_dtype={kv_cache_dtype!r} (quantised KV caches such as fp8 are not "
            "supported; use kv_cache_dtype='auto')"
        )
    if sliding_window is not None:
        reasons.append(f"sliding-window attention (window {sliding_window})")
    if has_alibi:
        reasons.append("ALiBi position biases")
    if has_sinks:
        reasons.append("learned attention sinks")
    if logits_soft_cap:
        reasons.append(f"logit soft-capping ({logits_soft_cap})")
    if attn_type != decoder_attn_type:
        reasons.append(f"attention type {attn_type!r} (only decoder self-attention)")
    return reasons


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of the whole model (before tensor parallelism splits it)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


_PATTERNS: dict[str, PatternConfig] = {}
_PATTERNS_LOCK = threading.Lock()


def load_patterns(config: str, model: ModelShape | None = None) -> PatternConfig:
    """Load a pattern config once per process and check that it fits ``model``.

    A config that does not fit raises ``ValueError`` naming each mismatch (from
    ``PatternConfig.validate_against``), so a wrong config fails when the engine starts rather than
    producing wrong attention.
    """
    with _PATTERNS_LOCK:
        patterns = _PATTERNS.get(config)
        if patterns is None:
            import minference_patterns

            try:
                patterns = minference_patterns.load(config)
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(
                    f"minference: cannot load pattern config {config!r}: {exc}"
                ) from exc
            _PATTERNS[config] = patterns
    if model is not None:
        try:
            patterns.validate_against(
                num_layers=model.num_layers,
                num_heads=model.num_heads,
                num_kv_heads=model.num_kv_heads,
                head_dim=model.head_dim,
            )
        except ValueError as exc:
            raise ValueError(f"minference: {exc}") from exc
    return patterns


def clear_pattern_cache() -> None:
    """Forget loaded configs (tests; a long-lived process whose config file changed)."""
    with _PATTERNS_LOCK:
        _PATTERNS.clear()


def plan_batch(
    query_start_loc: Sequence[int], seq_lens: Sequence[int], settings: PluginSettings
) -> tuple[list[int], list[int]]:
    """Split a batch's requests into ``(sparse, dense)`` request indices."""
    sparse, dense = [], []
    for i, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        if q_len >= settings.min_query_len and seq_len >= settings.threshold:
            sparse.append(i)
        elif q_len > 0:
            dense.append(i)
    return sparse, dense
