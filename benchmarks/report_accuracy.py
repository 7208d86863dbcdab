"""Aggregate the accuracy benchmark's runs into benchmarks/accuracy.json, docs/accuracy.md and a curve PNG per task."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from accuracy import BASELINE, BEST, EVAL_FRACTIONS, EVAL_ROWS, METHODS, RESULTS, TASKS, Task, same_settings

BACKPROP = "backprop-adamw"
LONG_BASELINE = "zo-sgd-4x-budget"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def collect(name: str, task: Task) -> dict:
    """The task's rows: every method whose runs match its current settings, and backprop."""
    results = RESULTS / name
    runs: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*-s*.json")):
        run = json.loads(path.read_text())
        method = run["method"]
        if method == BACKPROP or (method in METHODS and same_settings(run, task, method)):
            runs.setdefault(method, []).append(run)
    zero_file = results / "zero-shot.json"
    zero = json.loads(zero_file.read_text())["final_accuracy"] if zero_file.is_file() else None
    rows = {}
    for method, rs in runs.items():
        if method == BACKPROP:
            rows[method] = {"seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"], "lr": rs[0]["lr"],
                            "trainable": rs[0]["trainable_parameters"], "final": [r["final_accuracy"] for r in rs],
                            "curve": _curve(rs, "step"),
                            "step_seconds": statistics.median(r["step_seconds_median"] for r in rs),
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
            continue
        rows[method] = {"seeds": [r["seed"] for r in rs], "budget": rs[0]["budget"], "config": rs[0]["config"],
                        "final": [r["final_accuracy"] for r in rs], "curve": _curve(rs, "forward_passes"),
                        "diverged": sum(bool(r["diverged"]) for r in rs),
                        "extra_state_bytes": rs[0]["extra_state_bytes"], "trainable": rs[0]["trainable"],
                        "step_seconds": statistics.median(r["step_seconds_median"] for r in rs)}
    return {"zero_shot": zero, "rows": rows}


def _curve(runs: list[dict], x: str) -> list[dict]:
    """Points reached by every seed: x, and the accuracies of the seeds there."""
    common = set.intersection(*({p[x] for p in r["curve"]} for r in runs))
    return [{x: v, "accuracy": [next(p["accuracy"] for p in r["curve"] if p[x] == v) for r in runs]}
            for v in sorted(common)]


def targets(result: dict) -> dict:
    rows, zero = result["rows"], result["zero_shot"]
    if BASELINE not in rows or BEST not in rows:
        return {}
    base = statistics.fmean(rows[BASELINE]["final"])
    best = rows[BEST]
    reach = next((p["forward_passes"] for p in best["curve"] if statistics.fmean(p["accuracy"]) >= base), None)
    out = {"baseline_final": base, "baseline_forwards": rows[BASELINE]["budget"], "best_forwards_to_baseline": reach,
           "best_final": statistics.fmean(best["final"]), "best_diverged_seeds": best["diverged"],
           "sampled_at": [p["forward_passes"] for p in best["curve"]]}
    if reach:
        out["forward_ratio"] = reach / rows[BASELINE]["budget"]
    if LONG_BASELINE in rows:  # the same target read at 4x the budget: best's whole budget is 1/4 of ZO-SGD's
        out["long_baseline_final"] = statistics.fmean(rows[LONG_BASELINE]["final"])
        out["long_baseline_forwards"] = rows[LONG_BASELINE]["budget"]
    if BACKPROP in rows and zero is not None:
        ceiling = statistics.fmean(rows[BACKPROP]["final"])
        out["backprop_final"] = ceiling
        out["gap_closed"] = (out["best_final"] - zero) / (ceiling - zero) if ceiling != zero else None
        same_budget = [m for m in rows if m != BACKPROP and rows[m]["budget"] == rows[BASELINE]["budget"]]
        top = max(same_budget, key=lambda m: statistics.fmean(rows[m]["final"]))
        out["top_method"], out["top_final"] = top, statistics.fmean(rows[top]["final"])
        out["top_gap_closed"] = (out["top_final"] - zero) / (ceiling - zero) if ceiling != zero else None
    return out


def plot(name: str, task: Task, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    zero = result["zero_shot"]
    for method, row in result["rows"].items():
        if method == BACKPROP:
            ax.axhline(100 * statistics.fmean(row["final"]), color="black", ls="--",
                       label=f"backprop AdamW, {row['steps']} steps (ceiling)")
            continue
        xs = [0] + [p["forward_passes"] for p in row["curve"]]
        stats = [_mean_std(p["accuracy"]) for p in row["curve"]]
        ys = [100 * zero] + [100 * m for m, _ in stats]
        err = [0.0] + [100 * s for _, s in stats]
        style = {"lw": 2.5} if method in (BASELINE, BEST) else {"lw": 1, "alpha": 0.7}
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=method, **style)
    ax.axhline(100 * zero, color="grey", ls=":", label="zero-shot")
    ax.set_xlabel("training forward passes")
    ax.set_ylabel(f"test accuracy, % (first {EVAL_ROWS} rows)")
    ax.set_title(f"{name}: Rotten Tomatoes, {task.trains}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _section(name: str, task: Task, result: dict) -> list[str]:
    import dataclasses

    from pocketzo.zo_trainer import Method

    method_fields = {f.name for f in dataclasses.fields(Method)}

    rows, zero, t = result["rows"], result["zero_shot"], result["targets"]
    early = len(EVAL_FRACTIONS) - 1  # evaluations before the last, as columns
    lines = [
        f"## `{name}`: {task.title}",
        "",
        f"Bundle `{task.bundle}`, training {task.trains}. Batch {task.batch_size}, eps {task.eps:g}, lr "
        f"{task.lr:g} (step_lr {task.step_lr:g} for adaptive and sign) x the row's scale, constant schedule unless "
        f"the row says otherwise. Every ZO run has the same budget of **{task.budget} training forward passes** "
        "(steps = budget / forwards per step). Accuracy is on "
        f"the first {EVAL_ROWS} test rows after the given fraction of the budget, mean ± std over the seeds listed "
        "(no std for one seed; – where a run was not evaluated there).",
        *(["", task.notes] if task.notes else []),
        "",
        "| method | what it is | forwards/step | extra memory | seeds | "
        + "".join(f"acc @ 1/{k} | " for k in EVAL_FRACTIONS[:-1]) + "final acc | diverged |",
        "|---|---|---|---|---|" + "---|" * (early + 2),
        "| zero-shot | the bundle as exported | – | – | – | " + "– | " * early + f"{100 * (zero or 0):.1f} | – |",
    ]
    for method, m in METHODS.items():
        row = rows.get(method)
        if row is None:
            continue
        fps = Method(**{k: v for k, v in row["config"].items() if k in method_fields}).forwards_per_step()
        accs = (["–"] * early + [_fmt(p["accuracy"]) for p in row["curve"]][:-1])[-early:]
        extra = row["extra_state_bytes"] / 1e3
        lines.append(f"| {method} | {m.what} | {fps} | {extra:,.0f} KB | {len(row['seeds'])} | "
                     + "".join(f"{a} | " for a in accs) + f"**{_fmt(row['final'])}** | {row['diverged']} |")
    bp = rows.get(BACKPROP)
    if bp:
        lines.append(f"| backprop AdamW | PyTorch, same tensors, batches and loss, lr {bp['lr']:g}, {bp['steps']} "
                     f"steps (forward + backward each) | – | {bp['peak_rss_mb']:,.0f} MB peak RSS | "
                     f"{len(bp['seeds'])} | " + "– | " * early + f"**{_fmt(bp['final'])}** | – |")
    missing = [m for m in METHODS if m not in rows]
    if missing:
        lines += ["", "Not measured with these settings yet (`make bench-accuracy` runs them): "
                  + ", ".join(missing) + "."]
    lines += ["", f"![{name}: accuracy vs forward passes](img/accuracy-{name}.png)", "", "Targets:", ""]
    if t:
        reach = t.get("best_forwards_to_baseline")
        lines.append(f"- `{BEST}` is the row `pocketzo train` defaults to (`--recipe best`).")
        lines.append(f"- ZO-SGD (MeZO's recipe) ends at {100 * t['baseline_final']:.1f} % after "
                     f"{t['baseline_forwards']} forwards. `{BEST}` reaches it "
                     + (f"by {reach} forwards: ratio {t['forward_ratio']:.2f}, target <= 0.25 "
                        f"**{'met' if t['forward_ratio'] <= 0.25 else 'not met'}** (the curve is sampled at "
                        f"{', '.join(map(str, t['sampled_at']))} forwards)." if reach
                        else "at none of its sampled points: target **not met**."))
        if "long_baseline_final" in t:
            met = t["best_final"] >= t["long_baseline_final"]
            lines.append(f"- The same target read at 4x the budget: ZO-SGD with {t['long_baseline_forwards']} forwards "
                         f"ends at {100 * t['long_baseline_final']:.1f} %; `{BEST}` after {t['baseline_forwards']} "
                         f"(1/4 of them) is at {100 * t['best_final']:.1f} %: **{'met' if met else 'not met'}**.")
        if t.get("gap_closed") is not None:
            lines.append(f"- `{BEST}` ends at {100 * t['best_final']:.1f} %: it closes {100 * t['gap_closed']:.0f} % "
                         f"of the gap from zero-shot ({100 * zero:.1f}) to backprop ({100 * t['backprop_final']:.1f}); "
                         f"target >= 90 % **{'met' if t['gap_closed'] >= 0.9 else 'not met'}**. The highest final "
                         f"accuracy of any row with this budget is `{t['top_method']}`'s {100 * t['top_final']:.1f} % "
                         f"({100 * t['top_gap_closed']:.0f} % of the gap; {len(rows[t['top_method']]['seeds'])} "
                         "seed(s)).")
        lines.append(f"- Diverged seeds of `{BEST}`: {t['best_diverged_seeds']} (a run diverges if a loss or weight "
                     "is non-finite, or a training loss exceeds 10x the first).")
    return lines + [""]


def markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Accuracy per forward pass: ZO estimators and update rules",
        "",
        "Generated by `make bench-accuracy` (`benchmarks/accuracy.py`, `benchmarks/report_accuracy.py`) from the "
        f"runs in `benchmarks/accuracy/`; report written {meta['date']} on {meta['machine']}. Every ZO run is one "
        "process with one thread, two side by side; its settings and per-seed curve are in its JSON file.",
        "",
    ]
    for name, result in results.items():
        lines += _section(name, TASKS[name], result)
    lines += ["## What each option costs", "",
              "n = trainable weights, q = directions per step. All of them compose "
              "(`pocketzo train --help`); the details are in `pocketzo/zo_trainer/updates.py`.", "",
              "| option | flag | forwards per step | memory beyond inference |",
              "|---|---|---|---|",
              "| two-sided ZO-SGD (MeZO) | `--recipe zo-sgd` | 2 | none (noise regenerated from seeds) |",
              "| q directions, two-sided | `--directions q` | 2q | none |",
              "| q directions, one-sided, sharing L(θ) | `--estimator one-sided` | q + 1 | none |",
              "| momentum (ZO-SGD-MMT) | `--momentum 0.9` | – | n float32 |",
              "| adaptive (scalar second moment) | `--adaptive` | – | 2 scalars |",
              "| sign | `--sign` | – | none |",
              "| sparse perturbation | `--sparsity s` | – | n float32 (σ ∈ {0, 1}) |",
              "| diagonal curvature (HiZOO-like) | `--curvature α --perturbation gaussian` | + 1 (L(θ)) "
              "| n float32 (σ) |",
              "| ε schedule | `--eps-end` | – | none |",
              "| loss-spike guard | `--spike-factor` (on by default) | – | 32 floats |",
              "",
              "Any option but plain ZO-SGD also uses one 1 MiB chunk of scratch per thread (two with curvature). "
              "Biases, as the unit tests check them against autograd on a tiny model (`tests/test_optim.py`): "
              "two-sided and one-sided estimates are unbiased to O(ε²) (one-sided because E[z zᵀHz] = 0 for "
              "symmetric z; its variance is higher); sparse estimates the gradient of the perturbed weights only "
              "(mask ⊙ ∇L); curvature-scaled directions estimate σ² ⊙ ∇L, a preconditioned gradient.",
              "", "## Reproduce", "", "```",
              "make bench-accuracy       # exports both bundles, runs every method x seeds 0,1,2 not yet in",
              "                          # benchmarks/accuracy/ (the full grid: hours on 2 cores), writes this page",
              "make bench-accuracy-quick # reruns zero-shot, zo-sgd, best and backprop for seed 0 of both tasks",
              "```", "", "Per-run JSON: `benchmarks/accuracy/<task>/`; aggregate: `benchmarks/accuracy.json`.", ""]
    return "\n".join(lines)


def write(root: Path, meta: dict) -> None:
    results = {}
    for name, task in TASKS.items():
        result = collect(name, task)
        if not result["rows"]:
            continue
        result["targets"] = targets(result)
        plot(name, task, result, root / "docs" / "img" / f"accuracy-{name}.png")
        results[name] = result
    meta = {**meta, "date": time.strftime("%Y-%m-%d")}
    (root / "benchmarks" / "accuracy.json").write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    (root / "docs" / "accuracy.md").write_text(markdown(results, meta))
