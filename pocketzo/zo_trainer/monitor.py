"""Watching a run: the divergence guard's loss limit, and the warning for a run that is not learning.

The loss limit is ``spike_factor`` x the larger of two levels: the median of the last 32 good steps' losses,
and the run's starting level (the median of its first 8 good steps). The ratio to the recent median alone
failed once a model fitted: a cross-entropy's median falls towards zero, and a batch with one misclassified
row then sits 30x above it, an ordinary batch taken for a divergence (issue 40). A loss under 10x the
loss the run started from is not a divergence, however small the recent losses; a non-finite one always is.

The stall check runs once, after min(100, steps / 2) steps. A run with a mid-run evaluation is judged
by it: learning if the dev loss fell or the accuracy rose since step 0. Without one, by a trend test
on the training loss: the least-squares slope of the steps' mean losses over the steps so far, which
must be below zero by two standard errors. (Comparing the first and last 20 steps' means, as before,
missed slow steady progress buried in batch-to-batch noise.)
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from pocketzo.zo_trainer.method import Method
from pocketzo.zo_trainer.trainer import StepRecord

SPIKE_WINDOW = 32
START_STEPS = 8  # the good steps whose median is the run's starting level
STALL_CHECK, STALL_MIN_STEPS = 100, 20


def loss_trend(losses: list[float]) -> tuple[float, float]:
    """(least-squares slope per step, its t statistic) of ``losses`` against their index."""
    n = len(losses)
    xbar, ybar = (n - 1) / 2, statistics.fmean(losses)
    sxx = sum((i - xbar) ** 2 for i in range(n))
    slope = sum((i - xbar) * (y - ybar) for i, y in enumerate(losses)) / sxx
    residual = sum((y - ybar - slope * (i - xbar)) ** 2 for i, y in enumerate(losses)) / (n - 2)
    se = math.sqrt(residual / sxx)
    return slope, (slope / se if se > 0 else (-math.inf if slope < 0 else math.inf))


def evals_improved(evals: list[dict]) -> bool | None:
    """Whether the latest evaluation beats step 0's (loss down or accuracy up); None without one."""
    if len(evals) < 2 or evals[0].get("step") != 0:
        return None
    first, last = evals[0], evals[-1]
    if last["loss"] < first["loss"]:
        return True
    return first.get("accuracy") is not None and last["accuracy"] > first["accuracy"]


class RunMonitor:
    """The mean loss of every good step, for the spike limit and the stall check.

    Everything here is derived from the log's records (a resumed run replays them into a new monitor)."""

    def __init__(self, method: Method, spike_factor: float):
        self.method, self.spike_factor = method, spike_factor
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.losses: list[float] = []  # up to the stall check

    def remember(self, r: StepRecord) -> None:
        if r.status == "ok":
            self.recent.append(r.loss)
            if len(self.losses) < STALL_CHECK:
                self.losses.append(r.loss)

    def start_level(self) -> float:
        """The median loss of the run's first good steps (needs ``START_STEPS`` of them)."""
        return statistics.median(self.losses[:START_STEPS])

    def loss_limit(self) -> float:
        if not self.spike_factor or len(self.recent) < START_STEPS:
            return math.inf
        return self.spike_factor * max(statistics.median(self.recent), self.start_level())

    def stall_step(self) -> int:
        return min(STALL_CHECK, self.method.steps // 2)

    def stall_warning(self, steps_done: int, evals: list[dict]) -> str | None:
        """The warning for a run that has not learnt by the stall check's step, or None."""
        if steps_done != self.stall_step() or steps_done < STALL_MIN_STEPS or len(self.losses) < STALL_MIN_STEPS:
            return None
        improved = evals_improved(evals)
        if improved:
            return None
        m = self.method
        hint = (f"raise --lr (now {m.lr:g}; try {10 * m.lr:g})" if not (m.adaptive or m.normalize or m.sign) else
                f"raise --lr (now {m.lr:g}: with --adaptive/--normalize/--sign it is the step per weight)")
        if improved is None:
            slope, t = loss_trend(self.losses)
            if t < -2:
                return None
            what = (f"the training loss has not decreased (slope {100 * slope:+.3g} per 100 steps, "
                    f"{t:.1f} standard errors, over {len(self.losses)} steps)")
        else:
            what = (f"the dev loss has not decreased ({evals[0]['loss']:.4g} at step 0, {evals[-1]['loss']:.4g} at "
                    f"step {evals[-1]['step']})")
        return (f"after {steps_done} steps {what}: {hint}, or check that the bundle trains the tensors you meant "
                "(pocketzo export --trainable/--peft); docs/value.md lists what worked on real tasks")
