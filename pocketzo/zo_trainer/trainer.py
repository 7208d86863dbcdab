"""The training step: plan -> evaluate -> update, and the record it leaves.

    plan      the estimator says which points to evaluate (``estimators``)
    evaluate  the evaluator returns their losses (``evaluators``: sequential, slotted, or the exact
              gradient from the bundle's gradient graph)
    update    the update rule turns the estimate into one fused pass over theta (``updates``;
              ``first_order`` for exact gradients)

A zeroth-order step is fully described by its record: the seeds regenerate the noise, the losses give
the estimate, so initial weights + the log rebuild the final weights bit for bit (``replay``). A
first-order step is not (its gradient is not in the log): such runs are rebuilt from checkpoints.

A step with a non-finite loss, or one above ``loss_limit``, is *undone*: no update is applied and
the perturbation is removed (by the same fused restore as always); the record says ``"undone"``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import Batch
from pocketzo.runtime.gradient_session import GradientSession
from pocketzo.runtime.session import FlatParameters, SessionConfig, TrainingSession
from pocketzo.runtime.split_session import SplitSession
from pocketzo.runtime.trunk_cache import TrunkCache
from pocketzo.zo_trainer.estimators import Estimate, Estimator, Plan, Point, make_estimator
from pocketzo.zo_trainer.evaluators import (
    Evaluator,
    ForwardRun,
    GradientEvaluator,
    GradientRun,
    Noise,
    PlanLosses,
    PointLoss,
    SequentialEvaluator,
    SlottedEvaluator,
    one_slot_copy,
)
from pocketzo.zo_trainer.first_order import FirstOrderRule
from pocketzo.zo_trainer.method import Method
from pocketzo.zo_trainer.updates import State, UpdateRule

Status = Literal["ok", "undone"]


@dataclass(frozen=True)
class DirectionRecord:
    seed: int  # regenerates z
    grad: float | None  # projected gradient estimate g along z (None: the step was undone)
    loss_plus: float  # L(theta + eps z)
    loss_minus: float | None = None  # L(theta - eps z); None when not measured (one-sided)


@dataclass(frozen=True)
class StepRecord:
    step: int
    lr: float
    eps: float
    directions: tuple[DirectionRecord, ...]
    loss_theta: float | None = None  # L(theta), when the step measured it (one-sided, curvature, exact gradient)
    status: Status = "ok"  # "undone": a non-finite or exploding loss; no update was applied
    seconds: float = 0.0  # the whole step
    forward_seconds: float = 0.0  # of which in forward passes (the rest is noise passes and updates)
    grad_norm: float | None = None  # the exact gradient's L2 norm (first-order steps)

    @property
    def loss(self) -> float:
        """The mean of the step's losses: an estimate of L(theta) on its batch."""
        values = [v for d in self.directions for v in (d.loss_plus, d.loss_minus) if v is not None]
        values += [self.loss_theta] if self.loss_theta is not None else []
        return sum(values) / len(values)

    @property
    def grad_rms(self) -> float:
        """RMS of the directions' projected gradients, or the exact gradient's norm."""
        if self.grad_norm is not None:
            return self.grad_norm
        grads = [d.grad for d in self.directions if d.grad is not None]
        return math.sqrt(sum(g * g for g in grads) / len(grads)) if grads else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> StepRecord:
        return cls(**{**obj, "directions": tuple(DirectionRecord(**d) for d in obj["directions"])})


def record_of(plan: Plan, losses: tuple[float, ...], estimate: Estimate | None, lr: float,
              seconds: float, forward_seconds: float) -> StepRecord:
    """The record of a step (``estimate`` None: undone): each loss under the name of its point."""
    plus: dict[int, float] = {}
    minus: dict[int, float] = {}
    theta = None
    for point, value in zip(plan.points, losses, strict=True):
        if point.role in ("theta", "gradient"):
            theta = value
        else:
            (plus if point.role == "plus" else minus)[point.direction] = value
    directions = tuple(DirectionRecord(s, None if estimate is None else estimate.grads[j], plus[j], minus.get(j))
                       for j, s in enumerate(plan.seeds))
    grad_norm = estimate.grad_norm if estimate is not None and estimate.gradient is not None else None
    return StepRecord(plan.step, lr, plan.eps, directions, theta, "ok" if estimate is not None else "undone",
                      seconds, forward_seconds, grad_norm)


class Trainer:
    """One ZO step at a time: ``estimator`` plans, ``evaluator`` measures, ``rule`` updates."""

    def __init__(self, method: Method, estimator: Estimator, evaluator: Evaluator, rule: UpdateRule | FirstOrderRule):
        self.method, self.estimator, self.evaluator, self.rule = method, estimator, evaluator, rule

    @property
    def state(self) -> State:
        return self.rule.state

    def step(self, step: int, batch: Batch | None, lr: float | None = None,
             loss_limit: float = math.inf) -> StepRecord:
        """One step at learning rate ``lr`` (default: the schedule's)."""
        t0 = time.perf_counter()
        lr = self.method.lr_at(step) if lr is None else lr
        plan = self.estimator.plan(step, self.method.eps_at(step))
        evaluation = self.evaluator.evaluate(plan, batch)
        estimate = None
        if all(math.isfinite(v) and v <= loss_limit for v in evaluation.losses):
            estimate = self.estimator.estimate(plan, evaluation.losses, evaluation.gradient)
            if estimate.gradient is not None and not math.isfinite(estimate.grad_norm):
                estimate = None  # a non-finite gradient is undone like a non-finite loss
            else:
                self.evaluator.update(self.rule.ops(estimate, lr))
        return record_of(plan, evaluation.losses, estimate, lr, time.perf_counter() - t0, evaluation.forward_seconds)

    def sync(self) -> None:
        """Make the session's buffer hold the current weights (before evaluating or saving them)."""
        self.evaluator.sync()

    def close(self) -> None:
        self.evaluator.close()


def resolve_directions(method: Method, slots: int) -> Method:
    """With P slots and the default one direction: as many directions as one session run holds."""
    if slots == 1 or method.directions != 1:
        return method
    theta = 1 if method.measures_theta else 0
    per_direction = 2 if method.estimator == "two-sided" else 1
    return replace(method, directions=max(1, (slots - theta) // per_direction))


def build_trainer(params: FlatParameters, slots: int, method: Method, threads: int,
                  loss: PointLoss | PlanLosses) -> Trainer:
    """A trainer over ``params``: sequential with a ``PointLoss``, or, when ``params`` has P > 1
    perturbation slots, slotted with a ``PlanLosses``. ``method`` must have its directions resolved."""
    threads = threads or os.cpu_count() or 1
    theta = params if slots == 1 else one_slot_copy(params)
    rule = UpdateRule(method, theta, threads)
    decay = tuple(theta.segments(decay=True)) if method.weight_decay > 0 else ()
    noise = Noise(method.perturbation, threads, decay, rule.state.sigma)
    if slots == 1:
        evaluator: Evaluator = SequentialEvaluator(theta, noise, loss)
    elif method.forwards_per_step() > slots:
        raise ValueError(f"a step of this method evaluates {method.forwards_per_step()} points, more than the "
                         f"bundle's {slots} perturbation slots; lower --directions")
    else:
        evaluator = SlottedEvaluator(params, theta, noise, loss)
    return Trainer(method, make_estimator(method), evaluator, rule)


def build_first_order_trainer(params: FlatParameters, gradient: FlatParameters, backward: GradientRun, method: Method,
                              threads: int, forward: ForwardRun | None = None, zo_elements: int = 0) -> Trainer:
    """A trainer that steps with exact gradients (``--method fo``): ``backward(batch)`` is one forward+backward
    at ``params`` that returns the loss and writes d loss / d params into ``gradient``. Hybrid: the buffer's
    first ``zo_elements`` have no exact gradient and are estimated from ``forward(batch)`` losses."""
    threads = threads or os.cpu_count() or 1
    rule = FirstOrderRule(method, params, threads, zo_elements)
    decay = tuple(params.segments(decay=True)) if method.weight_decay > 0 else ()
    evaluator = GradientEvaluator(params, gradient, Noise(method.perturbation, threads, decay), backward, forward,
                                  zo_elements)
    return Trainer(method, make_estimator(method), evaluator, rule)


Session = TrainingSession | SplitSession | GradientSession


def open_session(bundle: Bundle, config: SessionConfig, method: Method,
                 params: FlatParameters | None = None, split: bool = True) -> Session:
    """The session a method trains with: for ZO a split bundle's trunk and head (unless ``split`` is false) or the
    loss graph; for fo and hybrid the gradient graph (which also evaluates, with its backward pass switched off,
    so the frozen weights are loaded once)."""
    params = params if params is not None else FlatParameters.from_bundle(bundle)
    if not method.first_order:
        if split and bundle.manifest.split is not None:
            return SplitSession(bundle, config, params)
        return TrainingSession(bundle, config, params)
    if bundle.manifest.slots > 1:
        raise ValueError(f"--method {method.method} trains one copy of the weights: export the bundle without --slots")
    return GradientSession(bundle, config, params, method.micro_batch)


def hybrid_split(session: GradientSession) -> int:
    """The length of the buffer's prefix without an exact gradient: the tensors a hybrid step estimates."""
    specs = session.params.specs
    first = next((i for i, s in enumerate(specs) if s.name in session.exact), len(specs))
    if any(s.name not in session.exact for s in specs[first:]):
        raise ValueError("--method hybrid needs the exactly differentiated tensors to be the last ones; re-export "
                         "with --gradient-layers K")
    return specs[first].offset if first < len(specs) else session.params.buffer.shape[0]


def make_trainer(session: Session, method: Method, threads: int = 0, cache: TrunkCache | None = None) -> Trainer:
    """The trainer of a session (``open_session``): sequential, slotted when the bundle has perturbation
    slots, or first-order / hybrid over the bundle's gradient graph (sharing the session's weight buffer).
    ``cache``: a split session's trunk outputs for the training set (batches must carry their rows)."""
    if method.first_order:
        if not isinstance(session, GradientSession):
            raise ValueError(f"--method {method.method} runs on the gradient graph: open it with open_session")
        split = 0
        if method.method == "hybrid":
            split = hybrid_split(session)
            if split == 0:
                raise ValueError(f"{session.bundle.path}: its gradient graph differentiates every trainable tensor, "
                                 "so --method hybrid has nothing to estimate; use --method fo, or re-export with "
                                 "--gradient-layers K")
        elif len(session.exact) < len(session.params.specs):
            raise ValueError(f"{session.bundle.path}: its gradient graph differentiates {len(session.exact)} of "
                             f"{len(session.params.specs)} trainable tensors (--gradient-layers); train it with "
                             "--method hybrid")

        def forward(b: Batch) -> float:
            return float(session.run(b.input_ids, b.attention_mask, b.labels)["loss"])

        return build_first_order_trainer(session.params, session.gradient,
                                         lambda b: session.backward(b.input_ids, b.attention_mask, b.labels),
                                         method, threads, forward, split)
    if isinstance(session, GradientSession):
        raise ValueError("--method zo runs on the loss graph: open it with open_session")
    method = resolve_directions(method, session.slots)
    inputs_of, run = _forward_of(session, cache)
    if session.slots == 1:
        def point_loss(plan: Plan, point: Point, b: Batch) -> float:
            return float(run(*inputs_of(b))["loss"])

        return build_trainer(session.params, 1, method, threads, point_loss)

    def plan_losses(plan: Plan, b: Batch) -> np.ndarray:  # the batch once per slot: rows are grouped slot-major
        return run(*(np.tile(a, (session.slots,) + (1,) * (a.ndim - 1)) for a in inputs_of(b)))["loss"]

    return build_trainer(session.params, session.slots, method, threads, plan_losses)


def _forward_of(session: TrainingSession | SplitSession, cache: TrunkCache | None = None) \
        -> tuple[Callable[[Batch], tuple[np.ndarray, ...]], Callable[..., dict[str, np.ndarray]]]:
    """A ZO forward pass as (the graph's row inputs for a batch, the run over them). A split bundle's rows start
    with the trunk's output, computed at a batch's first point and reused for its others (a step costs one
    trunk and one head per point), or read from ``cache`` (one head per point)."""
    if isinstance(session, TrainingSession):
        if cache is not None:
            raise ValueError("--cache-trunk needs a split bundle (pocketzo export --split auto)")
        return (lambda b: (b.input_ids, b.attention_mask, b.labels)), session.run
    last: list = [None, None]  # the batch the trunk last ran on, its output

    def trunk(b: Batch) -> np.ndarray:
        if cache is None:
            return session.trunk(b.input_ids, b.attention_mask)
        if b.rows is None:
            raise ValueError("a batch without its data set rows cannot be read from the trunk cache")
        return cache.hidden_of(b.rows, b.input_ids.shape[1])

    def inputs_of(b: Batch) -> tuple[np.ndarray, ...]:
        if last[0] is not b:
            last[:] = [b, trunk(b)]
        return last[1], b.attention_mask, b.labels

    return inputs_of, session.run_head
