"""``minference-patterns``: inspect, draw, validate and convert pattern configs.

    minference-patterns show CONFIG [--seq-len N] [--json]
    minference-patterns plot CONFIG -o fig.png [--seq-len N]
    minference-patterns validate FILE [FILE ...]
    minference-patterns convert SRC -o OUT [--to ours|minference] [--model-id ID] ...
    minference-patterns list
    minference-patterns schema

CONFIG is a file (ours, MInference's or Qwen's format) or the id of a shipped config. The search
itself needs a model: it is ``minference search`` in the minference-hf package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, UnknownModelError

__all__ = ["main"]


def _policy(name: str | None, cfg):
    from .policy import BudgetPolicy

    if name is None:
        return None
    if name == "measured":  # from the searched length, else the config's reference (or 128K)
        if cfg.context_length is not None:
            return BudgetPolicy.measured()
        return BudgetPolicy.measured(reference_length=cfg.budget_policy.reference_length or 131072)
    return {"absolute": BudgetPolicy.absolute(), "proportional": BudgetPolicy.proportional()}[name]


def _load(args: argparse.Namespace):
    from .registry import load

    cfg = load(args.config)
    pol = _policy(getattr(args, "policy", None), cfg)
    return cfg if pol is None else cfg.with_budget_policy(pol)


def _cmd_show(args: argparse.Namespace) -> int:
    from .summary import summarize, summary_dict

    cfg = _load(args)
    if args.json:
        print(json.dumps(summary_dict(cfg, args.seq_len), indent=2))
    else:
        print(summarize(cfg, args.seq_len))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_config

    cfg = _load(args)
    plot_config(cfg, args.output, seq_len=args.seq_len, dpi=args.dpi)
    print(f"wrote {args.output}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .registry import load

    bad = 0
    for f in args.files:
        try:
            cfg = load(f)
        except (ConfigError, FileNotFoundError, IsADirectoryError, UnknownModelError) as exc:
            print(f"INVALID {exc}", file=sys.stderr)
            bad += 1
            continue
        print(f"ok {f}: {cfg.model_id}, {cfg.num_layers} layers x {cfg.num_heads} heads")
    return 1 if bad else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import save_minference
    from .registry import load

    cfg = load(args.src, model_id=args.model_id)
    changes = {
        k: v
        for k, v in (
            ("num_kv_heads", args.num_kv_heads),
            ("head_dim", args.head_dim),
            ("context_length", args.context_length),
        )
        if v is not None
    }
    if changes:
        cfg = cfg.replace(**changes)
    if args.to == "minference":
        save_minference(cfg, args.output)
    else:
        cfg.save(args.output)
    print(f"wrote {args.output} ({args.to} format, {cfg.model_id})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import SEARCHED_MODELS, SHIPPED_MODELS

    for m in (*SHIPPED_MODELS, *SEARCHED_MODELS):
        how = "converted from MInference" if m.source_file else "searched by minference"
        print(
            f"{m.model_id:48s} {m.num_layers:3d} layers x {m.num_heads:2d} heads  ({m.file}; {how})"
        )
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help (an option whose default is ``None``, or
    a flag's ``False``, says in words what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def _parser() -> argparse.ArgumentParser:
    from .__about__ import __version__

    p = argparse.ArgumentParser(
        prog="minference-patterns",
        description="Inspect, draw, validate and convert sparse attention pattern configs.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    kw: dict[str, Any] = {"formatter_class": _HelpFormatter}

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="config file, or the model id of a shipped config")
        sp.add_argument(
            "--seq-len",
            type=int,
            default=None,
            help="prompt length for budgets and densities (default: the searched "
            "length, else 131072)",
        )
        sp.add_argument(
            "--policy",
            choices=("absolute", "proportional", "measured"),
            default=None,
            help="override the config's budget policy (default: the config's own; shipped "
            "configs carry 'measured')",
        )

    sp = sub.add_parser("show", help="print a summary: kinds, budgets, expected density", **kw)
    config_args(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=_cmd_show)

    sp = sub.add_parser("plot", help="draw layers x heads coloured by kind and budget", **kw)
    config_args(sp)
    sp.add_argument("-o", "--output", required=True, help="image file (png, svg, pdf)")
    sp.add_argument("--dpi", type=int, default=120, help="resolution of raster images")
    sp.set_defaults(func=_cmd_plot)

    sp = sub.add_parser("validate", help="check config files; exit 1 if any is invalid", **kw)
    sp.add_argument("files", nargs="+", help="config files to check")
    sp.set_defaults(func=_cmd_validate)

    sp = sub.add_parser("convert", help="convert between formats", **kw)
    sp.add_argument("src", help="config file (any supported format) or shipped model id")
    sp.add_argument("-o", "--output", required=True, help="file to write")
    sp.add_argument(
        "--to",
        choices=("ours", "minference"),
        default="ours",
        help="output format: this project's JSON (ours) or MInference 1.0's (minference)",
    )
    sp.add_argument("--model-id", default=None, help="model id to record (default: the source's)")
    sp.add_argument(
        "--num-kv-heads",
        type=int,
        default=None,
        help="set the config's key/value heads (default: keep the source's)",
    )
    sp.add_argument(
        "--head-dim",
        type=int,
        default=None,
        help="set the config's head dimension (default: keep the source's)",
    )
    sp.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="length the config was searched at (enables budget scaling)",
    )
    sp.set_defaults(func=_cmd_convert)

    sp = sub.add_parser("list", help="list the shipped configs", **kw)
    sp.set_defaults(func=_cmd_list)

    sp = sub.add_parser("schema", help="print the JSON Schema of the config format", **kw)
    sp.set_defaults(func=_cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``minference-patterns`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, UnknownModelError, FileNotFoundError, IsADirectoryError,
            ValueError, ImportError) as exc:  # fmt: skip
        print(f"minference-patterns: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
