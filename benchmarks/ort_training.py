"""ONNX Runtime's own on-device training (onnxruntime-training 1.19.2): full-parameter backprop + AdamW.

    VENV/bin/python benchmarks/ort_training.py --model-dir DIR --json OUT.json [--work DIR] [--lr 1e-5 ...]

Runs in its own venv, made by ``benchmarks/ort_training_venv.sh VENV`` (onnxruntime-training-cpu==1.19.2,
onnx==1.16.2, torch==2.13.0, transformers==4.57.6): ONNX Runtime's training API ended at 1.19.2 and cannot
share a venv with the project's onnxruntime/onnx. The recipe is the one in shared/FACTS.md ("ONNX Runtime
mobile and phones").

What is trained and how, next to ``torch_baselines.py --mode adamw``:

* every parameter of the HF causal LM is trainable (a tied embedding / lm_head is one tensor, trained once);
* the loss is the model's OWN causal-LM loss (``model(input_ids, attention_mask, labels).loss``: labels
  shifted left by one inside the model, mean cross-entropy over the B*(T-1) predicted tokens), exported
  inside the graph as a scalar output. ``generate_artifacts`` is called with ``loss=None`` (onnxblock's
  PassThrough), NOT with ``LossType.CrossEntropyLoss``: that block appends a SoftmaxCrossEntropyLoss node
  to the logits output with the labels unshifted (token t scored against label t, not t+1), a different
  loss from every other mode's. The first
  loss ORT reports is checked against the same loss computed by transformers in torch (``loss_check``);
* dropout probabilities are set to 0 in the config before the export, because the export must be in
  training mode (below) while the torch baselines run with dropout off (``model.eval()``); the exported
  Dropout nodes (``prepare.dropout_nodes``) then have ratio 0 and generate_artifacts' graph optimisation
  removes them from the training model;
* AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter, bias
  correction), lr 1e-5 (``Optimizer.set_learning_rate``);
* one step = ``module(input_ids, attention_mask, labels)`` (forward + backward), ``optimizer.step()``,
  ``module.lazy_reset_grad()``, on ``common.make_batch``;
* threads: ``SessionOptions.intra_op_num_threads = --threads`` (and ``inter_op_num_threads = 1``), passed
  to ``Module``; ``Optimizer`` reuses the module's session options. ``os_threads`` in the result counts the
  process's threads after the sessions are built; ``cpu_s_all`` is the process CPU time of each timed step
  (all threads), which with ``step_s_all`` tells a busy machine (CPU < threads x wall) from a slow step.

Two phases, two processes, so that ``peak_rss_mb`` is training only:

1. prepare (a subprocess: this script with ``--prepare-only``, same interpreter): load the model with
   transformers, export it with the legacy exporter in training mode (``dynamo=False,
   training=TrainingMode.TRAINING, do_constant_folding=False, opset_version=14``, static shapes B x T),
   then ``onnxruntime.training.artifacts.generate_artifacts`` (training, eval and optimizer models and the
   checkpoint). The artifacts are cached in ``--work`` (default ``~/.cache/pocketzo/ort-training``) in a
   folder keyed by the model dir (its path and its files' sizes and mtimes), B, T, the optimizer settings
   and the package versions; a cached folder is reused without starting the subprocess.
2. train (this process): ``import onnxruntime`` (this wheel imports torch: ``rss_after_import_mb`` is that
   fixed cost, included in the peak), ``CheckpointState.load_checkpoint``, ``Module(train, state, eval)``,
   ``Optimizer``, ``--warmup`` untimed steps and ``--steps`` timed ones. transformers is never imported
   here. ``peak_rss_mb`` is this process's own peak (``RUSAGE_SELF``: a finished child is not in it);
   ``prepare_peak_rss_mb`` is the subprocess's, reported separately when it ran.

``--no-eval-model`` builds the ``Module`` without the eval model (a training-only app), to see what the
second session costs.

On any failure the result file is still written, as ``{"mode": ..., "error": "<one line>"}``, and the exit
status is 1. Known: the legacy exporter fails on Llama-architecture models (SmolLM2) with
``RuntimeError: unordered_map::at`` in transformers' mask code (``masking_utils.sdpa_mask_recent_torch``
builds the mask with ``torch.vmap``, which the legacy tracer cannot follow). ``--vmap-free-mask`` (off by
default) swaps in transformers' own ``sdpa_mask_older_torch`` for the export, which exports SmolLM2. Models
over 2 GB (opt-1.3b) are not handled (the single-file ONNX export and onnx.load would need external data).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, make_batch, time_steps, write_result  # noqa: E402

MODE = "ort-training-adamw"
CACHE_FORMAT = 1  # bump when the export or the artifacts change
INPUT_NAMES = ("input_ids", "attention_mask", "labels")
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "bias_correction": True}  # torch.optim.AdamW's defaults


class StageError(RuntimeError):
    """A failure with the stage it happened in; its message is the one-line reason for the result file."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, plus the innermost transformers frame it came through, if any."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".strip()[:300]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/transformers/" in f.filename]
    if frames:
        f = frames[-1]
        line += f" (in transformers/{f.filename.rsplit('/transformers/', 1)[1]}:{f.lineno} {f.name})"
    return line


def pkg_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MB (10**6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def artifact_dir(args) -> Path:
    """The cache folder for this model dir, batch shape, optimizer and package versions."""
    model_dir = args.model_dir.resolve()
    files = sorted(p for p in model_dir.iterdir() if p.is_file()) if model_dir.is_dir() else []
    key = {
        "format": CACHE_FORMAT,
        "model_dir": str(model_dir),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "weight_decay": args.weight_decay,
        "adamw": ADAMW,
        "vmap_free_mask": args.vmap_free_mask,
        "versions": [pkg_version("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime"),
                     pkg_version("onnx"), pkg_version("torch"), pkg_version("transformers")],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = args.work if args.work is not None else Path.home() / ".cache" / "pocketzo" / "ort-training"
    return root / f"{model_dir.name}-b{args.batch_size}-t{args.seq_len}-{digest}"


# ---------------------------------------------------------------------------------------------- prepare


def prepare(args, final: Path) -> dict:
    """Export + generate_artifacts into ``final`` (built in a temporary folder, then renamed)."""
    import onnx
    import torch
    import transformers
    from onnxruntime.training import artifacts, onnxblock
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)  # generate_artifacts does not create its folder
    info: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "onnx": onnx.__version__}

    if args.vmap_free_mask:
        from transformers import masking_utils

        masking_utils.sdpa_mask = masking_utils.sdpa_mask_older_torch  # looked up by name at call time
    info["vmap_free_mask"] = args.vmap_free_mask

    stage = "load"
    try:
        config = AutoConfig.from_pretrained(args.model_dir)
        zeroed = []
        for name, value in config.to_dict().items():
            if ("dropout" in name or name == "layerdrop") and isinstance(value, float) and value != 0.0:
                setattr(config, name, 0.0)
                zeroed.append(name)
        info["dropout_zeroed"] = zeroed
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, config=config, dtype=torch.float32,
                                                     attn_implementation="eager")
        model.requires_grad_(True)
        info["model_type"] = config.model_type
        info["params_torch"] = sum(p.numel() for p in model.parameters())  # tied tensors once

        class LossOnly(torch.nn.Module):
            """The model's own causal-LM loss as the single (scalar) graph output."""

            def __init__(self, lm):
                super().__init__()
                self.lm = lm

            def forward(self, input_ids, attention_mask, labels):
                return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               use_cache=False).loss

        wrapper = LossOnly(model)
        batch = {k: torch.from_numpy(v) for k, v in
                 make_batch(config.vocab_size, args.batch_size, args.seq_len, args.seed).items()}
        inputs = tuple(batch[n] for n in INPUT_NAMES)
        with torch.no_grad():
            model.eval()
            info["hf_loss_initial"] = float(wrapper(*inputs))
            info["hf_loss_seed"] = args.seed

        stage = "legacy ONNX export (dynamo=False, TrainingMode.TRAINING)"
        onnx_path = tmp / "model.onnx"
        t0 = time.perf_counter()
        model.train()
        torch.onnx.export(wrapper, inputs, str(onnx_path), input_names=list(INPUT_NAMES), output_names=["loss"],
                          opset_version=14, do_constant_folding=False, training=torch.onnx.TrainingMode.TRAINING,
                          dynamo=False)
        info["export_s"] = time.perf_counter() - t0
        info["onnx_mb"] = onnx_path.stat().st_size / 1e6

        stage = "generate_artifacts"
        proto = onnx.load(str(onnx_path), load_external_data=False)
        param_names = {n for n, _ in wrapper.named_parameters()}
        inits = list(proto.graph.initializer)
        requires_grad = [t.name for t in inits if t.name in param_names]
        frozen = [t.name for t in inits if t.name not in param_names]
        info["trainable_tensors"] = len(requires_grad)
        info["frozen_initializers"] = frozen
        info["params"] = sum(math.prod(t.dims) for t in inits if t.name in param_names)
        info["dropout_nodes"] = sum(n.op_type == "Dropout" for n in proto.graph.node)
        del proto
        if info["params"] != info["params_torch"]:
            raise RuntimeError(f"the export has {info['params']} trainable parameters, torch {info['params_torch']}")
        del model, wrapper
        t0 = time.perf_counter()
        artifacts.generate_artifacts(
            str(onnx_path), requires_grad=requires_grad, frozen_params=frozen, loss=None,
            optimizer=onnxblock.optim.AdamW(weight_decay=args.weight_decay, **ADAMW),
            artifact_directory=str(tmp))
        info["artifacts_s"] = time.perf_counter() - t0
        onnx_path.unlink()  # not needed for training; the artifacts hold the graph and the weights
        info["artifacts_mb"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
        (tmp / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageError(f"{stage} failed: {one_line(exc)}") from exc
    try:
        tmp.rename(final)
    except OSError:  # another run finished the same folder first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def run_prepare_subprocess(args, art: Path) -> dict:
    """Run the prepare phase in a child process; return its result or raise with its one-line reason."""
    art.parent.mkdir(parents=True, exist_ok=True)
    out = art.with_name(f"{art.name}.prepare-{os.getpid()}.json")
    log = art.with_name(f"{art.name}.prepare.log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-only", "--model-dir", str(args.model_dir),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
           "--seed", str(args.seed), "--weight-decay", str(args.weight_decay), "--work", str(art.parent),
           "--json", str(out)] + (["--vmap-free-mask"] if args.vmap_free_mask else [])
    print(f"ort_training: preparing artifacts in {art} (log {log})", file=sys.stderr, flush=True)
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    result = json.loads(out.read_text()) if out.is_file() else {}
    out.unlink(missing_ok=True)
    if rc != 0 or "error" in result:
        lines = log.read_text(errors="replace").strip().splitlines()
        reason = result.get("error") or f"exited {rc}: {lines[-1] if lines else 'no output'}"
        raise StageError(f"prepare: {reason}")
    if not (art / "prepared.json").is_file():
        raise StageError(f"prepare: finished but {art} has no prepared.json")
    return result


# ------------------------------------------------------------------------------------------------ train


def train(args, art: Path) -> dict:
    import onnxruntime as ort  # this wheel imports torch
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    result: dict = {"onnxruntime": ort.__version__, "rss_after_import_mb": rss_mb()}
    info = json.loads((art / "prepared.json").read_text())
    vocab_size = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]

    ort.set_default_logger_severity(3)  # one warning per unused constant initializer otherwise
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    t0 = time.perf_counter()
    state = CheckpointState.load_checkpoint(str(art / "checkpoint"))
    eval_model = str(art / "eval_model.onnx") if args.eval_model else None
    module = Module(str(art / "training_model.onnx"), state, eval_model, "cpu", options)
    optimizer = Optimizer(str(art / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(args.lr)
    module.train()
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_mb"] = rss_mb()
    result["os_threads"] = len(os.listdir("/proc/self/task"))

    names = list(module.input_names())
    if sorted(names) != sorted(INPUT_NAMES):
        raise RuntimeError(f"unexpected training-model inputs {names}")
    batch = make_batch(vocab_size, args.batch_size, args.seq_len, args.seed)
    inputs = [batch[n] for n in names]
    losses: list[float] = []
    cpu: list[float] = []

    def step() -> None:
        c0 = time.process_time()
        loss = module(*inputs)
        optimizer.step()
        module.lazy_reset_grad()
        cpu.append(time.process_time() - c0)
        losses.append(float(loss))

    times = time_steps(step, args.steps, args.warmup)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    if info.get("hf_loss_seed") == args.seed:
        result["loss_check"] = {"hf_torch": info["hf_loss_initial"], "ort": losses[0],
                                "abs_diff": abs(info["hf_loss_initial"] - losses[0])}
    result.update({
        "step_s_all": times,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "cpu_s_all": cpu[args.warmup:],  # process CPU seconds (all threads) of the timed steps
        "rss_after_steps_mb": rss_mb(),
    })
    return result


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="artifact cache root (default ~/.cache/pocketzo/ort-training)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (baked into artifacts)")
    parser.add_argument("--eval-model", action=argparse.BooleanOptionalAction, default=True,
                        help="give Module the eval model too, as an app that evaluates would (default: yes)")
    parser.add_argument("--vmap-free-mask", action="store_true",
                        help="export with transformers' sdpa_mask_older_torch (makes Llama/SmolLM2 exportable)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="internal: export + generate_artifacts only (run by the script as a subprocess)")
    args = parser.parse_args(argv)
    mode = MODE + "-prepare" if args.prepare_only else MODE

    fixed = {"mode": mode, "model_dir": str(args.model_dir), "batch_size": args.batch_size,
             "seq_len": args.seq_len, "threads": args.threads}
    try:
        art = artifact_dir(args)
        if args.prepare_only:
            write_result(args.json, {**fixed, **prepare(args, art), "artifacts": str(art)})
            return 0
        prepared = None
        if not (art / "prepared.json").is_file():
            prepared = run_prepare_subprocess(args, art)
        try:
            trained = train(args, art)
        except Exception as exc:
            raise StageError(f"train: {one_line(exc)}") from exc
        info = json.loads((art / "prepared.json").read_text())
        write_result(args.json, {
            **fixed,
            **trained,
            "params": info["params"],
            "model_type": info["model_type"],
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "eval_model": args.eval_model,
            "vmap_free_mask": args.vmap_free_mask,
            "loss": "model's own causal-LM loss (labels shifted in the model), exported in the graph",
            "artifacts": str(art),
            "artifacts_cached": prepared is None,
            "prepare": info,
            "prepare_peak_rss_mb": prepared.get("peak_rss_mb") if prepared else None,
            "torch": info.get("torch"),
            "transformers": info.get("transformers"),
            "onnx": info.get("onnx"),
        })
        return 0
    except Exception as exc:
        reason = str(exc) if isinstance(exc, StageError) else one_line(exc)
        traceback.print_exc()
        write_result(args.json, {**fixed, "error": reason.replace("\n", " "), "peak_rss_mb": None,
                                 "onnxruntime": pkg_version("onnxruntime-training-cpu", "onnxruntime-training")})
        return 1


if __name__ == "__main__":
    sys.exit(main())
