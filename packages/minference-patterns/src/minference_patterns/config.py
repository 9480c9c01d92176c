"""The typed per-model pattern config: :class:`PatternConfig`, its JSON form and validation, and
the readers of MInference's and Qwen's formats that :meth:`PatternConfig.load` detects (the
writer, :func:`~minference_patterns.to_minference`, is in :mod:`minference_patterns.convert`).

A config says, for every layer and query head of one model, which sparse pattern the head uses
during pre-fill and how large its budget is. The JSON form (``schema_version`` 1) is documented in
``docs/patterns/config-reference.md`` and published as a JSON Schema (:func:`json_schema`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from minference_kernels.patterns import BLOCK_SCORINGS, KINDS, HeadPattern

from .errors import ConfigError
from .model_shape import ModelShape, read_model_shape, text_config
from .policy import BudgetPolicy, adapt_pattern
from .shipped import shape_for_source_file

__all__ = [
    "FORMAT_NAME",
    "KIND_FIELDS",
    "MINFERENCE_KINDS",
    "SCHEMA_VERSION",
    "PatternConfig",
    "Provenance",
    "detect_format",
    "from_minference",
    "from_qwen",
    "head_from_dict",
    "head_to_dict",
    "json_schema",
    "load_file",
    "read_json",
]

#: Version of the JSON layout written by :meth:`PatternConfig.save`. Files with a higher version
#: are refused (written by a newer minference-patterns); lower versions would be migrated.
SCHEMA_VERSION = 1
#: Value of the ``format`` key of our JSON files (lets :func:`minference_patterns.load` tell them
#: apart from MInference's and Qwen's files).
FORMAT_NAME = "minference-patterns"

#: The JSON fields of each pattern kind (besides ``kind``), in file order, with their defaults.
#: Adding a kind: add it to :class:`minference_kernels.HeadPattern`, here, and to ``schema.json``.
KIND_FIELDS: Mapping[str, Mapping[str, int | None]] = MappingProxyType(
    {
        "dense": MappingProxyType({}),
        "a_shape": MappingProxyType({"sink_tokens": None, "window_tokens": None}),
        "vertical_slash": MappingProxyType({"num_vertical": None, "num_slash": None}),
        "block_sparse": MappingProxyType({"top_k": None, "block_size": 64}),
        "vertical_block": MappingProxyType({"num_vertical": None, "top_k": None}),
    }
)
# Fields that must be >= 1 (the others must be >= 0).
_POSITIVE = {"window_tokens", "top_k", "block_size"}

Score = float | int

_TOP_LEVEL = (
    "format",
    "schema_version",
    "model_id",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "context_length",
    "budget_policy",
    "provenance",
    "layers",
)
_HEAD_KEYS_EXTRA = ("score",)
#: Optional string fields of a kind (written only when not the default).
_KIND_STRINGS: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"block_sparse": MappingProxyType({"scoring": BLOCK_SCORINGS})}
)


def _where(layer: int | None = None, head: int | None = None, fld: str | None = None) -> str:
    parts = []
    if layer is not None:
        parts.append(f"layer {layer}")
    if head is not None:
        parts.append(f"head {head}")
    if fld is not None:
        parts.append(f"field {fld!r}")
    return ", ".join(parts)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# provenance


@dataclass(frozen=True)
class Provenance:
    """Where a config came from.

    Attributes:
        source: ``"search"`` (made by :func:`minference_patterns.search_config`),
            ``"minference"`` (converted from MInference's format), ``"qwen"``, ``"uniform"`` or
            ``"manual"``.
        calibration: what the search ran on (prompt, data set, length), free text.
        budget: the search's cost budget (relative to dense attention), if searched.
        objective: the search objective (``"recall"`` or ``"output"``), if searched.
        tool: the program that wrote the config.
        tool_version: its version.
        date: ISO 8601 date (or date-time) the config was made.
        license: licence of the config data, if not ours (e.g. ``"MIT (Microsoft)"``).
        notes: free text.
        extra: any further JSON-serialisable facts (search settings, source file names, ...).
    """

    source: str = "manual"
    calibration: str | None = None
    budget: float | None = None
    objective: str | None = None
    tool: str | None = "minference-patterns"
    tool_version: str | None = None
    date: str | None = None
    license: str | None = None
    notes: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("must be a non-empty string", location="provenance.source")
        for name in (
            "calibration",
            "objective",
            "tool",
            "tool_version",
            "date",
            "license",
            "notes",
        ):
            val = getattr(self, name)
            if val is not None and not isinstance(val, str):
                raise ConfigError(
                    f"must be a string or null, got {type(val).__name__}",
                    location=f"provenance.{name}",
                )
        if self.budget is not None and not _is_number(self.budget):
            raise ConfigError(
                f"must be a number or null, got {self.budget!r}", location="provenance.budget"
            )
        if not isinstance(self.extra, Mapping):
            raise ConfigError("must be an object", location="provenance.extra")
        try:
            frozen = json.loads(json.dumps(dict(self.extra)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"must be JSON-serialisable ({exc})", location="provenance.extra"
            ) from None
        object.__setattr__(self, "extra", MappingProxyType(frozen))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        for name in (
            "calibration",
            "budget",
            "objective",
            "tool",
            "tool_version",
            "date",
            "license",
            "notes",
        ):
            val = getattr(self, name)
            if val is not None:
                out[name] = val
        if self.extra:
            out["extra"] = json.loads(json.dumps(dict(self.extra)))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Provenance:
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"must be an object, got {type(data).__name__}", location="provenance"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(map(repr, unknown))}", location="provenance"
            )
        kwargs = dict(data)
        if "extra" in kwargs and kwargs["extra"] is None:
            kwargs["extra"] = {}
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# per-head codec


def head_to_dict(pattern: HeadPattern, score: Score | None = None) -> dict[str, Any]:
    """The JSON object of one head: ``{"kind": ..., <kind fields>, ["score": ...]}``."""
    out: dict[str, Any] = {"kind": pattern.kind}
    for name in KIND_FIELDS[pattern.kind]:
        out[name] = getattr(pattern, name)
    for name, allowed in _KIND_STRINGS.get(pattern.kind, {}).items():
        if getattr(pattern, name) != allowed[0]:
            out[name] = getattr(pattern, name)
    if score is not None:
        out["score"] = score
    return out


def head_from_dict(
    data: Any, *, layer: int | None = None, head: int | None = None, source: str | None = None
) -> tuple[HeadPattern, Score | None]:
    """Parse one head's JSON object; errors name ``layer``, ``head`` and the field."""

    def fail(msg: str, fld: str | None = None) -> ConfigError:
        return ConfigError(msg, source=source, location=_where(layer, head, fld))

    if not isinstance(data, Mapping):
        raise fail(f"a head must be an object with a 'kind', got {type(data).__name__}")
    kind = data.get("kind")
    if kind is None:
        raise fail("missing 'kind'")
    if kind not in KIND_FIELDS:
        raise fail(f"unknown pattern kind {kind!r}; known kinds: {', '.join(KIND_FIELDS)}", "kind")
    fields = KIND_FIELDS[kind]
    strings = _KIND_STRINGS.get(kind, {})
    unknown = sorted(set(data) - {"kind", *fields, *strings, *_HEAD_KEYS_EXTRA})
    if unknown:
        raise fail(
            f"unknown field(s) {', '.join(map(repr, unknown))} for kind {kind!r} "
            f"(it takes: {', '.join(fields) or 'no sizes'})"
        )
    kwargs: dict[str, Any] = {}
    for name, allowed in strings.items():
        if name in data:
            if data[name] not in allowed:
                raise fail(
                    f"must be one of {', '.join(map(repr, allowed))}, got {data[name]!r}", name
                )
            kwargs[name] = data[name]
    for name, default in fields.items():
        if name not in data:
            if default is None:
                raise fail(f"missing (required for kind {kind!r})", name)
            kwargs[name] = default
            continue
        val = data[name]
        if not _is_int(val):
            raise fail(f"must be an integer, got {val!r}", name)
        if name in _POSITIVE and val < 1:
            raise fail(f"must be a positive integer, got {val}", name)
        if val < 0:
            raise fail(f"must be >= 0, got {val}", name)
        kwargs[name] = val
    if kind == "vertical_slash" and kwargs["num_vertical"] + kwargs["num_slash"] < 1:
        raise fail("num_vertical and num_slash are both zero (an empty pattern)", "num_slash")
    if kind == "block_sparse" and kwargs["block_size"] % 64:
        raise fail(f"must be a multiple of 64, got {kwargs['block_size']}", "block_size")
    try:
        pattern = HeadPattern(kind, **kwargs)
    except (TypeError, ValueError) as exc:  # a rule of HeadPattern not mirrored above
        raise fail(str(exc)) from None
    score = data.get("score")
    if score is not None and not _is_number(score):
        raise fail(f"must be a finite number or null, got {score!r}", "score")
    return pattern, score


# --------------------------------------------------------------------------------------------
# the config


def _check_count(name: str, val: Any, *, optional: bool) -> None:
    if val is None and optional:
        return
    if not _is_int(val) or val < 1:
        raise ConfigError(
            f"must be a positive integer{' or null' if optional else ''}, got {val!r}",
            location=f"field {name!r}",
        )


@dataclass(frozen=True)
class PatternConfig:
    """Per-layer, per-query-head sparse patterns of one model.

    Attributes:
        model_id: Hugging Face id (or any name) of the model the config is for.
        num_layers: number of decoder layers.
        num_heads: number of query heads per layer.
        num_kv_heads: number of key/value heads (GQA), if known.
        head_dim: head dimension, if known.
        layers: ``layers[layer][query_head]`` is a :class:`~minference_kernels.HeadPattern`.
        context_length: prompt length the budgets were searched at, if known.
        provenance: where the config came from (:class:`Provenance`).
        schema_version: JSON layout version (:data:`SCHEMA_VERSION`).
        budget_policy: how budgets adapt to other lengths (:class:`BudgetPolicy`).
        scores: optional ``scores[layer][head]``: the search objective of the chosen pattern
            (MInference's 4th element, or our recall); not used at inference.

    Construction validates everything and raises :class:`~minference_patterns.ConfigError`
    (a ``ValueError``) naming the layer, head and field at fault.
    """

    model_id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    layers: tuple[tuple[HeadPattern, ...], ...] = ()
    context_length: int | None = None
    provenance: Provenance = field(default_factory=Provenance)
    schema_version: int = SCHEMA_VERSION
    budget_policy: BudgetPolicy = field(default_factory=BudgetPolicy)
    scores: tuple[tuple[Score | None, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ConfigError(
                f"must be a non-empty string, got {self.model_id!r}", location="field 'model_id'"
            )
        _check_count("num_layers", self.num_layers, optional=False)
        _check_count("num_heads", self.num_heads, optional=False)
        _check_count("num_kv_heads", self.num_kv_heads, optional=True)
        _check_count("head_dim", self.head_dim, optional=True)
        _check_count("context_length", self.context_length, optional=True)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads "
                f"({self.num_kv_heads})",
                location="field 'num_kv_heads'",
            )
        if not _is_int(self.schema_version) or self.schema_version < 1:
            raise ConfigError(
                f"must be a positive integer, got {self.schema_version!r}",
                location="field 'schema_version'",
            )
        if self.schema_version > SCHEMA_VERSION:
            raise ConfigError(_future_msg(self.schema_version), location="field 'schema_version'")
        if not isinstance(self.provenance, Provenance):
            raise ConfigError("must be a Provenance", location="field 'provenance'")
        if not isinstance(self.budget_policy, BudgetPolicy):
            raise ConfigError("must be a BudgetPolicy", location="field 'budget_policy'")
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ConfigError("must be a sequence of layers", location="field 'layers'")
        layers = tuple(tuple(layer) if _seq(layer) else layer for layer in layers)
        if len(layers) != self.num_layers:
            raise ConfigError(
                f"has {len(layers)} layers but num_layers is {self.num_layers}",
                location="field 'layers'",
            )
        for li, layer in enumerate(layers):
            if not isinstance(layer, tuple):
                raise ConfigError(
                    f"must be a sequence of head patterns, got {type(layer).__name__}",
                    location=_where(li),
                )
            if len(layer) != self.num_heads:
                raise ConfigError(
                    f"has {len(layer)} heads but num_heads is {self.num_heads}",
                    location=_where(li),
                )
            for hi, pattern in enumerate(layer):
                if not isinstance(pattern, HeadPattern):
                    raise ConfigError(
                        f"must be a HeadPattern, got {type(pattern).__name__}",
                        location=_where(li, hi),
                    )
        object.__setattr__(self, "layers", layers)
        if self.scores is not None:
            scores = tuple(tuple(row) if _seq(row) else row for row in self.scores)
            if len(scores) != self.num_layers:
                raise ConfigError(
                    f"has {len(scores)} layers but num_layers is {self.num_layers}",
                    location="field 'scores'",
                )
            for li, row in enumerate(scores):
                if not isinstance(row, tuple) or len(row) != self.num_heads:
                    raise ConfigError(
                        f"must hold {self.num_heads} scores",
                        location=_where(li) + ", field 'scores'",
                    )
                for hi, s in enumerate(row):
                    if s is not None and not _is_number(s):
                        raise ConfigError(
                            f"must be a finite number or None, got {s!r}",
                            location=_where(li, hi, "score"),
                        )
            object.__setattr__(self, "scores", scores)

    # ---- access -------------------------------------------------------------------------

    def head(self, layer: int, head: int) -> HeadPattern:
        """The stored pattern of one (layer, query head)."""
        return self.layers[self._layer_index(layer)][head]

    def score(self, layer: int, head: int) -> Score | None:
        """The stored search score of one (layer, query head), or ``None``."""
        if self.scores is None:
            return None
        return self.scores[self._layer_index(layer)][head]

    def _layer_index(self, layer: int) -> int:
        if not _is_int(layer) or not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} out of range for {self.num_layers} layers")
        return layer

    def heads_for_layer(
        self, layer: int, seq_len: int | None = None, *, policy: BudgetPolicy | None = None
    ) -> tuple[HeadPattern, ...]:
        """The patterns of ``layer`` (one per query head) for a prompt of ``seq_len`` keys.

        With ``seq_len=None`` the stored patterns are returned unchanged. Otherwise each budget is
        adapted by ``policy`` (default: the config's :attr:`budget_policy`): scaled relative to
        :attr:`context_length` by the policy's exponents, clamped to ``seq_len``, and turned into
        ``dense`` where it covers every causal pair (see :class:`BudgetPolicy`). ``seq_len``
        counts key positions (cached prefix included).
        """
        heads = self.layers[self._layer_index(layer)]
        if seq_len is None:
            return heads
        pol = self.budget_policy if policy is None else policy
        return tuple(adapt_pattern(h, seq_len, self.context_length, pol) for h in heads)

    def kind_counts(self) -> dict[str, int]:
        """Number of heads of each kind (all kinds, zeros included)."""
        counts = dict.fromkeys(KINDS, 0)
        for layer in self.layers:
            for h in layer:
                counts[h.kind] = counts.get(h.kind, 0) + 1
        return counts

    def validate_against(
        self,
        *,
        num_layers: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        """Check the config fits a model; raise ``ValueError`` naming every mismatch.

        Arguments left ``None`` are not checked, nor are fields the config does not know.
        """
        problems = []
        for name, want in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            have = getattr(self, name)
            if want is None or have is None:
                continue
            if have != want:
                problems.append(f"{name}: config has {have}, model has {want}")
        if problems:
            raise ValueError(
                f"pattern config for {self.model_id!r} does not fit this model ("
                + "; ".join(problems)
                + "). Use the config made for this model, or search one: "
                "minference search --model MODEL --calib PROMPT --out CONFIG.json"
            )

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_heads: int,
        pattern: HeadPattern,
        *,
        model_id: str = "custom",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        context_length: int | None = None,
        budget_policy: BudgetPolicy | None = None,
    ) -> PatternConfig:
        """A config where every head of every layer uses ``pattern``."""
        if not isinstance(pattern, HeadPattern):
            raise TypeError(f"pattern must be a HeadPattern, got {type(pattern).__name__}")
        _check_count("num_layers", num_layers, optional=False)
        _check_count("num_heads", num_heads, optional=False)
        return cls(
            model_id=model_id,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layers=tuple((pattern,) * num_heads for _ in range(num_layers)),
            context_length=context_length,
            provenance=Provenance(source="uniform"),
            budget_policy=budget_policy or BudgetPolicy(),
        )

    def replace(self, **changes: Any) -> PatternConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def with_budget_policy(self, policy: BudgetPolicy) -> PatternConfig:
        """A copy that adapts budgets with ``policy``."""
        return replace(self, budget_policy=policy)

    # ---- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of this config (see ``docs/patterns/config-reference.md``)."""
        layers = []
        for li, layer in enumerate(self.layers):
            row = []
            for hi, pattern in enumerate(layer):
                score = None if self.scores is None else self.scores[li][hi]
                row.append(head_to_dict(pattern, score))
            layers.append(row)
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "context_length": self.context_length,
            "budget_policy": self.budget_policy.to_dict(),
            "provenance": self.provenance.to_dict(),
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> PatternConfig:
        """Build a config from :meth:`to_dict`'s layout, validating every field.

        Raises :class:`~minference_patterns.ConfigError` naming ``source`` (a file name, if
        any), the layer, head and field of the first problem.
        """
        if not isinstance(data, Mapping):
            hint = (
                " (a list of per-layer objects is MInference's format: use "
                "minference_patterns.from_minference or load())"
                if isinstance(data, list)
                else ""
            )
            raise ConfigError(
                f"a pattern config must be a JSON object, got {type(data).__name__}{hint}",
                source=source,
            )
        fmt = data.get("format")
        if fmt is not None and fmt != FORMAT_NAME:
            raise ConfigError(
                f"expected {FORMAT_NAME!r}, got {fmt!r}", source=source, location="field 'format'"
            )
        version = data.get("schema_version")
        if version is None:
            raise ConfigError(
                "missing (is this a minference-patterns config?)",
                source=source,
                location="field 'schema_version'",
            )
        if not _is_int(version) or version < 1:
            raise ConfigError(
                f"must be a positive integer, got {version!r}",
                source=source,
                location="field 'schema_version'",
            )
        if version > SCHEMA_VERSION:
            raise ConfigError(
                _future_msg(version), source=source, location="field 'schema_version'"
            )
        unknown = sorted(set(data) - set(_TOP_LEVEL))
        if unknown:
            raise ConfigError(
                f"unknown top-level field(s) {', '.join(map(repr, unknown))}", source=source
            )
        for name in ("model_id", "num_layers", "num_heads", "layers"):
            if name not in data:
                raise ConfigError("missing", source=source, location=f"field {name!r}")
        try:
            for name, optional in (
                ("num_layers", False),
                ("num_heads", False),
                ("num_kv_heads", True),
                ("head_dim", True),
                ("context_length", True),
            ):
                _check_count(name, data.get(name), optional=optional)
            num_layers = data["num_layers"]
            num_heads = data["num_heads"]
            raw_layers = data["layers"]
            if not isinstance(raw_layers, list):
                raise ConfigError(
                    f"must be a list of layers, got {type(raw_layers).__name__}",
                    location="field 'layers'",
                )
            if len(raw_layers) != num_layers:
                raise ConfigError(
                    f"has {len(raw_layers)} layers but num_layers is {num_layers}",
                    location="field 'layers'",
                )
            layers = []
            scores = []
            any_score = False
            for li, raw in enumerate(raw_layers):
                if not isinstance(raw, list):
                    raise ConfigError(
                        f"must be a list of heads, got {type(raw).__name__}", location=_where(li)
                    )
                if len(raw) != num_heads:
                    raise ConfigError(
                        f"has {len(raw)} heads but num_heads is {num_heads}", location=_where(li)
                    )
                row, srow = [], []
                for hi, h in enumerate(raw):
                    pattern, score = head_from_dict(h, layer=li, head=hi)
                    row.append(pattern)
                    srow.append(score)
                    any_score |= score is not None
                layers.append(tuple(row))
                scores.append(tuple(srow))
            policy_raw = data.get("budget_policy")
            try:
                policy = (
                    BudgetPolicy() if policy_raw is None else BudgetPolicy.from_dict(policy_raw)
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc), location="field 'budget_policy'") from None
            prov_raw = data.get("provenance")
            try:
                provenance = Provenance() if prov_raw is None else Provenance.from_dict(prov_raw)
            except TypeError as exc:
                raise ConfigError(str(exc), location="field 'provenance'") from None
            return cls(
                model_id=data["model_id"],
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=data.get("num_kv_heads"),
                head_dim=data.get("head_dim"),
                layers=tuple(layers),
                context_length=data.get("context_length"),
                provenance=provenance,
                schema_version=version,
                budget_policy=policy,
                scores=tuple(scores) if any_score else None,
            )
        except ConfigError as exc:
            if source is None or exc.source is not None:
                raise
            raise ConfigError(exc.reason, source=source, location=exc.location) from None

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`, one head per line (diff-friendly)."""
        return dumps_config(self.to_dict())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as JSON to ``path`` (parent directories are created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatternConfig:
        """Read a config file: ours, or MInference's / Qwen's format (auto-detected).

        For a model id of a shipped config use :func:`minference_patterns.load`.
        """
        return load_file(path)


def _seq(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def _future_msg(version: int) -> str:
    return (
        f"schema version {version} is newer than this minference-patterns understands "
        f"(up to {SCHEMA_VERSION}); upgrade minference-patterns to read it"
    )


def dumps_config(data: Mapping[str, Any]) -> str:
    """Serialise a config dict with one head object per line."""
    lines = ["{"]
    items = list(data.items())
    for i, (key, val) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if key == "layers":
            lines.append('  "layers": [')
            for li, layer in enumerate(val):
                lines.append("    [")
                for hi, h in enumerate(layer):
                    hc = "," if hi < len(layer) - 1 else ""
                    lines.append("      " + json.dumps(h, separators=(", ", ": ")) + hc)
                lc = "," if li < len(val) - 1 else ""
                lines.append("    ]" + lc)
            lines.append("  ]" + comma)
        else:
            text = json.dumps(val, indent=2)
            text = text.replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {text}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def json_schema() -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of the config file format."""
    from importlib.resources import files

    text = files("minference_patterns").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------------------------
# Reading other formats: MInference's and Qwen's (minference_patterns.convert re-exports these
# and adds the writer). They build PatternConfigs and PatternConfig.load dispatches to them, so
# they live in this module and config never imports convert (no import loop).

#: MInference kind name -> our kind name.
MINFERENCE_KINDS: Mapping[str, str] = {
    "vertical_and_slash": "vertical_slash",
    "stream_llm": "a_shape",
    "block_sparse": "block_sparse",
}
_QWEN_SPARSE_FILE = "sparse_attention_config.json"
PathLike = str | os.PathLike


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a missing, empty, truncated or non-JSON file raises a clear error."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such pattern config file: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory, not a JSON file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", source=str(p)
        ) from None
    if not text.strip():
        raise ConfigError("file is empty", source=str(p))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text.rstrip())
        why = "the file looks truncated" if truncated else "the file is not valid JSON"
        raise ConfigError(
            f"{why}: {exc.msg} at line {exc.lineno}, column {exc.colno}", source=str(p)
        ) from None


# --------------------------------------------------------------------------------------------
# MInference


def _parse_minference(
    data: Any, source: str | None
) -> tuple[list[tuple[HeadPattern, ...]], list[tuple[Score | None, ...]], dict[str, int]]:
    if not isinstance(data, list):
        raise ConfigError(
            f"MInference's format is a JSON list of per-layer objects, got {type(data).__name__}",
            source=source,
        )
    if not data:
        raise ConfigError("MInference config has no layers", source=source)
    num_heads = None
    layers, scores = [], []
    unused_b: dict[str, int] = {}
    for li, layer in enumerate(data):
        if not isinstance(layer, Mapping):
            raise ConfigError(
                f"must be an object mapping head index to [kind, a, b, score], "
                f"got {type(layer).__name__}",
                source=source,
                location=_where(li),
            )
        by_index: dict[int, Any] = {}
        for key, entry in layer.items():
            idx = (
                key
                if _is_int(key)
                else (int(key) if isinstance(key, str) and key.isdigit() else None)
            )
            if idx is None:
                raise ConfigError(
                    f"head key {key!r} is not a head index", source=source, location=_where(li)
                )
            if idx in by_index:
                raise ConfigError(f"head {idx} appears twice", source=source, location=_where(li))
            by_index[idx] = entry
        if num_heads is None:
            num_heads = len(by_index)
        if len(by_index) != num_heads or set(by_index) != set(range(num_heads)):
            missing = sorted(set(range(num_heads)) - set(by_index))
            extra = sorted(set(by_index) - set(range(num_heads)))
            detail = []
            if missing:
                detail.append(f"missing heads {missing}")
            if extra:
                detail.append(f"unexpected heads {extra}")
            raise ConfigError(
                f"has {len(by_index)} heads, layer 0 has {num_heads} ({'; '.join(detail)})",
                source=source,
                location=_where(li),
            )
        row, srow = [], []
        for hi in range(num_heads):
            pattern, score, b = _parse_entry(by_index[hi], li, hi, source)
            if b:  # 0 is what to_minference writes by default
                unused_b[f"{li}:{hi}"] = b
            row.append(pattern)
            srow.append(score)
        layers.append(tuple(row))
        scores.append(tuple(srow))
    return layers, scores, unused_b


def _parse_entry(
    entry: Any, li: int, hi: int, source: str | None
) -> tuple[HeadPattern, Score | None, int | None]:
    def fail(msg: str, fld: str | None = None) -> ConfigError:
        return ConfigError(msg, source=source, location=_where(li, hi, fld))

    if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) not in (3, 4):
        raise fail(f"must be [kind, size_a, size_b, score], got {entry!r}")
    kind, a, b = entry[0], entry[1], entry[2]
    score = entry[3] if len(entry) == 4 else None
    if kind not in MINFERENCE_KINDS:
        raise fail(
            f"unknown MInference pattern kind {kind!r}; known kinds: {', '.join(MINFERENCE_KINDS)}",
            "kind",
        )
    for name, val in (("size_a", a), ("size_b", b)):
        if not _is_int(val):
            raise fail(f"must be an integer, got {val!r}", name)
        if val < 0:
            raise fail(f"must be >= 0, got {val}", name)
    if score is not None and not _is_number(score):
        raise fail(f"must be a finite number, got {score!r}", "score")
    unused = None
    if kind == "vertical_and_slash":
        if a + b < 1:
            raise fail("verticals and slashes are both zero (an empty pattern)", "size_b")
        pattern = HeadPattern.vertical_slash(a, b)
    elif kind == "stream_llm":
        if b < 1:
            raise fail(f"the local window must be a positive integer, got {b}", "size_b")
        pattern = HeadPattern.a_shape(a, b)
    else:
        if a < 1:
            raise fail(f"top-k key blocks must be a positive integer, got {a}", "size_a")
        pattern = HeadPattern.block_sparse(a, 64)
        unused = b
    return pattern, score, unused


def from_minference(
    data_or_path: Any,
    *,
    model_id: str,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    context_length: int | None = None,
    budget_policy: BudgetPolicy | None = None,
    provenance: Provenance | None = None,
) -> PatternConfig:
    """Convert a config in MInference's format (a parsed list, or a path to its JSON file).

    Args:
        data_or_path: the list of per-layer ``{"<head>": [kind, a, b, score]}`` objects, or a path.
        model_id: the model the config is for (MInference's files do not say).
        num_kv_heads, head_dim: the model's shape, if known (MInference's files do not say).
        context_length: the length the config was searched at, if known (MInference does not
            publish it; without it the budgets are used as absolute sizes).
        budget_policy: how budgets adapt to other lengths (default: absolute, like MInference).
        provenance: overrides the default provenance (``source="minference"``).

    Raises:
        ConfigError: naming the layer, head and element at fault.
    """
    source = None
    if isinstance(data_or_path, (str, os.PathLike)):
        source = str(data_or_path)
        data = read_json(data_or_path)
    else:
        data = data_or_path
    return _convert_minference(
        data,
        source,
        model_id=model_id,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        context_length=context_length,
        budget_policy=budget_policy,
        provenance=provenance,
    )


def _convert_minference(
    data: Any,
    source: str | None,
    *,
    model_id: str,
    num_kv_heads: int | None,
    head_dim: int | None,
    context_length: int | None,
    budget_policy: BudgetPolicy | None,
    provenance: Provenance | None,
) -> PatternConfig:
    layers, scores, unused_b = _parse_minference(data, source)
    if provenance is None:
        extra: dict[str, Any] = {}
        if source is not None:
            extra["source_file"] = Path(source).name
        provenance = Provenance(source="minference", tool=None, extra=extra)
    if unused_b:
        extra = dict(provenance.extra)
        mi = dict(extra.get("minference", {}))
        mi["block_sparse_size_b"] = unused_b
        extra["minference"] = mi
        provenance = Provenance(**{**_prov_kwargs(provenance), "extra": extra})
    has_scores = any(s is not None for row in scores for s in row)
    try:
        return PatternConfig(
            model_id=model_id,
            num_layers=len(layers),
            num_heads=len(layers[0]),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layers=tuple(layers),
            context_length=context_length,
            provenance=provenance,
            budget_policy=budget_policy or BudgetPolicy(),
            scores=tuple(scores) if has_scores else None,
        )
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(exc.reason, source=source, location=exc.location) from None


def _prov_kwargs(p: Provenance) -> dict[str, Any]:
    return {name: getattr(p, name) for name in Provenance.__dataclass_fields__}


# --------------------------------------------------------------------------------------------
# Qwen


def _qwen_shape(cfg: Mapping[str, Any], source: str | None) -> ModelShape | None:
    """The model shape of a Qwen ``config.json`` (:func:`read_model_shape`, the one reader), or
    ``None`` when it names neither layers nor heads (a bare ``sparse_attention_config`` holder:
    nothing to check the patterns against)."""
    text = text_config(cfg)
    if text.num_hidden_layers is None and text.num_attention_heads is None:
        return None
    try:
        return read_model_shape(cfg)
    except ValueError as exc:
        raise ConfigError(f"the model config's shape: {exc}", source=source) from None


def from_qwen(
    data_or_path: Any,
    *,
    model_id: str | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    context_length: int | None = None,
) -> PatternConfig:
    """Convert Qwen's ``sparse_attention_config`` (Qwen2.5-1M) into a :class:`PatternConfig`.

    Accepts any of:

    * the ``sparse_attention_config.json`` list itself (MInference's format), parsed or a path;
    * a model ``config.json`` (parsed dict or path) holding ``sparse_attention_config`` at the top
      level or inside ``dual_chunk_attention_config``, either inline (the list) or as a file name
      relative to the ``config.json``; without it, ``sparse_attention_config.json`` next to the
      ``config.json`` is used (vLLM's convention);
    * a model directory holding those files.

    From a model config the shape (layers, heads, KV heads, head dim) is read and checked against
    the pattern list, ``_name_or_path`` gives the default model id, and the dual-chunk
    ``sparse_attention_threshold`` (vLLM default 32768) becomes ``budget_policy.dense_below`` (one
    more than the threshold: vLLM runs sparse only above it).
    """
    base: Path | None = None
    source: str | None = None
    data = data_or_path
    if isinstance(data_or_path, (str, os.PathLike)):
        p = Path(data_or_path)
        if p.is_dir():
            if (p / "config.json").exists():
                p = p / "config.json"
            elif (p / _QWEN_SPARSE_FILE).exists():
                p = p / _QWEN_SPARSE_FILE
            else:
                raise FileNotFoundError(f"{p} holds neither config.json nor {_QWEN_SPARSE_FILE}")
        source, base = str(p), p.parent
        data = read_json(p)
    if isinstance(data, list):
        return _convert_minference(
            data,
            source,
            model_id=model_id or (base.name if base is not None else "qwen"),
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            context_length=context_length,
            budget_policy=None,
            provenance=_qwen_provenance(source, None),
        )
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a model config (object) or a sparse_attention_config (list), "
            f"got {type(data).__name__}",
            source=source,
        )
    dca = data.get("dual_chunk_attention_config")
    dca = dca if isinstance(dca, Mapping) else None
    sparse = data.get("sparse_attention_config")
    if sparse is None and dca is not None:
        sparse = dca.get("sparse_attention_config")
    sparse_source = source
    if sparse is None or isinstance(sparse, str):
        name = sparse or _QWEN_SPARSE_FILE
        if base is None:
            raise ConfigError(
                f"the model config refers to the file {name!r}; pass the path of config.json "
                "(or of the model directory) so it can be found",
                source=source,
            )
        target = base / name
        if not target.exists():
            what = "names" if sparse else "has no sparse_attention_config and there is no"
            raise ConfigError(
                f"the model config {what} {name!r} ({target} not found)", source=source
            )
        sparse_source = str(target)
        sparse = read_json(target)
    shape = _qwen_shape(data, source)
    policy = BudgetPolicy()
    extra: dict[str, Any] = {}
    if dca is not None:
        threshold = dca.get("sparse_attention_threshold", 32768)
        if _is_int(threshold) and threshold >= 0:
            policy = BudgetPolicy(dense_below=threshold + 1)
        extra["dual_chunk_attention_config"] = {
            k: v for k, v in dca.items() if k != "sparse_attention_config"
        }
    mid = model_id or data.get("_name_or_path") or (base.name if base is not None else "qwen")
    cfg = _convert_minference(
        sparse,
        sparse_source,
        model_id=mid,
        num_kv_heads=num_kv_heads
        if num_kv_heads is not None or shape is None
        else shape.num_kv_heads,
        head_dim=head_dim if head_dim is not None or shape is None else shape.head_dim,
        context_length=context_length,
        budget_policy=policy,
        provenance=_qwen_provenance(sparse_source, extra),
    )
    try:
        if shape is not None:
            cfg.validate_against(num_layers=shape.num_layers, num_heads=shape.num_heads)
    except ValueError as exc:
        raise ConfigError(
            f"sparse_attention_config does not match the model config: {exc}", source=source
        ) from None
    return cfg


def _qwen_provenance(source: str | None, extra: dict[str, Any] | None) -> Provenance:
    ex = dict(extra or {})
    if source is not None:
        ex["source_file"] = Path(source).name
    return Provenance(
        source="qwen",
        tool=None,
        notes="Qwen's sparse_attention_config (MInference format); vLLM's dual-chunk backend "
        "raised a vertical size of 30 to 130 at run time, the stored value is kept as is.",
        extra=ex,
    )


# --------------------------------------------------------------------------------------------
# auto-detection


def detect_format(data: Any) -> str:
    """``"minference-patterns"``, ``"minference"`` or ``"qwen"`` for parsed JSON ``data``."""
    if isinstance(data, list):
        return "minference"
    if isinstance(data, Mapping):
        if data.get("format") == FORMAT_NAME or "schema_version" in data:
            return FORMAT_NAME
        if (
            "sparse_attention_config" in data
            or "dual_chunk_attention_config" in data
            or "num_hidden_layers" in data
        ):
            return "qwen"
        if "layers" in data and "model_id" in data:
            return FORMAT_NAME
    raise ValueError("unrecognised pattern config format")


def load_file(path: PathLike, *, model_id: str | None = None) -> PatternConfig:
    """Load a config file in any supported format (ours, MInference's, Qwen's), or a directory.

    A directory must hold a Qwen-style ``config.json`` with a sparse attention config, or its
    ``sparse_attention_config.json``. MInference files get their model id (and shape) from the
    shipped index when the file name matches a shipped source file, else from ``model_id`` or the
    file name.
    """
    p = Path(path)
    if p.is_dir():
        return from_qwen(p, model_id=model_id)
    data = read_json(p)
    try:
        fmt = detect_format(data)
    except ValueError:
        raise ConfigError(
            "not a pattern config: expected our format (an object with 'schema_version'), "
            "MInference's (a list of per-layer objects) or a Qwen model config",
            source=str(p),
        ) from None
    if fmt == FORMAT_NAME:
        cfg = PatternConfig.from_dict(data, source=str(p))
        return cfg if model_id is None else cfg.replace(model_id=model_id)
    if fmt == "qwen":
        return from_qwen(p, model_id=model_id)
    known = shape_for_source_file(p.name)
    return _convert_minference(
        data,
        str(p),
        model_id=model_id or (known["model_id"] if known else p.stem),
        num_kv_heads=known["num_kv_heads"] if known else None,
        head_dim=known["head_dim"] if known else None,
        context_length=None,
        budget_policy=None,
        provenance=None,
    )
