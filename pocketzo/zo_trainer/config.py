"""Training configuration and schedules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS, Distribution

Schedule = Literal["constant", "linear", "cosine"]
Estimator = Literal["two-sided", "one-sided"]
CONFIG_VERSION = 2  # 2: Gaussian noise by Box-Muller (version 1 used numpy's ziggurat)

# What `pocketzo train --recipe` starts from before its explicit flags; "best" is the default: the highest
# mean final accuracy over 3 seeds in docs/accuracy.md (SmolLM2, 200 forwards: 80.5 % vs ZO-SGD's 79.6 %),
# a scalar second moment with lr as the step per weight. TrainConfig's own defaults stay plain ZO-SGD.
RECIPES: dict[str, dict[str, Any]] = {
    "best": {"adaptive": True, "lr": 1e-3},
    "zo-sgd": {},  # MeZO's ZO-SGD: one two-sided direction, plain update
}
DEFAULT_RECIPE = "best"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a ZO run; saved as ``config.json`` in the run directory.

    The estimator (``directions``, ``estimator``), the perturbation's shape (``sparsity``,
    ``curvature``) and the update rule (``momentum``, ``adaptive``, ``sign``) compose freely;
    what each costs in memory and forward passes is in ``optim`` and docs/accuracy.md. The
    defaults are plain ZO-SGD (MeZO) with one two-sided direction per step.
    """

    steps: int
    lr: float = 1e-4
    eps: float = 1e-3
    batch_size: int = 16
    perturbation: Distribution = "rademacher"
    directions: int = 1  # q: directions per step, averaged
    estimator: Estimator = "two-sided"  # two-sided: 2q forwards/step; one-sided: q + 1, sharing L(theta)
    momentum: float = 0.0  # beta of an EMA of the estimate (ZO-SGD-MMT); > 0 keeps one float32 per weight
    adaptive: bool = False  # divide the step by the RMS of past g (a scalar second moment)
    sign: bool = False  # step along the sign of the estimate (or of the momentum)
    sparsity: float = 0.0  # fraction of each tensor never perturbed: its largest-magnitude weights
    curvature: float = 0.0  # EMA rate of a diagonal curvature estimate that scales z (HiZOO-like; 0: off)
    eps_end: float = 0.0  # > 0: eps decays linearly to this over the run (0: eps is constant)
    seed: int = 0
    threads: int = 0  # 0 = one per CPU core; used by ONNX Runtime and by the noise passes
    weight_decay: float = 0.0  # decoupled; only tensors with decay=True in the manifest (matrices)
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_batch_size: int = 32
    checkpoint_every: int = 0  # steps between checkpoints (0: only on SIGINT/SIGTERM); resume with --resume
    keep_checkpoints: int = 2  # newest checkpoints kept
    spike_factor: float = 10.0  # a loss above this x the median of the last 32 steps is a divergence (0: off)
    lr_backoff: float = 0.5  # lr multiplier after each undone step (non-finite or exploding loss)
    max_failures: int = 5  # consecutive undone steps before the run stops
    noise_chunk: int = CHUNK_ELEMENTS  # recorded so that a replay can refuse noise it cannot regenerate
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr >= 0 and math.isfinite(self.lr), "lr must be a finite number >= 0"),
            (self.eps > 0 and math.isfinite(self.eps), "eps must be a finite number > 0"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.perturbation in ("rademacher", "gaussian"), "perturbation must be rademacher or gaussian"),
            (self.schedule in ("constant", "linear", "cosine"), "schedule must be constant, linear or cosine"),
            (0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (self.threads >= 0 and self.warmup_steps >= 0 and self.eval_every >= 0,
             "threads, warmup_steps and eval_every must be >= 0"),
            (0 <= self.weight_decay < 1, "weight_decay must be in [0, 1)"),
            (self.checkpoint_every >= 0 and self.keep_checkpoints >= 1, "checkpoint_every must be >= 0 and "
             "keep_checkpoints >= 1"),
            (self.directions >= 1, "directions must be >= 1"),
            (self.estimator in ("two-sided", "one-sided"), "estimator must be two-sided or one-sided"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (0 <= self.sparsity < 1, "sparsity must be in [0, 1)"),
            (0 <= self.curvature < 1, "curvature must be in [0, 1)"),
            (self.curvature == 0 or self.estimator == "two-sided", "curvature needs the two-sided estimator "
             "(its estimate uses L+, L- and L(theta))"),
            (self.curvature == 0 or self.perturbation == "gaussian", "curvature needs --perturbation gaussian: "
             "with +-1 noise z_i^2 = 1 and every weight would get the same curvature"),
            (0 <= self.eps_end <= self.eps and math.isfinite(self.eps_end), "eps_end must be in [0, eps]"),
            (self.weight_decay == 0 or self.plain_update, "weight_decay works only with the plain ZO-SGD update "
             "(no momentum, adaptive, sign, sparsity or curvature)"),
            (self.spike_factor == 0 or self.spike_factor > 1, "spike_factor must be 0 (off) or > 1"),
            (0 < self.lr_backoff <= 1 and self.max_failures >= 1, "lr_backoff must be in (0, 1] and "
             "max_failures >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then the schedule's decay to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    @property
    def plain_update(self) -> bool:
        """theta -= lr * mean_j g_j z_j with no optimizer state: the fused fast path."""
        return not (self.momentum or self.adaptive or self.sign or self.sparsity or self.curvature)

    @property
    def needs_loss_zero(self) -> bool:
        """Whether a step evaluates L(theta) itself (one-sided estimates, curvature)."""
        return self.estimator == "one-sided" or self.curvature > 0

    def forwards_per_step(self) -> int:
        per_direction = 2 if self.estimator == "two-sided" else 1
        return per_direction * self.directions + (1 if self.needs_loss_zero else 0)

    def eps_at(self, step: int) -> float:
        """Perturbation scale of 0-based ``step``: constant, or linear from eps to eps_end over the run."""
        if not self.eps_end:
            return self.eps
        frac = min(1.0, step / max(1, self.steps))
        return self.eps + (self.eps_end - self.eps) * frac

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainConfig:
        return cls(**obj)
