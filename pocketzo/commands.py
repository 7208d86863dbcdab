"""The handlers of the ``pocketzo`` commands (``pocketzo.cli`` builds the parser and dispatches to them).

Device commands (``train``, ``eval``, ``bench``, ``generate``, ``replay``) import only the device side;
desktop commands (``assets``, ``export``, ``merge``) import torch/transformers lazily, inside their handlers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from pocketzo.errors import PocketzoError


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: object):
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})
    except ValueError as e:  # a config's own validation of user input
        raise PocketzoError(f"bad option: {e}") from None


def unescape(text: str) -> str:
    """\\n and \\t typed on a command line become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_assets(args: argparse.Namespace) -> int:
    try:
        from pocketzo.export.assets import prepare_assets
    except ImportError:
        return desktop_only(args)

    assets = prepare_assets(Path(args.cache) if args.cache else None, progress=not args.json,
                            encoder=args.encoder, gemma3=args.gemma3,
                            qwen=tuple(args.qwen or ()))
    if args.json:
        print(json.dumps(assets.to_json(), indent=2))
    else:
        for k, v in assets.to_json().items():
            print(f"{k:12s} {v}")
    return 0


def desktop_only(args: argparse.Namespace) -> int:
    raise PocketzoError(f"`pocketzo {args.command}` runs on the desktop: this copy of pocketzo has no exporter "
                        "(install pocketzo[export] on a desktop and copy the bundle to the device)")


def cmd_export(args: argparse.Namespace) -> int:
    from pocketzo.export import ExportConfig, export_bundle

    if not args.debug:  # torch.onnx logs a warning per torchvision operator it cannot register: noise for an export
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # A shell cannot easily pass a newline: "\n" and "\t" in --template and --prompt-init mean newline and tab.
    texts = {k: unescape(getattr(args, k)) for k in ("template", "prompt_init") if getattr(args, k)}
    export_bundle(args.model, args.out, dataclass_from_args(ExportConfig, args, **texts), overwrite=args.overwrite)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    try:
        from pocketzo.export import merge
    except ImportError:
        return desktop_only(args)

    kw = {"bundle": Path(args.bundle) if args.bundle else None, "overwrite": args.overwrite}
    base = Path(args.base) if args.base else None
    if args.to_hf:
        merge.to_hf(Path(args.run), Path(args.to_hf), base, **kw)
    elif args.to_peft:
        merge.to_peft(Path(args.run), Path(args.to_peft), **kw)
    else:
        merge.to_onnx(Path(args.run), Path(args.to_onnx), base, **kw)
    return 0


def _given(cls: type, args: argparse.Namespace) -> dict:
    """The fields of ``cls`` given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args: argparse.Namespace) -> int:
    from pocketzo.zo_trainer import RECIPES, Method, RunPolicy, resume, train

    method_given = _given(Method, args)
    policy_given = {**_given(RunPolicy, args), "progress": not args.quiet}
    if args.resume:  # a resumed run compares only what is on the command line (a recipe's settings too)
        if args.out and Path(args.out) != Path(args.resume):
            raise PocketzoError("--out and --resume name different run directories; give one of them")
        if hasattr(args, "recipe"):
            method_given = {**RECIPES[args.recipe], **method_given}
        try:
            summary = resume(args.resume, policy_given, method_given, bundle_path=args.bundle, train_path=args.data)
        except ValueError as e:  # a policy flag's own validation
            raise PocketzoError(f"bad option: {e}") from None
    else:
        missing = [flag for flag, v in (("BUNDLE", args.bundle), ("--data", args.data), ("--out", args.out)) if not v]
        if missing:
            raise PocketzoError(f"a new run needs {', '.join(missing)} (or --resume RUN to continue one)")
        if "steps" not in method_given:
            raise PocketzoError("a new run needs --steps N")
        # a new run starts from a recipe: the one named, or the one chosen for the bundle
        recipe = args.recipe if hasattr(args, "recipe") else _chosen_recipe(args)
        method_given = {**RECIPES[recipe], **method_given}
        method = dataclass_from_args(Method, argparse.Namespace(**method_given))
        policy = dataclass_from_args(RunPolicy, argparse.Namespace(**policy_given))
        summary = train(args.bundle, args.data, args.out, method, policy, eval_path=args.eval,
                        overwrite=args.overwrite)
    keys = ("zero_shot_accuracy", "final_accuracy", "steps", "stopped_by", "train_seconds", "step_seconds_median",
            "peak_rss_mb", "weights")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def _chosen_recipe(args: argparse.Namespace) -> str:
    """The recipe for a new run that names none: from the bundle's gradient graph (or --method), said on stderr."""
    from pocketzo.runtime import Bundle
    from pocketzo.zo_trainer import choose_recipe, gradient_graph

    choice = choose_recipe(gradient_graph(Bundle(args.bundle).manifest), getattr(args, "method", None))
    settings = ", ".join(f"{k} {v}" for k, v in choice.settings.items()) or "ZO-SGD"
    print(f"[train] recipe {choice.recipe} ({settings}): {choice.reason}; --recipe NAME overrides",
          file=sys.stderr)
    return choice.recipe


def cmd_replay(args: argparse.Namespace) -> int:
    from pocketzo.zo_trainer import replay_run

    params = replay_run(args.bundle, args.log)
    params.save(args.out, {"format": "pt", "producer": "pocketzo replay"})
    print(json.dumps({"weights": args.out, "parameters": params.numel}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession
    from pocketzo.runtime.data import TextEncoder
    from pocketzo.zo_trainer import evaluate
    from pocketzo.zo_trainer.batches import load_data
    from pocketzo.zo_trainer.evaluate import fit_label_prior

    for flag, value in (("--batch-size", args.batch_size), ("--calibrate-rows", args.calibrate_rows)):
        if value < 1:
            raise PocketzoError(f"{flag} must be >= 1, got {value}")
    session_config = dataclass_from_args(SessionConfig, args)
    bundle = Bundle(args.bundle)
    if args.calibrate and bundle.task.kind != "classify":
        raise PocketzoError(f"--calibrate: {bundle.path} is a {bundle.task.kind} bundle; a label prior needs classify")
    encoder = TextEncoder(bundle)
    data = load_data(encoder, args.data)
    params = FlatParameters.from_bundle(bundle, args.weights)
    session = TrainingSession(bundle, session_config, params)
    offsets = fit_label_prior(session, load_data(encoder, args.calibrate), args.calibrate_rows) \
        if args.calibrate else None
    result = evaluate(session, data, args.batch_size, offsets).to_json()
    if offsets is not None:
        result["label_offsets"] = [float(x) for x in offsets]
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            shown = f"{v:.4f}" if isinstance(v, float) else ", ".join(f"{x:.3f}" for x in v) \
                if isinstance(v, list | tuple) else v
            print(f"{k:16s} {shown}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pocketzo._io import write_json
    from pocketzo.mobile_harness.bench import BenchConfig, run_bench

    config = dataclass_from_args(BenchConfig, args)
    report = run_bench(args.bundle, config)
    if args.json:
        write_json(args.json, report)
    if args.plot:
        from pocketzo.plots import bench_figure  # desktop only: needs matplotlib

        bench_figure(report, args.plot)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pocketzo.runtime.generate import GenerationConfig, Generator
    from pocketzo.runtime.session import SessionConfig

    config = dataclass_from_args(GenerationConfig, args)
    generator = Generator(args.directory, dataclass_from_args(SessionConfig, args))
    for piece in generator.generate(unescape(args.prompt), **dataclasses.asdict(config)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
