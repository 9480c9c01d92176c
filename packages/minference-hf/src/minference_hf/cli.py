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

if TYPE_CHECKING:
    from minference_patterns import PatternConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .longctx import MemoryEstimate

#: Sparse threshold used with the embedded default model, so its short demo prompts go sparse.
TINY_MIN_SPARSE_LEN = 1024
TINY_PROMPT_TOKENS = 2048


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    untrained: bool
    default_config: PatternConfig | None


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
    if not args.model:
        from .tiny import (
            DEFAULT_MODEL_NAME,
            UNTRAINED_NOTICE,
            build_model,
            build_tokenizer,
            default_pattern_config,
        )

        print(UNTRAINED_NOTICE, flush=True)
        dtype = torch.float32 if args.dtype == "auto" else _DTYPES[args.dtype]
        model = build_model(dtype=dtype).to(device)
        return Loaded(model, build_tokenizer(), DEFAULT_MODEL_NAME, True, default_pattern_config())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype: Any = "auto" if args.dtype == "auto" else _DTYPES[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, attn_implementation="sdpa"
    )
    model = model.to(device).eval()
    return Loaded(model, tokenizer, str(args.model), False, None)


def _pattern_config(args: argparse.Namespace, loaded: Loaded) -> PatternConfig:
    from .patching import resolve_config

    if args.config:
        return resolve_config(args.config, loaded.model)
    if loaded.default_config is not None:
        return loaded.default_config
    return resolve_config(None, loaded.model)


def _min_sparse_len(args: argparse.Namespace, loaded: Loaded) -> int:
    from .plan import DEFAULT_MIN_SPARSE_LEN

    if args.min_sparse_len is not None:
        return int(args.min_sparse_len)
    return TINY_MIN_SPARSE_LEN if loaded.untrained else DEFAULT_MIN_SPARSE_LEN


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


def _prompt_ids(args: argparse.Namespace, loaded: Loaded) -> list[int]:
    if args.prompt_file:
        text = Path(args.prompt_file).read_text()
        tok = loaded.tokenizer
        if args.chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(text)["input_ids"])
    else:
        ids = _default_prompt(loaded.tokenizer, args.prompt_tokens or TINY_PROMPT_TOKENS)
    if args.prompt_tokens and len(ids) > args.prompt_tokens:
        ids = ids[-args.prompt_tokens :]
    if not ids:
        raise SystemExit("generate: the prompt is empty")
    return ids


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation import GenerationResult, greedy_generate
    from .patching import patch, unpatch

    if args.model and not args.prompt_file:
        raise SystemExit("minference generate: --prompt-file is required with --model")
    _check_prefill_args(args)
    loaded = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    cfg = _pattern_config(args, loaded)
    thr = _min_sparse_len(args, loaded)
    ids = _prompt_ids(args, loaded)
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    print(f"model: {loaded.name} on {device}, {next(model.parameters()).dtype}")
    print(f"pattern config: {_describe_config(cfg)}")
    print(f"prompt: {len(ids)} tokens; sparse pre-fill from {thr} tokens")
    patch(
        model,
        cfg,
        min_sparse_len=thr,
        coverage=args.coverage,
        block_allocation=args.block_allocation,
    )
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
        return greedy_generate(
            model,
            x,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.chunk_size,
            progress=progress and len(ids) >= 8192,
            **long_kw,
        )

    sparse = run()
    text = tok.decode(sparse.token_ids, skip_special_tokens=True)
    path = "sparse" if sparse.sparse_calls else "dense (prompt below the threshold)"
    print(
        f"minference [{path}]: time to first token {sparse.ttft_s:.3f} s "
        f"({sparse.prefill_tokens_per_s:,.0f} prompt tokens/s); decode "
        f"{len(sparse.token_ids)} tokens at {sparse.decode_tokens_per_s:.1f} tokens/s; "
        f"sparse attention calls {sparse.sparse_calls}"
    )
    print(f"output: {text!r}")
    summary: dict[str, Any] = {
        "model": loaded.name,
        "untrained": loaded.untrained,
        "prompt_tokens": len(ids),
        "min_sparse_len": thr,
        "prefill": prefill.to_dict(),
        "minference": _result_dict(sparse, text),
    }
    if args.compare_dense:
        unpatch(model)
        dense = run()
        dtext = tok.decode(dense.token_ids, skip_special_tokens=True)
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
        print(f"dense output: {dtext!r}")
        print(f"pre-fill speedup (dense TTFT / minference TTFT): {speedup:.2f}x")
        verdict = "yes" if agree else f"no (first {same} of {n} tokens identical)"
        print(
            f"outputs agree: {verdict}; first-token logits max |diff| {diff:.3g}"
            + (" [untrained model: agreement says little]" if loaded.untrained else "")
        )
        summary["dense"] = _result_dict(dense, dtext)
        summary["outputs_agree"] = agree
        summary["identical_prefix_tokens"] = same
        summary["first_token_logits_max_abs_diff"] = diff
        summary["ttft_speedup"] = speedup
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
    from .longctx import DEFAULT_CHUNK_SIZE, estimate_memory, plan_offload
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

    if args.model and not args.calib:
        raise SystemExit("minference search: --calib FILE is required with --model")
    loaded = _load(args)
    tok = loaded.tokenizer
    if args.calib:
        ids = list(tok(Path(args.calib).read_text())["input_ids"])
    else:
        ids = _default_prompt(tok, args.max_tokens or 2048)
    if args.max_tokens and len(ids) > args.max_tokens:
        ids = ids[: args.max_tokens]
    device = next(loaded.model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    print(f"search: {loaded.name}, calibration prompt {len(ids)} tokens", flush=True)
    t0 = time.perf_counter()
    cfg = search_model_config(
        loaded.model,
        x,
        model_id=loaded.name,
        budget=_parse_budget(args.budget),
        seed=args.seed,
        calibration=f"{Path(args.calib).name if args.calib else 'built-in filler'}, {len(ids)} tokens",
        progress=not args.no_progress,
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
    thr = _min_sparse_len(args, loaded)
    print(
        f"niah: {loaded.name}; lengths {lengths}; depths {depths}; methods {methods}; "
        f"sparse from {thr} tokens",
        flush=True,
    )
    result = run_niah(
        loaded.model,
        loaded.tokenizer,
        lengths=lengths,
        depths=depths,
        sparse_config=cfg,
        min_sparse_len=thr,
        out_dir=args.out_dir,
        coverage=args.coverage,
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
        print(f"niah {m}: mean retrieval {r['mean']:.2f} -> {out / r['heatmap']}")
    print(f"niah: wrote {out / 'niah.json'}")
    if loaded.untrained:
        print("(untrained default model: a score of 0 is expected)")
    return 0


# ---- parser --------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="model path or Hugging Face id (default: the embedded tiny UNTRAINED model)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES])
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``minference`` command."""
    parser = argparse.ArgumentParser(
        prog="minference",
        description="Sparse long-context pre-fill for transformers models (MInference).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="pre-fill + greedy generation, with timing")
    _common(g)
    g.add_argument("--prompt-file", help="text file with the prompt")
    g.add_argument("--config", help="pattern config: path or shipped model id")
    g.add_argument("--compare-dense", action="store_true", help="also run dense and compare")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--min-sparse-len", type=int, help="sparse pre-fill threshold (tokens)")
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
        "KV cache in host memory; 'auto' (default) does so, with automatic placement, only on "
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
        "--coverage",
        type=float,
        help="adaptive vertical-slash budgets: keep this share of each head's estimated "
        "attention mass (e.g. 0.95), at most the configured budget",
    )
    g.add_argument(
        "--block-allocation",
        choices=("query_block", "head", "layer"),
        default="query_block",
        help="block-sparse heads: top_k key blocks per query block (query_block), or the same "
        "number in all spread by estimated attention share over each head's query blocks (head) "
        "or over all the layer's block-sparse heads (layer): more recall per tile, slower "
        "estimation",
    )
    g.add_argument("--prompt-tokens", type=int, help="keep the last N prompt tokens")
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
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("search", help="capture Q/K/V on a calibration prompt, search a config")
    _common(s)
    s.add_argument("--calib", help="calibration text file")
    s.add_argument("--out", required=True, help="output config JSON")
    s.add_argument(
        "--budget",
        help="compute budget as a fraction of dense attention cost, e.g. 0.1 (the search's "
        "default when omitted)",
    )
    s.add_argument("--max-tokens", type=int, help="truncate the calibration prompt")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_search)

    n = sub.add_parser("niah", help="needle-in-a-haystack retrieval, dense vs sparse")
    _common(n)
    n.add_argument("--config", help="pattern config: path or shipped model id")
    n.add_argument(
        "--lengths", help="comma-separated, e.g. 8k,32k,128k (default 1k,2k on the tiny model)"
    )
    n.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    n.add_argument("--methods", default="dense,sparse")
    n.add_argument("--out-dir", default="niah-out")
    n.add_argument("--max-new-tokens", type=int, default=12)
    n.add_argument("--min-sparse-len", type=int, help="sparse pre-fill threshold (tokens)")
    n.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    n.add_argument("--coverage", type=float, help="adaptive vertical-slash budgets (see generate)")
    n.set_defaults(func=_cmd_niah)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minference`` command."""
    args = build_parser().parse_args(argv)
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
