"""bench-value on another CPU than the tables': read a run at the step the tables' CPU reached, not the minute.

A reading after N minutes of training depends on the CPU; the weights after a given step should not (a run's
noise, batches and updates follow its seed and step; every run that makes one of the tables' readings again
tests this, ``check``). So a run of a row the tables' CPU has already trained is read, on another CPU, at the step count
that CPU's runs of the row reached by that reading (``pocketzo train --stop-at-step``):

- the same seed's own reading, when the tables have it: the run makes it again, as a check that the two CPUs
  agree (``check``), and the tables keep the reading made on their CPU;
- else the mean over the row's seeds that have that reading;
- else that many minutes at the row's step rate on the tables' CPU (the training seconds over the steps of each
  seed's latest reading). How far off that is, the report shows from the runs with a 5- and a 15-minute reading
  (``rate_spread``): about as far as the run-to-run speed of the tables' CPU itself.

Such a stage is marked ``step_matched`` (the CPU and where its step count came from) and the tables mark it. A
row the tables' CPU never trained has no step count to match: its runs stay apart (``other-machines/``); so
do a row's runs on a CPU where one of its checks did not agree: its runs there have parted from the tables' CPU's
(a run whose updates amplify rounding differences, such as ZO-SGD at a constant lr going unstable, can part).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# The tables' CPU: any AMD EPYC (the tables' runs were made on an AMD EPYC (Zen 4) VM; the first of them did not
# record the CPU).
REFERENCE_CPU = "AMD EPYC"
# How closely a reading made again on another CPU must agree with the tables' (relative, on the test loss).
AGREE = 1e-3


@dataclass(frozen=True)
class StepTarget:
    steps: int
    source: str  # where the step count came from, as the report says it
    reference: dict | None  # the same seed's stage on the tables' CPU, which the run makes again


def reference_stages(run: dict) -> list[dict]:
    """The stages of a result that the tables' CPU made (not matched by step on another CPU)."""
    return [s for s in run.get("stages", []) if "step_matched" not in s]


def target(runs: list[dict], seed: int, minutes: int) -> StepTarget | None:
    """The step at which ``seed``'s run of a row is read at ``minutes``, from the row's results ``runs`` (one per
    seed, as saved); None when the tables' CPU has no trained reading of the row."""
    own = next((s for r in runs if r["seed"] == seed for s in reference_stages(r) if s["minutes"] == minutes), None)
    if own is not None:
        return StepTarget(own["steps"], f"seed {seed}'s own {minutes}-minute reading", own)
    same = [(r["seed"], s["steps"]) for r in runs for s in reference_stages(r) if s["minutes"] == minutes]
    if same:
        seeds = ", ".join(str(s) for s, _ in same)
        return StepTarget(round(statistics.mean(n for _, n in same)), f"the mean of seeds {seeds} at {minutes} min",
                          None)
    latest = [stages[-1] for r in runs if (stages := reference_stages(r))]
    if not latest:
        return None
    per_step = sum(s["train_seconds"] for s in latest) / sum(s["steps"] for s in latest)
    return StepTarget(round(60 * minutes / per_step), f"{minutes} min at {per_step:.3f} s a step, the row's rate over "
                      f"{len(latest)} run(s) on the tables' CPU", None)


def check(reference: dict, here: dict, cpu: str) -> dict:
    """The same seed's reading at the same step, made again on ``cpu``: both test losses and whether they agree (to
    ``AGREE``). A row with a check that does not agree is not matched by step on that CPU (``failed``)."""
    loss, again = reference["eval"]["loss"], here["eval"]["loss"]
    return {"minutes": reference["minutes"], "steps": reference["steps"], "cpu": cpu, "loss_reference": loss,
            "loss_here": again, "agrees": abs(again - loss) <= AGREE * abs(loss)}


def _apart(check: dict) -> float:
    """How far apart a check's two test losses are, relative to the tables' CPU's."""
    return abs(check["loss_here"] - check["loss_reference"]) / abs(check["loss_reference"])


def disagreement(check: dict) -> str:
    """Why a check that does not agree stops the matching, in one line."""
    return (f"step {check['steps']}: the test loss on {check['cpu']} is {check['loss_here']:.6f}, on the tables' CPU "
            f"{check['loss_reference']:.6f}: the two CPUs' runs have parted, so this row's readings cannot be "
            "matched by step on this CPU; its runs here go to other-machines/")


def failed(runs: list[dict], cpu: str) -> list[dict]:
    """The checks of a row's results made on ``cpu`` that did not agree."""
    return [c for r in runs for c in r.get("checks", []) if c["cpu"] == cpu and not c.get("agrees", True)]


def rate_spread(runs: list[dict]) -> list[float]:
    """For each result with a reference reading at 5 and at 15 minutes: its steps at 15 over 3 x its steps at 5,
    how far the 5-minute rate misses the 15-minute step count."""
    out = []
    for r in runs:
        steps = {s["minutes"]: s["steps"] for s in reference_stages(r)}
        if 5 in steps and 15 in steps:
            out.append(steps[15] / (3 * steps[5]))
    return out


def reference_seconds(stage: dict) -> float:
    """The stage's training seconds on the tables' CPU: its own, or (matched by step on another CPU) the reading's
    minutes, which that CPU took to reach the step."""
    return 60.0 * stage["minutes"] if "step_matched" in stage else stage["train_seconds"]


def report_lines(runs: dict[str, list[dict]], mark: str) -> list[str]:
    """What the tables owe to another CPU: the stages read at the tables' CPU's step counts, the checks that the
    two CPUs agree, and how far a step count projected from a run's rate can miss."""
    results = [r for rs in runs.values() for r in rs]
    matched = [(r, s) for r in results for s in r.get("stages", []) if "step_matched" in s]
    checks = [c for r in results for c in r.get("checks", [])]
    if not matched and not checks:
        return []
    cpus = sorted({s["step_matched"]["cpu"] for _, s in matched} | {c["cpu"] for c in checks})
    runs_matched = len({(r["row"], r["seed"]) for r, _ in matched})
    dates = sorted({s["step_matched"]["date"] for _, s in matched})
    when = f", {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "") if dates else ""
    out = [f"Readings marked {mark.strip()} were made on another CPU ({', '.join(cpus)}{when}) at the step count the "
           "tables' CPU reached by that reading (`pocketzo train --stop-at-step`; `benchmarks/value_steps.py`): "
           "the weights after a step should not depend on the CPU (the checks below test it), the minutes do. "
           f"Their FE counts the reading's minutes on the tables' CPU. {_count(len(matched), 'reading')} of "
           f"{_count(runs_matched, 'run')}:", ""]
    out += [f"- {r['row']} s{r['seed']} at {s['minutes']} min: step {s['steps']:,} ({s['step_matched']['source']})"
            for r, s in matched]
    agreed = [c for c in checks if c.get("agrees", True)]
    if agreed:
        worst = max(_apart(c) for c in agreed)
        out += ["", f"Checks: {_count(len(agreed), 'reading')} of the tables made again at the same step on the "
                f"other CPU; the test losses differ by at most {worst:.1e} of the loss (a row is no longer matched "
                f"on a CPU once they differ by more than {AGREE:g} there)."]
    parted = [(r, c) for r in results for c in r.get("checks", []) if not c.get("agrees", True)]
    if parted:
        out += ["", "Checks that did not agree; these rows' runs on that CPU are listed apart, not matched:", ""]
        out += [f"- {r['row']} s{r['seed']} at {c['minutes']} min (step {c['steps']:,}) on {c['cpu']}: test loss "
                f"{c['loss_here']:.6f} against {c['loss_reference']:.6f}, "
                f"{_apart(c):.1e} of the loss"
                + "".join(f"; at {e['minutes']} min (step {e['steps']:,}) it was "
                          f"{_apart(e):.1e}"
                          for e in r["checks"] if e["cpu"] == c["cpu"] and e.get("agrees", True))
                for r, c in parted]
    spread = rate_spread(results)
    if spread:
        out += ["", f"A step count projected from a run's 5-minute rate: the {len(spread)} runs of the tables' CPU "
                f"with a 5- and a 15-minute reading made {min(spread):.2f} to {max(spread):.2f} x (median "
                f"{statistics.median(spread):.2f}) the steps at 15 minutes that rate predicts."]
    return [*out, ""]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
