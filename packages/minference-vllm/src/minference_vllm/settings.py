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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minference_kernels import HeadPattern
    from minference_kernels.options import PrefillOptions
    from minference_patterns import PatternConfig
    from minference_patterns.model_shape import ModelShape

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "ENV_BACKEND",
    "ENV_BLOCK_ALLOCATION",
    "ENV_CONFIG",
    "ENV_COVERAGE",
    "ENV_DISABLE",
    "ENV_LAST_Q",
    "ENV_MAX_DENSITY",
    "ENV_MIN_SPARSE_LEN",
    "ENV_MIN_SPARSE_QUERY",
    "ENV_REPLACE_DEFAULT",
    "ENV_SKIP_VERSION_CHECK",
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
#: Append one JSON line per sparse pre-fill call to this file (debugging, tests).
ENV_TRACE = "MINFERENCE_VLLM_TRACE"
# The sparse pre-fill settings: one variable per :class:`minference_kernels.PrefillOptions` field,
# ``MINFERENCE_VLLM_`` + its name in capitals (its docstring gives meaning and default).
#: ``PrefillOptions.min_sparse_len``: context length from which a pre-fill chunk goes sparse.
ENV_MIN_SPARSE_LEN = "MINFERENCE_VLLM_MIN_SPARSE_LEN"
#: ``PrefillOptions.min_sparse_query``: fewest query tokens a chunk needs to go sparse.
ENV_MIN_SPARSE_QUERY = "MINFERENCE_VLLM_MIN_SPARSE_QUERY"
#: ``PrefillOptions.last_q``: last queries used to estimate each head's index.
ENV_LAST_Q = "MINFERENCE_VLLM_LAST_Q"
#: ``PrefillOptions.backend``: ``auto`` (Triton on CUDA, PyTorch on CPU), ``torch``, ``triton``.
ENV_BACKEND = "MINFERENCE_VLLM_BACKEND"
#: ``PrefillOptions.coverage``: adaptive vertical-slash budgets (e.g. ``0.95``).
ENV_COVERAGE = "MINFERENCE_VLLM_COVERAGE"
#: ``PrefillOptions.block_allocation``: ``query_block``, ``head`` or ``layer``.
ENV_BLOCK_ALLOCATION = "MINFERENCE_VLLM_BLOCK_ALLOCATION"
#: ``PrefillOptions.max_density``: on CUDA, an index keeping more of the causal pairs runs dense.
ENV_MAX_DENSITY = "MINFERENCE_VLLM_MAX_DENSITY"
#: ``1``: ``register()`` does nothing (the plugin stays installed but inactive).
ENV_DISABLE = "MINFERENCE_VLLM_DISABLE"
#: ``1`` on CUDA: also replace the default ``FLASH_ATTN`` entry, not only the ``CUSTOM`` slot.
ENV_REPLACE_DEFAULT = "MINFERENCE_VLLM_REPLACE_DEFAULT"
#: ``1``: register even when the installed vLLM is outside the tested range.
ENV_SKIP_VERSION_CHECK = "MINFERENCE_VLLM_SKIP_VERSION_CHECK"

#: Keys and variables renamed in 0.2.0 (before any release) to the settings' one name; using an
#: old one is an error that names the new one (it would otherwise be silently ignored).
_RENAMED = {
    "threshold": "min_sparse_len",
    "min_query_len": "min_sparse_query",
    "kernel_backend": "backend",
}

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
        options: the sparse pre-fill settings, a :class:`minference_kernels.PrefillOptions`
            (validated when it was made; its docstring gives each setting's meaning and default).
            A pre-fill chunk takes the sparse path when its request's context length (tokens
            already cached plus the chunk) is at least ``options.min_sparse_len`` and the chunk has
            at least ``options.min_sparse_query`` tokens; other chunks, decode steps and short
            speculative-decoding verifications use the platform's dense attention.
            ``block_allocation="layer"`` pools the heads of one call, i.e. this worker's heads of
            the layer.
        trace: a file to which every sparse pre-fill call appends one JSON line, or ``None``.
    """

    config: str
    options: PrefillOptions = field(default_factory=lambda: _options_class()())
    trace: str | None = None

    def __post_init__(self) -> None:
        PrefillOptions = _options_class()
        if not isinstance(self.config, str) or not self.config.strip():
            raise ValueError("minference: 'config' must be a non-empty path or model id")
        if not isinstance(self.options, PrefillOptions):
            raise TypeError(
                "minference: 'options' must be a minference_kernels.PrefillOptions, "
                f"got {type(self.options).__name__}"
            )
        if self.trace is not None and not isinstance(self.trace, str):
            raise TypeError(f"minference: 'trace' must be a path string, got {self.trace!r}")


def _options_class() -> type[PrefillOptions]:
    # imported when settings are made, not with the module: importing the plugin (every vLLM
    # process does) loads neither torch nor the kernels
    from minference_kernels.options import PrefillOptions

    return PrefillOptions


#: The ``additional_config`` keys and environment variables of the plugin's own fields.
_PLUGIN_ENV = {"config": ENV_CONFIG, "trace": ENV_TRACE}
#: The same for the :class:`PrefillOptions` fields, by name.
_OPTION_ENV = {
    "min_sparse_len": ENV_MIN_SPARSE_LEN,
    "min_sparse_query": ENV_MIN_SPARSE_QUERY,
    "last_q": ENV_LAST_Q,
    "backend": ENV_BACKEND,
    "coverage": ENV_COVERAGE,
    "block_allocation": ENV_BLOCK_ALLOCATION,
    "max_density": ENV_MAX_DENSITY,
}


def _env_value(name: str, var: str, raw: str) -> Any:
    """An environment variable's text as the type the setting's default has (the validator of
    :class:`PrefillOptions` then checks the value)."""
    default = getattr(_options_class()(), name, None)
    if name in ("coverage", "max_density"):  # a share: a number, or ``none`` for ``None``
        if raw.lower() == "none":
            return None
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a number") from None
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not an integer") from None
    return raw


def _check_renamed(section: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    for old, new in _RENAMED.items():
        if old in section:
            raise ValueError(
                f"additional_config['minference'] key {old!r} was renamed to {new!r} "
                "(the setting's one name in every layer: minference_kernels.PrefillOptions)"
            )
        var = "MINFERENCE_VLLM_" + old.upper()
        if environ.get(var, "").strip():
            raise ValueError(
                f"{var} was renamed to MINFERENCE_VLLM_{new.upper()} (the setting's one name in "
                "every layer: minference_kernels.PrefillOptions)"
            )


def resolve_settings(
    additional_config: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> PluginSettings | None:
    """Build the settings from vLLM's ``additional_config`` and the environment.

    ``additional_config["minference"]`` (a dict, or a JSON string of one) wins field by field over
    the ``MINFERENCE_VLLM_*`` variables. Its keys are ``config``, ``trace`` and the
    :class:`minference_kernels.PrefillOptions` field names; the options are made (and validated)
    once, here. Without a ``config`` from either source the plugin is not configured and this
    returns ``None``. Unknown keys (and the names renamed in 0.2.0) and bad values raise
    ``ValueError`` / ``TypeError`` naming the setting.
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
            '{"config": "patterns.json", "min_sparse_len": 32768}, '
            f"got {type(section).__name__}"
        )
    _check_renamed(section, environ)
    known = set(_PLUGIN_ENV) | set(_OPTION_ENV)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) in additional_config['minference']: {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for name, var in {**_PLUGIN_ENV, **_OPTION_ENV}.items():
        if name in section and (section[name] is not None or name in ("coverage", "max_density")):
            values[name] = section[name]
        elif environ.get(var, "").strip():
            values[name] = _env_value(name, var, environ[var].strip())
    if "config" not in values:
        return None
    try:
        options = _options_class()(**{k: v for k, v in values.items() if k in _OPTION_ENV})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"minference: {exc}") from None
    return PluginSettings(config=values["config"], options=options, trace=values.get("trace"))


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


_PATTERNS: dict[str, PatternConfig] = {}
_PATTERNS_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:
    # ModelShape is minference-patterns' (the reader both integrations share); imported on first
    # use so that importing this module loads neither torch nor the kernels
    if name == "ModelShape":
        from minference_patterns.model_shape import ModelShape

        return ModelShape
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
            counts = patterns.kind_counts()
            if counts.get("vertical_block"):
                raise ValueError(
                    f"minference: pattern config {config!r} has {counts['vertical_block']} "
                    "vertical_block heads, which the plugin's one-launch batch kernel does not "
                    "run yet (use them with minference-hf one prompt per call, or pick "
                    "vertical_slash or block_sparse heads)"
                )
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
    """Split a batch's requests into ``(sparse, dense)`` request indices
    (:meth:`minference_kernels.PrefillOptions.wants_sparse` on each request's chunk and context)."""
    sparse, dense = [], []
    for i, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        if settings.options.wants_sparse(q_len, seq_len):
            sparse.append(i)
        elif q_len > 0:
            dense.append(i)
    return sparse, dense
