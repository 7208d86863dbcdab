"""docs/value.md's report (benchmarks/report_value.py): runs made on another CPU are listed apart and enter no table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from report_value import write_report  # noqa: E402 (a benchmark script beside its results)
from value_rows import ROWS, TASKS  # noqa: E402


def _result(seed: int, accuracy: float, forward: float, cpu: str | None) -> dict:
    stage = {"minutes": 5, "train_seconds": 300.0, "steps": 200, "peak_rss_mb": 800.0, "step_seconds_median": 1.5,
             "forward_seconds_median": forward, "eval": {"accuracy": accuracy, "auc": 0.9},
             "ood": {"accuracy": 0.8}}
    return {"row": "rt-zo-sgd", "seed": seed, "date": "2026-12-03T12:00:00+00:00",
            "machine": "x86_64, 2 CPUs, 2 threads, otherwise idle", **({"cpu": cpu} if cpu else {}), "task": "rt",
            "command": "python -m pocketzo train ...", "zero_shot": {"accuracy": 0.76}, "stages": [stage]}


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result), encoding="utf-8")


def test_other_machine_runs_are_listed_apart(tmp_path):
    results, report = tmp_path / "value", tmp_path / "docs" / "value.md"
    report.parent.mkdir()
    _write(results / "rt-zo-sgd-s0.json", _result(0, 0.805, 0.46, None))  # the tables' CPU (not recorded)
    _write(results / "other-machines" / "rt-zo-sgd-s1.json", _result(1, 0.901, 0.83, "Some Other CPU"))
    write_report(results, report, {"rt-zo-sgd": ROWS["rt-zo-sgd"]}, {"rt": TASKS["rt"]})
    text = report.read_text(encoding="utf-8")
    tables, _, apart = text.partition("## Runs on other machines")
    row = next(line for line in tables.splitlines() if line.startswith("| rt-zo-sgd |"))
    assert "| 1 | 80.5 |" in row and "90.1" not in tables  # one seed, the tables' run alone
    assert "| rt-zo-sgd | 1 | Some Other CPU |" in apart and "accuracy 90.1" in apart
    assert "rt: 0.460 s" in apart  # the tables' forward-equivalent beside the other CPU's 0.830 s
