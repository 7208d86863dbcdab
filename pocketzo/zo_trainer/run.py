"""A training run: data, sampler, the step loop with evaluations and checkpoints (files: ``rundir``).

Initial weights + config.json + the log rebuild the final weights bit for bit (``replay``), and a
run resumed from a checkpoint ends bit-identical to one never interrupted: the sampler is
stateless, the noise is regenerated from seeds, and the checkpoint holds the rest.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pocketzo._io import write_json
from pocketzo._progress import Progress
from pocketzo.errors import DataError, PocketzoError, RunInterrupted, TrainingError
from pocketzo.mobile_harness.memory import peak_rss_mb
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import Dataset, TextEncoder
from pocketzo.runtime.session import SessionConfig
from pocketzo.runtime.trunk_cache import TrunkCache
from pocketzo.zo_trainer.batches import BatchSampler, load_data
from pocketzo.zo_trainer.budget import check_memory, check_trunk_cache, eval_batch_size, trunk_cache
from pocketzo.zo_trainer.checkpoint import (
    CheckpointState,
    latest_checkpoint,
    load_optimizer,
    save_checkpoint,
    truncate_logs,
)
from pocketzo.zo_trainer.evaluate import EvalResult, evaluate
from pocketzo.zo_trainer.method import Method, RunPolicy
from pocketzo.zo_trainer.monitor import RunMonitor
from pocketzo.zo_trainer.rundir import SUMMARY, WEIGHTS, RunConfig, check_same_run, prepare_dir
from pocketzo.zo_trainer.steplog import LOG, LOG_BIN, pack_record, read_log, start_logs
from pocketzo.zo_trainer.trainer import Session, StepRecord, make_trainer, open_session, resolve_directions


class _Loop:
    """The state of one run: session, trainer, data and what has been measured so far."""

    def __init__(self, session: Session, method: Method, policy: RunPolicy, train_data: Dataset,
                 eval_data: Dataset | None, run_dir: Path, start: CheckpointState | None,
                 cache: TrunkCache | None = None):
        self.session, self.method, self.policy = session, method, policy
        self.train_data, self.eval_data, self.run_dir = train_data, eval_data, run_dir
        self.trainer = make_trainer(session, method, policy.threads, cache)
        if start:
            load_optimizer(run_dir, start, self.trainer.state)
        self.sampler = BatchSampler(len(train_data), method.batch_size, method.seed)
        self.evals: list[dict] = list(start.evals) if start else []
        self.step_seconds: list[float] = []
        self.forward_seconds: list[float] = []  # per forward pass (per session run with slots)
        self.steps_done = start.step if start else 0
        self.lr_scale = start.lr_scale if start else 1.0
        self.failures = start.failures if start else 0
        self.good_steps = start.good_steps if start else 0  # good steps in a row since the last lr back-off
        self.undone = 0  # undone steps in the whole run (a resumed run's earlier ones too)
        self.monitor = RunMonitor(self.trainer.method, policy.spike_factor)
        self.warnings: list[str] = []
        self.train_seconds = 0.0  # the steps' seconds (evaluations and checkpoints excluded), resumed runs' too
        self.stopped_by: str | None = None  # why the run ended before method.steps
        self.checkpointed_step = start.step if start else -1  # the step of the newest checkpoint on disk
        if start:
            for r in read_log(run_dir / LOG)[: start.step]:
                self.monitor.remember(r)
                self.train_seconds += r.seconds
                self.undone += r.status == "undone"
        self._signal: int | None = None

    @property
    def forwards_per_step(self) -> int:
        return 1 if self.session.slots > 1 else self.trainer.method.forwards_per_step()

    def evaluate(self, step: int, bar: Progress | None = None) -> EvalResult | None:
        if self.eval_data is None:
            return None
        self.trainer.sync()
        result = evaluate(self.session, self.eval_data, eval_batch_size(self.session, self.method, self.policy))
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
        state = CheckpointState(self.steps_done, self.lr_scale, self.failures, log.tell(), log_bin.tell(), "",
                                self.evals, good_steps=self.good_steps)
        save_checkpoint(self.run_dir, self.session.params, state, self.policy.keep_checkpoints, self.trainer.state)
        self.checkpointed_step = self.steps_done

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def run(self) -> None:
        m, policy = self.method, self.policy
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with open(self.run_dir / LOG, "a", encoding="utf-8") as log, \
                    open(self.run_dir / LOG_BIN, "ab") as log_bin, \
                    Progress(m.steps, "train", enabled=policy.progress) as bar:
                bar.update(self.steps_done)
                for step in range(self.steps_done, m.steps):
                    stop = self._budget_spent(step)
                    if stop:
                        if self.checkpointed_step != step:  # a later --resume with a larger budget goes on from here
                            self.checkpoint(log, log_bin)
                        self.stopped_by = stop
                        break
                    batch = self.train_data.batch(self.sampler.indices(step))
                    record = self.trainer.step(step, batch, m.lr_at(step) * self.lr_scale, self.monitor.loss_limit())
                    log.write(json.dumps(record.to_json()) + "\n")
                    log_bin.write(pack_record(record))
                    log.flush()
                    log_bin.flush()
                    self.steps_done = step + 1
                    self.step_seconds.append(record.seconds)
                    self.train_seconds += record.seconds
                    self.forward_seconds.append(record.forward_seconds / self.forwards_per_step)
                    self._after(record)
                    bar.update(1, loss=record.loss, g=record.grad_rms)
                    if policy.eval_every and self.steps_done % policy.eval_every == 0 and self.steps_done < m.steps:
                        self.evaluate(self.steps_done, bar)
                    warning = self.monitor.stall_warning(self.steps_done, self.evals)
                    if warning:
                        self.warnings.append(warning)
                        print(f"\nwarning: {warning}", file=sys.stderr)
                    if policy.checkpoint_every and self.steps_done % policy.checkpoint_every == 0:
                        self.checkpoint(log, log_bin)
                    if self._signal is not None:
                        self.checkpoint(log, log_bin)
                        name = signal.Signals(self._signal).name
                        raise RunInterrupted(f"stopped by {name} after step {self.steps_done}; a checkpoint was "
                                             f"saved: continue it with `pocketzo train --resume {self.run_dir}`")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _budget_spent(self, step: int) -> str | None:
        """The run policy's budget that stops the run before ``step`` (its field name), if one does."""
        policy = self.policy
        if policy.max_train_seconds and self.train_seconds >= policy.max_train_seconds:
            return "max_train_seconds"
        if policy.stop_at_step and step >= policy.stop_at_step:
            return "stop_at_step"
        return None

    def _after(self, record: StepRecord) -> None:
        """Divergence handling: back off the learning rate after an undone step, take one back-off back after
        ``lr_recover_steps`` good steps in a row, stop after ``max_failures`` undone steps in a row."""
        policy = self.policy
        if record.status == "ok":
            self.failures = 0
            self.monitor.remember(record)
            if self.lr_scale < 1 and policy.lr_recover_steps:
                self.good_steps += 1
                if self.good_steps >= policy.lr_recover_steps:
                    self.lr_scale = min(1.0, self.lr_scale / policy.lr_backoff)
                    self.good_steps = 0
                    print(f"\nnote: {policy.lr_recover_steps} good steps since the last back-off; lr scale back to "
                          f"{self.lr_scale:.3g}", file=sys.stderr)
            return
        self.failures += 1
        self.undone += 1
        self.good_steps = 0
        self.lr_scale *= policy.lr_backoff
        print(f"\nnote: step {record.step} undone (mean loss {record.loss:.4g}, limit "
              f"{self.monitor.loss_limit():.4g}); lr x{policy.lr_backoff:g} -> scale {self.lr_scale:.3g}",
              file=sys.stderr)
        if self.failures >= policy.max_failures:
            raise TrainingError(f"step {record.step}: {self.failures} consecutive steps had a non-finite or exploding "
                                "loss and were undone; lower --lr or --eps, or check the data")

    def measured(self, t_start: float) -> dict[str, Any]:
        return {
            "steps": self.steps_done,
            "stopped_by": self.stopped_by,
            "undone_steps": self.undone,
            "lr_scale": self.lr_scale,
            "train_seconds": self.train_seconds,
            "forward_passes": self.forwards_per_step * self.steps_done,
            "perturbed_losses": self.steps_done * self.trainer.method.forwards_per_step(),
            "eval_forward_passes": sum(e["forward_passes"] for e in self.evals),
            "step_seconds_median": statistics.median(self.step_seconds) if self.step_seconds else None,
            "forward_seconds_median": statistics.median(self.forward_seconds) if self.forward_seconds else None,
            "wall_seconds": time.perf_counter() - t_start,
            "peak_rss_mb": peak_rss_mb(),
            "warnings": self.warnings,
            "initial_eval": self.evals[0] if self.evals else None,
            "evals": self.evals,
        }


def train(bundle_path: str | Path, train_path: str | Path, out: str | Path, method: Method,
          policy: RunPolicy | None = None, eval_path: str | Path | None = None,
          session_config: SessionConfig | None = None, overwrite: bool = False) -> dict:
    """Fine-tune the bundle's trainable tensors on ``train_path`` into the new run ``out``; returns the summary.

    Everything that can be checked (bundle, data, session, memory budget) is checked before the run
    directory is touched. A run stopped by a TrainingError keeps its log and gets a summary with
    ``"status": "failed"`` but no weights; one stopped by SIGINT/SIGTERM saves a checkpoint and gets
    ``"status": "interrupted"`` (continue it with ``resume``).
    """
    policy = policy or RunPolicy()
    bundle = Bundle(bundle_path)
    session_config = replace(session_config or SessionConfig(), threads=policy.threads)
    method = resolve_directions(method, bundle.manifest.slots)
    for path in (train_path, eval_path):
        if path and not Path(path).is_file():
            raise DataError(f"{path}: data file not found; check the path")
    run_config = RunConfig.new(bundle, train_path, eval_path, method, policy, session_config)
    return _execute(Path(out), run_config, bundle, start=None, overwrite=overwrite)


def resume(out: str | Path, policy_changes: dict[str, Any] | None = None, method_given: dict[str, Any] | None = None,
           bundle_path: str | Path | None = None, train_path: str | Path | None = None) -> dict:
    """Continue the run ``out`` from its newest valid checkpoint. Bundle, data, method and policy come from
    its config.json; ``method_given`` fields must equal the run's method; ``policy_changes`` replace fields
    of its policy (threads, evaluation, checkpoints ...); ``bundle_path``/``train_path`` point at moved
    files (checked by sha256)."""
    out = Path(out)
    saved = RunConfig.load(out)
    policy = replace(saved.policy, **(policy_changes or {}))
    bundle = Bundle(bundle_path or saved.bundle)
    train_path = train_path or saved.train_data
    given = dict(method_given or {})
    if given.get("directions") == 1:  # resolved for the bundle's slots, as a new run does
        given["directions"] = resolve_directions(replace(saved.method, directions=1), bundle.manifest.slots).directions
    check_same_run(out, saved, bundle, train_path, given)
    run_config = replace(saved, bundle=str(bundle.path), train_data=str(train_path), policy=policy,
                         session=replace(saved.session, threads=policy.threads))
    return _execute(out, run_config, bundle, start=True, overwrite=False)


def _execute(out: Path, rc: RunConfig, bundle: Bundle, start: bool | None, overwrite: bool) -> dict:
    t_start = time.perf_counter()
    method, policy = rc.method, rc.policy
    encoder = TextEncoder(bundle)
    train_data = load_data(encoder, rc.train_data)
    eval_data = load_data(encoder, rc.eval_data) if rc.eval_data else None
    session = open_session(bundle, rc.session, method, split=policy.split)
    check_trunk_cache(session, method, policy, out)
    memory = check_memory(session, train_data, method, policy) if policy.memory_budget else None
    checkpoint = None
    if start:
        checkpoint = latest_checkpoint(out, session.params)
        if checkpoint is None:
            raise PocketzoError(f"{out}: no valid checkpoint to resume from; start again without --resume "
                                "(use --checkpoint-every N to save checkpoints)")
        truncate_logs(out, checkpoint)
    else:
        prepare_dir(out, overwrite)
        start_logs(out)
    rc.save(out)

    cache = trunk_cache(session, train_data, policy)  # built after every check that could refuse the run
    loop = _Loop(session, method, policy, train_data, eval_data, out, checkpoint, cache)
    initial = loop.evaluate(0) if checkpoint is None else None
    if initial and policy.progress:
        print("before training: " + json.dumps(initial.to_json()), file=sys.stderr)
    if checkpoint is not None and policy.progress:
        print(f"resuming {out} after step {checkpoint.step}", file=sys.stderr)
    summary = {
        "status": "completed", "bundle": str(bundle.path), "weights": str(out / WEIGHTS),
        "train_data": rc.train_data, "dev_data": rc.eval_data, "task": bundle.task.kind,
        "trainable_parameters": loop.trainer.evaluator.theta.numel,
        "truncated_rows": {"train": train_data.n_truncated, "dev": eval_data.n_truncated if eval_data else 0},
        "method": method.to_json(), "policy": policy.to_json(),
        "resumed_from_step": checkpoint.step if checkpoint else None, "memory_check": memory,
        "trunk_cache": None if cache is None else {"directory": str(cache.directory), "rows": len(cache.offsets) - 1,
                                                   "bytes": cache.nbytes, "build_seconds": cache.build_seconds},
    }
    try:
        loop.run()
        loop.trainer.sync()
        if not np.isfinite(session.params.buffer).all():
            raise TrainingError("the trained weights are not finite; nothing was saved (lower --lr or --eps)")
    except (TrainingError, RunInterrupted) as e:
        status = "interrupted" if isinstance(e, RunInterrupted) else "failed"
        write_json(out / SUMMARY, {**summary, **loop.measured(t_start), "status": status, "error": str(e),
                                   "weights": None})
        raise
    finally:
        loop.trainer.close()
    if loop.evals and loop.evals[-1]["step"] == loop.steps_done:  # these weights were evaluated (--steps 0)
        final: EvalResult | None = EvalResult(**{k: v for k, v in loop.evals[-1].items() if k != "step"})
    else:
        final = loop.evaluate(loop.steps_done)
    if final and policy.progress:
        print("after training:  " + json.dumps(final.to_json()), file=sys.stderr)
    session.params.save(out / WEIGHTS, {"format": "pt", "producer": "pocketzo", "steps": str(method.steps)})
    summary.update(loop.measured(t_start))
    summary["final_eval"] = final.to_json() if final else None
    if loop.evals and final and loop.evals[0].get("accuracy") is not None:
        summary["zero_shot_accuracy"] = loop.evals[0]["accuracy"]
        summary["final_accuracy"] = final.accuracy
    write_json(out / SUMMARY, summary)
    return summary
