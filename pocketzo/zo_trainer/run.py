"""A training run: data, sampler, the step loop with evaluations, and the run directory.

    RUN/config.json          TrainConfig + session settings + what was trained on (with its sha256)
    RUN/log.jsonl            one StepRecord per line, flushed as the run goes
    RUN/log.bin              the same records, 56 bytes each (``checkpoint``)
    RUN/checkpoints/         the newest checkpoints (every --checkpoint-every steps, and on SIGINT/SIGTERM)
    RUN/weights.safetensors  final trainable tensors under their Hugging Face names (never NaN)
    RUN/summary.json         evaluations, timings, memory; "status": completed, failed or interrupted

Initial weights + config.json + the log rebuild the final weights bit for bit (``replay_run``),
and a run resumed from a checkpoint ends bit-identical to one never interrupted: the sampler is
stateless, the noise is regenerated from seeds, and the checkpoint holds the rest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo._io import sha256_file, write_json
from pocketzo._progress import Progress
from pocketzo.errors import PocketzoError, RunInterrupted, TrainingError
from pocketzo.mobile_harness.memory import parse_bytes, peak_rss_mb
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import Dataset, TextEncoder
from pocketzo.runtime.session import FlatParameters, SessionConfig, TrainingSession
from pocketzo.zo_trainer.checkpoint import (
    LOG_BIN,
    CheckpointState,
    check_order,
    latest_checkpoint,
    load_optimizer,
    pack_record,
    read_bin_log,
    save_checkpoint,
    truncate_logs,
)
from pocketzo.zo_trainer.config import CONFIG_VERSION, TrainConfig
from pocketzo.zo_trainer.evaluate import EvalResult, evaluate
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS
from pocketzo.zo_trainer.trainer import StepRecord, make_trainer, replay

LOG, WEIGHTS, SUMMARY, CONFIG = "log.jsonl", "weights.safetensors", "summary.json", "config.json"


class BatchSampler:
    """Stateless seeded sampling: step t takes rows [tB, (t+1)B) of an endless chain of
    per-epoch permutations, so any step's batch is known without replaying earlier ones."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def _epoch(self, epoch: int) -> npt.NDArray[np.int64]:
        return np.random.default_rng([self.seed, 0xDA7A, epoch]).permutation(self.n)

    def indices(self, step: int) -> npt.NDArray[np.int64]:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):  # a batch spans at most a few epochs
            at = epochs == e
            out[at] = self._epoch(int(e))[offsets[at]]
        return out


def load_data(encoder: TextEncoder, path: str | Path) -> Dataset:
    """Tokenize a JSONL file; says on stderr how many rows were cut to the bundle's max_length."""
    data = encoder.dataset(path)
    if data.n_truncated:
        print(f"note: {data.n_truncated} of {len(data)} rows of {path} were cut to max_length "
              f"{encoder.task.max_length}", file=sys.stderr)
    return data


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PocketzoError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PocketzoError(f"{out}: run directory is not empty; choose another --out or pass --overwrite")
        if not (out / CONFIG).is_file():
            raise PocketzoError(f"{out}: not a pocketzo run directory (no {CONFIG}); refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


class _Loop:
    """The state of one run: session, trainer, data and what has been measured so far."""

    SPIKE_WINDOW = 32
    STALL_CHECK, STALL_WINDOW = 100, 20  # the stall check's step, and the steps compared at each end

    def __init__(self, session: TrainingSession, config: TrainConfig, train_data: Dataset,
                 eval_data: Dataset | None, run_dir: Path, start: CheckpointState | None):
        self.session, self.config = session, config
        self.train_data, self.eval_data, self.run_dir = train_data, eval_data, run_dir
        self.trainer = make_trainer(session, config)
        self.forwards_per_step = config.forwards_per_step() if session.slots == 1 else 1
        if start:
            load_optimizer(run_dir, start, self.trainer.state)
        self.sampler = BatchSampler(len(train_data), config.batch_size, config.seed)
        self.evals: list[dict] = list(start.evals) if start else []
        self.step_seconds: list[float] = []
        self.forward_seconds: list[float] = []  # per forward pass
        self.steps_done = start.step if start else 0
        self.lr_scale = start.lr_scale if start else 1.0
        self.failures = start.failures if start else 0
        self.undone = 0
        self.recent: deque[float] = deque(maxlen=self.SPIKE_WINDOW)  # mean losses of the last good steps
        self.first: list[float] = []  # mean losses of the first good steps (the stall check)
        self.warnings: list[str] = []
        if start:
            for r in read_log(run_dir / LOG):
                if r.step < start.step:
                    self._remember(r)
        self._signal: int | None = None

    def _remember(self, r: StepRecord) -> None:
        if r.status == "ok" and r.direction == 0:
            self.recent.append((r.loss_plus + r.loss_minus) / 2)
            if len(self.first) < self.STALL_WINDOW:
                self.first.append(self.recent[-1])

    def check_stall(self, step: int) -> None:
        """Once, after STALL_CHECK steps: warn if the training loss has not moved, and say what to change."""
        if (step != min(self.STALL_CHECK, self.config.steps // 2) or step < 2 * self.STALL_WINDOW
                or len(self.first) < self.STALL_WINDOW or len(self.recent) < self.STALL_WINDOW):
            return
        first, last = self.first, list(self.recent)[-self.STALL_WINDOW:]
        drop = statistics.fmean(first) - statistics.fmean(last)
        noise = math.sqrt((statistics.variance(first) + statistics.variance(last)) / self.STALL_WINDOW)
        if drop > 2 * noise:  # a drop beyond two standard errors of batch-to-batch noise: it moves
            return
        cfg = self.config
        hint = (f"raise --lr (now {cfg.lr:g}; try {10 * cfg.lr:g})" if not (cfg.adaptive or cfg.sign) else
                f"raise --lr (now {cfg.lr:g}: with --adaptive/--sign it is the step per weight)")
        msg = (f"after {step} steps the training loss has not moved (mean {statistics.fmean(first):.4g} over the "
               f"first {self.STALL_WINDOW} steps, {statistics.fmean(last):.4g} over the last {self.STALL_WINDOW}, "
               f"batch noise +-{noise:.2g}): {hint}, "
               f"or check that the bundle trains the tensors you meant (pocketzo export --trainable/--peft); "
               "docs/accuracy.md lists what worked on a real task")
        self.warnings.append(msg)
        print(f"\nwarning: {msg}", file=sys.stderr)

    def loss_limit(self) -> float:
        if not self.config.spike_factor or len(self.recent) < 8:
            return math.inf
        return self.config.spike_factor * statistics.median(self.recent)

    def evaluate(self, step: int, bar: Progress | None = None) -> EvalResult | None:
        if self.eval_data is None:
            return None
        self.trainer.sync()
        result = evaluate(self.session, self.eval_data, self.config.eval_batch_size)
        self.evals.append({"step": step, **result.to_json()})
        if bar is not None:
            bar.set(**({"acc": result.accuracy} if result.accuracy is not None else {"ppl": result.perplexity}))
        return result

    def checkpoint(self, log, log_bin) -> None:
        for f in (log, log_bin):
            f.flush()
            os.fsync(f.fileno())
        self.trainer.sync()
        if not np.isfinite(self.session.params.buffer).all():  # cannot happen: undone steps restore theta
            raise TrainingError(f"step {self.steps_done}: the weights are not finite; not saving a checkpoint")
        state = CheckpointState(self.steps_done, self.lr_scale, self.failures, log.tell(), "", self.evals)
        save_checkpoint(self.run_dir, self.session.params, state, self.config.keep_checkpoints, self.trainer.state)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def run(self, show_progress: bool) -> None:
        cfg = self.config
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with open(self.run_dir / LOG, "a", encoding="utf-8") as log, \
                    open(self.run_dir / LOG_BIN, "ab") as log_bin, \
                    Progress(cfg.steps, "train", enabled=show_progress) as bar:
                bar.update(self.steps_done)
                for step in range(self.steps_done, cfg.steps):
                    batch = self.train_data.batch(self.sampler.indices(step))
                    records = self.trainer.step(step, batch, cfg.lr_at(step) * self.lr_scale, self.loss_limit())
                    for r in records:
                        log.write(json.dumps(r.to_json()) + "\n")
                        log_bin.write(pack_record(r))
                    log.flush()
                    log_bin.flush()
                    record = records[0]
                    self.steps_done = step + 1
                    self.step_seconds.append(record.seconds)
                    self.forward_seconds.append(record.forward_seconds / self.forwards_per_step)
                    self._after(record)
                    self.check_stall(self.steps_done)
                    bar.update(1, loss=(record.loss_plus + record.loss_minus) / 2, g=record.grad)
                    if cfg.eval_every and self.steps_done % cfg.eval_every == 0 and self.steps_done < cfg.steps:
                        self.evaluate(self.steps_done, bar)
                    if cfg.checkpoint_every and self.steps_done % cfg.checkpoint_every == 0:
                        self.checkpoint(log, log_bin)
                    if self._signal is not None:
                        self.checkpoint(log, log_bin)
                        name = signal.Signals(self._signal).name
                        raise RunInterrupted(f"stopped by {name} after step {self.steps_done}; a checkpoint was "
                                             f"saved: run the same command with --resume {self.run_dir}")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _after(self, record: StepRecord) -> None:
        """Divergence handling: back off the learning rate after an undone step; stop after too many."""
        cfg = self.config
        if record.status == "ok":
            self.failures = 0
            self._remember(record)
            return
        self.failures += 1
        self.undone += 1
        self.lr_scale *= cfg.lr_backoff
        print(f"\nnote: step {record.step} undone (L+={record.loss_plus:.4g}, L-={record.loss_minus:.4g}, limit "
              f"{self.loss_limit():.4g}); lr x{cfg.lr_backoff:g} -> scale {self.lr_scale:.3g}", file=sys.stderr)
        if self.failures >= cfg.max_failures:
            raise TrainingError(f"step {record.step}: {self.failures} consecutive steps had a non-finite or exploding "
                                "loss and were undone; lower --lr or --eps, or check the data")


def check_memory(session: TrainingSession, data: Dataset, config: TrainConfig, budget: str) -> dict:
    """Estimate the run's peak memory (weights + a probe forward on the longest rows) against ``budget``."""
    limit_mb = parse_bytes(budget) / 1e6
    rows = max(config.batch_size, config.eval_batch_size)
    longest = np.argsort([-len(ids) for ids in data.ids], kind="stable")[:rows]
    b = data.batch(longest)
    session.run(b.input_ids, b.attention_mask, b.labels)
    threads = config.threads or os.cpu_count() or 1
    estimate = peak_rss_mb() + threads * CHUNK_ELEMENTS * 4 / 1e6  # + the noise passes' scratch
    if estimate > limit_mb:
        raise PocketzoError(f"this run needs about {estimate:,.0f} MB (weights + a probe batch of {rows} x "
                            f"{b.input_ids.shape[1]} tokens), more than --memory-budget {budget}; lower "
                            "--batch-size/--eval-batch-size, train fewer tensors, or use a smaller model")
    return {"estimated_peak_mb": estimate, "budget_mb": limit_mb}


def train(
    bundle_path: str | Path,
    train_path: str | Path,
    out: str | Path,
    config: TrainConfig,
    eval_path: str | Path | None = None,
    session_config: SessionConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    resume: bool = False,
    memory_budget: str | None = None,
) -> dict:
    """Fine-tune the bundle's trainable tensors on ``train_path``; returns the summary.

    Everything that can be checked (bundle, data, session, memory budget) is checked before
    the run directory is touched. ``resume`` continues ``out`` from its newest valid checkpoint
    (same bundle, data and config, or a clear error). A run stopped by a TrainingError keeps
    its log and gets a summary with ``"status": "failed"`` but no weights; one stopped by
    SIGINT/SIGTERM saves a checkpoint and gets ``"status": "interrupted"``.
    """
    out = Path(out)
    t_start = time.perf_counter()
    bundle = Bundle(bundle_path)
    session_config = session_config or SessionConfig()
    session_config = replace(session_config, threads=session_config.threads or config.threads)
    encoder = TextEncoder(bundle)
    train_data = load_data(encoder, train_path)
    eval_data = load_data(encoder, eval_path) if eval_path else None
    session = TrainingSession(bundle, session_config, FlatParameters.from_bundle(bundle))
    memory = check_memory(session, train_data, config, memory_budget) if memory_budget else None
    run_config = {"train": config.to_json(), "session": asdict(session_config), "bundle": str(bundle.path),
                  "bundle_trainable_sha256": sha256_file(bundle.trainable_path),
                  "train_data": str(train_path), "train_data_sha256": sha256_file(train_path),
                  "eval_data": str(eval_path) if eval_path else None}
    start = None
    if resume:
        start = _resume_state(out, run_config, session)
    else:
        _prepare_dir(out, overwrite)
        write_json(out / CONFIG, run_config)
        for name in (LOG, LOG_BIN):
            (out / name).touch()

    loop = _Loop(session, config, train_data, eval_data, out, start)
    initial = loop.evaluate(0) if start is None else None
    if initial and show_progress:
        print("before training: " + json.dumps(initial.to_json()), file=sys.stderr)
    if start is not None and show_progress:
        print(f"resuming {out} after step {start.step}", file=sys.stderr)
    summary = {
        "status": "completed",
        "bundle": str(bundle.path),
        "weights": str(out / WEIGHTS),
        "train_data": str(train_path),
        "dev_data": str(eval_path) if eval_path else None,
        "task": bundle.task.kind,
        "trainable_parameters": session.params.numel,
        "truncated_rows": {"train": train_data.n_truncated, "dev": eval_data.n_truncated if eval_data else 0},
        "config": config.to_json(),
        "resumed_from_step": start.step if start else None,
        "memory_check": memory,
    }
    try:
        loop.run(show_progress)
        loop.trainer.sync()
        if not np.isfinite(session.params.buffer).all():
            raise TrainingError("the trained weights are not finite; nothing was saved (lower --lr or --eps)")
    except (TrainingError, RunInterrupted) as e:
        status = "interrupted" if isinstance(e, RunInterrupted) else "failed"
        write_json(out / SUMMARY, {**summary, **_measured(loop, t_start), "status": status, "error": str(e),
                                   "weights": None})
        raise
    finally:
        loop.trainer.close()
    final = loop.evaluate(config.steps)
    if final and show_progress:
        print("after training:  " + json.dumps(final.to_json()), file=sys.stderr)
    session.params.save(out / WEIGHTS, {"format": "pt", "producer": "pocketzo", "steps": str(config.steps)})
    summary.update(_measured(loop, t_start))
    summary["final_eval"] = final.to_json() if final else None
    if loop.evals and final and loop.evals[0].get("accuracy") is not None:
        summary["zero_shot_accuracy"] = loop.evals[0]["accuracy"]
        summary["final_accuracy"] = final.accuracy
    write_json(out / SUMMARY, summary)
    return summary


def _resume_state(out: Path, run_config: dict, session: TrainingSession) -> CheckpointState:
    """Check that ``out`` is the same run (bundle, data, config) and load its newest valid checkpoint."""
    try:
        saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PocketzoError(f"{out}: not a run directory to resume ({e})") from None
    for key, what in (("train", "training settings"), ("bundle_trainable_sha256", "bundle's initial weights"),
                      ("train_data_sha256", "training data")):
        if saved.get(key) != run_config[key]:
            raise PocketzoError(f"{out}: the {what} differ from those the run started with; resume with the "
                                "same bundle, data and flags (see its config.json)")
    state = latest_checkpoint(out, session.params)
    if state is None:
        raise PocketzoError(f"{out}: no valid checkpoint to resume from; start again without --resume "
                            "(use --checkpoint-every N to save checkpoints)")
    truncate_logs(out, LOG, state, max(1, session.slots // 2))
    return state


def _measured(loop: _Loop, t_start: float) -> dict:
    return {
        "steps": loop.steps_done,
        "forward_passes": loop.forwards_per_step * loop.steps_done,
        "perturbed_losses": loop.steps_done * max(loop.session.slots, loop.forwards_per_step),
        "eval_forward_passes": sum(e["forward_passes"] for e in loop.evals),
        "step_seconds_median": statistics.median(loop.step_seconds) if loop.step_seconds else None,
        "forward_seconds_median": statistics.median(loop.forward_seconds) if loop.forward_seconds else None,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
        "warnings": loop.warnings,
        "initial_eval": loop.evals[0] if loop.evals else None,
        "evals": loop.evals,
    }


def read_log(path: str | Path) -> list[StepRecord]:
    """The step records of a run's log.jsonl (or log.bin), checked to be consecutive from step 0."""
    if Path(path).suffix == ".bin":
        return read_bin_log(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                records.append(StepRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
                raise PocketzoError(f"{path}:{lineno}: not a step record ({e})") from None
    check_order(records, str(path))
    return records


def replay_run(bundle_path: str | Path, log: str | Path) -> FlatParameters:
    """Rebuild a run's final weights from the bundle's initial weights and its log (log.jsonl or
    log.bin, or the run directory), with the config.json next to the log."""
    log = Path(log)
    run, log = (log, log / LOG) if log.is_dir() else (log.parent, log)
    try:
        config = TrainConfig.from_json(json.loads((run / CONFIG).read_text(encoding="utf-8"))["train"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PocketzoError(f"{run / CONFIG}: cannot read the run's training config ({e})") from None
    if config.version != CONFIG_VERSION and config.perturbation == "gaussian":
        raise PocketzoError(f"{run}: trained with config version {config.version}, whose Gaussian noise this "
                            f"pocketzo (version {CONFIG_VERSION}) does not draw; replay it with the pocketzo that "
                            "trained it")
    if config.noise_chunk != CHUNK_ELEMENTS:
        raise PocketzoError(f"{run}: trained with noise chunks of {config.noise_chunk} elements, this pocketzo "
                            f"draws {CHUNK_ELEMENTS}; its noise cannot be regenerated here")
    bundle = Bundle(bundle_path)
    params = FlatParameters.from_bundle(bundle)
    replay(params, config, read_log(log), bundle.manifest.slots)
    return params
