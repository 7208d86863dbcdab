"""ZO-SGD (MeZO) on the flat buffer: two forward passes and two memory passes per step.

    theta += eps z_k                 -> L+    (one pass, fused with step k-1's update)
    theta -= 2 eps z_k               -> L-    (one pass)
    g = (L+ - L-) / (2 eps)
    theta += (eps - lr g) z_k        restore and update, deferred: applied in the same pass as
                                     step k+1's +eps z_{k+1}, or by ``sync()``
             (with decay d = 1 - lr wd on matrices: theta = d theta + (d eps - lr g) z_k)

z is regenerated from the step seed each time (see ``noise``). A step is fully described by
its seed and g, so initial weights + the log rebuild the final weights bit for bit (``replay``):
a fused pass does per element exactly the float32 operations of separate passes.

A step whose L+ or L- is non-finite or above ``loss_limit`` is *undone*: theta += eps z puts the
perturbation back (the same noise, regenerated), no update is applied, and the record says
``status: "undone"``. Replay repeats exactly those passes, so undone steps replay bit for bit.

A bundle with perturbation slots (P > 1) is trained by ``SlottedZOTrainer``: q = P/2 directions
per step, all 2q perturbed losses from ONE session run. Both trainers' ``step`` return one
record per direction.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from pocketzo.runtime.bundle import layout
from pocketzo.runtime.data import Batch
from pocketzo.runtime.session import FlatParameters, TrainingSession
from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.noise import Perturber, Term


def step_seed(run_seed: int, step: int, direction: int = 0) -> int:
    """The noise seed of ``step`` (and ``direction``): a 63-bit integer derived from the run seed."""
    key = [run_seed, step] if direction == 0 else [run_seed, step, direction]
    state = np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
    return int(state) >> 1


@dataclass(frozen=True)
class StepRecord:
    step: int
    seed: int
    grad: float  # projected gradient estimate g
    lr: float
    eps: float
    loss_plus: float
    loss_minus: float
    seconds: float  # the whole step
    forward_seconds: float = 0.0  # of which in the two forward passes (the rest is the noise passes)
    status: str = "ok"  # "undone": a non-finite or exploding loss; the perturbation was removed, no update
    direction: int = 0  # the direction's index within its step (perturbation slots: q = P/2 per step)

    def to_json(self) -> dict:
        return asdict(self)


def _update_term(seed: int, eps: float, lr: float, grad: float, weight_decay: float) -> Term:
    """Restore theta from theta - eps z and apply the SGD update (and decay) in one term."""
    d = 1.0 - lr * weight_decay
    return Term(seed, eps - lr * grad, decay_factor=d, decay_coef=d * eps - lr * grad)


class ZOTrainer:
    """Owns the perturber over a session's flat buffer and runs ZO-SGD steps.

    Between steps the buffer holds theta - eps z of the last step (its update is pending):
    call ``sync()`` before reading the weights (evaluation, saving). ``close()`` syncs.
    """

    def __init__(self, session: TrainingSession, config: TrainConfig):
        self.session = session
        self.config = config
        self.perturber = _perturber(session.params, config)
        self._pending: tuple[Term, ...] = ()

    def sync(self) -> None:
        """Apply the pending update, so that the buffer holds the current weights."""
        self.perturber.apply(*self._pending)
        self._pending = ()

    def close(self) -> None:
        self.sync()
        self.perturber.close()

    def _loss(self, batch: Batch) -> float:
        return float(self.session.run(batch.input_ids, batch.attention_mask, batch.labels)["loss"])

    def step(self, step: int, batch: Batch, lr_scale: float = 1.0,
             loss_limit: float = math.inf) -> list[StepRecord]:
        """One two-sided ZO-SGD step; ``lr_scale`` multiplies the scheduled lr (divergence back-off)."""
        cfg, p = self.config, self.perturber
        t0 = time.perf_counter()
        seed, eps, lr = step_seed(cfg.seed, step), cfg.eps, cfg.lr_at(step) * lr_scale
        p.apply(*self._pending, Term(seed, eps))
        self._pending = ()
        t1 = time.perf_counter()
        loss_plus = self._loss(batch)
        t2 = time.perf_counter()
        p.add(seed, -2.0 * eps)
        t3 = time.perf_counter()
        loss_minus = self._loss(batch)
        forward = (t2 - t1) + (time.perf_counter() - t3)
        finite = math.isfinite(loss_plus) and math.isfinite(loss_minus)
        if not (finite and loss_plus <= loss_limit and loss_minus <= loss_limit):
            p.add(seed, eps)  # remove the perturbation; nothing else has touched theta
            return [StepRecord(step, seed, 0.0, lr, eps, loss_plus, loss_minus, time.perf_counter() - t0, forward,
                               status="undone")]
        grad = (loss_plus - loss_minus) / (2.0 * eps)
        self._pending = (_update_term(seed, eps, lr, grad, cfg.weight_decay),)
        return [StepRecord(step, seed, grad, lr, eps, loss_plus, loss_minus, time.perf_counter() - t0, forward)]


class SlottedZOTrainer:
    """q = P/2 directions per step from one session run over a bundle with P perturbation slots.

    theta lives in its own buffer in the one-slot layout; before the run, slot 2j is set to
    theta + eps z_j and slot 2j+1 to theta - eps z_j (z_j drawn over theta's layout, so the noise is
    that of an unslotted run). The update theta += sum_j -(lr / q) g_j z_j is one fused pass.
    theta itself is never perturbed, so an undone step has nothing to undo.

    Memory: the P slots (the session's buffer) + theta + one work copy = (P + 2) x the adapter.
    """

    def __init__(self, session: TrainingSession, config: TrainConfig):
        if config.weight_decay:
            raise ValueError("weight decay is not supported with perturbation slots")
        self.session, self.config = session, config
        self.slots = session.slots
        self.theta = _theta_params(session.params)
        self.work = FlatParameters(self.theta.specs, self.theta.buffer.shape[0])
        threads = config.threads or os.cpu_count() or 1
        self.perturber = Perturber(self.theta.buffer, config.perturbation, threads)
        self.work_perturber = Perturber(self.work.buffer, config.perturbation, threads)

    def _write_slot(self, slot: int, seed: int, coef: float) -> None:
        """slot <- theta + coef z(seed)."""
        np.copyto(self.work.buffer, self.theta.buffer)
        if coef:
            self.work_perturber.add(seed, coef)
        for name, view in self.work.views.items():
            self.session.params.views[name][slot] = view

    def sync(self) -> None:
        """Every slot holds theta (evaluation uses all slots for different rows)."""
        for k in range(self.slots):
            self._write_slot(k, 0, 0.0)

    def close(self) -> None:
        self.sync()
        self.perturber.close()
        self.work_perturber.close()

    def step(self, step: int, batch: Batch, lr_scale: float = 1.0,
             loss_limit: float = math.inf) -> list[StepRecord]:
        cfg, q = self.config, self.slots // 2
        t0 = time.perf_counter()
        eps, lr = cfg.eps, cfg.lr_at(step) * lr_scale / q
        seeds = [step_seed(cfg.seed, step, j) for j in range(q)]
        for j, seed in enumerate(seeds):
            self._write_slot(2 * j, seed, eps)
            self._write_slot(2 * j + 1, seed, -eps)
        t1 = time.perf_counter()
        rows = [np.tile(a, (self.slots,) + (1,) * (a.ndim - 1)) for a in (batch.input_ids, batch.attention_mask,
                                                                          batch.labels)]
        losses = self.session.run(*rows)["loss"].astype(np.float64)  # (P,)
        forward = time.perf_counter() - t1
        plus, minus = losses[0::2], losses[1::2]
        ok = bool(np.all(np.isfinite(losses)) and np.all(losses <= loss_limit))
        grads = (plus - minus) / (2.0 * eps) if ok else np.zeros(q)
        if ok:
            self.perturber.apply(*(Term(s, -lr * float(g)) for s, g in zip(seeds, grads, strict=True)))
        seconds = time.perf_counter() - t0
        return [StepRecord(step, seed, float(grads[j]), lr, eps, float(plus[j]), float(minus[j]), seconds, forward,
                           "ok" if ok else "undone", j) for j, seed in enumerate(seeds)]


def make_trainer(session: TrainingSession, config: TrainConfig) -> ZOTrainer | SlottedZOTrainer:
    return SlottedZOTrainer(session, config) if session.slots > 1 else ZOTrainer(session, config)


def _theta_params(params: FlatParameters) -> FlatParameters:
    """A one-slot copy of slot 0 of slotted parameters."""
    specs, n = layout([(s.name, s.shape[1:], s.decay) for s in params.specs])
    theta = FlatParameters(specs, n)
    for name, view in theta.views.items():
        view[...] = params.views[name][0]
    return theta


def replay(params: FlatParameters, config: TrainConfig, records: Iterable[StepRecord], slots: int = 1) -> None:
    """Re-apply logged steps to ``params`` (initial weights) without any forward pass.

    Runs the same float32 passes in the same order as training, so the result is bit-identical.
    """
    if slots > 1:
        _replay_slotted(params, config, records)
        return
    with _perturber(params, config) as p:
        for r in records:
            p.add(r.seed, r.eps)
            p.add(r.seed, -2.0 * r.eps)
            if r.status == "undone":
                p.add(r.seed, r.eps)
            else:
                p.apply(_update_term(r.seed, r.eps, r.lr, r.grad, config.weight_decay))


def _replay_slotted(params: FlatParameters, config: TrainConfig, records: Iterable[StepRecord]) -> None:
    theta = _theta_params(params)
    by_step: dict[int, list[StepRecord]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    with Perturber(theta.buffer, config.perturbation, config.threads or os.cpu_count() or 1) as p:
        for step in sorted(by_step):
            if by_step[step][0].status == "ok":
                p.apply(*(Term(r.seed, -r.lr * r.grad) for r in by_step[step]))
    for name, view in theta.views.items():
        params.views[name][...] = view  # every slot


def _perturber(params: FlatParameters, config: TrainConfig) -> Perturber:
    decay = params.segments(decay=True) if config.weight_decay > 0 else ()
    return Perturber(params.buffer, config.perturbation, config.threads or os.cpu_count() or 1, decay)
