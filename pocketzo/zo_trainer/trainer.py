"""ZO-SGD (MeZO) on the flat buffer: two forward passes and three noise passes per step.

    theta += eps z          -> L+
    theta -= 2 eps z        -> L-
    g = (L+ - L-) / (2 eps)
    theta += (eps - lr g) z     restore and update fused into one pass
             (with decay d = 1 - lr wd on matrices: theta = d theta + (d eps - lr g) z)

z is regenerated from the step seed each time (see ``noise``). A step is fully described by
its seed and g, so initial weights + the log rebuild the final weights bit for bit (``replay``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from pocketzo.errors import TrainingError
from pocketzo.runtime.data import Batch
from pocketzo.runtime.session import FlatParameters, TrainingSession
from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.noise import Perturber


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

    def to_json(self) -> dict:
        return asdict(self)


def _update_pass(perturber: Perturber, seed: int, eps: float, lr: float, grad: float, weight_decay: float) -> None:
    d = 1.0 - lr * weight_decay
    perturber.add(seed, eps - lr * grad, decay_factor=d, decay_coef=d * eps - lr * grad)


class ZOTrainer:
    """Owns the perturber over a session's flat buffer and runs ZO-SGD steps."""

    def __init__(self, session: TrainingSession, config: TrainConfig):
        self.session = session
        self.config = config
        self.perturber = _perturber(session.params, config)

    def close(self) -> None:
        self.perturber.close()

    def _loss(self, batch: Batch) -> float:
        return float(self.session.run(batch.input_ids, batch.attention_mask, batch.labels)["loss"])

    def step(self, step: int, batch: Batch) -> StepRecord:
        cfg, p = self.config, self.perturber
        t0 = time.perf_counter()
        seed, eps, lr = step_seed(cfg.seed, step), cfg.eps, cfg.lr_at(step)
        p.add(seed, eps)
        t1 = time.perf_counter()
        loss_plus = self._loss(batch)
        t2 = time.perf_counter()
        p.add(seed, -2.0 * eps)
        t3 = time.perf_counter()
        loss_minus = self._loss(batch)
        forward = (t2 - t1) + (time.perf_counter() - t3)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            p.add(seed, eps)  # undo the perturbation (exact up to float32 rounding)
            raise TrainingError(
                f"step {step}: non-finite loss (L+={loss_plus}, L-={loss_minus}); "
                "lower --lr or --eps, or check the data"
            )
        grad = (loss_plus - loss_minus) / (2.0 * eps)
        _update_pass(p, seed, eps, lr, grad, cfg.weight_decay)
        return StepRecord(step, seed, grad, lr, eps, loss_plus, loss_minus, time.perf_counter() - t0, forward)


def replay(params: FlatParameters, config: TrainConfig, records: Iterable[StepRecord]) -> None:
    """Re-apply logged steps to ``params`` (initial weights) without any forward pass.

    Runs the same float32 passes in the same order as training, so the result is bit-identical.
    """
    with _perturber(params, config) as p:
        for r in records:
            p.add(r.seed, r.eps)
            p.add(r.seed, -2.0 * r.eps)
            _update_pass(p, r.seed, r.eps, r.lr, r.grad, config.weight_decay)


def _perturber(params: FlatParameters, config: TrainConfig) -> Perturber:
    decay = params.segments(decay=True) if config.weight_decay > 0 else ()
    return Perturber(params.buffer, config.perturbation, config.threads or os.cpu_count() or 1, decay)
