"""docs/split.md from the results of ``benchmarks/split.py`` (one JSON per run in benchmarks/split/)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from grid import accuracy_at


def _load(results: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for path in sorted(results.glob("*-s*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        out[(r["row"], r["seed"])] = r
    return out


def _layers(name: str) -> str:
    """K of an accuracy row's name (``norms15``, ``lora8-lr1e-3``)."""
    return name.split("-")[0].lstrip("abcdefghijklmnopqrstuvwxyz")


def _speed(runs: dict, rows: dict) -> list[str]:
    whole = runs.get(("lora8-whole", 0))
    if whole is None:
        return ["(no speed runs yet)"]
    unit = whole["forward_seconds"]
    lines = [f"One forward-equivalent (FE: a forward of the whole loss graph, from the `lora8-whole` run) = "
             f"{unit:.3f} s.", "", "| run | what | step (median) | FE per step | speed-up | peak RSS |",
             "|---|---|---|---|---|---|"]
    for name in ("lora8-whole", "lora8-split", "lora8-cache"):
        r = runs.get((name, 0))
        if r is None:
            lines.append(f"| {name} | {rows[name].what} | not run yet | | | |")
            continue
        step = r["step_seconds_median"]
        lines.append(f"| {name} | {rows[name].what} | {step:.3f} s | {step / unit:.2f} | "
                     f"{whole['step_seconds_median'] / step:.2f}x | {r['peak_rss_mb']:,.0f} MB |")
    cache = (runs.get(("lora8-cache", 0)) or {}).get("trunk_cache")
    split, cached = runs.get(("lora8-split", 0)), runs.get(("lora8-cache", 0))
    if cache and split and cache["build_seconds"] > 0:
        saved = split["step_seconds_median"] - cached["step_seconds_median"]
        lines += ["", f"Building the cache of the whole training set took {cache['build_seconds']:.0f} s "
                  f"({cache['bytes'] / 1e6:,.0f} MB of float16). Each cached step saves {saved:.3f} s over the "
                  f"split, so the cache pays for itself after {cache['build_seconds'] / saved:,.0f} steps (batch 16: "
                  f"{16 * cache['build_seconds'] / saved / cache.get('rows', 9268):.1f} epochs): it is for small data "
                  "sets trained for "
                  "several epochs, not for one pass over a large one."]
    return lines


def _interleaved(runs: dict) -> list[str]:
    r = runs.get(("interleaved", 0))
    if r is None:
        return ["(not run yet)"]
    f16 = r["float16_cache"]
    ms = lambda s: f"{s * 1e3:,.0f} ms"  # noqa: E731
    return [
        f"Medians of {r['rounds']} rounds; in each round every kind of step runs once, in turn (`{r['command']}`).", "",
        "| batches | whole graph | split | speed-up | head only | speed-up |", "|---|---|---|---|---|---|",
        f"| fixed 16 x 64, random ids (head only: one batch's trunk output reused, no cache read) | "
        f"{ms(r['fixed_whole'])} | {ms(r['fixed_split'])} | {r['fixed_split_speedup']:.2f}x | "
        f"{ms(r['fixed_head_only'])} | {r['fixed_head_only_speedup']:.2f}x |",
        f"| 16 consecutive training rows (head only: read from the --cache-trunk cache) | {ms(r['data_whole'])} | "
        f"{ms(r['data_split'])} | {r['data_split_speedup']:.2f}x | {ms(r['data_head_only'])} | "
        f"{r['data_head_only_speedup']:.2f}x |", "",
        f"Float16 storage of the trunk's outputs, over {f16['rows']} training rows in {f16['batches']} batches: the "
        f"batch loss moves by at most {f16['loss_abs_error_max']:.1e} (median {f16['loss_abs_error_median']:.1e}), "
        f"a row's loss by at most {f16['example_loss_abs_error_max']:.1e}, against the float32 trunk outputs "
        "(a ZO step with eps 1e-3 measures loss differences of about 1e-3 to 1e-2)."]


def _accuracy(runs: dict, rows: dict, budget: float) -> list[str]:
    lines = [f"Accuracy on the first 500 test rows after {budget:.0f} s of training (evaluation time excluded), "
             "ZO-SGD on the RMSNorm weights or on LoRA adapters of the last K layers. \"Best within it\" is the "
             "best of the evaluations (every 25 steps) within the budget, on the same test rows: it picks the step on "
             "the test set, so it is an optimistic bound, shown to tell a run that diverged from one that never "
             "moved:", "",
             "| K | what | seeds | step (median) | steps in the budget | accuracy at the budget | best within it |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if row.kind != "accuracy":
            continue
        got = [r for (n, _), r in sorted(runs.items()) if n == name]
        if not got:
            lines.append(f"| {_layers(name)} | {row.what} | 0 | not run yet | | | |")
            continue
        acc = [a for r in got if (a := accuracy_at(r["curve"], budget)) is not None]
        step = statistics.median(r["step_seconds_median"] for r in got)
        spread = f" ± {statistics.stdev(acc) * 100:.1f}" if len(acc) > 1 else ""
        zero = got[0]["curve"][0]["accuracy"]
        best = statistics.mean(max(p["accuracy"] for p in r["curve"] if p["train_seconds"] <= budget) for r in got)
        lines.append(f"| {_layers(name)} | {row.what} | {len(got)} | {step:.3f} s | {budget / step:.0f} | "
                     f"{statistics.mean(acc) * 100:.1f}{spread} % (zero-shot {zero * 100:.1f} %) | "
                     f"{best * 100:.1f} % |")
    return lines


def _bench(results: Path) -> list[str]:
    lines = ["| bundle graph | forward (baked) | trunk | head | step | step / (trunk + 2 heads) | step, trunk output "
             "given | / (2 heads) | step in FE | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda s: "-" if s is None else f"{s * 1e3:,.0f} ms"  # noqa: E731
    ratio = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for path in sorted((results / "bench").glob("*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        graph = "split" if r["config"].get("split", True) and r.get("trunk_s") is not None else "whole"
        lines.append(f"| {graph} | {ms(r['forward_baked_s'])} | {ms(r.get('trunk_s'))} | {ms(r.get('head_s'))} | "
                     f"{ms(r['step_s'])} | {ratio(r.get('split_floor_ratio'))} | {ms(r.get('step_head_only_s'))} | "
                     f"{ratio(r.get('head_only_floor_ratio'))} | {r['step_forward_equivalents']:.2f} | "
                     f"{r['peak_rss_mb']:,.0f} MB |")
    date = json.loads(next((results / "bench").glob("*.json")).read_text())["date"] if len(lines) > 2 else "-"
    return [f"`pocketzo bench bundles/smollm2-lora8-split [--no-split] --batch-size 16 --seq-len 64 --threads 2 "
            f"--recipe zo-sgd --json benchmarks/split/bench/bench-lora8-<graph>.json` ({date}; each mode in its own "
            "process, medians of 5 steps after 2 warm-up). FE: a forward of the baked whole graph.", "", *lines]


def write_report(results: Path, report: Path, rows: dict, budget: float) -> None:
    runs = _load(results)
    dates = sorted({r["date"][:10] for r in runs.values()})
    machine = next(iter(runs.values()))["machine"] if runs else "-"
    text = "\n".join([
        "# The frozen-trunk split: step time and accuracy", "",
        "Written by `make bench-split` (`python benchmarks/split.py`; `--report-only` redraws this page). "
        f"Runs: {', '.join(dates) or '-'}, {machine}, one run at a time. Every run is a `pocketzo train` process "
        "over SmolLM2-135M-Instruct on Rotten Tomatoes, batch 16, max length 64; its command is in its JSON in "
        "benchmarks/split/.", "",
        "## Step time: LoRA on the last 8 of 30 layers", "",
        "The ZO step (ZO-SGD, one two-sided direction, lr 0) on the whole loss graph, on the split (the frozen "
        "trunk once per batch, the head at each of the two points) and on the head alone (`--cache-trunk`). "
        "Trunk: layers 0-21; head: layers 22-29 with their LoRA adapters (r 8 on q_proj and v_proj), the final "
        "norm and the label scores.", "", "### Interleaved in one process", "", *_interleaved(runs), "",
        "### As training runs", "",
        "Each a separate `pocketzo train` process of 40 steps, without evaluation; one forward of the whole "
        "graph is measured in the first. Separate processes at different minutes differ by up to 10 % here, "
        "so the interleaved table above is the one to read ratios from.", "", *_speed(runs, rows), "",
        "### `pocketzo bench`", "", *_bench(results), "",
        "## What training fewer layers costs or buys at equal wall-clock", "", *_accuracy(runs, rows, budget), "",
        "Norms: the same lr and eps for every K (the demo's ZO-SGD values: lr 1e-4, eps 1e-3, constant), not tuned "
        "per K; the rows at lr 1e-3 show that fewer trainable layers want a larger lr (with fewer weights the noise "
        "of the estimate, which grows with their number, allows it). LoRA (r 8, alpha 16, on q_proj and v_proj; B "
        "starts at zero): at docs/modes.md's lr 1e-3 for LoRA on every layer the adapters of the last 4 or 8 layers "
        "did not move the accuracy in 200 s; lr 1e-2 moved the last 8 layers' (one probe, seed 0) but diverged on "
        "15 and 30 layers and was slow on 4 (the rows at one lr). The LoRA rows without an lr therefore use about "
        "1e-2 x 8 / K (ZO-SGD's stable lr falls as the number of weights grows): 2e-2, 1e-2, 5e-3 for K = 4, 8, 15, "
        "and for K = 30 1.5e-3, half the rule's 3e-3, which diverged after 125 steps (its row); chosen from those "
        "seed-0 runs, not swept. A decaying lr or the divergence guard's undo would let the larger lrs run longer: "
        "not tried here. Bundles: norms `--trainable 'norm\\.weight$' "
        "--trainable-layers K --split auto` (K = 30: the demo's "
        "bundle, no split), LoRA `--peft lora --trainable-layers K --split auto` (K = 30: `--peft lora`, no split).",
        "",
        "What to read from it: a restricted K buys steps (the split's step is 0.6-0.8 of the whole graph's), and "
        "those steps buy accuracy only at an lr chosen for K; compare the best K < 30 against K = 30 within the "
        "seed spread before concluding that training fewer layers wins on a task.",
        "",
    ])
    report.write_text(text, encoding="utf-8")
