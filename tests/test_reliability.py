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
from pocketzo.zo_trainer import RECIPES, Method, RunPolicy, replay_run, resume, train
from pocketzo.zo_trainer.steplog import read_log
from pocketzo.zo_trainer.trainer import make_trainer

CFG = Method(steps=400, lr=2e-3, eps=1e-3, batch_size=8, seed=7, weight_decay=0.05, schedule="cosine",
             warmup_steps=10)
POLICY = RunPolicy(checkpoint_every=7, eval_every=100, threads=1, progress=False)


def _flags(cfg: Method, policy: RunPolicy = POLICY) -> list[str]:
    keys = ("steps", "lr", "eps", "batch_size", "seed", "weight_decay", "schedule", "warmup_steps")
    return ["--recipe", "zo-sgd", *(x for k in keys for x in ("--" + k.replace("_", "-"), str(getattr(cfg, k)))),
            "--checkpoint-every", str(policy.checkpoint_every), "--eval-every", str(policy.eval_every),
            "--threads", str(policy.threads)]


@pytest.fixture(scope="module")
def reference(bundles, sentiment_files, tmp_path_factory):
    """One uninterrupted run: the weights and log every interrupted run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(bundles("llama-classify"), sentiment_files["train"], run, CFG, POLICY, eval_path=sentiment_files["dev"])
    return run


def _weights(path: Path) -> bytes:
    """The tensors' bytes (the files' metadata, e.g. the producer, may differ)."""
    return b"".join(a.tobytes() for a in _safetensors.load(path).values())


def _train_cmd(bundles, files, run: Path, resume: bool) -> list[str]:
    """The new run's full command; a resumed one is `--resume RUN` alone (on 2 threads: the policy may change)."""
    if resume:
        return [sys.executable, "-m", "pocketzo", "train", "--resume", str(run), "--threads", "2", "--quiet"]
    return [sys.executable, "-m", "pocketzo", "train", str(bundles("llama-classify")), "--data", str(files["train"]),
            "--eval", str(files["dev"]), "--out", str(run), *_flags(CFG), "--quiet"]


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
        target = max(_lines(run / "log.jsonl"), POLICY.checkpoint_every) + rng.randint(3, 30)
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
    # the method's flags may be repeated on resume if they are the run's own
    assert main(["train", "--resume", str(run), *_flags(CFG), "--quiet"]) == 0
    assert _weights(run / "weights.safetensors") == _weights(reference / "weights.safetensors")


def test_a_time_budget_stops_with_a_checkpoint_and_a_larger_one_goes_on_bit_identical(bundles, sentiment_files,
                                                                                      reference, tmp_path):
    run, budget = tmp_path / "run", 0.05
    summary = train(bundles("llama-classify"), sentiment_files["train"], run, CFG,
                    replace(POLICY, max_train_seconds=budget), eval_path=sentiment_files["dev"])
    seconds = [json.loads(line)["seconds"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert summary["stopped_by"] == "max_train_seconds" and 1 <= summary["steps"] == len(seconds) < CFG.steps
    assert sum(seconds[:-1]) < budget <= sum(seconds) == pytest.approx(summary["train_seconds"])  # the first over it
    assert (run / "checkpoints" / f"step-{summary['steps']:08d}").is_dir()
    again = resume(run)  # the same budget, already spent: no step
    assert again["steps"] == summary["steps"] and again["stopped_by"] == "max_train_seconds"
    done = resume(run, {"max_train_seconds": 0.0})
    assert done["steps"] == CFG.steps and done["stopped_by"] is None
    assert _weights(run / "weights.safetensors") == _weights(reference / "weights.safetensors")


def test_a_step_budget_stops_with_a_checkpoint_and_a_resume_without_it_ends_bit_identical(bundles, sentiment_files,
                                                                                          reference, tmp_path):
    run, stop = tmp_path / "run", CFG.steps // 2
    summary = train(bundles("llama-classify"), sentiment_files["train"], run, CFG,
                    replace(POLICY, stop_at_step=stop), eval_path=sentiment_files["dev"])
    assert summary["stopped_by"] == "stop_at_step" and summary["steps"] == stop
    assert len((run / "log.jsonl").read_text().splitlines()) == stop
    assert (run / "checkpoints" / f"step-{stop:08d}").is_dir()
    assert resume(run)["steps"] == stop  # the same budget, already spent: no step
    done = resume(run, {"stop_at_step": 0})
    assert done["steps"] == CFG.steps and done["stopped_by"] is None
    assert _weights(run / "weights.safetensors") == _weights(reference / "weights.safetensors")


def test_a_torn_checkpoint_is_skipped(bundles, sentiment_files, reference, tmp_path):
    cfg = replace(CFG, steps=100)
    run = tmp_path / "run"
    train(bundles("llama-classify"), sentiment_files["train"], run, cfg, POLICY, eval_path=sentiment_files["dev"])
    newest, older = sorted((run / "checkpoints").glob("step-*"), reverse=True)[:2]
    w = newest / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])  # torn: the tail never reached the disk
    summary = resume(run)
    assert summary["resumed_from_step"] == int(older.name.split("-")[1])
    short_ref = tmp_path / "ref100"
    train(bundles("llama-classify"), sentiment_files["train"], short_ref, cfg, POLICY,
          eval_path=sentiment_files["dev"])
    assert _weights(run / "weights.safetensors") == _weights(short_ref / "weights.safetensors")


def test_resume_refuses_another_method_or_data_and_names_the_field(bundles, sentiment_files, reference, tmp_path,
                                                                    capsys):
    with pytest.raises(PocketzoError, match=r"--lr 0.01 differs from this run's lr 0.002 \(config.json\)"):
        resume(reference, method_given={"lr": 1e-2})
    with pytest.raises(PocketzoError, match="training data differ"):
        resume(reference, train_path=sentiment_files["dev"])
    assert main(["train", "--resume", str(reference), "--seed", "8", "--quiet"]) == 1
    assert "--seed 8 differs from this run's seed 7" in capsys.readouterr().err
    other = tmp_path / "other"  # not a run of this pocketzo
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"train": CFG.to_json()}))
    with pytest.raises(PocketzoError, match="older pocketzo"):
        resume(other)


def test_replay_cli_rebuilds_the_weights_from_the_binary_log(bundles, reference, tmp_path, capsys):
    for log in ("log.bin", "log.jsonl"):
        out = tmp_path / f"{log}.safetensors"
        assert main(["replay", str(bundles("llama-classify")), str(reference / log), "--out", str(out)]) == 0
        assert _weights(out) == _weights(reference / "weights.safetensors")
    per_step = ((reference / "log.bin").stat().st_size - 8) / CFG.steps
    assert per_step == 55 and 10_000 * per_step < 1_000_000  # a 10,000-step log is under 1 MB


def test_divergence_is_undone_backed_off_logged_and_replayed(bundles, sentiment_files, tmp_path, monkeypatch):
    bad_steps = {12, 13, 30}

    def flaky_trainer(session, method, threads=0, cache=None):
        trainer = make_trainer(session, method, threads, cache)
        original = trainer.evaluator._loss
        trainer.evaluator._loss = lambda plan, point, batch: (float("nan") if plan.step in bad_steps else
                                                              original(plan, point, batch))
        return trainer

    monkeypatch.setattr("pocketzo.zo_trainer.run.make_trainer", flaky_trainer)
    cfg = Method(steps=40, lr=2e-3, batch_size=8, seed=3)
    run = tmp_path / "run"
    summary = train(bundles("llama-classify"), sentiment_files["train"], run, cfg, replace(POLICY, eval_every=0))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["status"] == "undone"] == sorted(bad_steps)
    assert records[14]["lr"] == pytest.approx(cfg.lr * POLICY.lr_backoff**2)  # two back-offs so far
    assert summary["status"] == "completed"
    replayed = replay_run(bundles("llama-classify"), run / "log.bin")
    assert replayed.buffer.tobytes() == FlatParameters.from_bundle(Bundle(bundles("llama-classify")),
                                                                   run / "weights.safetensors").buffer.tobytes()


def _scaled_losses(monkeypatch, factor):
    """Every run's evaluator returns its real losses times ``factor(step)`` (the gradient, if any, unchanged)."""
    def scaled_trainer(session, method, threads=0, cache=None):
        trainer = make_trainer(session, method, threads, cache)
        original = trainer.evaluator.evaluate

        def evaluate(plan, batch):
            e = original(plan, batch)
            return replace(e, losses=tuple(v * factor(plan.step) for v in e.losses))

        trainer.evaluator.evaluate = evaluate
        return trainer

    monkeypatch.setattr("pocketzo.zo_trainer.run.make_trainer", scaled_trainer)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bundle,recipe", [("llama-classify", "zo-sgd"), ("llama-norms-grad", "fo-adamw")])
def test_an_ordinary_hard_batch_after_the_model_fits_is_not_undone(bundle, recipe, bundles, sentiment_files,
                                                                   tmp_path, monkeypatch):
    """Issue 40: the loss falls to near zero (x 0.005 from step 10); step 40's batch is 30x the recent median,
    which the old limit (10x the median of the last 32 losses) undid. It stays under 10x the starting loss."""
    _scaled_losses(monkeypatch, lambda step: 1.0 if step < 10 else 0.15 if step == 40 else 0.005)
    method = Method(**{**RECIPES[recipe], "steps": 50, "batch_size": 8, "seed": 3})
    summary = train(bundles(bundle), sentiment_files["train"], tmp_path / "run", method, replace(POLICY, eval_every=0))
    records = _records(tmp_path / "run")
    losses = [r.loss for r in read_log(tmp_path / "run" / "log.jsonl")]
    assert losses[40] > 10 * np.median(losses[8:40])  # over the old rule's limit: this batch would have been undone
    assert [r["status"] for r in records] == ["ok"] * 50
    assert summary["undone_steps"] == 0 and summary["lr_scale"] == 1.0
    assert len({r["lr"] for r in records}) == 1  # the lr was never backed off


@pytest.mark.parametrize("bundle,recipe", [("llama-classify", "zo-sgd"), ("llama-norms-grad", "fo-adamw")])
@pytest.mark.parametrize("blow_up", [1e3, float("inf")], ids=["x1000", "inf"])
def test_a_real_divergence_after_the_model_fits_is_still_undone(blow_up, bundle, recipe, bundles, sentiment_files,
                                                                 tmp_path, monkeypatch):
    _scaled_losses(monkeypatch, lambda step: 1.0 if step < 10 else blow_up if step == 40 else 0.005)
    method = Method(**{**RECIPES[recipe], "steps": 45, "batch_size": 8, "seed": 3})
    summary = train(bundles(bundle), sentiment_files["train"], tmp_path / "run", method, replace(POLICY, eval_every=0))
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if r["status"] == "undone"] == [40]
    assert summary["undone_steps"] == 1 and summary["lr_scale"] == POLICY.lr_backoff
    assert records[41]["lr"] == pytest.approx(records[39]["lr"] * POLICY.lr_backoff)


def _nan_at(steps: set[int]):
    return lambda step: float("nan") if step in steps else 1.0


def test_the_lr_comes_back_after_enough_good_steps(bundles, sentiment_files, tmp_path, monkeypatch):
    _scaled_losses(monkeypatch, _nan_at({12, 13}))
    policy = replace(POLICY, eval_every=0, lr_recover_steps=5)
    cfg = Method(steps=40, lr=2e-3, batch_size=8, seed=3)
    summary = train(bundles("llama-classify"), sentiment_files["train"], tmp_path / "run", cfg, policy)
    lrs = [r["lr"] / cfg.lr for r in _records(tmp_path / "run")]
    # two back-offs (steps 12, 13), each taken back after 5 good steps (14-18, 19-23)
    assert lrs[:12] == [1.0] * 12 and lrs[14:19] == [0.25] * 5 and lrs[19:24] == [0.5] * 5 and lrs[24:] == [1.0] * 16
    assert summary["lr_scale"] == 1.0 and summary["undone_steps"] == 2


def test_a_run_resumed_while_its_lr_recovers_ends_bit_identical(bundles, sentiment_files, tmp_path, monkeypatch):
    _scaled_losses(monkeypatch, _nan_at({12}))
    policy = replace(POLICY, eval_every=0, checkpoint_every=0, lr_recover_steps=10)
    cfg = Method(steps=40, lr=2e-3, batch_size=8, seed=3)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(bundles("llama-classify"), sentiment_files["train"], whole, cfg, policy)
    train(bundles("llama-classify"), sentiment_files["train"], cut, cfg, replace(policy, stop_at_step=17))
    state = json.loads(next((cut / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["good_steps"] == 4 and state["lr_scale"] == 0.5  # steps 13-16, in the middle of the recovery
    resume(cut, {"stop_at_step": 0})
    untimed = [[json.dumps({k: v for k, v in r.items() if "seconds" not in k}) for r in _records(run)]
               for run in (whole, cut)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 40
    assert _weights(cut / "weights.safetensors") == _weights(whole / "weights.safetensors")


def test_an_undone_step_restores_the_weights_to_float32_rounding(bundles, sentiment_files):
    from pocketzo.runtime import SessionConfig, TrainingSession
    from pocketzo.runtime.data import TextEncoder

    bundle = Bundle(bundles("llama-classify"))
    batch = TextEncoder(bundle).dataset(sentiment_files["train"]).batch(range(8))
    session = TrainingSession(bundle, SessionConfig(threads=1))
    before = session.params.buffer.copy()
    trainer = make_trainer(session, Method(steps=1))
    record = trainer.step(0, batch, loss_limit=-1.0)  # every loss "explodes"
    trainer.close()
    assert record.status == "undone" and record.directions[0].grad is None
    np.testing.assert_allclose(session.params.buffer, before, rtol=0, atol=4 * np.finfo(np.float32).eps)


def test_repeated_divergence_stops_the_run_without_saving_weights(bundles, sentiment_files, tmp_path, monkeypatch):
    def exploding_trainer(session, method, threads=0, cache=None):
        trainer = make_trainer(session, method, threads, cache)
        trainer.evaluator._loss = lambda plan, point, batch: float("inf")
        return trainer

    monkeypatch.setattr("pocketzo.zo_trainer.run.make_trainer", exploding_trainer)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="5 consecutive steps"):
        train(bundles("llama-norms"), sentiment_files["train"], run, Method(steps=20), POLICY)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 5
    assert not (run / "weights.safetensors").exists()


def test_memory_guard_refuses_before_touching_the_run_directory(bundles, sentiment_files, tmp_path):
    with pytest.raises(PocketzoError, match=r"needs about [\d,]+ MB .* more than --memory-budget 20M"):
        train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", Method(steps=2),
              replace(POLICY, memory_budget="20M"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory) -> Path:
    """A llama whose 120k-row embedding (15M weights, 61 MB) is trainable: optimizer state is large here."""
    import torch
    from conftest import LABELS, TEMPLATE, _tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocketzo.export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=120_000, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True, pad_token_id=0)).save_pretrained(root / "model")
    _tokenizer(False).save_pretrained(root / "model")
    export_bundle(root / "model", root / "bundle", ExportConfig(task="classify", template=TEMPLATE, labels=LABELS,
                                                                trainable="embed_tokens", max_length=32))
    return root / "bundle"


@pytest.mark.parametrize("flags", [["--momentum", "0.9"], []], ids=["momentum", "plain"])
def test_memory_estimate_is_within_15_percent_of_the_measured_peak(flags, wide_bundle, sentiment_files, tmp_path):
    """The estimate (RSS after a probe forward + what the trainer allocates) against the peak RSS of the whole
    run, in a fresh process. Momentum adds 61 MB, a quarter of the run: an estimate without it was 32 % low.
    Measured 2026-12-01: 235 vs 253 MB with momentum, 172 vs 191 MB without (ONNX Runtime's arena grows by a
    pattern per new batch shape, which one probe does not see)."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pocketzo", "train", str(wide_bundle), "--data",
                           str(sentiment_files["train"]), "--out", str(run), "--steps", "3", "--recipe", "zo-sgd",
                           "--threads", "1", "--memory-budget", "64G", "--quiet", *flags],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    estimate, peak = summary["memory_check"]["estimated_peak_mb"], summary["peak_rss_mb"]
    assert summary["memory_check"]["trainer_mb"] >= (61 if flags else 0)
    assert abs(estimate - peak) <= 0.15 * peak, (estimate, peak)


def test_no_code_execution_from_data():
    """No pickle, eval/exec or trust_remote_code anywhere in the package."""
    pattern = re.compile(r"\bpickle\b|\bcPickle\b|(?<![\w.])eval\(|(?<![\w.])exec\(|trust_remote_code|torch\.load\(")
    package = Path(__file__).resolve().parents[1] / "pocketzo"
    hits = [f"{p.relative_to(package.parent)}:{i}: {line.strip()}"
            for p in sorted(package.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []
    assert pattern.search("x = eval(s)") and pattern.search("pickle.loads(b)")  # the check can fail
