"""Estimators: which points a step evaluates (its ``Plan``), and what the losses there estimate.

A point is theta + coef * sigma * z(seed) for one direction, or theta itself. A direction's noise z
is regenerated from its seed wherever it is needed (``noise``), so a plan is a handful of numbers.

    two-sided   points theta +- eps z_j              g_j = (L+ - L-) / (2 eps)            2q forwards
                (+ theta first, with curvature)      c_j = |L+ + L- - 2 L(theta)| / (2 eps^2)
    one-sided   theta, then theta + eps z_j          g_j = (L_j - L(theta)) / eps          q + 1
    exact       theta, with its gradient             the gradient graph's g              1 forward+backward
    hybrid      exact at theta, then the ZO points   exact g above the graph's cut, the   1 forward+backward
                of one- or two-sided (perturbing     one- or two-sided g_j below it       + q or 2q forwards
                only the tensors below the cut)      (one-sided: L(theta) from the exact point)

An evaluator (``evaluators``) returns one loss per point, in plan order; the estimate goes to an
update rule (``updates``). Replay feeds logged losses to the same ``estimate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from pocketzo.zo_trainer.method import Method

Role = Literal["theta", "plus", "minus", "gradient"]  # gradient: L(theta) and its exact gradient


def step_seed(run_seed: int, step: int, direction: int = 0) -> int:
    """The noise seed of ``step`` (and ``direction``): a 63-bit integer derived from the run seed."""
    key = [run_seed, step] if direction == 0 else [run_seed, step, direction]
    state = np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
    return int(state) >> 1


@dataclass(frozen=True)
class Point:
    """theta + coef * sigma * z(seed), the ``direction``-th of the step (role "theta": theta itself)."""

    role: Role
    direction: int = -1
    seed: int = 0
    coef: float = 0.0


THETA = Point("theta")


@dataclass(frozen=True)
class Plan:
    step: int
    eps: float
    seeds: tuple[int, ...]  # one per direction
    points: tuple[Point, ...]  # in evaluation order


@dataclass(frozen=True)
class Estimate:
    """Projected gradients g_j along the plan's directions (and curvatures c_j, when measured), or the
    exact gradient (a flat buffer in the weights' layout) and its L2 norm."""

    seeds: tuple[int, ...]
    grads: tuple[float, ...]
    curvatures: tuple[float, ...] | None = None
    gradient: npt.NDArray[np.float32] | None = None
    grad_norm: float = 0.0


class Estimator:
    """Plans the points of a step and turns their losses into an ``Estimate``."""

    def __init__(self, run_seed: int, directions: int):
        self.run_seed, self.directions = run_seed, directions

    def seeds(self, step: int) -> tuple[int, ...]:
        return tuple(step_seed(self.run_seed, step, j) for j in range(self.directions))

    def plan(self, step: int, eps: float) -> Plan:
        raise NotImplementedError

    def estimate(self, plan: Plan, losses: tuple[float, ...], gradient: npt.NDArray[np.float32] | None = None
                 ) -> Estimate:
        """The estimate from the plan's losses (and the gradient buffer an exact plan filled)."""
        raise NotImplementedError


def _by_role(plan: Plan, losses: tuple[float, ...], role: Role) -> list[float]:
    return [v for p, v in zip(plan.points, losses, strict=True) if p.role == role]


class TwoSided(Estimator):
    """theta + eps z_j, then theta - eps z_j, for each direction; with ``curvature`` L(theta) first."""

    def __init__(self, run_seed: int, directions: int, curvature: bool = False):
        super().__init__(run_seed, directions)
        self.curvature = curvature

    def plan(self, step: int, eps: float) -> Plan:
        seeds = self.seeds(step)
        pairs = [Point(r, j, s, c) for j, s in enumerate(seeds) for r, c in (("plus", eps), ("minus", -eps))]
        return Plan(step, eps, seeds, ((THETA,) if self.curvature else ()) + tuple(pairs))

    def estimate(self, plan: Plan, losses: tuple[float, ...], gradient: npt.NDArray[np.float32] | None = None
                 ) -> Estimate:
        plus, minus, eps = _by_role(plan, losses, "plus"), _by_role(plan, losses, "minus"), plan.eps
        grads = tuple((a - b) / (2.0 * eps) for a, b in zip(plus, minus, strict=True))
        curvatures = None
        if self.curvature:
            (zero,) = _by_role(plan, losses, "theta")
            curvatures = tuple(abs(a + b - 2.0 * zero) / (2.0 * eps * eps) for a, b in zip(plus, minus, strict=True))
        return Estimate(plan.seeds, grads, curvatures)


class OneSided(Estimator):
    """L(theta) once, then theta + eps z_j for each direction: q + 1 forwards."""

    def plan(self, step: int, eps: float) -> Plan:
        seeds = self.seeds(step)
        return Plan(step, eps, seeds, (THETA, *(Point("plus", j, s, eps) for j, s in enumerate(seeds))))

    def estimate(self, plan: Plan, losses: tuple[float, ...], gradient: npt.NDArray[np.float32] | None = None
                 ) -> Estimate:
        (zero,) = _by_role(plan, losses, "theta")
        return Estimate(plan.seeds, tuple((a - zero) / plan.eps for a in _by_role(plan, losses, "plus")))


class ExactGradient(Estimator):
    """The loss and its exact gradient at theta: one run of the bundle's gradient graph."""

    def __init__(self) -> None:
        super().__init__(0, 0)

    def plan(self, step: int, eps: float) -> Plan:
        return Plan(step, 0.0, (), (Point("gradient"),))

    def estimate(self, plan: Plan, losses: tuple[float, ...], gradient: npt.NDArray[np.float32] | None = None
                 ) -> Estimate:
        if gradient is None:
            raise ValueError("an exact-gradient plan needs an evaluator that returns the gradient")
        return Estimate((), (), gradient=gradient, grad_norm=math.sqrt(float(np.dot(gradient, gradient))))


class Hybrid(Estimator):
    """The exact point, then one-sided or two-sided ZO points (which the evaluator applies only to the
    tensors without an exact gradient): an estimate with both the exact gradient and the g_j."""

    def __init__(self, run_seed: int, directions: int, two_sided: bool):
        super().__init__(run_seed, directions)
        self.two_sided = two_sided
        self.zo: Estimator = TwoSided(run_seed, directions) if two_sided else OneSided(run_seed, directions)

    def plan(self, step: int, eps: float) -> Plan:
        zo = self.zo.plan(step, eps)
        return Plan(step, eps, zo.seeds, (Point("gradient"), *(p for p in zo.points if p.role != "theta")))

    def estimate(self, plan: Plan, losses: tuple[float, ...], gradient: npt.NDArray[np.float32] | None = None
                 ) -> Estimate:
        exact = ExactGradient().estimate(plan, losses[:1], gradient)
        if self.two_sided:
            zo = self.zo.estimate(Plan(plan.step, plan.eps, plan.seeds, plan.points[1:]), losses[1:])
        else:  # the exact point's loss is L(theta)
            zo = self.zo.estimate(Plan(plan.step, plan.eps, plan.seeds, (THETA, *plan.points[1:])), losses)
        return Estimate(plan.seeds, zo.grads, gradient=exact.gradient, grad_norm=exact.grad_norm)


def make_estimator(method: Method) -> Estimator:
    if method.method == "fo":
        return ExactGradient()
    if method.method == "hybrid":
        return Hybrid(method.seed, method.directions, two_sided=method.estimator == "two-sided")
    if method.estimator == "one-sided":
        return OneSided(method.seed, method.directions)
    return TwoSided(method.seed, method.directions, curvature=method.curvature > 0)
