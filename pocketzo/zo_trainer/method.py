"""What a run is: the ``Method`` (everything that decides the bits of the trained weights) and the
``RunPolicy`` (how this process runs it: threads, evaluations, checkpoints, guards).

A run directory saves both in ``config.json``. On resume the method is compared field by field (a
refusal names the field and both values); the policy may differ, so a run started on a laptop can
continue on a phone with other threads or another checkpoint cadence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS, Distribution

Schedule = Literal["constant", "linear", "cosine", "inverse-time"]
EstimatorKind = Literal["two-sided", "one-sided"]
Order = Literal["zo", "fo", "hybrid"]
Optimizer = Literal["sgd", "adamw"]
METHOD_VERSION = 3  # 3: Method and RunPolicy split, one record per step; 2: Box-Muller Gaussian noise



def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


@dataclass(frozen=True)
class Method:
    """Everything that changes the trained weights, bit for bit.

    The estimator (``estimator``, ``directions``, ``curvature``), the perturbation (``perturbation``,
    ``sparsity``) and the update rule (``momentum``, ``adaptive``, ``sign``, ``weight_decay``) compose
    freely; what each costs is in ``updates`` and docs/archive/accuracy-per-forward.md. The defaults are plain
    ZO-SGD (MeZO).
    """

    steps: int
    # zo: forward passes only (MeZO); fo: exact gradients from the bundle's gradient graph; hybrid: exact
    # gradients for the tensors the gradient graph differentiates, ZO estimates for the others, one update
    method: Order = "zo"
    optimizer: Optimizer = "sgd"  # fo: sgd (with --momentum) or adamw (betas 0.9, 0.999); zo: sgd and its options
    grad_clip: float = 0.0  # fo, hybrid: clip the exact gradient's global L2 norm to this (0: off)
    # fo, hybrid: run the gradient graph over at most this many rows at a time and sum the parts' gradients, each
    # weighted by its share of the batch's loss (0: the whole batch at once). The backward pass keeps every
    # layer's activations, so its memory follows these rows; the sum differs from the whole batch's gradient
    # by float32 rounding, so it is part of the method (a resumed run keeps it).
    micro_batch: int = 0
    lr: float = 1e-4
    eps: float = 1e-3
    batch_size: int = 16
    perturbation: Distribution = "rademacher"
    directions: int = 1  # q: directions per step, averaged (a bundle with P slots: 1 means "as many as fit")
    estimator: EstimatorKind = "two-sided"  # two-sided: 2q forwards/step; one-sided: q + 1, sharing L(theta)
    momentum: float = 0.0  # beta of an EMA of the estimate (ZO-SGD-MMT); > 0 keeps one float32 per weight
    adaptive: bool = False  # divide the step by the RMS of past g (a scalar second moment)
    # divide the step by the standard deviation of this step's q directional estimates, i.e. of the q perturbed
    # losses (FZOO's normalized SGD; its eta is lr x eps here): needs q >= 2
    normalize: bool = False
    sign: bool = False  # step along the sign of the estimate (or of the momentum)
    sparsity: float = 0.0  # fraction of each tensor never perturbed: its largest-magnitude weights
    curvature: float = 0.0  # EMA rate of a diagonal curvature estimate that scales z (HiZOO-like; 0: off)
    eps_end: float = 0.0  # > 0: eps decays linearly to this over the run (0: eps is constant)
    seed: int = 0
    weight_decay: float = 0.0  # decoupled; only tensors with decay=True in the manifest (matrices)
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    # inverse-time: the lr holds for this many steps, then falls as 1/step (the sum of the lrs grows without
    # bound, the sum of their squares does not: Robbins-Monro). It needs no horizon, so a run stopped at any step
    # (a time budget, a phone's battery) has annealed as far as it got
    hold_steps: int = 0
    noise_chunk: int = CHUNK_ELEMENTS  # recorded so that a replay can refuse noise it cannot regenerate
    version: int = METHOD_VERSION

    def __post_init__(self) -> None:
        _check([
            (self.steps >= 0, "steps must be >= 0"),
            (self.lr >= 0 and math.isfinite(self.lr), "lr must be a finite number >= 0"),
            (self.eps > 0 and math.isfinite(self.eps), "eps must be a finite number > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.perturbation in ("rademacher", "gaussian"), "perturbation must be rademacher or gaussian"),
            (self.schedule in ("constant", "linear", "cosine", "inverse-time"),
             "schedule must be constant, linear, cosine or inverse-time"),
            (self.hold_steps >= 0, "hold_steps must be >= 0"),
            (self.schedule != "inverse-time" or self.hold_steps >= 1, "--schedule inverse-time needs --hold-steps N "
             "(N >= 1): the steps at the full lr"),
            (0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.weight_decay < 1, "weight_decay must be in [0, 1)"),
            (self.directions >= 1, "directions must be >= 1"),
            (not self.normalize or self.directions >= 2, "normalize divides by the spread of the step's directions: "
             "it needs --directions >= 2"),
            (not (self.normalize and self.adaptive), "normalize and adaptive both set the step's scale: choose one"),
            (self.estimator in ("two-sided", "one-sided"), "estimator must be two-sided or one-sided"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (0 <= self.sparsity < 1, "sparsity must be in [0, 1)"),
            (0 <= self.curvature < 1, "curvature must be in [0, 1)"),
            (self.curvature == 0 or self.estimator == "two-sided", "curvature needs the two-sided estimator "
             "(its estimate uses L+, L- and L(theta))"),
            (self.curvature == 0 or self.perturbation == "gaussian", "curvature needs --perturbation gaussian: "
             "with +-1 noise z_i^2 = 1 and every weight would get the same curvature"),
            (0 <= self.eps_end <= self.eps and math.isfinite(self.eps_end), "eps_end must be in [0, eps]"),
            (self.method in ("zo", "fo", "hybrid"), "method must be zo, fo or hybrid"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be sgd or adamw"),
            (self.grad_clip >= 0 and math.isfinite(self.grad_clip), "grad_clip must be a finite number >= 0"),
            (self.micro_batch >= 0, "micro_batch must be >= 0 (0: the whole batch)"),
            (self.method != "zo" or not self.micro_batch, "--micro-batch splits the gradient graph's batch: it needs "
             "--method fo or hybrid"),
            (self.method != "zo" or (self.optimizer == "sgd" and not self.grad_clip), "--optimizer adamw and "
             "--grad-clip need --method fo or hybrid (ZO's Adam-like rule is --adaptive)"),
            (self.method != "fo" or not (self.directions != 1 or self.estimator != "two-sided"),
             "--method fo takes the exact gradient: no --directions or --estimator"),
            (self.method == "zo" or not (self.adaptive or self.normalize or self.sign or self.sparsity
                                         or self.curvature or self.eps_end),
             f"--method {self.method} updates with the optimizer: no --adaptive, --normalize, --sign, --sparsity, "
             "--curvature or --eps-end"),
            (self.method == "zo" or self.optimizer == "sgd" or not self.momentum,
             "--momentum is SGD's; AdamW's first moment is fixed at 0.9"),
            (self.method == "fo" or self.weight_decay == 0
             or not (self.momentum or self.sign or self.sparsity or self.curvature),
             "weight_decay works only with updates that rescale the step (plain, --adaptive, --normalize): not with "
             "momentum, sign, sparsity or curvature"),
        ])

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then the schedule's decay (to 0 at ``steps`` for
        linear and cosine; inverse-time: lr until ``hold_steps``, then lr hold_steps / (step + 1))."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "inverse-time":
            return self.lr * min(1.0, self.hold_steps / (step + 1))
        span = max(1, self.steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def eps_at(self, step: int) -> float:
        """Perturbation scale of 0-based ``step``: constant, or linear from eps to eps_end over the run."""
        if not self.eps_end:
            return self.eps
        frac = min(1.0, step / max(1, self.steps))
        return self.eps + (self.eps_end - self.eps) * frac

    @property
    def measures_theta(self) -> bool:
        """Whether a step evaluates L(theta) itself (one-sided estimates, curvature, exact gradients)."""
        return self.estimator == "one-sided" or self.curvature > 0 or self.method != "zo"

    @property
    def first_order(self) -> bool:
        """Whether a step runs the gradient graph and updates with ``optimizer`` (fo, hybrid)."""
        return self.method != "zo"

    def forwards_per_step(self) -> int:
        """Points a step evaluates: forward passes on a bundle without slots (fo: one forward+backward;
        hybrid: that, then one or two forwards per ZO direction)."""
        if self.method == "fo":
            return 1
        per_direction = 2 if self.estimator == "two-sided" else 1
        return per_direction * self.directions + (1 if self.measures_theta else 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Method:
        return cls(**obj)

    def differences(self, given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(field, this run's value, given value) for each field of ``given`` that differs."""
        names = {f.name for f in fields(self)}
        return [(k, getattr(self, k), v) for k, v in given.items() if k in names and getattr(self, k) != v]


@dataclass(frozen=True)
class RunPolicy:
    """How this process runs the method; may change when a run is resumed."""

    threads: int = 0  # 0 = one per CPU core; used by ONNX Runtime and by the noise passes
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_batch_size: int = 32
    checkpoint_every: int = 0  # steps between checkpoints (0: only on SIGINT/SIGTERM); resume with --resume
    keep_checkpoints: int = 2  # newest checkpoints kept
    # a loss above this x the larger of the last 32 good steps' median and the run's starting loss (the median of
    # its first 8 good steps) is a divergence, and so is a non-finite one (0: only non-finite)
    spike_factor: float = 10.0
    lr_backoff: float = 0.5  # lr multiplier after each undone step (non-finite or exploding loss)
    lr_recover_steps: int = 50  # after this many good steps in a row, one back-off is taken back (0: never)
    max_failures: int = 5  # consecutive undone steps before the run stops
    memory_budget: str | None = None  # e.g. 3G: refuse to start a run that would not fit
    progress: bool = True  # a progress bar on stderr
    cache_trunk: str | None = None  # a split bundle: this directory caches the training set's trunk outputs
    split: bool = True  # a split bundle: train on its trunk and head (false: on its whole loss graph)
    # 0: no limit; else stop, with a checkpoint, after the step that brings the steps' seconds to this many
    max_train_seconds: float = 0.0
    # 0: no limit; else stop, with a checkpoint, once this many steps are done (unlike --steps, the lr schedule's
    # horizon, it leaves the method as it is: a --resume with a larger value goes on bit-identical)
    stop_at_step: int = 0

    def __post_init__(self) -> None:
        _check([
            (self.threads >= 0 and self.eval_every >= 0, "threads and eval_every must be >= 0"),
            (self.max_train_seconds >= 0, "max_train_seconds must be >= 0 (0: no limit)"),
            (self.stop_at_step >= 0, "stop_at_step must be >= 0 (0: no limit)"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.checkpoint_every >= 0 and self.keep_checkpoints >= 1, "checkpoint_every must be >= 0 and "
             "keep_checkpoints >= 1"),
            (self.spike_factor == 0 or self.spike_factor > 1, "spike_factor must be 0 (off) or > 1"),
            (0 < self.lr_backoff <= 1 and self.max_failures >= 1, "lr_backoff must be in (0, 1] and "
             "max_failures >= 1"),
            (self.lr_recover_steps >= 0, "lr_recover_steps must be >= 0 (0: a back-off is never taken back)"),
        ])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunPolicy:
        return cls(**obj)
