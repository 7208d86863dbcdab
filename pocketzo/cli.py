"""The ``pocketzo`` command line.

Device commands (``train``, ``eval``) import only the device side; desktop commands
(``assets``, ``export``) import torch/transformers lazily, inside their handlers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from pocketzo import __version__
from pocketzo.errors import PocketzoError

_HIDDEN_TRAIN_FIELDS = {"version", "noise_chunk", "steps"}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    """One ``--flag`` per dataclass field, typed and defaulted from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"default {f.default}")


def _dataclass_from_args(cls: type, args: argparse.Namespace, **extra: object):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and k not in extra}, **extra)


def cmd_assets(args: argparse.Namespace) -> int:
    from pocketzo.export.assets import prepare_assets

    assets = prepare_assets(Path(args.cache) if args.cache else None, progress=not args.json)
    if args.json:
        print(json.dumps(assets.to_json(), indent=2))
    else:
        for k, v in assets.to_json().items():
            print(f"{k:10s} {v}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pocketzo.export import ExportConfig, export_bundle

    labels = tuple(s.strip() for s in args.labels.split(",") if s.strip()) if args.labels else ()
    # A shell cannot easily pass a newline: "\n" and "\t" in --template mean newline and tab.
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
    config = ExportConfig(task=args.task, max_length=args.max_length, template=template, labels=labels,
                          trainable=args.trainable, freeze=args.freeze, seed=args.seed)
    export_bundle(args.model, args.out, config, overwrite=args.overwrite)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pocketzo.zo_trainer import TrainConfig, train

    try:
        config = _dataclass_from_args(TrainConfig, args, steps=args.steps)
    except ValueError as e:
        raise PocketzoError(f"bad training option: {e}") from None
    summary = train(args.bundle, args.data, args.out, config, eval_path=args.eval, overwrite=args.overwrite,
                    show_progress=not args.quiet)
    keys = ("zero_shot_accuracy", "final_accuracy", "steps", "step_seconds_median", "peak_rss_mb", "weights")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession
    from pocketzo.runtime.data import TextEncoder
    from pocketzo.zo_trainer import evaluate
    from pocketzo.zo_trainer.run import load_data

    bundle = Bundle(args.bundle)
    data = load_data(TextEncoder(bundle), args.data, lambda m: print(m, file=sys.stderr))
    params = FlatParameters.from_bundle(bundle, args.weights)
    session = TrainingSession(bundle, SessionConfig(threads=args.threads), params)
    result = evaluate(session, data, args.batch_size)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for k, v in result.to_json().items():
            print(f"{k:12s} {v:.4f}" if isinstance(v, float) else f"{k:12s} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pocketzo.zo_trainer.config import TrainConfig

    p = argparse.ArgumentParser(prog="pocketzo", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"pocketzo {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="fetch and prepare the real model and data (desktop)")
    a.add_argument("--cache", help="cache directory (default $POCKETZO_CACHE or ~/.cache/pocketzo)")
    a.add_argument("--json", action="store_true", help="print the asset paths as JSON")
    a.set_defaults(func=cmd_assets)

    e = sub.add_parser("export", help="export a Hugging Face model (dir or .gguf) to a bundle (desktop)")
    e.add_argument("model")
    e.add_argument("--task", choices=("causal-lm", "classify"), required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--template", help='classify on a causal LM, e.g. "Review: {text}\\nSentiment:" (\\n = newline)')
    e.add_argument("--labels", help="classify: comma-separated class names, e.g. negative,positive")
    e.add_argument("--trainable", default="all", help="'all' or a regex of parameter names to train")
    e.add_argument("--freeze", help="regex of parameter names to keep frozen")
    e.add_argument("--max-length", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="fine-tune a bundle with zeroth-order SGD (device)")
    t.add_argument("bundle")
    t.add_argument("--data", required=True, help="training JSONL")
    t.add_argument("--eval", help="dev JSONL, evaluated before, during (--eval-every) and after training")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--steps", type=int, required=True)
    _add_dataclass_flags(t, TrainConfig, _HIDDEN_TRAIN_FIELDS)
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("eval", help="loss (and accuracy, macro-F1) of a bundle on a JSONL file (device)")
    v.add_argument("bundle")
    v.add_argument("--data", required=True)
    v.add_argument("--weights", help="a run's weights.safetensors (default: the bundle's own)")
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--threads", type=int, default=0)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PocketzoError as e:
        if args.debug:
            raise
        print(f"pocketzo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pocketzo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
