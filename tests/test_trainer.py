"""ZO-SGD: estimator vs autograd, a golden step, replay, schedules, sampler, divergence, the stall check."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import EXPORTS

from pocketzo.errors import PocketzoError, TrainingError
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession
from pocketzo.runtime.data import TextEncoder
from pocketzo.zo_trainer import BatchSampler, Method, RunPolicy, read_log, replay, replay_run, train
from pocketzo.zo_trainer.monitor import RunMonitor
from pocketzo.zo_trainer.trainer import DirectionRecord, StepRecord, make_trainer

QUIET = RunPolicy(progress=False)


def _session_and_batch(bundles, files, name="llama-norms", n=8):
    bundle = Bundle(bundles(name))
    data = TextEncoder(bundle).dataset(files["train"])
    return TrainingSession(bundle, SessionConfig(threads=1)), data.batch(range(n))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_estimator_points_along_autograd_gradient(distribution, bundles, tiny_models, sentiment_files):
    session, batch = _session_and_batch(bundles, sentiment_files)
    trainer = make_trainer(session, Method(steps=1, lr=0.0, eps=1e-3, perturbation=distribution))
    estimate = np.zeros(session.params.buffer.shape, np.float64)
    n = 1500
    for step in range(n):
        d = trainer.step(step, batch).directions[0]
        estimate += d.grad * trainer.evaluator.perturber.noise(d.seed)
    estimate /= n

    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_models[EXPORTS["llama-norms"][0]], attn_implementation="eager")
    logits = net(input_ids=torch.from_numpy(batch.input_ids),
                 attention_mask=torch.from_numpy(batch.attention_mask)).logits
    answer = logits[torch.arange(len(batch.labels)), torch.from_numpy(batch.attention_mask).sum(1) - 1]
    scores = answer[:, list(session.bundle.task.label_token_ids)]
    torch.nn.functional.cross_entropy(scores, torch.from_numpy(batch.labels)).backward()
    params = dict(net.named_parameters())
    true = np.zeros_like(estimate)
    for s in session.bundle.manifest.trainable:
        true[s.offset : s.offset + s.numel] = params[s.name].grad.numpy().ravel()
    cosine = estimate @ true / (np.linalg.norm(estimate) * np.linalg.norm(true))
    assert cosine >= 0.9


def test_one_step_matches_float64_reference(bundles, sentiment_files):
    session, batch = _session_and_batch(bundles, sentiment_files)
    theta = session.params.buffer.astype(np.float64)
    cfg = Method(steps=1, lr=0.05, eps=1e-2, perturbation="gaussian")
    trainer = make_trainer(session, cfg)
    record = trainer.step(0, batch).directions[0]
    trainer.sync()  # the update is deferred to the next step's first pass
    z = trainer.evaluator.perturber.noise(record.seed).astype(np.float64)

    def loss_at(values):
        p = FlatParameters(session.params.specs, len(values))
        p.buffer[:] = values
        s = TrainingSession(session.bundle, SessionConfig(threads=1), p)
        return float(s.run(batch.input_ids, batch.attention_mask, batch.labels)["loss"])

    g_ref = (loss_at(theta + cfg.eps * z) - loss_at(theta - cfg.eps * z)) / (2 * cfg.eps)
    assert abs(record.grad - g_ref) <= 1e-3 * max(1.0, abs(g_ref))
    np.testing.assert_allclose(session.params.buffer, theta - cfg.lr * record.grad * z, rtol=0, atol=1e-5)


def test_weight_decay_applies_to_matrices_only(bundles, sentiment_files):
    """Golden check of the fused update with decay: d*theta - lr*g*z on matrices, theta - lr*g*z elsewhere."""
    session, batch = _session_and_batch(bundles, sentiment_files, name="llama-classify")
    theta = session.params.buffer.astype(np.float64)
    cfg = Method(steps=1, lr=0.05, eps=1e-3, weight_decay=0.2)
    trainer = make_trainer(session, cfg)
    record = trainer.step(0, batch).directions[0]
    trainer.sync()
    z = trainer.evaluator.perturber.noise(record.seed).astype(np.float64)
    want = theta - cfg.lr * record.grad * z
    decayed = 0
    for s in session.bundle.manifest.trainable:
        if s.decay:
            sl = slice(s.offset, s.offset + s.numel)
            want[sl] -= cfg.lr * cfg.weight_decay * theta[sl]
            decayed += s.numel
    assert 0 < decayed < session.params.numel  # both kinds of tensor are present
    np.testing.assert_allclose(session.params.buffer, want, rtol=0, atol=1e-5)


def test_training_reduces_loss_on_a_tiny_task(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=200, lr=2e-3, eps=1e-3, batch_size=16, seed=3)
    summary = train(bundles("llama-classify"), sentiment_files["train"], tmp_path / "run", cfg,
                    eval_path=sentiment_files["dev"], policy=QUIET)
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 0.2
    assert summary["final_accuracy"] > 0.8
    assert summary["forward_passes"] == 400
    assert summary["warnings"] == []  # the loss moved: no stall warning


def test_a_run_whose_loss_does_not_move_is_warned_about(bundles, sentiment_files, tmp_path, capsys):
    cfg = Method(steps=100, lr=1e-9, eps=1e-3, batch_size=8, seed=3)
    summary = train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", cfg, policy=QUIET)
    assert len(summary["warnings"]) == 1 and "raise --lr (now 1e-09; try 1e-08)" in summary["warnings"][0]
    assert "warning: after 50 steps the training loss has not decreased" in capsys.readouterr().err


def _old_stall_rule(losses: list[float]) -> bool:
    """The stall rule before the trend test: the first and last 20 steps' means within 2 standard errors."""
    first, last = losses[:20], losses[-20:]
    noise = np.sqrt((np.var(first, ddof=1) + np.var(last, ddof=1)) / 20)
    return np.mean(first) - np.mean(last) <= 2 * noise


def _monitor_with(losses: list[float]) -> RunMonitor:
    monitor = RunMonitor(Method(steps=400), spike_factor=0)
    for i, loss in enumerate(losses):
        monitor.remember(StepRecord(i, 1e-4, 1e-3, (DirectionRecord(1, 0.0, loss, loss),)))
    return monitor


def test_the_trend_test_tells_slow_progress_from_a_stall():
    """200 noisy 100-step losses (batch noise 0.03): falling by 0.03 over the window, the trend test calls
    fewer of them stalls than the old window rule did; flat, it warns about nearly all of them."""
    def warned(slope: float, seed: int) -> tuple[bool, bool]:
        losses = list(0.47 - slope * np.arange(100) + np.random.default_rng(seed).normal(0, 0.03, 100))
        return _old_stall_rule(losses), _monitor_with(losses).stall_warning(100, []) is not None

    falling = np.array([warned(3e-4, seed) for seed in range(200)]).mean(axis=0)
    assert falling[1] <= 0.2 and falling[1] < falling[0] - 0.05, falling
    flat = np.array([warned(0.0, seed) for seed in range(200)]).mean(axis=0)
    assert flat[1] >= 0.95, flat
    assert "training loss has not decreased" in _monitor_with([0.47] * 99 + [0.48]).stall_warning(100, [])


def test_the_stall_check_trusts_the_dev_evaluation():
    """make demo's case: a flat-looking training loss while dev accuracy rises is a run that learns."""
    rng = np.random.default_rng(1)
    flat = list(0.47 + rng.normal(0, 0.03, 100))
    monitor = _monitor_with(flat)
    learning = [{"step": 0, "loss": 0.50, "accuracy": 0.766}, {"step": 100, "loss": 0.51, "accuracy": 0.818}]
    assert monitor.stall_warning(100, learning) is None
    stuck = [{"step": 0, "loss": 0.50, "accuracy": 0.766}, {"step": 100, "loss": 0.50, "accuracy": 0.766}]
    assert "dev loss has not decreased (0.5 at step 0, 0.5 at step 100)" in monitor.stall_warning(100, stuck)
    assert monitor.stall_warning(99, stuck) is None  # only at the check's step


def test_zero_steps_evaluate_once(bundles, sentiment_files, tmp_path):
    summary = train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", Method(steps=0),
                    policy=QUIET, eval_path=sentiment_files["dev"])
    assert len(summary["evals"]) == 1
    assert summary["final_eval"] == {k: v for k, v in summary["initial_eval"].items() if k != "step"}
    assert summary["eval_forward_passes"] == 2  # 64 dev rows in batches of 32, once


@pytest.mark.parametrize("perturbation", ["rademacher", "gaussian"])
def test_replay_from_log_is_bit_identical(perturbation, bundles, sentiment_files, tmp_path):
    cfg = Method(steps=40, lr=2e-3, eps=1e-3, batch_size=8, seed=5, weight_decay=0.1, schedule="cosine",
                 warmup_steps=5, perturbation=perturbation)
    # evaluations mid-run sync the deferred update at steps 15 and 30: replay must not depend on it
    train(bundles("llama-classify"), sentiment_files["train"], tmp_path / "run", cfg,
          RunPolicy(threads=2, eval_every=15, progress=False), eval_path=sentiment_files["dev"])
    bundle = Bundle(bundles("llama-classify"))
    initial = FlatParameters.from_bundle(bundle).buffer
    trained = FlatParameters.from_bundle(bundle, tmp_path / "run" / "weights.safetensors")
    assert not np.array_equal(trained.buffer, initial)
    # from the run directory alone (config.json + log.jsonl), with a different thread count
    assert replay_run(bundle.path, tmp_path / "run").buffer.tobytes() == trained.buffer.tobytes()
    params = FlatParameters.from_bundle(bundle)
    replay(params, cfg, read_log(tmp_path / "run" / "log.jsonl"))
    assert params.buffer.tobytes() == trained.buffer.tobytes()


def test_replay_refuses_gaussian_noise_of_another_version(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=2, perturbation="gaussian")
    train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", cfg, policy=QUIET)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["method"]["version"] = 2
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PocketzoError, match="method version 2"):
        replay_run(bundles("llama-norms"), tmp_path / "run")


def test_replay_refuses_an_incomplete_log(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=5, lr=1e-3)
    train(bundles("llama-norms"), sentiment_files["train"], tmp_path / "run", cfg, policy=QUIET)
    log = tmp_path / "run" / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "".join(lines[2:]))
    with pytest.raises(PocketzoError, match="log.jsonl: record 1 is step 2"):
        replay_run(bundles("llama-norms"), tmp_path / "run")


def test_a_diverged_run_records_failure_and_keeps_no_weights(bundles, sentiment_files, tmp_path):
    bundle = Bundle(bundles("llama-norms"))
    broken = tmp_path / "bundle"
    shutil.copytree(bundle.path, broken)
    params = FlatParameters.from_bundle(bundle)
    params.buffer[:] = np.nan
    params.save(broken / "trainable.safetensors")
    with pytest.raises(TrainingError, match="5 consecutive steps"):
        train(broken, sentiment_files["train"], tmp_path / "run", Method(steps=30), policy=QUIET)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 5 and "consecutive" in summary["error"]
    assert not (tmp_path / "run" / "weights.safetensors").exists()


def test_same_seed_same_run(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=20, lr=1e-3, eps=1e-3, seed=11)
    runs = [train(bundles("llama-norms"), sentiment_files["train"], tmp_path / f"r{i}", cfg, policy=QUIET)
            for i in range(2)]
    logs = [(tmp_path / f"r{i}" / "log.jsonl").read_text().splitlines() for i in range(2)]
    strip = [[line.split(', "seconds"', 1)[0] for line in log] for log in logs]
    assert strip[0][0] != logs[0][0]  # the timings were cut off
    assert strip[0] == strip[1] and runs[0]["steps"] == 20
    w = [(tmp_path / f"r{i}" / "weights.safetensors").read_bytes() for i in range(2)]
    assert w[0] == w[1]


def test_non_finite_loss_undoes_the_step(bundles, sentiment_files):
    session, batch = _session_and_batch(bundles, sentiment_files)
    session.params.buffer[0] = np.inf
    before = session.params.buffer.copy()
    trainer = make_trainer(session, Method(steps=1))
    record = trainer.step(0, batch).directions[0]
    trainer.close()
    assert record.grad is None
    finite = np.isfinite(before)
    np.testing.assert_allclose(session.params.buffer[finite], before[finite], atol=1e-6)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5]),  # decays to 0 over the 4 steps after warm-up
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5]),
])
def test_lr_schedules(schedule, expected):
    cfg = Method(steps=6, lr=1.0, schedule=schedule, warmup_steps=2)
    np.testing.assert_allclose([cfg.lr_at(s) for s in range(5)], expected)


def test_inverse_time_holds_then_falls_without_a_horizon():
    cfg = Method(steps=10, lr=1.0, schedule="inverse-time", hold_steps=4)
    np.testing.assert_allclose([cfg.lr_at(s) for s in (0, 3, 4, 15, 99)], [1, 1, 0.8, 0.25, 0.04])
    assert cfg.lr_at(10_000) > 0  # past --steps it goes on falling, never to 0 (the run's length is not used)
    assert replace(cfg, steps=1000).lr_at(99) == cfg.lr_at(99)
    with pytest.raises(ValueError, match="inverse-time needs --hold-steps"):
        Method(steps=10, schedule="inverse-time")


def test_sampler_is_seeded_and_covers_each_epoch():
    s = BatchSampler(10, 4, seed=1)
    first_epoch = np.concatenate([s.indices(0), s.indices(1), s.indices(2)[:2]])
    assert sorted(first_epoch) == list(range(10))
    np.testing.assert_array_equal(s.indices(5), BatchSampler(10, 4, seed=1).indices(5))
    assert not np.array_equal(s.indices(0), BatchSampler(10, 4, seed=2).indices(0))


@pytest.mark.parametrize("bad", [dict(eps=0.0), dict(lr=-1.0), dict(batch_size=0), dict(perturbation="uniform"),
                                 dict(weight_decay=1.5), dict(steps=-1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        Method(**{"steps": 1, **bad})
