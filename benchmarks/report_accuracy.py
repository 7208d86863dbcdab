"""Aggregate the accuracy benchmark's runs into benchmarks/accuracy.json, docs/accuracy.md and the curve PNG."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from accuracy import BASELINE, BEST, COMMON, EVAL_ROWS, METHODS


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def collect(work: Path) -> dict:
    runs: dict[str, list[dict]] = {}
    for path in sorted(work.glob("*-s*.json")):
        run = json.loads(path.read_text())
        if run["method"] == "zero-shot":
            continue
        runs.setdefault(run["method"], []).append(run)
    zero = json.loads((work / "zero-shot.json").read_text())["final_accuracy"] if (work / "zero-shot.json").is_file() \
        else None
    rows = {}
    for method, rs in runs.items():
        if method == "backprop-adamw":
            rows[method] = {"seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"], "lr": rs[0]["lr"],
                            "final": [r["final_accuracy"] for r in rs],
                            "curve": _curve(rs, "step"), "step_seconds": statistics.median(r["step_seconds_median"]
                                                                                           for r in rs),
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
           "best_final": statistics.fmean(best["final"]), "best_diverged_seeds": best["diverged"]}
    if reach:
        out["forward_ratio"] = reach / rows[BASELINE]["budget"]
    if "backprop-adamw" in rows and zero is not None:
        ceiling = statistics.fmean(rows["backprop-adamw"]["final"])
        out["backprop_final"] = ceiling
        out["gap_closed"] = (out["best_final"] - zero) / (ceiling - zero) if ceiling != zero else None
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    zero = result["zero_shot"]
    for method, row in result["rows"].items():
        if method == "backprop-adamw":
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
    ax.set_title("SmolLM2-135M, Rotten Tomatoes, norm weights (35k): accuracy vs forward passes")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, meta: dict) -> str:
    rows, zero, t = result["rows"], result["zero_shot"], result["targets"]
    budget = meta["budget"]
    lines = [
        "# Accuracy per forward pass: ZO estimators and update rules",
        "",
        "Generated by `make bench-accuracy` (`benchmarks/accuracy.py`, `benchmarks/report_accuracy.py`) on "
        f"{meta['date']}, {meta['machine']}. Every ZO run: one thread, two runs side by side.",
        "",
        "**Task.** SmolLM2-135M-Instruct as a prompt classifier of Rotten Tomatoes snippets (the demo's bundle,",
        "`bundles/smollm2-sentiment`), training the 35,136 norm weights. Batch 16, "
        f"eps {COMMON['eps']:g}, lr {COMMON['lr']:g} unless the row says otherwise, constant schedule. Every ZO run "
        f"has the same budget of **{budget} training forward passes** (steps = budget / forwards per step) and",
        f"is evaluated on the first {EVAL_ROWS} test rows after 1/4, 1/2 and all of it. Accuracies are mean ± std "
        "over the seeds listed; a row with one seed has no std.",
        "",
        "| method | what it is | forwards/step | extra memory | seeds | acc @ 1/4 | acc @ 1/2 | final acc | diverged |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| zero-shot | the bundle as exported | – | – | – | – | – | {100 * (zero or 0):.1f} | – |",
    ]
    for method, (what, _) in METHODS.items():
        row = rows.get(method)
        if row is None:
            continue
        from pocketzo.zo_trainer import TrainConfig

        fps = TrainConfig.from_json(row["config"]).forwards_per_step()
        accs = [_fmt(p["accuracy"]) for p in row["curve"]]
        accs = (["–"] * (3 - len(accs)) + accs)[-3:]
        extra = row["extra_state_bytes"] / 1e3
        lines.append(f"| {method} | {what} | {fps} | {extra:,.0f} KB | {len(row['seeds'])} | {accs[0]} | "
                     f"{accs[1]} | **{_fmt(row['final'])}** | {row['diverged']} |")
    bp = rows.get("backprop-adamw")
    if bp:
        lines.append(f"| backprop AdamW | PyTorch, same tensors, batches and loss, lr {bp['lr']:g}, {bp['steps']} "
                     f"steps (forward + backward each) | – | {bp['peak_rss_mb']:,.0f} MB peak RSS | "
                     f"{len(bp['seeds'])} | – | – | **{_fmt(bp['final'])}** | – |")
    missing = [m for m in METHODS if m not in rows]
    if missing:
        lines += ["", "Rows of the grid not measured yet (run `make bench-accuracy`): " + ", ".join(missing) + "."]
    lines += ["", "![accuracy vs forward passes](img/accuracy.png)", "", "## Targets", ""]
    if t:
        reach = t.get("best_forwards_to_baseline")
        lines.append(f"- ZO-SGD (MeZO's recipe) ends at {100 * t['baseline_final']:.1f} % after "
                     f"{t['baseline_forwards']} forwards. `{BEST}` reaches it "
                     + (f"by {reach} forwards: ratio {t['forward_ratio']:.2f}, target <= 0.25 "
                        f"**{'met' if t['forward_ratio'] <= 0.25 else 'not met'}** (the curve is sampled at 1/4, "
                        "1/2 and 1 of the budget)." if reach else "at none of its sampled points: target **not met**."))
        if "gap_closed" in t and t["gap_closed"] is not None:
            lines.append(f"- `{BEST}` ends at {100 * t['best_final']:.1f} %: it closes {100 * t['gap_closed']:.0f} % "
                         f"of the gap from zero-shot ({100 * zero:.1f}) to backprop ({100 * t['backprop_final']:.1f}); "
                         f"target >= 90 % **{'met' if t['gap_closed'] >= 0.9 else 'not met'}**.")
        lines.append(f"- Diverged seeds of `{BEST}`: {t['best_diverged_seeds']} (a run diverges if a loss or weight "
                     "is non-finite, or a training loss exceeds 10x the first).")
    lines += ["", "## What each option costs", "",
              "n = trainable weights, q = directions per step. All of them compose "
              "(`pocketzo train --help`); the details are in `pocketzo/zo_trainer/optim.py`.", "",
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
              "", "## Reproduce", "", "```", "make demo                 # exports bundles/smollm2-sentiment",
              "make bench-accuracy       # the full grid: every method, seeds 0,1,2 (hours on 2 cores)",
              "make bench-accuracy-quick # zero-shot, zo-sgd, best, backprop; seed 0 (under 30 min on 2 cores)",
              "```", "", "Per-run JSON: `benchmarks/work/accuracy/`; aggregate: `benchmarks/accuracy.json`.", ""]
    return "\n".join(lines)


def write(work: Path, root: Path, meta: dict) -> None:
    result = collect(work)
    result["targets"] = targets(result)
    meta = {**meta, "date": time.strftime("%Y-%m-%d")}
    result["meta"] = meta
    (root / "benchmarks" / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, root / "docs" / "img" / "accuracy.png")
    (root / "docs" / "accuracy.md").write_text(markdown(result, meta))
