"""A training run: data, sampler, the step loop with evaluations, and the run directory.

    RUN/config.json          TrainConfig + session settings + what was trained on
    RUN/log.jsonl            one StepRecord per line, flushed as the run goes
    RUN/weights.safetensors  final trainable tensors under their Hugging Face names
    RUN/summary.json         evaluations, timings, memory; "status" says whether the run completed

Initial weights + config.json + log.jsonl rebuild the final weights bit for bit (``replay_run``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo._io import write_json
from pocketzo._progress import Progress
from pocketzo.errors import PocketzoError, TrainingError
from pocketzo.mobile_harness.memory import peak_rss_mb
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import Dataset, TextEncoder
from pocketzo.runtime.session import FlatParameters, SessionConfig, TrainingSession
from pocketzo.zo_trainer.config import CONFIG_VERSION, TrainConfig
from pocketzo.zo_trainer.evaluate import EvalResult, evaluate
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS
from pocketzo.zo_trainer.trainer import StepRecord, ZOTrainer, replay

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

    def __init__(self, session: TrainingSession, config: TrainConfig, train_data: Dataset, eval_data: Dataset | None):
        self.session, self.config = session, config
        self.train_data, self.eval_data = train_data, eval_data
        self.trainer = ZOTrainer(session, config)
        self.sampler = BatchSampler(len(train_data), config.batch_size, config.seed)
        self.evals: list[dict] = []
        self.step_seconds: list[float] = []
        self.forward_seconds: list[float] = []  # per forward pass
        self.steps_done = 0

    def evaluate(self, step: int, bar: Progress | None = None) -> EvalResult | None:
        if self.eval_data is None:
            return None
        self.trainer.sync()
        result = evaluate(self.session, self.eval_data, self.config.eval_batch_size)
        self.evals.append({"step": step, **result.to_json()})
        if bar is not None:
            bar.set(**({"acc": result.accuracy} if result.accuracy is not None else {"ppl": result.perplexity}))
        return result

    def run(self, log_path: Path, show_progress: bool) -> None:
        cfg = self.config
        with open(log_path, "w", encoding="utf-8") as log, Progress(cfg.steps, "train", enabled=show_progress) as bar:
            for step in range(cfg.steps):
                record: StepRecord = self.trainer.step(step, self.train_data.batch(self.sampler.indices(step)))
                log.write(json.dumps(record.to_json()) + "\n")
                log.flush()
                self.steps_done = step + 1
                self.step_seconds.append(record.seconds)
                self.forward_seconds.append(record.forward_seconds / 2)
                bar.update(1, loss=(record.loss_plus + record.loss_minus) / 2, g=record.grad)
                if cfg.eval_every and self.steps_done % cfg.eval_every == 0 and self.steps_done < cfg.steps:
                    self.evaluate(self.steps_done, bar)


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
    """Fine-tune the bundle's trainable tensors on ``train_path``; returns the summary.

    Everything that can be checked (bundle, data, session) is checked before the run
    directory is touched. A run stopped by a TrainingError keeps its log and gets a summary
    with ``"status": "failed"``, but no weights.
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
    _prepare_dir(out, overwrite)
    write_json(out / CONFIG, {"train": config.to_json(), "session": asdict(session_config),
                              "bundle": str(bundle.path), "train_data": str(train_path),
                              "eval_data": str(eval_path) if eval_path else None})

    loop = _Loop(session, config, train_data, eval_data)
    initial = loop.evaluate(0)
    if initial and show_progress:
        print("before training: " + json.dumps(initial.to_json()), file=sys.stderr)
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
    }
    try:
        loop.run(out / LOG, show_progress)
    except TrainingError as e:
        write_json(out / SUMMARY, {**summary, **_measured(loop, t_start), "status": "failed", "error": str(e),
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
    if initial and final and initial.accuracy is not None:
        summary["zero_shot_accuracy"] = initial.accuracy
        summary["final_accuracy"] = final.accuracy
    write_json(out / SUMMARY, summary)
    return summary


def _measured(loop: _Loop, t_start: float) -> dict:
    return {
        "steps": loop.steps_done,
        "forward_passes": 2 * loop.steps_done,
        "eval_forward_passes": sum(e["forward_passes"] for e in loop.evals),
        "step_seconds_median": statistics.median(loop.step_seconds) if loop.step_seconds else None,
        "forward_seconds_median": statistics.median(loop.forward_seconds) if loop.forward_seconds else None,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
        "initial_eval": loop.evals[0] if loop.evals else None,
        "evals": loop.evals,
    }


def read_log(path: str | Path) -> list[StepRecord]:
    """The step records of a run's log.jsonl, checked to be consecutive from step 0."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                records.append(StepRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise PocketzoError(f"{path}:{lineno}: not a step record ({e})") from None
            if records[-1].step != lineno - 1:
                raise PocketzoError(f"{path}:{lineno}: step {records[-1].step}, expected {lineno - 1}; "
                                    "the log is incomplete or out of order")
    return records


def replay_run(bundle_path: str | Path, run: str | Path) -> FlatParameters:
    """Rebuild a run's final weights from the bundle's initial weights, its config.json and log.jsonl."""
    run = Path(run)
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
    params = FlatParameters.from_bundle(Bundle(bundle_path))
    replay(params, config, read_log(run / LOG))
    return params
