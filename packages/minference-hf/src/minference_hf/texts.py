"""Real English text available on every machine that has Python: the language reference.

CPython ships the text of its language reference's topics (``pydoc_data.topics``, about 465,000
characters, ~110K tokens for a Llama tokenizer) for ``help()``. It is natural technical prose with
code samples, written by people, so it exercises trained attention heads as real documents do,
unlike repeated filler sentences. The topics are split in two fixed halves:

* ``"calibration"`` (topics in even positions of the sorted list): the offline pattern search;
* ``"evaluation"`` (odd positions): held-out text for perplexity, pass keys and agreement.

:func:`real_text` returns a deterministic slice of one half (rotated by ``seed``). The exact text
depends on the Python version; :func:`text_fingerprint` identifies it for provenance.
"""

from __future__ import annotations

import hashlib
import sys
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Split = Literal["calibration", "evaluation"]

__all__ = ["Split", "real_text", "real_token_ids", "text_fingerprint"]


def _topics(split: Split) -> list[str]:
    from pydoc_data.topics import topics

    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    keys = sorted(topics)
    pick = 0 if split == "calibration" else 1
    return [topics[k].strip() for i, k in enumerate(keys) if i % 2 == pick]


def real_text(split: Split = "evaluation", *, seed: int = 0, min_chars: int = 0) -> str:
    """One half of the reference, topics joined by blank lines, rotated to start at topic
    ``seed`` (mod the number of topics), repeated whole if ``min_chars`` asks for more text than
    the half holds."""
    parts = _topics(split)
    s = seed % len(parts)
    parts = parts[s:] + parts[:s]
    text = "\n\n".join(parts)
    while len(text) < min_chars:
        text = text + "\n\n" + "\n\n".join(parts)
    return text


def real_token_ids(
    tokenizer: PreTrainedTokenizerBase, n_tokens: int, split: Split = "evaluation", *, seed: int = 0
) -> list[int]:
    """The first ``n_tokens`` token ids of :func:`real_text` (no special tokens)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    chars = n_tokens * 6
    while True:
        ids = list(
            tokenizer(real_text(split, seed=seed, min_chars=chars), add_special_tokens=False)[
                "input_ids"
            ]
        )
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        chars *= 2


def text_fingerprint(split: Split) -> str:
    """``"pydoc_data.topics (Python X.Y), <split> half, sha256 <first 12 hex>"``."""
    digest = hashlib.sha256(real_text(split).encode()).hexdigest()[:12]
    v = sys.version_info
    return f"pydoc_data.topics (Python {v.major}.{v.minor}), {split} half, sha256 {digest}"
