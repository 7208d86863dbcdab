"""A training run: data, sampler, the step loop with evaluations, and the run directory.

    RUN/config.json          TrainConfig + what was trained on
    RUN/log.jsonl            one StepRecord per line, written as the run goes
    RUN/weights.safetensors  final trainable tensors under their Hugging Face names
    RUN/summary.json         evaluations, timings, memory
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo._io import write_json
from pocketzo._progress import Progress
from pocketzo.errors import PocketzoError
from pocketzo.mobile_harness.memory import peak_rss_mb
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import Dataset, TextEncoder
from pocketzo.runtime.session import FlatParameters, SessionConfig, TrainingSession
from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.evaluate import EvalResult, evaluate
from pocketzo.zo_trainer.trainer import StepRecord, ZOTrainer

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


def load_data(encoder: TextEncoder, path: str | Path, say: Callable[[str], None]) -> Dataset:
    data = encoder.dataset(path)
    if data.n_truncated:
        say(f"note: {data.n_truncated} of {len(data)} rows of {path} were cut to max_length "
            f"{encoder.task.max_length}")
    return data


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PocketzoError(f"{out}: run directory is not empty; choose another --out or pass --overwrite")
        if not (out / CONFIG).is_file():
            raise PocketzoError(f"{out}: not a pocketzo run directory; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def train(
    bundle_path: str | Path,
    train_path: str | Path,
    out: str | Path,
    config: TrainConfig,
    eval_path: str | Path | None = None,
    session_config: SessionConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Fine-tune the bundle's trainable tensors on ``train_path``; returns the summary."""
    out = Path(out)

    def say(msg: str) -> None:
        if show_progress:
            print(msg, file=sys.stderr)

    bundle = Bundle(bundle_path)
    session_config = session_config or SessionConfig()
    session_config = replace(session_config, threads=session_config.threads or config.threads)
    encoder = TextEncoder(bundle)
    train_data = load_data(encoder, train_path, say)
    eval_data = load_data(encoder, eval_path, say) if eval_path else None
    _prepare_dir(out, overwrite)
    write_json(out / CONFIG, {"train": config.to_json(), "session": session_config.__dict__,
                              "bundle": str(bundle.path), "train_data": str(train_path),
                              "eval_data": str(eval_path) if eval_path else None})

    t_start = time.perf_counter()
    session = TrainingSession(bundle, session_config, FlatParameters.from_bundle(bundle))
    trainer = ZOTrainer(session, config)
    sampler = BatchSampler(len(train_data), config.batch_size, config.seed)
    evals: list[dict] = []
    step_seconds: list[float] = []
    classify = bundle.task.kind == "classify"

    def run_eval(step: int, bar: Progress | None) -> EvalResult:
        assert eval_data is not None
        result = evaluate(session, eval_data, config.eval_batch_size)
        evals.append({"step": step, **result.to_json()})
        if bar is not None:
            bar.set(**({"acc": result.accuracy} if classify else {"ppl": result.perplexity}))
        return result

    initial = run_eval(0, None) if eval_data else None
    if initial:
        say("before training: " + json.dumps(initial.to_json()))
    try:
        with open(out / LOG, "w", encoding="utf-8") as log, \
                Progress(config.steps, "train", enabled=show_progress) as bar:
            for step in range(config.steps):
                record: StepRecord = trainer.step(step, train_data.batch(sampler.indices(step)))
                log.write(json.dumps(record.to_json()) + "\n")
                log.flush()
                step_seconds.append(record.seconds)
                bar.update(1, loss=(record.loss_plus + record.loss_minus) / 2, g=record.grad)
                if eval_data and config.eval_every and (step + 1) % config.eval_every == 0 \
                        and step + 1 < config.steps:
                    run_eval(step + 1, bar)
    finally:
        trainer.close()
    final = run_eval(config.steps, None) if eval_data else None
    if final:
        say("after training:  " + json.dumps(final.to_json()))
    session.params.save(out / WEIGHTS, {"format": "pt", "producer": "pocketzo", "steps": str(config.steps)})

    summary = {
        "bundle": str(bundle.path),
        "weights": str(out / WEIGHTS),
        "train_data": str(train_path),
        "dev_data": str(eval_path) if eval_path else None,
        "task": bundle.task.kind,
        "trainable_parameters": session.params.numel,
        "steps": config.steps,
        "forward_passes": 2 * config.steps,
        "eval_forward_passes": sum(e["forward_passes"] for e in evals),
        "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
        "initial_eval": initial.to_json() if initial else None,
        "final_eval": final.to_json() if final else None,
        "evals": evals,
        "config": config.to_json(),
    }
    if classify and initial and final:
        summary["zero_shot_accuracy"] = initial.accuracy
        summary["final_accuracy"] = final.accuracy
    write_json(out / SUMMARY, summary)
    return summary


def read_log(path: str | Path) -> list[StepRecord]:
    """The step records of a run's log.jsonl."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                records.append(StepRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise PocketzoError(f"{path}:{lineno}: not a step record ({e})") from None
    return records
