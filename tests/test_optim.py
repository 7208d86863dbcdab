"""Estimators and update rules (zo_trainer.estimators, .updates): bias against autograd, loss reduction,
memory, noise generations per step, and bit-exact replay and resume with optimizer state."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import resume_without_the_newest_checkpoint

from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.manifest import layout
from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer import Method, RunPolicy, make_trainer, replay_run, train
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS
from pocketzo.zo_trainer.recipes import RECIPES
from pocketzo.zo_trainer.trainer import Trainer, build_trainer
from pocketzo.zo_trainer.updates import State, state_bytes

QUIET = RunPolicy(progress=False)


def sequential(params: FlatParameters, method: Method, loss, threads: int = 1) -> Trainer:
    """A sequential trainer whose forward pass is ``loss()`` of the buffer's current contents."""
    return build_trainer(params, 1, method, threads, lambda plan, point, batch: loss())


class TinyMLP:
    """A 4 -> 3 -> 2 softmax classifier on fixed data; its 23 weights live in a FlatParameters."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 2, (32,), generator=g)
        specs, n = layout([("w1", (3, 4), True), ("b1", (3,), False), ("w2", (2, 3), True), ("b2", (2,), False)])
        self.params = FlatParameters(specs, n)
        for view in self.params.views.values():
            view[...] = torch.randn(view.shape, generator=g).numpy() * 0.5

    def _loss(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(self.x @ t["w1"].T + t["b1"])
        return torch.nn.functional.cross_entropy(h @ t["w2"].T + t["b2"], self.y)

    def loss(self, _batch=None) -> float:
        with torch.no_grad():
            return float(self._loss({k: torch.from_numpy(v.astype(np.float64)) for k, v in
                                     self.params.views.items()}))

    def gradient(self) -> np.ndarray:
        t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in self.params.views.items()}
        self._loss(t).backward()
        flat = np.zeros_like(self.params.buffer, dtype=np.float64)
        for s in self.params.specs:
            flat[s.offset : s.offset + s.numel] = t[s.name].grad.numpy().ravel()
        return flat

    def trainer(self, config: Method) -> Trainer:
        return sequential(self.params, config, self.loss)


def mean_estimate(model: TinyMLP, config: Method, n: int) -> np.ndarray:
    """The average over n seeds of one step's estimate e (read off a step with lr 1: theta0 - theta1)."""
    theta0 = model.params.buffer.copy()
    trainer = model.trainer(config)
    total = np.zeros_like(theta0, dtype=np.float64)
    for k in range(n):
        trainer.step(k, None, lr=1.0)
        trainer.sync()
        total += theta0 - model.params.buffer
        model.params.buffer[...] = theta0
    trainer.close()
    return total / n


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Over the 23 weights (the buffer's alignment padding is perturbed too, but is no weight).
    The mean of n single-direction estimates has a relative error of about sqrt(23 / n) ~ 0.08."""
    real = np.concatenate([np.arange(a, b) for a, b in TinyMLP().params.segments()])
    return float(np.linalg.norm(got[real] - want[real]) / np.linalg.norm(want[real]))


@pytest.mark.parametrize("fields", [
    dict(perturbation="gaussian"),
    dict(perturbation="rademacher"),
    dict(perturbation="rademacher", directions=4),
    dict(perturbation="gaussian", estimator="one-sided", directions=4),
    dict(perturbation="rademacher", estimator="one-sided", directions=4),
], ids=["gaussian", "rademacher", "q4", "one-sided-gaussian", "one-sided-rademacher"])
def test_estimators_are_unbiased_against_autograd(fields):
    """E[e] = grad L: two-sided to O(eps^2); one-sided too for symmetric z (E[z z^T H z] = 0), with more variance."""
    model = TinyMLP()
    want = model.gradient()
    got = mean_estimate(model, Method(steps=1, eps=1e-3, **fields), 4000)
    assert relative_error(got, want) < 0.2
    # and a statistic that could fail: a wrong sign or scale would be far off
    assert float(got @ want / (want @ want)) == pytest.approx(1.0, abs=0.1)
    assert relative_error(-got, want) > 1.5 and relative_error(got / 2, want) > 0.4  # the bound can fail


def test_sparse_estimate_is_the_gradient_of_the_perturbed_weights():
    """Documented bias: E[e] = mask * grad L; the fixed weights never move."""
    model = TinyMLP()
    want = model.gradient()
    cfg = Method(steps=1, eps=1e-3, sparsity=0.5)
    mask = State.initial(model.params, cfg, 1).sigma
    got = mean_estimate(model, cfg, 4000)
    assert mask.sum() == sum(max(1, round(s.numel / 2)) for s in model.params.specs)
    assert np.all(got[mask == 0] == 0)
    assert relative_error(got, mask * want) < 0.2


def test_direction_scale_preconditions_the_estimate():
    """With directions sigma * z, E[e] = sigma^2 * grad L (curvature's preconditioning; documented bias)."""
    model = TinyMLP()
    want = model.gradient()
    cfg = Method(steps=1, eps=1e-3, perturbation="gaussian", curvature=1e-12)
    trainer = model.trainer(cfg)
    sigma = np.random.default_rng(0).uniform(0.5, 2.0, trainer.state.sigma.shape).astype(np.float32)
    theta0 = model.params.buffer.copy()
    total = np.zeros_like(theta0, dtype=np.float64)
    n = 4000
    for k in range(n):
        trainer.state.sigma[...] = sigma  # alpha = 1e-12 leaves it unchanged in float32 anyway
        trainer.step(k, None, lr=1.0)
        trainer.sync()
        total += theta0 - model.params.buffer
        model.params.buffer[...] = theta0
    assert relative_error(total / n, sigma.astype(np.float64) ** 2 * want) < 0.2


def test_curvature_shrinks_directions_where_the_loss_is_curved():
    """On a loss with per-coordinate curvature 100 and 1, sigma ends smaller on the curved half."""
    specs, n = layout([("w", (16,), False)])
    params = FlatParameters(specs, n)
    params.buffer[:16] = 0.5
    curv = np.r_[np.full(8, 100.0), np.ones(8)]
    trainer = sequential(params, Method(steps=1, eps=1e-2, lr=1e-4, perturbation="gaussian", curvature=0.05),
                         lambda: float(0.5 * np.sum(curv * params.buffer[:16].astype(np.float64) ** 2)))
    for k in range(300):
        trainer.step(k, None)
    sigma = trainer.state.sigma[:16]
    assert sigma[:8].mean() < 0.5 * sigma[8:].mean()


@pytest.mark.parametrize("fields", [
    dict(),
    dict(directions=4),
    dict(estimator="one-sided", directions=4),
    dict(momentum=0.9),
    dict(adaptive=True, lr=2e-2),
    dict(sign=True, lr=1e-2),
    dict(momentum=0.9, adaptive=True, lr=2e-2),
    dict(sparsity=0.5),
    dict(perturbation="gaussian", curvature=1e-3),
    dict(eps_end=1e-4, schedule="linear"),
    dict(estimator="one-sided", directions=4, normalize=True, lr=2e-2),
], ids=["sgd", "q4", "one-sided", "momentum", "adaptive", "sign", "adam", "sparse", "curvature", "eps-decay", "fzoo"])
def test_each_update_rule_reduces_the_loss(fields):
    model = TinyMLP(seed=1)
    cfg = Method(**{"steps": 400, "lr": 0.2, "eps": 1e-3, **fields})
    before = model.loss()
    trainer = model.trainer(cfg)
    for k in range(cfg.steps):
        trainer.step(k, None)
    trainer.close()
    assert np.isfinite(model.params.buffer).all()
    assert model.loss() < 0.7 * before


@pytest.mark.parametrize("fields, arrays, scratch_per_thread", [
    (dict(), 0, 0),
    (dict(directions=4, estimator="one-sided"), 0, 0),
    (dict(momentum=0.9), 1, 1),
    (dict(adaptive=True), 0, 0),
    (dict(sign=True), 0, 0),
    (dict(sign=True, directions=2), 0, 1),
    (dict(sparsity=0.5), 1, 0),
    (dict(perturbation="gaussian", curvature=1e-3), 1, 2),
    (dict(momentum=0.9, sparsity=0.5), 2, 1),
    (dict(directions=4, estimator="one-sided", normalize=True), 0, 0),
], ids=["plain", "one-sided-q4", "momentum", "adaptive", "sign", "sign-q2", "sparse", "curvature", "momentum+sparse",
        "fzoo"])
def test_memory_overhead_matches_the_docstring(fields, arrays, scratch_per_thread):
    """updates' table: n float32 per state array, one chunk of scratch per thread for a per-weight update
    (two with curvature); measured with tracemalloc while the trainer is built, beyond a plain trainer's."""
    threads, n = 2, 3 * CHUNK_ELEMENTS
    specs, size = layout([("w", (n,), False)])
    params = FlatParameters(specs, size)
    params.buffer[:] = np.linspace(-1, 1, size, dtype=np.float32)
    expected = 4 * (arrays * size + scratch_per_thread * threads * CHUNK_ELEMENTS)

    def built(cfg: Method) -> tuple[int, int]:
        tracemalloc.start()
        trainer = sequential(params, cfg, lambda: 0.0, threads)
        size_now = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        trainer.close()
        return size_now, trainer.state.extra_bytes

    plain, _ = built(Method(steps=1))
    traced, reported = built(Method(steps=1, **fields))
    assert reported == expected == state_bytes(Method(steps=1, **fields), size, threads)
    assert abs((traced - plain) - expected) < 64 * 1024  # Python objects aside


@pytest.mark.parametrize("fields, generations", [
    (dict(), 3),  # plain ZO-SGD: +eps z (fused with the last update), -2 eps z, restore + update fused
    (RECIPES["best"], 3),  # a scalar second moment only rescales the step: no more than ZO-SGD
    (dict(sign=True), 3),
    (dict(sparsity=0.5), 3),
    (dict(adaptive=True, weight_decay=0.1), 3),
    (dict(momentum=0.9), 4),  # a per-weight update regenerates z once more
    (dict(directions=2), 7),  # z_1 update, z_2 restore+update, +eps z_1 | -2eps z_1 | z_1 back, +eps z_2 | -2eps z_2
    (dict(estimator="one-sided", directions=2), 5),  # z_1 update, z_2 restore+update | +eps z_1 | z_1 back, z_2
], ids=["zo-sgd", "default-recipe", "sign", "sparse", "adaptive-decay", "momentum", "q2", "one-sided-q2"])
def test_noise_generations_per_step(fields, generations, monkeypatch):
    """How often a step draws z (each draw is the noise pass's main cost), counted over 10 steady steps."""
    import pocketzo.zo_trainer.noise as noise
    import pocketzo.zo_trainer.updates as updates

    calls = {"n": 0}
    original = noise.fill_noise

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(noise, "fill_noise", counting)
    monkeypatch.setattr(updates, "fill_noise", counting)
    model = TinyMLP()  # 23 weights: one chunk, so draws = generations
    trainer = model.trainer(Method(**{"steps": 20, "lr": 1e-2, **fields}))
    trainer.step(0, None)
    calls["n"] = 0
    for k in range(1, 11):
        trainer.step(k, None)
    assert calls["n"] == 10 * generations


STATEFUL = Method(steps=24, lr=2e-3, eps=1e-3, batch_size=8, seed=7, estimator="one-sided", directions=2,
                  momentum=0.9, adaptive=True, sparsity=0.5, eps_end=2e-4, schedule="linear")


@pytest.mark.parametrize("cfg", [STATEFUL, Method(steps=16, lr=2e-3, eps=1e-3, batch_size=8, seed=7, directions=2,
                                                  perturbation="gaussian", curvature=1e-3, sign=True)],
                         ids=["one-sided-adam-sparse-q2", "curvature-sign-q2"])
def test_stateful_runs_replay_and_resume_bit_for_bit(cfg, bundles, sentiment_files, tmp_path):
    bundle = bundles("llama-norms")
    train(bundle, sentiment_files["train"], tmp_path / "ref", cfg, QUIET)
    weights = FlatParameters.from_bundle(Bundle(bundle), tmp_path / "ref" / "weights.safetensors").buffer
    assert not np.array_equal(weights, FlatParameters.from_bundle(Bundle(bundle)).buffer)
    assert replay_run(bundle, tmp_path / "ref").buffer.tobytes() == weights.tobytes()
    # a run with checkpoints, whose newest checkpoint is lost: it resumes from an older one and cuts both
    # logs back to it (with q = 2 directions log.bin was once cut to the length of a one-direction log)
    run = tmp_path / "run"
    resumed, _ = resume_without_the_newest_checkpoint(  # the policy may change on resume
        bundle, sentiment_files["train"], run, cfg, replace(QUIET, checkpoint_every=cfg.steps // 4, keep_checkpoints=4),
        changes={"threads": 2})
    assert (sorted((run / "checkpoints").glob("step-*"))[-2] / "momentum.npy").is_file() or cfg.momentum == 0
    assert resumed.tobytes() == weights.tobytes()
    assert (run / "log.bin").read_bytes() == (tmp_path / "ref" / "log.bin").read_bytes()
    assert replay_run(bundle, run / "log.bin").buffer.tobytes() == weights.tobytes()


def test_normalize_divides_the_step_by_the_spread_of_the_directions():
    """FZOO's rule: the step is lr x g_j / std(g) per direction, so scaling every loss difference (a loss
    measured in other units) leaves the update unchanged, where a plain step would scale with it."""
    from pocketzo.zo_trainer.estimators import Estimate
    from pocketzo.zo_trainer.updates import UpdateRule

    specs, n = layout([("w", (8,), False)])
    params = FlatParameters(specs, n)
    rule = UpdateRule(Method(steps=1, lr=0.1, estimator="one-sided", directions=2, normalize=True), params, 1)
    coefs = [t.coef for t in rule.ops(Estimate((11, 12), (1.0, 3.0)), 0.1)]  # std(1, 3) = 1
    assert coefs == pytest.approx([-0.1 * 1.0 / 2, -0.1 * 3.0 / 2], rel=1e-6)
    scaled = [t.coef for t in rule.ops(Estimate((11, 12), (10.0, 30.0)), 0.1)]
    assert scaled == pytest.approx(coefs, rel=1e-6)


def test_options_that_cannot_compose_are_refused():
    for bad in (dict(curvature=1e-3), dict(curvature=1e-3, perturbation="gaussian", estimator="one-sided"),
                dict(momentum=0.9, weight_decay=0.1), dict(eps_end=1.0), dict(directions=0), dict(sparsity=1.0),
                dict(normalize=True), dict(normalize=True, directions=4, adaptive=True),
                dict(method="hybrid", normalize=True, directions=2, optimizer="adamw")):
        with pytest.raises(ValueError):
            Method(steps=1, **bad)


def test_slotted_trainer_takes_update_rules(bundles, sentiment_files):
    from pocketzo.runtime import SessionConfig, TrainingSession
    from pocketzo.runtime.data import TextEncoder

    bundle = Bundle(bundles("llama-lora-slots"))
    batch = TextEncoder(bundle).dataset(sentiment_files["train"]).batch(range(8))
    session = TrainingSession(bundle, SessionConfig(threads=1))
    trainer = make_trainer(session, Method(steps=2, lr=1e-2, momentum=0.9, adaptive=True))
    trainer.step(0, batch)
    assert trainer.state.t == 1 and np.any(trainer.state.momentum != 0)
    with pytest.raises(ValueError, match="6 points, more than the bundle's 4 perturbation slots"):
        make_trainer(session, Method(steps=1, directions=3))
    one_sided = make_trainer(session, Method(steps=1, lr=1e-2, estimator="one-sided"))  # L(theta) + 3 directions
    record = one_sided.step(0, batch)
    assert len(record.directions) == 3 and record.loss_theta is not None
    assert all(d.loss_minus is None for d in record.directions)

