"""Accuracy harness: does sparse pre-fill change a real model's answers?

For every prompt length and seed, on held-out real text (:mod:`minference_hf.texts`), each method
(``dense``, the model's own SDPA attention, and any number of sparse methods) runs

* **pass key**: a 5-digit key hidden at several depths of the text, asked for at the end;
* **multi-key retrieval** (RULER-style): several "special magic number for <word>" needles, the
  question asks for one of them;
* **language modelling**: the log-likelihood of the last ``tail`` tokens after a sparse pre-fill of
  the whole text; against dense, the perplexity ratio, the top-1 next-token agreement and the
  KL divergence ``KL(p_dense || p_sparse)`` averaged over those positions;

and each sparse row records the *density* it really kept: the share of the causal (query, key)
pairs of all full-attention layers that were computed (layers that ran dense count as dense;
sliding-window layers, local by construction, are not counted). A sparse method
whose prompt stayed below its threshold is reported as ``went_sparse: false``, never as a result.

Methods are given as specs (:func:`parse_method`): ``dense``, ``shipped`` (the config shipped for
the model's id), ``config=PATH``, ``vs:V:S`` (every head vertical-slash with V columns and S
diagonals), ``block:K`` (block-sparse, top K key blocks of 64; ``block:K:sampled`` with sampled
block scoring), ``ashape:SINK:WINDOW``; any sparse
spec may end in ``@cov=0.95`` (coverage) or ``@alloc=layer`` (block allocation). ``oracle:D`` is
the upper line no estimator can beat at density ``D``: every query row of every head attends to its
own ``ceil(D * causal keys)`` highest-scoring keys, found from the full attention scores (a
measuring device, as costly as dense attention; sliding-window layers stay as the model defines).
``blockkeys:D`` (or ``blockkeys:D:G``) measures an estimator that has no kernel yet: each 64-row
query block attends to its own keys plus ``ceil(D * (block end)) - (its rows)`` earlier keys ranked
by the block's pooled queries (the rows split into ``G`` groups, default 4, each group's mean
query scored against the keys, the groups' softmaxes summed; ``G = 1``: the logits of the block's
mean query). All rows of a block share its keys, as in any index the kernels run; computed the same
way as ``oracle:D``, so it measures accuracy, not speed.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from minference_kernels.options import DEFAULT_BLOCK_ALLOCATION, DEFAULT_COVERAGE

from .generation import _decode_text, greedy_generate
from .patching import (
    _set_impl,
    attention_shape,
    full_attention_layers,
    get_plan,
    patch,
    resolve_config,
    restore_plan,
    unpatch,
)
from .texts import real_token_ids, text_fingerprint

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Method", "parse_method", "run_eval", "summarize", "plot_eval"]

_WORDS = (
    "apricot", "harbour", "lantern", "meadow", "copper", "violet", "glacier", "saddle",
    "compass", "thistle", "orchard", "falcon", "pebble", "quartz", "willow", "ember",
)  # fmt: skip


@dataclass(frozen=True)
class Method:
    """One way of running pre-fill: dense (``config is None``) or sparse with a pattern config."""

    name: str
    config: PatternConfig | None = None
    coverage: float | None = DEFAULT_COVERAGE
    block_allocation: str = DEFAULT_BLOCK_ALLOCATION
    oracle_density: float | None = None
    block_key_groups: int = 0  # > 0: ``blockkeys:D:G`` at density ``oracle_density``

    @property
    def sparse(self) -> bool:
        return self.config is not None or self.oracle_density is not None


def parse_method(spec: str, model: PreTrainedModel) -> Method:
    """A :class:`Method` from its spec (see the module doc); ``ValueError`` names a bad spec."""
    from minference_kernels import HeadPattern
    from minference_kernels._validate import check_allocation, check_coverage
    from minference_patterns import PatternConfig

    text = spec.strip()
    base, *opts = text.split("@")
    coverage = DEFAULT_COVERAGE
    alloc = DEFAULT_BLOCK_ALLOCATION
    for o in opts:
        key, _, val = o.partition("=")
        if key == "cov":
            try:
                coverage = float(val)
            except ValueError:
                raise ValueError(f"method {spec!r}: @cov needs a number, got {val!r}") from None
            check_coverage(coverage, f"method {spec!r}: @cov")
        elif key == "alloc":
            alloc = check_allocation(val, f"method {spec!r}: @alloc")
        else:
            raise ValueError(f"method {spec!r}: unknown option @{key} (use @cov= or @alloc=)")
    if base == "dense":
        if opts:
            raise ValueError(f"method {spec!r}: dense takes no options")
        return Method("dense")
    shape = attention_shape(model)

    def uniform(p: HeadPattern) -> PatternConfig:
        return PatternConfig.uniform(
            shape.num_layers,
            shape.num_heads,
            p,
            model_id=f"uniform {p.describe()}",
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
        )

    kind, _, rest = base.partition(":")
    if kind == "oracle":
        try:
            d = float(rest)
        except ValueError:
            raise ValueError(f"method {spec!r}: oracle:D needs a density D in (0, 1]") from None
        if not 0.0 < d <= 1.0 or opts:
            raise ValueError(f"method {spec!r}: oracle:D needs a density D in (0, 1], no options")
        return Method(text, None, oracle_density=d)
    if kind == "blockkeys":
        usage = f"method {spec!r}: blockkeys:D[:G] needs a density D in (0, 1] and 1 <= G <= 64"
        d_text, _, g_text = rest.partition(":")
        try:
            d, groups = float(d_text), int(g_text or BLOCK_KEY_GROUPS)
        except ValueError:
            raise ValueError(usage) from None
        if not 0.0 < d <= 1.0 or not 1 <= groups <= 64 or opts:
            raise ValueError(usage + ", no options")
        return Method(text, None, oracle_density=d, block_key_groups=groups)
    args = rest.split(":") if rest else []
    scoring = "pooled"
    if kind == "block" and len(args) == 2 and not args[1].isdigit():
        scoring = args.pop()
    try:
        nums = [int(a) for a in args]
    except ValueError:
        raise ValueError(f"method {spec!r}: sizes must be integers") from None
    if kind == "shipped" and not args:
        cfg = resolve_config(None, model)
    elif kind.startswith("config="):
        cfg = resolve_config(base[len("config=") :], model)
    elif kind == "vs" and len(nums) == 2:
        cfg = uniform(HeadPattern.vertical_slash(nums[0], nums[1]))
    elif kind == "block" and len(nums) == 1:
        cfg = uniform(HeadPattern.block_sparse(nums[0], 64, scoring))
    elif kind == "ashape" and len(nums) == 2:
        cfg = uniform(HeadPattern.a_shape(nums[0], nums[1]))
    elif kind == "vblock" and len(nums) == 2:
        cfg = uniform(HeadPattern.vertical_block(nums[0], nums[1]))
    else:
        raise ValueError(
            f"unknown method {spec!r}: use dense, shipped, config=PATH, vs:V:S, block:K, "
            "block:K:sampled, vblock:V:K or ashape:SINK:WINDOW, optionally followed by @cov=X "
            "and/or @alloc=NAME; or oracle:D, blockkeys:D[:G]"
        )
    name = text
    if kind.startswith("config="):  # a file's name, not its folder, names the method
        name = "config=" + os.path.basename(text[len("config=") :])
    return Method(name, cfg, coverage, alloc)


# ---- prompts -------------------------------------------------------------------------------


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _wrap(tok: PreTrainedTokenizerBase, body: list[int], question: str, answer_prefix: str,
          chat: bool) -> list[int]:  # fmt: skip
    """``[bos] intro body question answer_prefix``, in the chat template when ``chat``."""
    intro = "Read the document below and answer the question after it.\n\n"
    marker = "\u0000DOC\u0000"
    if chat and getattr(tok, "chat_template", None):
        full = str(
            tok.apply_chat_template(
                [{"role": "user", "content": intro + marker + "\n\n" + question}],
                tokenize=False,
                add_generation_prompt=True,
            )
        )
        full += answer_prefix
    else:
        full = (tok.bos_token or "") + intro + marker + "\n\n" + question + "\n" + answer_prefix
    before, after = full.split(marker)
    return _encode(tok, before) + body + _encode(tok, after)


def _haystack(tok: PreTrainedTokenizerBase, n: int, seed: int) -> list[int]:
    return real_token_ids(tok, max(1, n), "evaluation", seed=seed)


def _insert(hay: list[int], needle: list[int], depth: float, breaks: set[int]) -> list[int]:
    """Insert ``needle`` at relative ``depth`` of ``hay``, just after the nearest sentence end."""
    at = round(depth * len(hay))
    for j in range(at, max(-1, at - 200), -1):
        if j == 0 or hay[j - 1] in breaks:
            at = j
            break
    return hay[:at] + needle + hay[at:]


def _breaks(tok: PreTrainedTokenizerBase) -> set[int]:
    out: set[int] = set()
    for s in (".", ".\n", "\n", "\n\n", ". "):
        ids = _encode(tok, s)
        if len(ids) == 1:
            out.add(ids[0])
    return out


def passkey_prompt(
    tok: PreTrainedTokenizerBase, length: int, depth: float, seed: int, chat: bool = True
) -> tuple[list[int], str]:
    """``(ids, key)``: a ``length``-token prompt with a 5-digit pass key at ``depth``."""
    rng = random.Random(f"passkey:{seed}:{length}:{depth}")
    key = str(rng.randrange(10_000, 100_000))
    needle = _encode(tok, f" The pass key is {key}. Remember it. {key} is the pass key.\n")
    q = "What is the pass key? Answer with the number only."
    fixed = len(_wrap(tok, [], q, " The pass key is", chat)) + len(needle)
    hay = _haystack(tok, length - fixed, seed)
    ids = _wrap(tok, _insert(hay, needle, depth, _breaks(tok)), q, " The pass key is", chat)
    return ids, key


def multikey_prompt(
    tok: PreTrainedTokenizerBase, length: int, seed: int, num_keys: int = 4, chat: bool = True
) -> tuple[list[int], str]:
    """``(ids, value)``: ``num_keys`` needles "the special magic number for <word> is <n>" at
    random depths; the question asks for one of the words (RULER's multi-key NIAH)."""
    rng = random.Random(f"multikey:{seed}:{length}:{num_keys}")
    words = rng.sample(_WORDS, num_keys)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in words]
    target = rng.randrange(num_keys)
    needles = [
        _encode(tok, f" One of the special magic numbers for {w} is: {v}.\n")
        for w, v in zip(words, values)
    ]
    q = f"What is the special magic number for {words[target]} mentioned in the document?"
    prefix = f" The special magic number for {words[target]} is:"
    fixed = len(_wrap(tok, [], q, prefix, chat)) + sum(map(len, needles))
    hay = _haystack(tok, length - fixed, seed + 1)
    br = _breaks(tok)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in words)
    for needle, d in sorted(zip(needles, depths), key=lambda x: -x[1]):
        hay = _insert(hay, needle, d, br)
    return _wrap(tok, hay, q, prefix, chat), values[target]


# ---- running -------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """One (task, length, seed, depth) case under one method."""

    task: str  # "passkey" | "multikey" | "lm"
    method: str
    length: int
    seed: int
    depth: float | None
    prompt_tokens: int
    went_sparse: bool
    density: float | None  # share of all layers' causal pairs computed (None: dense method)
    seconds: float
    answer: str | None = None
    output: str | None = None
    correct: bool | None = None
    nll: float | None = None  # mean negative log-likelihood of the tail
    top1_agree: float | None = None  # vs dense
    kl: float | None = None  # KL(dense || method), mean over the tail
    extra: dict[str, Any] = field(default_factory=dict)


class _Switch:
    """Patch / unpatch the model per method; restores the state it found at the end."""

    def __init__(self, model: PreTrainedModel, min_sparse_len: int) -> None:
        self.model = model
        self.min_sparse_len = min_sparse_len
        self.was = get_plan(model)
        self.current: str | None = None

    def use(self, m: Method) -> None:
        if self.current == m.name:
            return
        if get_plan(self.model) is not None:
            unpatch(self.model)
        _ORACLE.update(
            density=m.oracle_density, groups=m.block_key_groups, kept=0.0, causal=0.0, calls=0
        )
        impl = getattr(self.model.config, "_attn_implementation", None)
        if m.oracle_density is not None:
            _register_oracle()
            if impl != ORACLE_IMPLEMENTATION:
                self.oracle_prev = impl
            _set_impl(self.model, ORACLE_IMPLEMENTATION)
        elif impl == ORACLE_IMPLEMENTATION:
            _set_impl(self.model, getattr(self, "oracle_prev", None) or "sdpa")
        if m.config is not None:
            patch(
                self.model,
                m.config,
                min_sparse_len=self.min_sparse_len,
                coverage=m.coverage,
                block_allocation=m.block_allocation,
            )
            plan = get_plan(self.model)
            assert plan is not None
            plan.record_density = True
        self.current = m.name

    def restore(self) -> None:
        if get_plan(self.model) is not None:
            unpatch(self.model)
        if getattr(self.model.config, "_attn_implementation", None) == ORACLE_IMPLEMENTATION:
            _set_impl(self.model, getattr(self, "oracle_prev", None) or "sdpa")
        if self.was is not None:
            restore_plan(self.model, self.was)


ORACLE_IMPLEMENTATION = "minference_oracle"
_ORACLE: dict[str, Any] = {"density": None, "groups": 0, "kept": 0.0, "causal": 0.0, "calls": 0}
#: ``blockkeys:D``'s default number of pooled row groups per query block
BLOCK_KEY_GROUPS = 4
_KEY_BLOCK = 64  # rows of a query block, as the kernels' index


def _register_oracle() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ORACLE_IMPLEMENTATION, oracle_attention)
    AttentionMaskInterface.register(ORACLE_IMPLEMENTATION, sdpa_mask)


def oracle_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``oracle:D`` and ``blockkeys:D:G`` methods' attention (registered as
    ``"minference_oracle"``): on a pre-fill (``Nq == Nk > 1``, full causal attention), each query
    row attends to its own ``ceil(D * (i + 1))`` highest-scoring causal keys (``oracle``), or to the
    keys its 64-row block chose (``blockkeys``, :func:`block_keys_mask`); anything else (decode
    steps, sliding windows) is the model's SDPA. ``query [B, Hq, N, D]``, ``key``/``value
    [B, Hkv, N, D]``; returns ``[B, N, Hq, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    d = _ORACLE["density"]
    b, hq, nq, hd = query.shape
    nk = key.shape[2]
    if d is None or nq != nk or nq < 2 or kwargs.get("sliding_window"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    scale = hd**-0.5 if scaling is None else scaling
    g = hq // key.shape[1]
    k = key.repeat_interleave(g, 1).float()
    v = value.repeat_interleave(g, 1).float()
    out = torch.empty(b, hq, nq, value.shape[-1], dtype=torch.float32, device=query.device)
    kpos = torch.arange(nk, device=query.device)
    for r0 in range(0, nq, 512):  # a multiple of 64: every chunk holds whole query blocks
        r1 = min(nq, r0 + 512)
        pos = torch.arange(r0, r1, device=query.device)
        q = query[:, :, r0:r1].float()
        s = torch.matmul(q, k[:, :, :r1].transpose(-1, -2)) * scale
        s.masked_fill_(kpos[None, :r1] > pos[:, None], float("-inf"))
        if _ORACLE["groups"]:
            s.masked_fill_(~block_keys_mask(q, k[:, :, :r1], r0, d, _ORACLE["groups"], scale),
                           float("-inf"))  # fmt: skip
        else:
            need = torch.ceil(d * (pos + 1).double()).long().clamp(min=1)  # [R]
            srt = s.sort(-1, descending=True).values
            thr = srt.gather(-1, (need - 1).view(1, 1, -1, 1).expand(b, hq, -1, 1))
            s.masked_fill_(s < thr, float("-inf"))
        _ORACLE["kept"] += float(torch.isfinite(s).sum())
        _ORACLE["causal"] += float((pos + 1).sum()) * b * hq
        out[:, :, r0:r1] = torch.matmul(torch.softmax(s, -1), v[:, :, :r1])
    _ORACLE["calls"] += 1
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def block_keys_mask(
    q: torch.Tensor, k: torch.Tensor, r0: int, density: float, groups: int, scale: float
) -> torch.Tensor:
    """The keys ``blockkeys:density:groups`` gives the query rows ``r0 .. r0 + R``: ``bool [B, H,
    R, Nk]``, shared by the rows of each 64-row block (``r0`` a multiple of 64). A block ``[s, e)``
    keeps its own keys and the ``min(s, ceil(density * e) - (e - s))`` earlier keys with the highest
    pooled score: its rows split into ``groups`` groups, each group's mean query against the keys
    before ``s`` (``q [B, H, R, D]``, ``k [B, H, Nk, D]``, float), the groups' softmaxes summed
    (``groups == 1``: the mean query's logits). Causality is left to the caller."""
    if r0 % _KEY_BLOCK:
        raise ValueError(f"block_keys_mask: r0 must be a multiple of {_KEY_BLOCK}, got {r0}")
    b, h, rows, _ = q.shape
    keep = torch.zeros(b, h, rows, k.shape[2], dtype=torch.bool, device=q.device)
    for a in range(0, rows, _KEY_BLOCK):
        s, e = r0 + a, min(r0 + a + _KEY_BLOCK, r0 + rows)
        keep[:, :, a : e - r0, s:e] = True
        n_early = min(s, math.ceil(density * e) - (e - s))
        if n_early <= 0:
            continue
        qg = torch.stack([c.mean(2) for c in q[:, :, a : e - r0].chunk(groups, dim=2)], 2)
        logits = torch.matmul(qg, k[:, :, :s].transpose(-1, -2)) * scale  # [B, H, G', s]
        score = logits[:, :, 0] if groups == 1 else torch.softmax(logits, -1).sum(2)
        top = score.topk(n_early, -1).indices  # [B, H, n_early]
        chosen = torch.zeros(b, h, s, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
        keep[:, :, a : e - r0, :s] = chosen[:, :, None]
    return keep


def _sparse_state(model: PreTrainedModel, layers: list[int]) -> tuple[bool, float | None]:
    if _ORACLE["density"] is not None:
        went = _ORACLE["calls"] > 0
        return went, (_ORACLE["kept"] / _ORACLE["causal"]) if went and _ORACLE["causal"] else None
    plan = get_plan(model)
    if plan is None:
        return False, None
    went = plan.stats.sparse_calls > 0
    return went, plan.stats.model_density(layers) if went else None


def _reset(model: PreTrainedModel) -> None:
    _ORACLE.update(kept=0.0, causal=0.0, calls=0)
    plan = get_plan(model)
    if plan is not None:
        plan.stats.reset()


@torch.no_grad()
def _tail_logprobs(model: PreTrainedModel, ids: list[int], tail: int) -> torch.Tensor:
    """``[tail, vocab]`` float32 log-probabilities predicting the last ``tail`` tokens."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=False, logits_to_keep=tail + 1)
    logits = out.logits[0, :-1].float()
    return torch.log_softmax(logits, -1).cpu()


def run_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seeds: Sequence[int] = (0,),
    tasks: Sequence[str] = ("passkey", "multikey", "lm"),
    tail: int = 512,
    num_keys: int = 4,
    min_sparse_len: int = 1024,
    max_new_tokens: int = 10,
    use_chat_template: bool = True,
    model_name: str = "",
    progress: bool = True,
    on_case: Callable[[CaseResult], None] | None = None,
) -> dict[str, Any]:
    """Run every task for every (length, seed) under each method; returns the JSON-ready result.

    Args:
        model: a causal LM (its patch state is restored on return).
        tokenizer: its tokenizer.
        methods: :class:`Method` list; a ``dense`` one is added first if missing (the reference
            for agreement, KL and "cases dense solves").
        lengths: prompt lengths in tokens.
        depths: pass-key depths in [0, 1].
        seeds: text offsets and needle values.
        tasks: any of ``passkey``, ``multikey``, ``lm``.
        tail: positions scored by the ``lm`` task.
        num_keys: needles of the ``multikey`` task.
        min_sparse_len: the sparse methods' threshold; a length below it runs dense and is
            reported as ``went_sparse: false``.
        max_new_tokens: greedy tokens generated for the retrieval tasks.
        use_chat_template: wrap prompts in the tokenizer's chat template when it has one.
        model_name: recorded in the result.
        progress: one line per case on stderr.
        on_case: called with each :class:`CaseResult` as it completes.
    """
    unknown = set(tasks) - {"passkey", "multikey", "lm"}
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}: use passkey, multikey, lm")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {depth}")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names repeat: {names}")
    methods = list(methods)
    if not any(not m.sparse for m in methods):
        methods.insert(0, Method("dense"))
    methods.sort(key=lambda m: m.sparse)  # dense first: it is the reference
    num_layers = full_attention_layers(model)
    device = next(model.parameters()).device
    chat = use_chat_template
    switch = _Switch(model, min_sparse_len)
    cases: list[CaseResult] = []
    t_start = time.perf_counter()

    jobs: list[tuple[str, int, int, float | None]] = []
    for L in lengths:
        for s in seeds:
            if "lm" in tasks:
                jobs.append(("lm", L, s, None))
            if "passkey" in tasks:
                jobs += [("passkey", L, s, d) for d in depths]
            if "multikey" in tasks:
                jobs.append(("multikey", L, s, None))
    total = len(jobs) * len(methods)
    done = 0

    def emit(c: CaseResult) -> None:
        nonlocal done
        done += 1
        cases.append(c)
        if on_case is not None:
            on_case(c)
        if progress:
            what = (
                f"{'ok ' if c.correct else 'MISS'} -> {c.output!r}"
                if c.task != "lm"
                else f"ppl {math.exp(c.nll or 0):.3f}"
                + (f", top-1 {c.top1_agree:.4f}, KL {c.kl:.2e}" if c.top1_agree is not None else "")
            )
            dens = f"density {c.density:.3f}" if c.went_sparse else "dense"
            print(
                f"[eval {done}/{total} {time.perf_counter() - t_start:6.0f}s] {c.method:>18} "
                f"{c.task:8} {c.length:>6} seed {c.seed}"
                + (f" depth {c.depth:.2f}" if c.depth is not None else "")
                + f" ({dens}, {c.seconds:.1f} s): {what}",
                file=sys.stderr,
                flush=True,
            )

    try:
        for task, L, s, d in jobs:
            if task == "lm":
                ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
                ids += real_token_ids(tokenizer, L - len(ids), "evaluation", seed=s)
                ref: torch.Tensor | None = None
                for m in methods:
                    switch.use(m)
                    _reset(model)
                    t0 = time.perf_counter()
                    lp = _tail_logprobs(model, ids, tail)
                    sec = time.perf_counter() - t0
                    target = torch.tensor(ids[len(ids) - lp.shape[0] :])
                    nll = float(-lp.gather(1, target[:, None]).mean())
                    went, dens = _sparse_state(model, num_layers)
                    c = CaseResult("lm", m.name, L, s, None, len(ids), went, dens, sec, nll=nll)
                    if ref is None:
                        ref = lp
                    else:
                        c.top1_agree = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
                        c.kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
                    emit(c)
                continue
            if task == "passkey":
                assert d is not None
                ids, answer = passkey_prompt(tokenizer, L, d, s, chat)
            else:
                ids, answer = multikey_prompt(tokenizer, L, s, num_keys, chat)
            x = torch.tensor([ids], dtype=torch.long, device=device)
            for m in methods:
                switch.use(m)
                _reset(model)
                res = greedy_generate(model, x, max_new_tokens=max_new_tokens)
                text = _decode_text(tokenizer, res.token_ids)
                went, dens = _sparse_state(model, num_layers)
                emit(
                    CaseResult(
                        task, m.name, L, s, d, len(ids), went, dens, res.ttft_s,
                        answer=answer, output=text, correct=answer in text,
                    )
                )  # fmt: skip
    finally:
        switch.restore()
    result: dict[str, Any] = {
        "model": model_name,
        "text": text_fingerprint("evaluation"),
        "lengths": list(lengths),
        "depths": list(depths),
        "seeds": list(seeds),
        "tasks": list(tasks),
        "tail": tail,
        "num_keys": num_keys,
        "min_sparse_len": min_sparse_len,
        "methods": [
            {
                "name": m.name,
                "sparse": m.sparse,
                "config": None if m.config is None else m.config.model_id,
                "oracle_density": m.oracle_density,
                "block_key_groups": m.block_key_groups,
                "coverage": m.coverage,
                "block_allocation": m.block_allocation,
            }
            for m in methods
        ],
        "cases": [asdict(c) for c in cases],
        "seconds": time.perf_counter() - t_start,
        "device": str(device),
        "torch": torch.__version__,
    }
    result["summary"] = summarize(result)
    return result


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: pass-key and multi-key accuracy, the retrieval cases dense solves that the
    method also solves, perplexity ratio to dense, top-1 agreement, KL and mean density."""
    cases = result["cases"]
    dense_name = next(m["name"] for m in result["methods"] if not m["sparse"])
    solved = {
        (c["task"], c["length"], c["seed"], c["depth"])
        for c in cases
        if c["method"] == dense_name and c["task"] != "lm" and c["correct"]
    }
    dense_nll = {
        (c["length"], c["seed"]): c["nll"]
        for c in cases
        if c["method"] == dense_name and c["task"] == "lm"
    }
    out: dict[str, dict[str, Any]] = {}
    for m in result["methods"]:
        mine = [c for c in cases if c["method"] == m["name"]]
        pk = [c for c in mine if c["task"] == "passkey"]
        mk = [c for c in mine if c["task"] == "multikey"]
        lm = [c for c in mine if c["task"] == "lm"]
        kept = [
            c
            for c in mine
            if c["task"] != "lm" and (c["task"], c["length"], c["seed"], c["depth"]) in solved
        ]
        ratios = [
            math.exp(c["nll"] - dense_nll[(c["length"], c["seed"])])
            for c in lm
            if (c["length"], c["seed"]) in dense_nll
        ]
        dens = [c["density"] for c in mine if c["went_sparse"] and c["density"] is not None]
        out[m["name"]] = {
            "passkey_accuracy": _mean([float(c["correct"]) for c in pk]),
            "multikey_accuracy": _mean([float(c["correct"]) for c in mk]),
            "retrieval_cases": len(pk) + len(mk),
            "dense_solved": len(solved),
            "dense_solved_kept": sum(bool(c["correct"]) for c in kept),
            "ppl": _mean([math.exp(c["nll"]) for c in lm]),
            "ppl_ratio": _mean(ratios),
            "ppl_ratio_max": max(ratios) if ratios else None,
            "top1_agree": _mean([c["top1_agree"] for c in lm if c["top1_agree"] is not None]),
            "top1_agree_min": min(
                (c["top1_agree"] for c in lm if c["top1_agree"] is not None), default=None
            ),
            "kl": _mean([c["kl"] for c in lm if c["kl"] is not None]),
            "density": _mean(dens),
            "went_sparse": all(c["went_sparse"] for c in mine) if m["sparse"] else False,
            "cases_below_threshold": sum(not c["went_sparse"] for c in mine) if m["sparse"] else 0,
        }
    return out


def format_summary(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`summarize`'s figures."""

    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        f"{'method':>24} {'density':>8} {'passkey':>8} {'multikey':>8} {'dense-solved kept':>18} "
        f"{'ppl ratio':>9} {'top-1':>7} {'KL':>9}"
    ]
    for name, s in result["summary"].items():
        kept = f"{s['dense_solved_kept']}/{s['dense_solved']}"
        lines.append(
            f"{name:>24} {f(s['density'], '.3f'):>8} {f(s['passkey_accuracy'], '.2f'):>8} "
            f"{f(s['multikey_accuracy'], '.2f'):>8} {kept:>18} {f(s['ppl_ratio'], '.4f'):>9} "
            f"{f(s['top1_agree'], '.4f'):>7} {f(s['kl'], '.2e'):>9}"
            + (
                f"  ({s['cases_below_threshold']} case(s) below the threshold ran dense)"
                if s["cases_below_threshold"]
                else ""
            )
        )
    return "\n".join(lines)


def plot_eval(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against density, one point per method (needs matplotlib): pass-key accuracy,
    perplexity ratio and top-1 agreement."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    summ = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("passkey_accuracy", "pass-key accuracy", None),
        ("ppl_ratio", "perplexity / dense perplexity", 1.01),
        ("top1_agree", "top-1 agreement with dense", 0.98),
    )
    for ax, (key, label, target) in zip(axes, panels):
        for name, s in summ.items():
            x = s["density"] if s["density"] is not None else 1.0
            y = s[key] if s[key] is not None else (1.0 if key != "passkey_accuracy" else None)
            if y is None:
                continue
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if target is not None:
            ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("density (share of causal pairs computed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    lens = ",".join(str(n) for n in result["lengths"])
    fig.suptitle(f"{result['model']}: sparse pre-fill vs dense (lengths {lens})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
