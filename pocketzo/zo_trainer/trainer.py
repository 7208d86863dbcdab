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
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from pocketzo.runtime.data import Batch
from pocketzo.runtime.session import FlatParameters, TrainingSession
from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.noise import Perturber, Term


def step_seed(run_seed: int, step: int) -> int:
    """The noise seed of ``step``: a 63-bit integer derived from the run seed."""
    state = np.random.SeedSequence([run_seed, step]).generate_state(1, np.uint64)[0]
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

    def step(self, step: int, batch: Batch, lr_scale: float = 1.0, loss_limit: float = math.inf) -> StepRecord:
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
            return StepRecord(step, seed, 0.0, lr, eps, loss_plus, loss_minus, time.perf_counter() - t0, forward,
                              status="undone")
        grad = (loss_plus - loss_minus) / (2.0 * eps)
        self._pending = (_update_term(seed, eps, lr, grad, cfg.weight_decay),)
        return StepRecord(step, seed, grad, lr, eps, loss_plus, loss_minus, time.perf_counter() - t0, forward)


def replay(params: FlatParameters, config: TrainConfig, records: Iterable[StepRecord]) -> None:
    """Re-apply logged steps to ``params`` (initial weights) without any forward pass.

    Runs the same float32 passes in the same order as training, so the result is bit-identical.
    """
    with _perturber(params, config) as p:
        for r in records:
            p.add(r.seed, r.eps)
            p.add(r.seed, -2.0 * r.eps)
            if r.status == "undone":
                p.add(r.seed, r.eps)
            else:
                p.apply(_update_term(r.seed, r.eps, r.lr, r.grad, config.weight_decay))


def _perturber(params: FlatParameters, config: TrainConfig) -> Perturber:
    decay = params.segments(decay=True) if config.weight_decay > 0 else ()
    return Perturber(params.buffer, config.perturbation, config.threads or os.cpu_count() or 1, decay)
