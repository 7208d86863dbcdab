"""docs/value.md from the results of ``benchmarks/value.py`` (one JSON per run in benchmarks/value/)."""

from __future__ import annotations

import datetime
import json
import statistics
from collections import defaultdict
from pathlib import Path

import value_steps
import value_targets

METRICS = {"rt": ("accuracy", "auc"), "tweets": ("macro_f1", "accuracy", "auc"), "hamlet": ("perplexity",)}
PERCENT = {"accuracy", "macro_f1"}  # shown in %; AUC and perplexity as they are
READINGS = (5, 15, 60)
SECONDARY = (5, 15)  # the readings of the other metrics
MATCHED = " †"  # marks a reading made on another CPU at the tables' CPU's step count (value_steps)
# each task's score for ranking recipes, higher is better
SCORE = {"rt": lambda e: e["accuracy"], "tweets": lambda e: e["macro_f1"], "hamlet": lambda e: -e["perplexity"]}


def _load(results: Path) -> dict[str, list[dict]]:
    """row -> its runs (one per seed), by seed."""
    out: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*-s*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        out.setdefault(r["row"], []).append(r)
    return {row: sorted(runs, key=lambda r: r["seed"]) for row, runs in out.items()}


def mean_ranks(results: list[dict], recipes: tuple[str, ...]) -> tuple[dict[str, float], list[str]]:
    """Each recipe's rank (1 = best, ties averaged) on each task, averaged over the tasks where every one of
    ``recipes`` has a reading, at the latest reading they all have (the mean over the seeds run); and those tasks."""
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in results:
        recipe = r["row"][len(r["task"]) + 1:]
        for stage in r.get("stages", []):
            scores[(r["task"], recipe, stage["minutes"])].append(SCORE[r["task"]](stage["eval"]))
    ranks: dict[str, list[float]] = defaultdict(list)
    tasks = []
    for task in sorted({t for t, _, _ in scores}):
        shared = [m for m in sorted({m for t, _, m in scores if t == task})
                  if all((task, recipe, m) in scores for recipe in recipes)]
        if not shared:
            continue
        tasks.append(task)
        mean = {recipe: sum(v) / len(v) for recipe in recipes for v in [scores[(task, recipe, shared[-1])]]}
        for recipe in recipes:
            ranks[recipe].append(1 + sum(mean[o] > mean[recipe] for o in recipes)
                                 + 0.5 * sum(mean[o] == mean[recipe] for o in recipes if o != recipe))
    return {recipe: sum(v) / len(v) for recipe, v in ranks.items()}, tasks


def _stat(values: list[float], percent: bool = True) -> str:
    """mean ± std (over seeds; the std only with 2 or more), in % when ``percent``."""
    if not values:
        return "–"
    scale = 100 if percent else 1
    mean = statistics.mean(values) * scale
    text = f"{mean:.1f}" if percent else f"{mean:.3f}"
    if len(values) > 1:
        std = statistics.stdev(values) * scale
        text += f" ± {std:.1f}" if percent else f" ± {std:.3f}"
    return text


def _stage(run: dict, minutes: int) -> dict | None:
    return next((s for s in run.get("stages", []) if s["minutes"] == minutes), None)


def _forward_unit(runs: dict[str, list[dict]], task: str) -> float | None:
    """One forward-equivalent on ``task``: the median forward of its ZO-SGD runs' first stage."""
    values = [s["forward_seconds_median"] for r in runs.get(f"{task}-zo-sgd", []) for s in r["stages"][:1]
              if s.get("forward_seconds_median")]
    return statistics.median(values) if values else None


def _metric_cell(evals: list[dict], metric: str) -> str:
    return _stat([e[metric] for e in evals if e.get(metric) is not None], percent=metric in PERCENT)


def _task_table(task: str, rows: dict, runs: dict[str, list[dict]], elsewhere: set[str]) -> list[str]:
    metrics = METRICS[task]
    unit = _forward_unit(runs, task)
    extra = {"rt": ["out of domain"], "hamlet": ["speaker lines"]}.get(task, [])
    head = ["row", "what", "seeds"] + [f"{m} @ {t} min" for t in READINGS for m in metrics[:1]] + \
        [f"{m} @ {t} min" for m in [*metrics[1:], *extra] for t in SECONDARY] + \
        ["last reading: steps", "FE", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if row.task != task:
            continue
        got = runs.get(name, [])
        if not got:
            where = "run on other CPUs only (listed apart)" if name in elsewhere else "not run yet"
            lines.append(f"| {name} | {row.what} | {where} |" + " |" * (len(head) - 3))
            continue
        if not row.trains:  # one evaluation, the same at every reading
            e = [r["eval"] for r in got]
            cells = [_metric_cell(e, metrics[0])] * len(READINGS)
            cells += [c for m in metrics[1:] for c in [_metric_cell(e, m)] * len(SECONDARY)]
            cells += [c for c in _extra_cells(task, got) for _ in SECONDARY]
            cells += ["0", "0", "–"]
        else:
            at = {t: [s for r in got if (s := _stage(r, t))] for t in READINGS}
            mark = {t: MATCHED if any("step_matched" in s for s in at[t]) else "" for t in READINGS}
            cells = [_metric_cell([s["eval"] for s in at[t]], metrics[0]) + mark[t] if t in row.minutes else ""
                     for t in READINGS]
            cells += [_metric_cell([s["eval"] for s in at[t]], m) + mark[t] for m in metrics[1:] for t in SECONDARY]
            extras = {t: _extra_cells(task, at[t]) for t in SECONDARY}
            cells += [extras[t][k] + mark[t] for k in range(len(extra)) for t in SECONDARY]
            latest = max(r["stages"][-1]["minutes"] for r in got)  # the seeds that reached it, not a mix of readings
            last = [s for r in got if (s := _stage(r, latest))]
            seeds = "" if len(last) == len(got) else f", {len(last)} of {len(got)} seeds"
            cells.append(f"{statistics.mean(s['steps'] for s in last):,.0f} ({latest} min{seeds})")
            seconds = statistics.mean(value_steps.reference_seconds(s) for s in last)
            cells.append(f"{seconds / unit:,.0f}" if unit else "–")
            cells.append(f"{max(s['peak_rss_mb'] for r in got for s in r['stages']):,.0f} MB")
        lines.append(f"| {name} | {row.what} | {len(got)} | " + " | ".join(cells) + " |")
    return lines


def _extra_cells(task: str, readings: list[dict]) -> list[str]:
    """Out-of-domain accuracy (rt) or the samples' share of speaker lines (hamlet), from results or stages."""
    if task == "rt":
        return [_metric_cell([r["ood"] for r in readings if "ood" in r], "accuracy")]
    if task == "hamlet":
        return [_stat([r["speaker_line_share"] for r in readings if r.get("speaker_line_share") is not None])]
    return []


def _samples(runs: dict[str, list[dict]]) -> list[str]:
    """The hamlet rows' greedy samples (seed 0; trained rows at their latest reading)."""
    out = []
    for name, rs in runs.items():
        r = next((r for r in rs if r["seed"] == 0 and r.get("task") == "hamlet"), None)
        source = r and (r["stages"][-1] if r.get("stages") else r)
        if source and source.get("samples"):
            out += [f"**{name}**" + (f" (after {source['minutes']} minutes)" if "stages" in r else ""), ""]
            out += ["    " + line for sample in source["samples"] for line in (*sample.splitlines(), "")]
    reference = next((r.get("reference_speaker_line_share") for rs in runs.values() for r in rs
                      if r.get("reference_speaker_line_share") is not None), None)
    if reference is not None:
        out.insert(0, f"Speaker lines in the held-out text itself: {100 * reference:.1f} %.\n")
    return out


def _mean_points(runs: list[dict], minutes: tuple[int, ...], metric: str, scale: float) -> list[tuple[float, float]]:
    """(minutes, the mean over ``runs`` of ``metric``) from zero-shot at 0, at each reading every run has."""
    points = [(0.0, scale * statistics.mean(r["zero_shot"][metric] for r in runs))]
    for t in minutes:
        at = [s["eval"][metric] for r in runs if (s := _stage(r, t))]
        if len(at) == len(runs):
            points.append((float(t), scale * statistics.mean(at)))
    return points


def _curves(task: str, rows: dict, runs: dict[str, list[dict]], path: Path) -> bool:
    """The task's figure: its first metric against training minutes, per trained row (the mean over seeds at
    each reading every seed has, from the zero-shot point at 0; a later reading only some seeds have, as those
    seeds' own curve), the untrained rows as lines."""
    from pocketzo.plots import curves_figure  # noqa: PLC0415 (matplotlib, loaded only to draw)

    metric = METRICS[task][0]
    scale = 100 if metric in PERCENT else 1
    curves, levels = {}, {}
    for name, row in rows.items():
        got = runs.get(name, [])
        if row.task != task or not got:
            continue
        label = name[len(task) + 1:]
        if not row.trains:
            levels[label] = scale * statistics.mean(r["eval"][metric] for r in got)
            continue
        points = _mean_points(got, row.minutes, metric, scale)
        if len(points) > 1:
            curves[label] = points
        longest = max((r["stages"][-1]["minutes"] for r in got if r.get("stages")), default=None)
        few = [r for r in got if _stage(r, longest)]
        if 0 < len(few) < len(got):  # a later reading only some seeds have: those seeds' own curve, named
            curves[f"{label}, seed {', '.join(str(r['seed']) for r in few)}"] = _mean_points(few, row.minutes,
                                                                                         metric, scale)
    if not curves:
        return False
    unit = " (%)" if scale == 100 else ""
    curves_figure(curves, levels, path, f"{task}: {metric} against training time (mean over seeds)",
                  metric.replace("_", "-") + unit)
    return True


def _defaults(runs: dict[str, list[dict]]) -> list[str]:
    """How `pocketzo train` chooses its recipe, from these results: each candidate's mean rank."""
    from pocketzo.zo_trainer.recipes import CANDIDATES, DEFAULTS, GRAPH_KINDS  # noqa: PLC0415

    results = [r for rs in runs.values() for r in rs]
    lines = ["A new `pocketzo train` run that names no `--recipe` takes, among the recipes its bundle can run "
             "without a hand-set lr, the one with the best mean rank over the tasks below (each task at the latest "
             "reading all of them have, the mean over the seeds run). `tests/test_recipes.py` fails when these "
             "results rank another recipe first.", "",
             "| bundle | mean rank (1 = best) | tasks compared | default |", "|---|---|---|---|"]
    for graph, names in CANDIDATES.items():
        ranks, tasks = mean_ranks(results, names)
        shown = ", ".join(f"{n} {ranks[n]:.2f}" for n in names) if tasks else "not measured yet"
        lines.append(f"| {GRAPH_KINDS[graph]} | {shown} | {', '.join(tasks) or '–'} | {DEFAULTS[graph]} |")
    return lines


def _other_machines(results: Path, tables: dict[str, list[dict]]) -> list[str]:
    """The runs made on another CPU than the tables' (``results/other-machines``), listed apart: a reading at a
    number of training minutes depends on the CPU, so they enter no table, target or default."""
    runs = [r for rs in _load(results / "other-machines").values() for r in rs]
    if not runs:
        return []
    units = ", ".join(f"{t}: {fe:.3f} s" for t in sorted({r["task"] for r in runs})
                      if (fe := _forward_unit(tables, t)) is not None)
    out = ["## Runs on other machines", "",
           "Not in the tables above: a reading after some minutes of training depends on the CPU. Listed so that "
           "no run is hidden. Their forward (median) column compares with one FE on the tables' CPU"
           + (f" ({units})." if units else "."), "",
           "| row | seed | CPU | date | reading: steps, score | step (median) | forward (median) |",
           "|---|---|---|---|---|---|---|"]
    for r in runs:
        for stage in r["stages"]:
            score = ", ".join(f"{k.replace('_', '-')} {_stat([stage['eval'][k]], k != 'perplexity')}"
                              for k in ("accuracy", "macro_f1", "perplexity") if stage["eval"].get(k) is not None)
            cpu = r.get("cpu", "not recorded")
            out.append(f"| {r['row']} | {r['seed']} | {cpu} | {r['date'][:10]} | {stage['minutes']} min: "
                       f"{stage['steps']} steps, {score} | {stage['step_seconds_median']:.2f} s | "
                       f"{stage['forward_seconds_median']:.3f} s |")
    return [*out, ""]


def write_report(results: Path, report: Path, rows: dict, tasks: dict) -> None:
    runs = _load(results)
    dates = sorted(r["date"][:10] for rs in runs.values() for r in rs)
    when = f"{dates[0]} to {dates[-1]}" if dates else "not run yet"
    machine = next((r["machine"] for rs in runs.values() for r in rs
                    if r.get("cpu", value_steps.REFERENCE_CPU).startswith(value_steps.REFERENCE_CPU)), "–")
    out = [
        "# Value per phone-minute: what a fine-tune gains for its training time",
        "",
        f"Generated by `make bench-value` (`benchmarks/value.py`, `benchmarks/report_value.py`) from the runs in "
        f"`benchmarks/value/` ({when}; {machine}; an AMD EPYC (Zen 4) VM, which these runs, made before results "
        "recorded the CPU, do not name; readings on another CPU join them only when matched by step, marked †, and "
        "other runs on other CPUs are listed apart, before the commands). Each run is one "
        "`pocketzo train` process, one run at a time. "
        "Readings are at 5, 15 and (ZO-SGD) 60 minutes of training: the sum of the step times, evaluations "
        "excluded; the run is stopped there (`--max-train-seconds`), evaluated on the whole test split, and "
        "resumed. A forward-equivalent (FE) is one forward of the task's loss graph at its batch (16 x 64 for rt, "
        "16 x 96 for tweets, 8 x 128 for hamlet: the median forward of its ZO-SGD run), the one unit of compute "
        "for every row of a task (a LoRA or prompt-tuning forward costs more than one FE). Accuracy, macro-F1 and "
        "speaker lines in %, AUC and perplexity as they are, mean ± std over the seeds run; AUC: of the label "
        "scores (two labels: of the margin), which a moved decision threshold cannot raise.",
        "",
        *value_steps.report_lines(runs, MATCHED),
    ]
    elsewhere = set(_load(results / "other-machines"))
    for task in tasks:
        out += [f"## {task}", "", *_task_table(task, rows, runs, elsewhere), ""]
        figure = report.parent / "img" / f"value-{task}.png"
        figure.parent.mkdir(exist_ok=True)
        if _curves(task, rows, runs, figure):
            out += [f"![{task}: score against training minutes](img/{figure.name})", ""]
    targets = value_targets.lines(runs, rows)
    if targets:
        out += ["## Targets", "", "Each from the tables above: the mean over the seeds run at a reading, among the "
                f"readings with {value_targets.CONFIRMED} seeds once there are any.", "",
                *targets, ""]
    out += ["## Defaults", "", *_defaults(runs), ""]
    samples = _samples(runs)
    if samples:
        out += ["## Hamlet samples (greedy)", "", *samples]
    out += _other_machines(results, runs)
    out += ["## Reproduce", "", "    make bench-value          # the grid; resumable, skips the runs done",
            "    make bench-value-quick    # rt: zero-shot rows, zo-sgd and the default (fo-adamw), seed 0, 5 minutes "
            "each", "",
            "Commands of the runs:", ""]
    for name, rs in runs.items():
        for r in rs:
            if "command" in r:
                out.append(f"- {name} s{r['seed']}: `{r['command']}`")
    out.append(f"\n(report written {datetime.date.today().isoformat()})")
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text("\n".join(out) + "\n", encoding="utf-8")
    tmp.replace(report)
