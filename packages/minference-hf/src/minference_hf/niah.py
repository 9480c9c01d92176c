"""Needle-in-a-haystack retrieval: dense vs sparse pre-fill over prompt lengths and needle depths.

A random 7-digit "special magic number" is hidden at a relative depth of a long filler text; the
model is asked for it and scores 1 when its greedy answer contains the number. Each method
(``dense``: the model's own SDPA attention; ``sparse``: :func:`minference_hf.patch` with a pattern
config) runs every (length, depth) cell; results go to a JSON file and one heatmap PNG per method.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from minference_kernels.options import PrefillOptions

from .generation import _decode_text, greedy_generate
from .patching import get_plan, patch, restore_plan, unpatch

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_FILLER = (
    "The harbour town woke slowly, its fishing boats rocking against the grey stone pier.",
    "Merchants unrolled their awnings and argued about the price of salt and rope.",
    "A cartographer spent the winter redrawing the coastline after the spring floods.",
    "Most of the old maps placed the lighthouse two miles further north than it stands.",
    "In the library, a clerk sorted letters by the colour of their wax seals.",
    "Gardeners on the hill grew pears that ripened late and kept until midwinter.",
    "The council met every second Tuesday, and the minutes rarely recorded a decision.",
    "Children learned arithmetic by counting the carts that crossed the toll bridge.",
    "An engineer proposed a canal, but the estimate doubled each time it was revised.",
    "The bakery on the square opened before dawn and closed once the rye was sold.",
    "Travellers described the road inland as long, dusty and surprisingly well signposted.",
    "A weaver kept a ledger of every pattern she had ever sold, bound in green cloth.",
    "The river changed course twice in a century, leaving a crescent lake behind.",
    "Astronomers at the small observatory catalogued comets with patient handwriting.",
    "Every autumn the orchard workers held a contest for the heaviest apple.",
    "The tram line was extended to the quarry, then shortened again when it closed.",
    "Some residents insisted the clock tower ran four minutes fast on purpose.",
    "A shipment of blue tiles arrived cracked, and the chapel roof stayed unfinished.",
    "The schoolteacher collected fossils from the cliffs and labelled them in Latin.",
    "During the long drought the wells were rationed by a lottery held at noon.",
    "Musicians rehearsed in the granary because its wooden walls softened the echo.",
    "The ferry timetable was printed in three languages and correct in none of them.",
    "A botanist found a fern on the north slope that grew nowhere else in the region.",
    "Carpenters argued whether oak or chestnut made the better beam for a barn.",
    "The annual fair drew jugglers, tinkers and a man who sold weather predictions.",
    "Old photographs show the market hall before the fire, with a glass dome.",
    "Shepherds moved their flocks to the high pasture when the snow line retreated.",
    "The printing press in the cellar produced a weekly paper of four thin pages.",
    "A storm in the ninth year tore the weather vane from the church spire.",
    "Nobody remembered who had planted the row of cedars along the avenue.",
)

_INTRO = (
    "Below is a long text. Somewhere in it there is one special magic number. Read the text "
    "and remember that number.\n\n"
)
_QUESTION = "\n\nWhat is the special magic number mentioned in the text above?"
_ANSWER_PREFIX = " The special magic number is"


def parse_length(text: str) -> int:
    """``"8k"`` -> 8192, ``"1m"`` -> 1048576, ``"3000"`` -> 3000."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", t)
    if not m:
        raise ValueError(f"bad length {text!r}: use e.g. 4096, 8k, 128k, 1m")
    mult = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2)]
    val = int(float(m.group(1)) * mult)
    if val < 1:
        raise ValueError(f"length must be positive, got {text!r}")
    return val


def parse_depths(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (each in [0, 1])."""
    out = [float(x) for x in text.split(",") if x.strip()]
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise ValueError(f"depths must be comma-separated numbers in [0, 1], got {text!r}")
    return out


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> tuple[str, str]:
    """Text before and after the haystack context, chat template applied when wanted."""
    marker = "\u0000HAYSTACK\u0000"
    user = _INTRO + marker + _QUESTION
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        full = str(full) + _ANSWER_PREFIX.lstrip()
    else:
        bos = tokenizer.bos_token or ""
        full = bos + user + _ANSWER_PREFIX
    before, after = full.split(marker)
    return before, after


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    *,
    seed: int = 0,
    use_chat_template: bool = True,
) -> tuple[list[int], str]:
    """Token ids of a haystack prompt of ``length`` tokens with the needle at ``depth``.

    The filler is made of whole sentences (the last one cut to fit); the needle goes between two
    sentences, at ``depth`` of them (0: first, 1: last).

    Returns:
        ``(input_ids, answer)``: the prompt ids and the 7-digit number to retrieve.
    """
    rng = random.Random(f"{seed}:{length}:{depth}")
    answer = str(rng.randrange(1_000_000, 10_000_000))
    needle = _encode(tokenizer, f" The special magic number is {answer}.")
    before, after = _template(tokenizer, use_chat_template)
    head = _encode(tokenizer, before)
    tail = _encode(tokenizer, after)
    budget = length - len(head) - len(tail) - len(needle)
    if budget < 1:
        raise ValueError(f"length {length} is too short for the template and the needle")
    sentences = [_encode(tokenizer, " " + s) for s in _FILLER]
    order = list(range(len(sentences)))
    context: list[list[int]] = []
    used = 0
    while used < budget:
        rng.shuffle(order)
        for i in order:
            piece = sentences[i][: budget - used]  # the last sentence is cut to fit exactly
            context.append(piece)
            used += len(piece)
            if used >= budget:
                break
    at = round(depth * len(context))
    ids = head + [t for s in context[:at] for t in s] + needle
    ids += [t for s in context[at:] for t in s] + tail
    return ids, answer


@dataclass
class NiahCase:
    """One (method, length, depth) result."""

    method: str
    length: int
    depth: float
    prompt_tokens: int
    answer: str
    output: str
    score: float
    ttft_s: float
    sparse_calls: int


def run_niah(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    sparse_config: PatternConfig | None,
    out_dir: str | Path,
    options: PrefillOptions | None = None,
    model_name: str = "",
    untrained: bool = False,
    methods: Sequence[str] = ("dense", "sparse"),
    max_new_tokens: int = 12,
    use_chat_template: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid for each method, write ``niah.json`` and ``niah_<method>.png`` to ``out_dir``
    (without matplotlib, the ``[plot]`` extra, the JSON only: its ``heatmap`` entries are ``None``
    and ``result["note"]`` says why).

    Args:
        model: the causal LM (left unpatched on return if it was unpatched on entry).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1] (0: start of the text, 1: end).
        sparse_config: pattern config for the ``sparse`` method (``None``: the model's own
            shipped config).
        out_dir: where the JSON and PNGs go (created).
        options: the sparse pre-fill settings of the ``sparse`` method
            (:class:`minference_kernels.PrefillOptions`, used unchanged); ``None``: those of the
            model's plan when it is patched, else the defaults.
        model_name: recorded in the JSON.
        untrained: recorded in the JSON (the embedded default model).
        methods: subset of ``("dense", "sparse")``.
        max_new_tokens: tokens generated per cell.
        use_chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        seed: needle values and filler order.
        progress: per-cell lines on stderr.

    Returns:
        The dict written to ``niah.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(methods) - {"dense", "sparse"}
    if unknown:
        raise ValueError(f"unknown NIAH methods {sorted(unknown)}; use dense and/or sparse")
    device = next(model.parameters()).device
    was = get_plan(model)
    if options is None:
        options = was.options if was is not None else PrefillOptions()
    elif not isinstance(options, PrefillOptions):
        raise TypeError(
            f"options must be a minference_kernels.PrefillOptions, got {type(options).__name__}"
        )
    cases: list[NiahCase] = []
    prompts = {
        (L, d): build_prompt(tokenizer, L, d, seed=seed, use_chat_template=use_chat_template)
        for L in lengths
        for d in depths
    }
    try:
        for method in methods:
            if method == "dense" and get_plan(model) is not None:
                unpatch(model)
            if method == "sparse":
                cfg = sparse_config
                if cfg is None and was is not None:
                    cfg = was.config
                patch(model, cfg, options=options)
            total = len(lengths) * len(depths)
            for i, ((L, d), (ids, answer)) in enumerate(prompts.items()):
                x = torch.tensor([ids], dtype=torch.long, device=device)
                res = greedy_generate(
                    model, x, max_new_tokens=max_new_tokens, progress=progress and L >= 32768
                )
                text = _decode_text(tokenizer, res.token_ids)
                score = 1.0 if answer in text else 0.0
                cases.append(
                    NiahCase(
                        method, L, d, len(ids), answer, text, score, res.ttft_s, res.sparse_calls
                    )
                )
                if progress:
                    print(
                        f"niah {method:6s} [{i + 1}/{total}] length {L} depth {d:.2f}: "
                        f"{'found' if score else 'missed'} ({res.ttft_s:.2f} s) -> {text!r}",
                        flush=True,
                    )
    finally:
        if was is None and get_plan(model) is not None:
            unpatch(model)
        elif was is not None:
            restore_plan(model, was)
    result: dict[str, Any] = {
        "model": model_name,
        "untrained": untrained,
        "lengths": list(lengths),
        "depths": list(depths),
        "min_sparse_len": options.min_sparse_len,
        "coverage": options.coverage,
        "options": options.to_dict(),
        "methods": {},
        "cases": [asdict(c) for c in cases],
    }
    for method in methods:
        grid = [
            [
                next(
                    c.score for c in cases if c.method == method and c.length == L and c.depth == d
                )
                for L in lengths
            ]
            for d in depths
        ]
        flat = [s for row in grid for s in row]
        result["methods"][method] = {
            "scores": grid,  # [depth][length]
            "mean": sum(flat) / len(flat),
            "heatmap": f"niah_{method}.png",
        }
    plot = _has_matplotlib()
    if not plot:
        result["note"] = PLOT_NOTE
        for method in methods:
            result["methods"][method]["heatmap"] = None
    (out / "niah.json").write_text(json.dumps(result, indent=2))
    if plot:
        for method in methods:
            plot_heatmap(result, method, out / f"niah_{method}.png")
    return result


#: What ``niah`` and ``eval`` say instead of drawing when matplotlib is missing.
PLOT_NOTE = "no plot: matplotlib is not installed (pip install 'minference-hf[plot]')"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_heatmap(result: dict[str, Any], method: str, path: str | Path) -> Path:
    """Draw one method's depth x length score grid to ``path`` (PNG; needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "the NIAH heatmap needs matplotlib: pip install 'minference-hf[plot]'"
        ) from e
    grid = result["methods"][method]["scores"]
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.6 + 1.1 * len(lengths)), max(3.0, 1.6 + 0.5 * len(depths)))
    )
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="black")
    mean = result["methods"][method]["mean"]
    title = f"{result['model'] or 'model'}\n{method} pre-fill: mean retrieval {mean:.2f}"
    if result.get("untrained"):
        title += " (UNTRAINED default model)"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt_len(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)
