"""Zeroth-order steps on the flat buffer. Plain ZO-SGD (MeZO) costs two forward passes and two
memory passes per step:

    theta += eps z_k                 -> L+    (one pass, fused with step k-1's update)
    theta -= 2 eps z_k               -> L-    (one pass)
    g = (L+ - L-) / (2 eps)
    theta += (eps - lr g) z_k        restore and update, deferred: applied in the same pass as
                                     step k+1's +eps z_{k+1}, or by ``sync()``
             (with decay d = 1 - lr wd on matrices: theta = d theta + (d eps - lr g) z_k)

With q directions the step repeats the pair for each z_j (the restore of one fused with the
perturbation of the next) and averages: 2q forwards. The one-sided estimator measures L(theta)
once and then only theta + eps z_j: g_j = (L_j - L(theta)) / eps, q + 1 forwards. Momentum,
adaptive and sign updates, sparse and curvature-scaled directions are in ``optim``.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from pocketzo.runtime.bundle import layout
from pocketzo.runtime.data import Batch
from pocketzo.runtime.session import FlatParameters, TrainingSession
from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.noise import ChunkOp, Perturber, Term
from pocketzo.zo_trainer.optim import State, Update


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
    loss_minus: float  # one-sided: L(theta), shared by the step's directions
    seconds: float  # the whole step
    forward_seconds: float = 0.0  # of which in the forward passes (the rest is the noise passes)
    status: str = "ok"  # "undone": a non-finite or exploding loss; the perturbation was removed, no update
    direction: int = 0  # the direction's index within its step
    loss_zero: float = math.nan  # L(theta), when the step measured it (one-sided, curvature)

    def to_json(self) -> dict:
        return asdict(self)


def _plain_update(carry: Term, seeds: list[int], grads: list[float], lr: float, weight_decay: float) -> list[Term]:
    """Restore theta (``carry``: the last direction's pending +-eps z) and apply the SGD update
    theta -= (lr / q) sum_j g_j z_j (and decay), the last direction in the same term as the restore."""
    step = lr / len(seeds)
    d = 1.0 - lr * weight_decay
    last = carry.coef - step * grads[-1]
    terms = [Term(s, -step * g) for s, g in zip(seeds[:-1], grads[:-1], strict=True)]
    return [*terms, Term(seeds[-1], last, decay_factor=d, decay_coef=d * carry.coef - step * grads[-1])]


class ZOTrainer:
    """Owns the perturber (and optimizer state) over a flat buffer and runs ZO steps; ``loss``
    is one forward pass on a batch (a session, or a log's recorded losses for replay).

    Between steps the buffer holds theta plus the last direction's perturbation (its update is
    pending): call ``sync()`` before reading the weights (evaluation, saving). ``close()`` syncs.
    """

    def __init__(self, params: FlatParameters, config: TrainConfig, loss: Callable[[Batch | None], float]):
        self.params, self.config, self._loss = params, config, loss
        threads = config.threads or os.cpu_count() or 1
        self.state = State.initial(params, config, threads)
        decay = params.segments(decay=True) if config.weight_decay > 0 else ()
        self.perturber = Perturber(params.buffer, config.perturbation, threads, decay, self.state.sigma)
        self._pending: tuple[Term | ChunkOp, ...] = ()

    def sync(self) -> None:
        """Apply the pending update, so that the buffer holds the current weights."""
        self.perturber.apply(*self._pending)
        self._pending = ()

    def close(self) -> None:
        self.sync()
        self.perturber.close()

    def step(self, step: int, batch: Batch | None, lr: float | None = None,
             loss_limit: float = math.inf) -> list[StepRecord]:
        """One step at learning rate ``lr`` (default: the schedule's); one record per direction."""
        cfg, p = self.config, self.perturber
        lr = cfg.lr_at(step) if lr is None else lr
        two_sided = cfg.estimator == "two-sided"
        t0, eps = time.perf_counter(), cfg.eps_at(step)
        seeds = [step_seed(cfg.seed, step, j) for j in range(cfg.directions)]
        forward = 0.0

        def loss() -> float:
            nonlocal forward
            t = time.perf_counter()
            value = self._loss(batch)
            forward += time.perf_counter() - t
            return value

        carry, self._pending = self._pending, ()
        loss0 = math.nan
        if cfg.needs_loss_zero:
            p.apply(*carry)
            carry, loss0 = (), loss()
        plus, minus = [], []
        for seed in seeds:
            p.apply(*carry, Term(seed, eps))
            plus.append(loss())
            if two_sided:
                p.add(seed, -2.0 * eps)
                minus.append(loss())
                carry = (Term(seed, eps),)
            else:
                minus.append(loss0)
                carry = (Term(seed, -eps),)
        measured = plus + minus + ([loss0] if cfg.needs_loss_zero else [])
        ok = all(math.isfinite(v) and v <= loss_limit for v in measured)
        grads = [0.0] * len(seeds)
        if not ok:
            p.apply(*carry)  # remove the perturbation; nothing else has touched theta
        else:
            grads = [(a - b) / (2.0 * eps if two_sided else eps) for a, b in zip(plus, minus, strict=True)]
            if cfg.plain_update:
                self._pending = tuple(_plain_update(carry[0], seeds, grads, lr, cfg.weight_decay))
            else:
                curvatures = ([abs(a + b - 2.0 * loss0) / (2.0 * eps * eps) for a, b in zip(plus, minus, strict=True)]
                              if cfg.curvature else None)
                self._pending = (*carry, Update(cfg, self.state, seeds, grads, lr, curvatures))
        seconds = time.perf_counter() - t0
        return [StepRecord(step, seed, grads[j], lr, eps, plus[j], minus[j], seconds, forward,
                           "ok" if ok else "undone", j, loss0) for j, seed in enumerate(seeds)]


class SlottedZOTrainer:
    """q = P/2 directions per step from one session run over a bundle with P perturbation slots.

    theta lives in its own buffer in the one-slot layout; before the run, slot 2j is set to
    theta + eps z_j and slot 2j+1 to theta - eps z_j (z_j drawn over theta's layout, so the noise is
    that of an unslotted run). The update (plain, or any of ``optim``'s rules) is one fused pass
    over theta. theta itself is never perturbed, so an undone step has nothing to undo.
    ``losses`` runs the batch once in every slot and returns the P losses.

    Memory: the P slots (the session's buffer) + theta + one work copy = (P + 2) x the adapter,
    plus the optimizer state.
    """

    def __init__(self, params: FlatParameters, config: TrainConfig, slots: int,
                 losses: Callable[[Batch | None], np.ndarray]):
        if config.weight_decay or config.needs_loss_zero or config.directions != 1:
            raise ValueError("perturbation slots set the directions (P/2 per step) and measure only L+ and L-: "
                             "no weight decay, one-sided estimator, curvature or --directions with them")
        self.params, self.config, self.slots, self._losses = params, config, slots, losses
        self.theta = _theta_params(params)
        self.work = FlatParameters(self.theta.specs, self.theta.buffer.shape[0])
        threads = config.threads or os.cpu_count() or 1
        self.state = State.initial(self.theta, config, threads)
        self.perturber = Perturber(self.theta.buffer, config.perturbation, threads, sigma=self.state.sigma)
        self.work_perturber = Perturber(self.work.buffer, config.perturbation, threads, sigma=self.state.sigma)

    def _write_slot(self, slot: int, seed: int, coef: float) -> None:
        """slot <- theta + coef z(seed)."""
        np.copyto(self.work.buffer, self.theta.buffer)
        if coef:
            self.work_perturber.add(seed, coef)
        for name, view in self.work.views.items():
            self.params.views[name][slot] = view

    def sync(self) -> None:
        """Every slot holds theta (evaluation uses all slots for different rows)."""
        for k in range(self.slots):
            self._write_slot(k, 0, 0.0)

    def close(self) -> None:
        self.sync()
        self.perturber.close()
        self.work_perturber.close()

    def step(self, step: int, batch: Batch | None, lr: float | None = None,
             loss_limit: float = math.inf) -> list[StepRecord]:
        cfg, q = self.config, self.slots // 2
        lr = cfg.lr_at(step) if lr is None else lr
        t0, eps = time.perf_counter(), cfg.eps_at(step)
        seeds = [step_seed(cfg.seed, step, j) for j in range(q)]
        for j, seed in enumerate(seeds):
            self._write_slot(2 * j, seed, eps)
            self._write_slot(2 * j + 1, seed, -eps)
        t1 = time.perf_counter()
        losses = np.asarray(self._losses(batch), np.float64)  # (P,)
        forward = time.perf_counter() - t1
        plus, minus = losses[0::2], losses[1::2]
        ok = bool(np.all(np.isfinite(losses)) and np.all(losses <= loss_limit))
        grads = [float(g) for g in (plus - minus) / (2.0 * eps)] if ok else [0.0] * q
        if ok and cfg.plain_update:
            self.perturber.apply(*(Term(s, -(lr / q) * g) for s, g in zip(seeds, grads, strict=True)))
        elif ok:
            self.perturber.apply(Update(cfg, self.state, seeds, grads, lr))
        seconds = time.perf_counter() - t0
        return [StepRecord(step, seed, grads[j], lr, eps, float(plus[j]), float(minus[j]), seconds, forward,
                           "ok" if ok else "undone", j) for j, seed in enumerate(seeds)]


def make_trainer(session: TrainingSession, config: TrainConfig) -> ZOTrainer | SlottedZOTrainer:
    if session.slots == 1:
        return ZOTrainer(session.params, config,
                         lambda b: float(session.run(b.input_ids, b.attention_mask, b.labels)["loss"]))

    def losses(b: Batch) -> np.ndarray:  # the batch once per slot: rows are grouped slot-major
        rows = [np.tile(a, (session.slots,) + (1,) * (a.ndim - 1)) for a in (b.input_ids, b.attention_mask,
                                                                             b.labels)]
        return session.run(*rows)["loss"]

    return SlottedZOTrainer(session.params, config, session.slots, losses)


def _theta_params(params: FlatParameters) -> FlatParameters:
    """A one-slot copy of slot 0 of slotted parameters."""
    specs, n = layout([(s.name, s.shape[1:], s.decay) for s in params.specs])
    theta = FlatParameters(specs, n)
    for name, view in theta.views.items():
        view[...] = params.views[name][0]
    return theta


def replay(params: FlatParameters, config: TrainConfig, records: Iterable[StepRecord], slots: int = 1) -> None:
    """Re-apply logged steps to ``params`` (initial weights) without any forward pass.

    The trainer itself runs again, fed the logged losses in the order it asks for them, so the
    float32 passes (and any optimizer state) are those of training: the result is bit-identical.
    """
    by_step: dict[int, list[StepRecord]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    queue: list = []
    two_sided = config.estimator == "two-sided"
    if slots > 1:
        trainer: ZOTrainer | SlottedZOTrainer = SlottedZOTrainer(params, config, slots, lambda _: queue.pop(0))
    else:
        trainer = ZOTrainer(params, config, lambda _: queue.pop(0))
    try:
        for step in sorted(by_step):
            rs = by_step[step]
            if slots > 1:
                queue.append([v for r in rs for v in (r.loss_plus, r.loss_minus)])
            else:
                queue.extend([rs[0].loss_zero] if config.needs_loss_zero else [])
                queue.extend(v for r in rs for v in ((r.loss_plus, r.loss_minus) if two_sided else (r.loss_plus,)))
            trainer.step(step, None, rs[0].lr, -math.inf if rs[0].status == "undone" else math.inf)
    finally:
        trainer.close()
