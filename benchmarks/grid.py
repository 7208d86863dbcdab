"""What the grids of training runs (``bench-methods``, ``bench-split``) share.

A grid is a set of rows (a bundle and ``pocketzo train`` flags) run at several seeds, each run one process with
2 threads, one at a time, on the demo task. A run's result is written to ``<results>/<row>-s<seed>.json`` as
soon as it finishes, so a grid that was stopped continues where it stopped; the report is drawn from those
files alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
EVAL_ROWS = 500  # the first rows of Rotten Tomatoes test


def cache() -> Path:
    return Path(os.environ.get("POCKETZO_CACHE", "~/.cache/pocketzo")).expanduser()


def model_dir() -> Path:
    return cache() / "smollm2-135m-instruct"


def ensure_inputs(bundles: Iterable[tuple[str, list[str]]], work: Path) -> tuple[Path, Path]:
    """The assets (``pocketzo assets``), each (bundle, export flags) exported once into bundles/, and the file of
    the first ``EVAL_ROWS`` test rows; returns (train file, test file)."""
    data = cache() / "data" / "rotten_tomatoes"
    if not model_dir().is_dir() or not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "pocketzo", "assets"], cwd=ROOT, check=True)
    for bundle, flags in bundles:
        if not (ROOT / bundle / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "pocketzo", "export", str(model_dir()), "--out", bundle, *flags,
                            "--overwrite"], cwd=ROOT, check=True)
    test = work / f"test-{EVAL_ROWS}.jsonl"
    if not test.is_file():
        work.mkdir(parents=True, exist_ok=True)
        lines = (data / "test.jsonl").read_text(encoding="utf-8").splitlines()[:EVAL_ROWS]
        test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data / "train.jsonl", test


@dataclass(frozen=True)
class TrainRun:
    """What a finished ``pocketzo train`` process left: its command (paths shortened), summary and step log."""

    command: str
    summary: dict
    log: list[dict]

    @property
    def step_seconds(self) -> list[float]:
        return [r["seconds"] for r in self.log if "seconds" in r]

    def curve(self, *keys: str) -> list[dict]:
        """Each evaluation's step, training seconds before it (evaluation excluded) and ``keys`` of it."""
        seconds = self.step_seconds
        return [{"step": e["step"], "train_seconds": sum(seconds[: e["step"]]), **{k: e[k] for k in keys}}
                for e in self.summary["evals"]]


def train(bundle: str, flags: Iterable[str], seed: int, train_file: Path, test_file: Path | None) -> TrainRun:
    """One ``pocketzo train`` process (batch 16, ``THREADS`` threads) in a temporary run directory."""
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        out = Path(tmp) / "run"
        cmd = ["-m", "pocketzo", "train", bundle, "--data", str(train_file), "--out", str(out), "--batch-size", "16",
               "--seed", str(seed), "--threads", str(THREADS), "--quiet", *flags]
        if test_file is not None:
            cmd += ["--eval", str(test_file)]
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    shown = ["RUN" if c == str(out) else c.replace(str(cache()), "$CACHE").replace(str(ROOT) + "/", "") for c in cmd]
    return TrainRun("python " + " ".join(shown), summary, log)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string where there is no such file."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def save(results: Path, row: str, seed: int, result: dict) -> dict:
    """Write one run's result (with its row, seed, date, CPU and machine) atomically; return it. A result that
    already names its machine keeps it (and its CPU, recorded or not): it is being extended, here or elsewhere."""
    cpu = cpu_model()
    here = {"cpu": cpu, "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs, {THREADS} threads, "
            "otherwise idle"}
    result = {"row": row, "seed": seed, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              **({} if "machine" in result else here), **result}
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{row}-s{seed}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"{row} seed {seed} done", flush=True)
    return result


def accuracy_at(curve: list[dict], seconds: float) -> float | None:
    """The accuracy of the last evaluation within ``seconds`` of training; None if the run stopped before."""
    seen = [p["accuracy"] for p in curve if p["train_seconds"] <= seconds + 1e-9]
    return seen[-1] if seen and curve[-1]["train_seconds"] >= seconds else None


def main(description: str, rows: dict, results: Path, run_one: Callable[[str, int], object], report: Path,
         write_report: Callable[[], object], seeded: Callable[[str], bool] = lambda name: True,
         done: Callable[[str, int], bool] | None = None) -> int:
    """The grid's command line: ``[--seeds 0,1,2] [--only ROW,...] [--rerun] [--report-only]``. Seed-major, so
    every row gets seed 0 before any gets seed 1; a row that is not ``seeded`` runs at seed 0 only. A run is
    skipped when ``done(row, seed)`` (default: its result file exists)."""
    done = done or (lambda name, seed: (results / f"{name}-s{seed}.json").is_file())
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the seeded rows; the others run at seed 0 only")
    ap.add_argument("--only", help=f"comma-separated rows of {', '.join(rows)}")
    ap.add_argument("--rerun", action="store_true", help="run again where a result exists")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(rows)}")
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                if (seed == 0 or seeded(name)) and (args.rerun or not done(name, seed)):
                    if args.rerun:  # from scratch, not from a result's last stage
                        (results / f"{name}-s{seed}.json").unlink(missing_ok=True)
                    run_one(name, seed)
    write_report()
    print(f"wrote {report.relative_to(ROOT)}")
    return 0
