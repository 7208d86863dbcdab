"""Evaluators (backends): return the loss at every point of a ``Plan``, and apply updates to theta.

An evaluator owns the weights being trained (``theta``) and how they meet the session:

    sequential   perturbs the session's own buffer in place, one point per forward pass. The move to
                 each point is one noise pass; the restore after the last point is deferred and fused
                 with the update and with the next step's first move (plain ZO-SGD: 3 generations of z
                 per step). Between steps the buffer is "pending": ``sync()`` makes it theta.
    slotted      a bundle with P perturbation slots: every point of the plan (<= P) is written into
                 its own slot and ONE session run returns all the losses. theta lives in its own
                 buffer and is never perturbed.

Both take the forward pass as a function, so replay runs the same passes over the buffer with logged
losses instead of a session (``replay``).

    gradient     runs the bundle's gradient graph at theta (a plan of one "gradient" point): the loss,
                 and the exact gradient written by ONNX Runtime into a flat buffer of theta's layout;
                 hybrid plans then add ZO points on the tensors the graph does not differentiate.

A split bundle (``export --split``) uses the first two as they are: its forward function runs the frozen
trunk once per batch and the head at each point (``trainer._forward_of``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from pocketzo.runtime.data import Batch
from pocketzo.runtime.manifest import layout
from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.estimators import Plan, Point
from pocketzo.zo_trainer.noise import ChunkOp, Distribution, Perturber, Term

Op = Term | ChunkOp
PointLoss = Callable[[Plan, Point, Batch | None], float]  # one forward pass with the buffer at the point
PlanLosses = Callable[[Plan, Batch | None], Sequence[float]]  # one run, a loss per slot


@dataclass(frozen=True)
class Noise:
    """How z is drawn over a buffer: distribution, threads, weight-decay segments, per-weight scale."""

    distribution: Distribution
    threads: int
    decay_segments: tuple[tuple[int, int], ...] = ()
    sigma: npt.NDArray[np.float32] | None = None

    def perturber(self, buffer: npt.NDArray[np.float32]) -> Perturber:
        return Perturber(buffer, self.distribution, self.threads, self.decay_segments, self.sigma)


@dataclass(frozen=True)
class Evaluation:
    losses: tuple[float, ...]  # one per plan point, in plan order
    forward_seconds: float
    gradient: npt.NDArray[np.float32] | None = None  # a gradient plan's d loss / d theta, flat


class Evaluator(Protocol):
    theta: FlatParameters  # the weights being trained, one slot's layout

    def evaluate(self, plan: Plan, batch: Batch | None) -> Evaluation: ...

    def update(self, ops: Sequence[Op]) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


def _offset(point: Point | None) -> Term | None:
    return None if point is None or point.role == "theta" else Term(point.seed, point.coef)


def _move(src: Point | None, dst: Point | None) -> tuple[Term, ...]:
    """Terms taking the buffer from ``src`` to ``dst`` (None or a theta point: theta itself)."""
    a, b = _offset(src), _offset(dst)
    if a is not None and b is not None and a.seed == b.seed:
        return (Term(a.seed, b.coef - a.coef),)  # +eps z -> -eps z in one pass
    return tuple(t for t in (a and Term(a.seed, -a.coef), b) if t is not None)


def _fuse(pending: tuple[Op, ...], ops: Sequence[Op]) -> tuple[Op, ...]:
    """``pending`` then ``ops``, the restore of a direction and its update merged into one term: per
    element theta + r z then (d theta + c z on decay segments) is d theta + (d r + c) z."""
    if len(pending) == 1 and ops and isinstance(pending[0], Term) and isinstance(ops[-1], Term):
        r, u = pending[0], ops[-1]
        if r.seed == u.seed and r.decay_factor == 1.0 and r.decay_coef is None:
            c = u.coef if u.decay_coef is None else u.decay_coef
            merged = Term(u.seed, r.coef + u.coef, u.decay_factor, u.decay_factor * r.coef + c)
            return (*ops[:-1], merged)
    return (*pending, *ops)


class SequentialEvaluator:
    """In-place perturbation of the session's buffer; see the module docstring."""

    def __init__(self, params: FlatParameters, noise: Noise, loss: PointLoss):
        self.theta = params
        self.perturber = noise.perturber(params.buffer)
        self._loss = loss
        self._pending: tuple[Op, ...] = ()  # ops that make the buffer theta

    def evaluate(self, plan: Plan, batch: Batch | None) -> Evaluation:
        losses, forward, at = [], 0.0, None
        for point in plan.points:
            self.perturber.apply(*self._pending, *_move(at, point))
            self._pending, at = (), point
            t = time.perf_counter()
            losses.append(self._loss(plan, point, batch))
            forward += time.perf_counter() - t
        self._pending = _move(at, None)
        return Evaluation(tuple(losses), forward)

    def update(self, ops: Sequence[Op]) -> None:
        self._pending = _fuse(self._pending, ops)

    def sync(self) -> None:
        self.perturber.apply(*self._pending)
        self._pending = ()

    def close(self) -> None:
        self.sync()
        self.perturber.close()


def one_slot_copy(params: FlatParameters) -> FlatParameters:
    """A one-slot copy of slot 0 of slotted parameters."""
    specs, n = layout([(s.name, s.shape[1:], s.decay) for s in params.specs])
    theta = FlatParameters(specs, n)
    for name, view in theta.views.items():
        view[...] = params.views[name][0]
    return theta


class SlottedEvaluator:
    """All points of a plan in one run over P perturbation slots; see the module docstring.

    Memory: the P slots (the session's buffer) + theta + one work copy = (P + 2) x the adapter.
    """

    def __init__(self, slotted: FlatParameters, theta: FlatParameters, noise: Noise, losses: PlanLosses):
        self.slotted, self.theta, self._losses = slotted, theta, losses
        self.slots = slotted.specs[0].shape[0]
        self.work = FlatParameters(theta.specs, theta.buffer.shape[0])
        self.perturber = noise.perturber(theta.buffer)
        self.work_perturber = noise.perturber(self.work.buffer)

    def _write_slot(self, slot: int, point: Point | None) -> None:
        """slot <- theta + coef z(seed)."""
        np.copyto(self.work.buffer, self.theta.buffer)
        if point is not None and point.role != "theta":
            self.work_perturber.add(point.seed, point.coef)
        for name, view in self.work.views.items():
            self.slotted.views[name][slot] = view

    def evaluate(self, plan: Plan, batch: Batch | None) -> Evaluation:
        if len(plan.points) > self.slots:
            raise ValueError(f"a step of {len(plan.points)} points does not fit the bundle's {self.slots} slots")
        for k in range(self.slots):
            self._write_slot(k, plan.points[k] if k < len(plan.points) else None)
        t = time.perf_counter()
        losses = self._losses(plan, batch)
        forward = time.perf_counter() - t
        return Evaluation(tuple(float(v) for v in losses[: len(plan.points)]), forward)

    def update(self, ops: Sequence[Op]) -> None:
        self.perturber.apply(*ops)

    def sync(self) -> None:
        """Every slot holds theta (evaluation uses all slots for different rows)."""
        for k in range(self.slots):
            self._write_slot(k, None)

    def close(self) -> None:
        self.sync()
        self.perturber.close()
        self.work_perturber.close()


GradientRun = Callable[[Batch | None], float]  # one forward+backward at the buffer's weights; fills the gradient
ForwardRun = Callable[[Batch | None], float]  # one forward at the buffer's weights: the loss


class GradientEvaluator:
    """The exact gradient at theta from the gradient graph; updates are applied to theta at once.

    Hybrid (``zo_elements`` > 0): the plan's other points perturb only the buffer's first ``zo_elements``
    weights (the tensors below the gradient graph's cut, a prefix of the layout), each measured by one
    ``forward`` and removed again by the opposite noise pass, as MeZO restores (theta comes back up to
    float32 rounding, the same in every run)."""

    def __init__(self, params: FlatParameters, gradient: FlatParameters, noise: Noise, backward: GradientRun,
                 forward: ForwardRun | None = None, zo_elements: int = 0):
        self.theta, self.gradient, self._backward, self._forward = params, gradient, backward, forward
        self.perturber = noise.perturber(params.buffer)  # its chunked passes carry the dense update
        self.zo_perturber = (Perturber(params.buffer[:zo_elements], noise.distribution, noise.threads)
                             if zo_elements else None)

    def evaluate(self, plan: Plan, batch: Batch | None) -> Evaluation:
        roles = [p.role for p in plan.points]
        if roles[:1] != ["gradient"] or (len(roles) > 1 and (self.zo_perturber is None or self._forward is None)):
            raise ValueError("the gradient backend evaluates an exact-gradient point, then (hybrid) ZO points")
        t = time.perf_counter()
        losses = [self._backward(batch)]
        for point in plan.points[1:]:
            self.zo_perturber.add(point.seed, point.coef)
            try:
                losses.append(self._forward(batch))
            finally:
                self.zo_perturber.add(point.seed, -point.coef)
        return Evaluation(tuple(losses), time.perf_counter() - t, self.gradient.buffer)

    def update(self, ops: Sequence[Op]) -> None:
        self.perturber.apply(*ops)

    def sync(self) -> None:
        pass  # theta is restored after every ZO point

    def close(self) -> None:
        self.perturber.close()
        if self.zo_perturber is not None:
            self.zo_perturber.close()
