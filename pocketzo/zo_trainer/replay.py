"""Replay: rebuild a run's weights from the bundle's initial weights and the step log, bit for bit.

Replay builds the trainer the run had (the same estimator, update rule and evaluator, so the same
float32 passes over the buffer) and gives it, in place of a session, the losses the log recorded at
each point. Values are looked up by what they are (step, direction, L+ / L- / L(theta)), never by the
order they are asked for. Each step's seeds and projected gradients are checked against the log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from pocketzo.errors import PocketzoError
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.estimators import Plan, Point
from pocketzo.zo_trainer.method import METHOD_VERSION, Method
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS
from pocketzo.zo_trainer.steplog import LOG, read_log
from pocketzo.zo_trainer.trainer import StepRecord, build_trainer, resolve_directions

CONFIG = "config.json"


class LoggedLosses:
    """The losses a log recorded, answered by point."""

    def __init__(self, records: Iterable[StepRecord]):
        self.records = {r.step: r for r in records}

    def point(self, plan: Plan, point: Point, _batch: object = None) -> float:
        r = self.records[plan.step]
        if point.role == "theta":
            value = r.loss_theta
        else:
            if point.direction >= len(r.directions) or r.directions[point.direction].seed != point.seed:
                raise PocketzoError(f"step {plan.step}: the log's directions do not match the run's method (seed or "
                                    "count differs); the log belongs to another run or config.json was edited")
            d = r.directions[point.direction]
            value = d.loss_plus if point.role == "plus" else d.loss_minus
        if value is None:
            if r.status == "undone":  # an undone step's losses are not used
                return math.nan
            raise PocketzoError(f"step {plan.step}: the log has no {point.role} loss for direction "
                                f"{point.direction}; it was written by another method")
        return value

    def plan(self, plan: Plan, _batch: object = None) -> list[float]:
        return [self.point(plan, p) for p in plan.points]


def replay(params: FlatParameters, method: Method, records: list[StepRecord], slots: int = 1) -> None:
    """Re-apply logged steps to ``params`` (the initial weights) without any forward pass."""
    if method.first_order:
        raise PocketzoError(f"a run with exact gradients (--method {method.method}) is not in its log: its gradients "
                            "are not logged; its checkpoints and final weights are the record")
    method = resolve_directions(method, slots)
    logged = LoggedLosses(records)
    trainer = build_trainer(params, slots, method, 1, logged.point if slots == 1 else logged.plan)
    try:
        for r in records:
            got = trainer.step(r.step, None, r.lr, -math.inf if r.status == "undone" else math.inf)
            if [d.grad for d in got.directions] != [d.grad for d in r.directions]:
                raise PocketzoError(f"step {r.step}: the logged projected gradients do not follow from the logged "
                                    "losses; the log is corrupt")
    finally:
        trainer.close()


def read_run_config(run: Path) -> dict:
    """A run directory's config.json, or a clear error."""
    try:
        return json.loads((run / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PocketzoError(f"{run / CONFIG}: cannot read the run's config ({e})") from None


def method_of(run: Path, saved: dict) -> Method:
    """The method a run's config.json (``saved``) records, if this pocketzo reproduces it."""
    if "method" not in saved:
        raise PocketzoError(f"{run}: written by an older pocketzo (no 'method' in {CONFIG}); replay or resume it "
                            "with the pocketzo that trained it")
    try:
        method = Method.from_json(saved["method"])
    except (TypeError, ValueError) as e:
        raise PocketzoError(f"{run / CONFIG}: the run's method is not valid ({e})") from None
    if method.version != METHOD_VERSION:
        raise PocketzoError(f"{run}: trained with method version {method.version}, whose noise or log this "
                            f"pocketzo (version {METHOD_VERSION}) does not reproduce; use the pocketzo that trained it")
    if method.noise_chunk != CHUNK_ELEMENTS:
        raise PocketzoError(f"{run}: trained with noise chunks of {method.noise_chunk} elements, this pocketzo "
                            f"draws {CHUNK_ELEMENTS}; its noise cannot be regenerated here")
    return method


def replay_run(bundle_path: str | Path, log: str | Path) -> FlatParameters:
    """A run's final weights from the bundle and its log (log.jsonl or log.bin, or the run directory),
    with the config.json next to the log."""
    log = Path(log)
    run, log = (log, log / LOG) if log.is_dir() else (log.parent, log)
    method = method_of(run, read_run_config(run))
    bundle = Bundle(bundle_path)
    params = FlatParameters.from_bundle(bundle)
    replay(params, method, read_log(log), bundle.manifest.slots)
    return params
