"""Reliability: kill-and-resume exactness, SIGTERM, torn checkpoints, replay, divergence, memory guard."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pocketzo.cli import main
from pocketzo.errors import PocketzoError, TrainingError
from pocketzo.runtime import Bundle, FlatParameters, _safetensors
from pocketzo.zo_trainer import TrainConfig, replay_run, train
from pocketzo.zo_trainer.checkpoint import RECORD_BYTES
from pocketzo.zo_trainer.trainer import make_trainer

CFG = TrainConfig(steps=400, lr=2e-3, eps=1e-3, batch_size=8, seed=7, weight_decay=0.05, schedule="cosine",
                  warmup_steps=10, checkpoint_every=7, eval_every=100, threads=1)


def _flags(cfg: TrainConfig) -> list[str]:
    keys = ("steps", "lr", "eps", "batch_size", "seed", "weight_decay", "schedule", "warmup_steps",
            "checkpoint_every", "eval_every", "threads")
    return ["--recipe", "zo-sgd", *(x for k in keys for x in ("--" + k.replace("_", "-"), str(getattr(cfg, k))))]


@pytest.fixture(scope="module")
def reference(bundles, sentiment_files, tmp_path_factory):
    """One uninterrupted run: the weights and log every interrupted run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(bundles("llama-classify"), sentiment_files["train"], run, CFG, eval_path=sentiment_files["dev"],
          show_progress=False)
    return run


def _weights(path: Path) -> bytes:
    """The tensors' bytes (the files' metadata, e.g. the producer, may differ)."""
    return b"".join(a.tobytes() for a in _safetensors.load(path).values())


def _train_cmd(bundles, files, run: Path, resume: bool) -> list[str]:
    where = ["--resume", str(run)] if resume else ["--out", str(run)]
    return [sys.executable, "-m", "pocketzo", "train", str(bundles("llama-classify")), "--data", str(files["train"]),
            "--eval", str(files["dev"]), *where, *_flags(CFG), "--quiet"]


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_steps_then_resume_is_bit_identical(bundles, sentiment_files, reference, tmp_path):
    rng = random.Random(1234)
    run = tmp_path / "run"
    kills, resumed = [], False
    while len(kills) < 10:
        proc = subprocess.Popen(_train_cmd(bundles, sentiment_files, run, resumed), stderr=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        # a kill point somewhere ahead, after the first checkpoint exists
        target = max(_lines(run / "log.jsonl"), CFG.checkpoint_every) + rng.randint(3, 30)
        while proc.poll() is None and _lines(run / "log.jsonl") < target:
            time.sleep(0.001)
        if proc.poll() is not None:  # finished before the kill point: the test needs more steps
            pytest.fail(f"the run ended before kill point {target}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_lines(run / "log.jsonl"))
        resumed = True
    done = subprocess.run(_train_cmd(bundles, sentiment_files, run, True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(set(kills)) >= 5, kills  # kill points spread over the run, not all at one step
    assert _weights(run / "weights.safetensors") == _weights(reference / "weights.safetensors")
    assert (run / "log.bin").read_bytes() == (reference / "log.bin").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] is not None


def test_sigterm_checkpoints_and_the_run_resumes(bundles, sentiment_files, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(bundles, sentiment_files, run, False), stderr=subprocess.PIPE, text=True)
    while _lines(run / "log.jsonl") < 50:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 130 and "stopped by SIGTERM" in err and "--resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["weights"] is None
    assert not (run / "weights.safetensors").exists()
    assert main(["train", str(bundles("llama-classify")), "--data", str(sentiment_files["train"]), "--eval",
                 str(sentiment_files["dev"]), "--resume", str(run), *_flags(CFG), "--quiet"]) == 0
    assert _weights(run / "weights.safetensors") == _weights(reference / "weights.safetensors")


def test_a_torn_checkpoint_is_skipped(bundles, sentiment_files, reference, tmp_path):
    cfg = replace(CFG, steps=100)
    run = tmp_path / "run"
    train(bundles("llama-classify"), sentiment_files["train"], run, cfg, eval_path=sentiment_files["dev"],
          show_progress=False)
    newest, older = sorted((run / "checkpoints").glob("step-*"), reverse=True)[:2]
    w = newest / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])  # torn: the tail never reached the disk
    summary = train(bundles("llama-classify"), sentiment_files["train"], run, cfg, eval_path=sentiment_files["dev"],
                    show_progress=False, resume=True)
    assert summary["resumed_from_step"] == int(older.name.split("-")[1])
    short_ref = tmp_path / "ref100"
    train(bundles("llama-classify"), sentiment_files["train"], short_ref, cfg, eval_path=sentiment_files["dev"],
          show_progress=False)
    assert _weights(run / "weights.safetensors") == _weights(short_ref / "weights.safetensors")


def test_resume_refuses_other_settings_or_data(bundles, sentiment_files, reference):
    with pytest.raises(PocketzoError, match="training settings differ"):
        train(bundles("llama-classify"), sentiment_files["train"], reference, replace(CFG, lr=1e-2),
              resume=True, show_progress=False)
    with pytest.raises(PocketzoError, match="training data differ"):
        train(bundles("llama-classify"), sentiment_files["dev"], reference, CFG, resume=True, show_progress=False)


def test_replay_cli_rebuilds_the_weights_from_the_binary_log(bundles, reference, tmp_path, capsys):
    for log in ("log.bin", "log.jsonl"):
        out = tmp_path / f"{log}.safetensors"
        assert main(["replay", str(bundles("llama-classify")), str(reference / log), "--out", str(out)]) == 0
        assert _weights(out) == _weights(reference / "weights.safetensors")
    steps = CFG.steps
    assert (reference / "log.bin").stat().st_size == steps * RECORD_BYTES
    assert 10_000 * RECORD_BYTES < 1_000_000  # a 10,000-step log is under 1 MB


def test_divergence_is_undone_backed_off_logged_and_replayed(bundles, sentiment_files, tmp_path, monkeypatch):
    bad_steps = {12, 13, 30}
    calls = {"n": 0}

    def flaky_trainer(session, config):
        trainer = make_trainer(session, config)
        original = trainer._loss

        def flaky(batch):
            step = calls["n"] // 2
            calls["n"] += 1
            return float("nan") if step in bad_steps else original(batch)

        trainer._loss = flaky
        return trainer

    monkeypatch.setattr("pocketzo.zo_trainer.run.make_trainer", flaky_trainer)
    cfg = TrainConfig(steps=40, lr=2e-3, batch_size=8, seed=3, threads=1)
    run = tmp_path / "run"
    summary = train(bundles("llama-classify"), sentiment_files["train"], run, cfg, show_progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["status"] == "undone"] == sorted(bad_steps)
    assert records[14]["lr"] == pytest.approx(cfg.lr * cfg.lr_backoff**2)  # two back-offs so far
    assert summary["status"] == "completed"
    replayed = replay_run(bundles("llama-classify"), run / "log.bin")
    assert replayed.buffer.tobytes() == FlatParameters.from_bundle(Bundle(bundles("llama-classify")),
                                                                   run / "weights.safetensors").buffer.tobytes()


def test_an_undone_step_restores_the_weights_to_float32_rounding(bundles, sentiment_files):
    from pocketzo.runtime import SessionConfig, TrainingSession
    from pocketzo.runtime.data import TextEncoder

    bundle = Bundle(bundles("llama-classify"))
    batch = TextEncoder(bundle).dataset(sentiment_files["train"]).batch(range(8))
    session = TrainingSession(bundle, SessionConfig(threads=1))
    before = session.params.buffer.copy()
    trainer = make_trainer(session, TrainConfig(steps=1))
    record = trainer.step(0, batch, loss_limit=-1.0)[0]  # every loss "explodes"
    trainer.close()
    assert record.status == "undone" and record.grad == 0.0
    np.testing.assert_allclose(session.params.buffer, before, rtol=0, atol=4 * np.finfo(np.float32).eps)


def test_repeated_divergence_stops_the_run_without_saving_weights(bundles, sentiment_files, tmp_path, monkeypatch):
    def exploding_trainer(session, config):
        trainer = make_trainer(session, config)
        trainer._loss = lambda batch: float("inf")
        return trainer

    monkeypatch.setattr("pocketzo.zo_trainer.run.make_trainer", exploding_trainer)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="5 consecutive steps"):
        train(bundles("llama-norms"), sentiment_files["train"], run, TrainConfig(steps=20), show_progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 5
    assert not (run / "weights.safetensors").exists()


def test_memory_guard_refuses_before_touching_the_run_directory(bundles, sentiment_files, tmp_path):
    with pytest.raises(PocketzoError, match=r"needs about [\d,]+ MB .* more than --memory-budget 20M"):
        train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", TrainConfig(steps=2),
              memory_budget="20M", show_progress=False)
    assert not (tmp_path / "run").exists()
    summary = train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", TrainConfig(steps=2),
                    memory_budget="64G", show_progress=False)
    assert 0 < summary["memory_check"]["estimated_peak_mb"] < 64_000


def test_no_code_execution_from_data():
    """No pickle, eval/exec or trust_remote_code anywhere in the package."""
    pattern = re.compile(r"\bpickle\b|\bcPickle\b|(?<![\w.])eval\(|(?<![\w.])exec\(|trust_remote_code|torch\.load\(")
    package = Path(__file__).resolve().parents[1] / "pocketzo"
    hits = [f"{p.relative_to(package.parent)}:{i}: {line.strip()}"
            for p in sorted(package.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []
    assert pattern.search("x = eval(s)") and pattern.search("pickle.loads(b)")  # the check can fail
