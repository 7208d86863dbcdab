"""The targets of docs/value.md (issue "Value per phone-minute"), each read from the committed results: what was
reached, by which row, at which reading and over how many seeds."""

from __future__ import annotations

import statistics
from collections import defaultdict

WITHIN = 15  # minutes: the targets' budget
UNTRAINED = 0  # the "reading" of a row without training: its one evaluation holds at every training time
CONFIRMED = 3  # seeds: once a reading has this many, the targets are judged on such readings only


def _means(runs: dict[str, list[dict]], name: str, get) -> dict[int, tuple[float, int]]:
    """minutes -> (the mean over seeds of ``get(reading)``, how many seeds) at each reading of row ``name``; a
    row without training has its one evaluation under ``UNTRAINED``."""
    by: dict[int, list[float]] = defaultdict(list)
    for r in runs.get(name, []):
        for stage in r.get("stages") or [{"minutes": UNTRAINED, **r}]:
            if (value := get(stage)) is not None:
                by[stage["minutes"]].append(value)
    return {m: (statistics.mean(v), len(v)) for m, v in sorted(by.items())}


def _best_within(runs: dict[str, list[dict]], names: list[str], get, minutes: int, higher: bool = True):
    """(value, row, reading, seeds) of the best mean among ``names`` at readings up to ``minutes``, or None; among
    the readings with ``CONFIRMED`` seeds when there are any, so that one lucky seed cannot carry a target."""
    found = [(v, name, m, n) for name in names for m, (v, n) in _means(runs, name, get).items() if m <= minutes]
    confirmed = [x for x in found if x[3] >= CONFIRMED]
    return (max if higher else min)(confirmed or found, default=None, key=lambda x: x[0])


def lines(runs: dict[str, list[dict]], rows: dict) -> list[str]:
    """The issue's targets, each from the readings above: what was reached and by which row."""
    def trained(task: str, *, zo_only: bool = False) -> list[str]:
        return [n for n, r in rows.items() if r.task == task and r.trains and not r.pytorch
                and (not zo_only or n.endswith(("-best", "-fzoo")))]

    def level(name: str, get) -> float | None:
        got = _means(runs, name, get).get(UNTRAINED)
        return got and got[0]

    def said(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def seeds(n: int) -> str:
        return f"{n} seed" + ("s" if n > 1 else "")

    def acc(s):
        return s["eval"].get("accuracy")

    def f1(s):
        return s["eval"].get("macro_f1")

    def ppl(s):
        return s["eval"].get("perplexity")

    def ood(s):
        return (s.get("ood") or {}).get("accuracy")

    out = []
    rt, calibrated = _best_within(runs, trained("rt"), acc, WITHIN), level("rt-zero-shot-calibrated", acc)
    if rt and calibrated:
        v, name, m, n = rt
        out.append(f"- rt, >= 84.0 % within {WITHIN} minutes and >= 4 points above the calibrated zero-shot "
                   f"({100 * calibrated:.1f} %): {name} {100 * v:.1f} % at {m} min ({seeds(n)}): "
                   f"{said(v >= 0.84 and v - calibrated >= 0.04)}")
    tw, zero = _best_within(runs, trained("tweets"), f1, WITHIN), level("tweets-zero-shot", f1)
    ceiling = _best_within(runs, ["tweets-pytorch-adamw"], f1, WITHIN)
    if tw and zero is not None and ceiling:
        share = (tw[0] - zero) / (ceiling[0] - zero)
        out.append(f"- tweets, >= 90 % of the macro-F1 gap from zero-shot ({100 * zero:.1f}) to PyTorch AdamW "
                   f"({100 * ceiling[0]:.1f} at {ceiling[2]} min) within {WITHIN} minutes: {tw[1]} "
                   f"{100 * tw[0]:.1f} at {tw[2]} min ({seeds(tw[3])}), {100 * share:.0f} % of it: "
                   f"{said(share >= 0.9)}")
    ham, zero = _best_within(runs, trained("hamlet"), ppl, WITHIN, higher=False), level("hamlet-zero-shot", ppl)
    if ham and zero:
        out.append(f"- hamlet, perplexity <= 0.8 x zero-shot ({0.8 * zero:.1f}) within {WITHIN} minutes: {ham[1]} "
                   f"{ham[0]:.1f} at {ham[2]} min ({seeds(ham[3])}): {said(ham[0] <= 0.8 * zero)}")
    zero = level("rt-zero-shot", ood)
    if zero:
        worse = [f"{n} at {m} min ({100 * (zero - v):.1f} points)" for n in trained("rt")
                 for m, (v, _) in _means(runs, n, ood).items() if zero - v > 0.01]
        out.append(f"- out of domain, no drop over 1 point from zero-shot ({100 * zero:.1f} %) after the rt "
                   "fine-tune: " + (f"dropped: {', '.join(worse)}" if worse else "no row dropped") + ": "
                   + said(not worse))
    shown = {"rt": lambda v: f"{100 * v:.1f} %", "tweets": lambda v: f"macro-F1 {100 * v:.1f}",
             "hamlet": lambda v: f"perplexity {v:.1f}"}
    for task, get, higher in (("rt", acc, True), ("tweets", f1, True), ("hamlet", ppl, False)):
        long = _means(runs, f"{task}-zo-sgd", get)
        zo = _best_within(runs, trained(task, zo_only=True), get, WITHIN, higher)
        if not long or not zo:
            continue
        if 60 not in long:
            out.append(f"- ZO alone on {task}: the tables have no 60-minute reading of ZO-SGD to judge it against: "
                       "**not judged**")
            continue
        show, (base, n) = shown[task], long[60]
        peak = (max if higher else min)(long.items(), key=lambda kv: kv[1][0])
        drift = (f"ZO-SGD's best reading is {show(peak[1][0])} at {peak[0]} min (its constant lr drifts)"
                 if peak[0] != 60 else "ZO-SGD's best reading is its 60-minute one")
        out.append(f"- ZO alone on {task}, the best ZO recipe within {WITHIN} minutes against ZO-SGD's 60-minute "
                   f"reading ({show(base)}, {seeds(n)}): {zo[1]} {show(zo[0])} at {zo[2]} min ({seeds(zo[3])}): "
                   f"{said(zo[0] >= base if higher else zo[0] <= base)}. {drift}")
    return out
