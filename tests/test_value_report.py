"""docs/value.md's report (benchmarks/report_value.py): runs made on another CPU are listed apart and enter no table,
unless matched by step to the tables' CPU (benchmarks/value_steps.py), and then marked."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import grid  # noqa: E402
import pytest  # noqa: E402
import value_steps  # noqa: E402
from report_value import write_report  # noqa: E402 (a benchmark script beside its results)
from value_rows import ROWS, TASKS  # noqa: E402


def _stage(minutes: int, steps: int, accuracy: float = 0.8, seconds: float | None = None, **more) -> dict:
    return {"minutes": minutes, "train_seconds": seconds or 60.0 * minutes, "steps": steps,
            "eval": {"accuracy": accuracy, "loss": 0.4}, **more}


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
    elsewhere = {**_result(0, 0.7, 0.83, "Some Other CPU"), "row": "rt-fzoo"}  # a row run on another CPU only
    _write(results / "other-machines" / "rt-fzoo-s0.json", elsewhere)
    rows = {n: ROWS[n] for n in ("rt-zo-sgd", "rt-fzoo", "rt-best")}
    write_report(results, report, rows, {"rt": TASKS["rt"]})
    text = report.read_text(encoding="utf-8")
    tables, _, apart = text.partition("## Runs on other machines")
    row = next(line for line in tables.splitlines() if line.startswith("| rt-zo-sgd |"))
    assert "| 1 | 80.5 |" in row and "90.1" not in tables  # one seed, the tables' run alone
    assert re.search(r"\| rt-fzoo \|[^\n]*\| run on other CPUs only \(listed apart\) \|", tables)
    assert re.search(r"\| rt-best \|[^\n]*\| not run yet \|", tables)
    assert "| rt-zo-sgd | 1 | Some Other CPU |" in apart and "accuracy 90.1" in apart
    assert "rt: 0.460 s" in apart  # the tables' forward-equivalent beside the other CPU's 0.830 s


def test_a_step_target_is_the_seeds_own_reading_else_the_other_seeds_mean_else_the_rows_rate():
    runs = [{"seed": 0, "stages": [_stage(5, 150), _stage(15, 420, seconds=903.0)]},
            {"seed": 1, "stages": [_stage(5, 170), _stage(15, 500, step_matched={"cpu": "X", "source": "..."})]},
            {"seed": 2, "stages": [_stage(5, 190)]}]
    own = value_steps.target(runs, 1, 5)
    assert own.steps == 170 and own.reference is runs[1]["stages"][0]
    mean = value_steps.target(runs, 2, 15)  # seed 1's 15-minute stage was matched, not measured: not counted
    assert (mean.steps, mean.reference) == (420, None) and "seeds 0" in mean.source
    # no reading at 60 min: the rate of each seed's latest measured stage, (903 + 300 + 300) s over
    # (420 + 170 + 190) steps
    assert value_steps.target(runs, 0, 60).steps == round(3600 / (1503 / 780))
    assert value_steps.target([{"seed": 0, "stages": []}], 0, 5) is None


def test_a_result_extended_on_another_cpu_keeps_the_machine_it_was_made_on(tmp_path):
    made = {k: v for k, v in _result(0, 0.8, 0.5, None).items() if k not in ("row", "seed")}  # CPU not recorded
    saved = grid.save(tmp_path, "rt-zo-sgd", 0, made)
    assert "cpu" not in saved and saved["machine"] == made["machine"] and saved["date"] == made["date"]
    fresh = grid.save(tmp_path, "rt-zo-sgd", 1, {"task": "rt"})
    assert fresh["cpu"] == grid.cpu_model() and grid.cpu_model() in fresh["machine"]
    assert json.loads((tmp_path / "rt-zo-sgd-s1.json").read_text(encoding="utf-8")) == fresh


def test_a_reading_made_again_on_another_cpu_must_agree_with_the_tables():
    reference = _stage(5, 150)
    close = value_steps.check(reference, _stage(5, 150, **{"eval": {"loss": 0.4000001}}), "X")
    assert close["loss_here"] == 0.4000001 and close["agrees"]
    parted = value_steps.check(reference, _stage(5, 150, **{"eval": {"loss": 0.41}}), "X")
    assert not parted["agrees"] and "cannot be matched by step" in value_steps.disagreement(parted)
    runs = [{"checks": [close]}, {"checks": [parted]}]
    assert value_steps.failed(runs, "X") == [parted] and value_steps.failed(runs, "Y") == []


def test_step_matched_readings_join_the_tables_marked_with_the_tables_minutes_as_their_compute(tmp_path):
    results, report = tmp_path / "value", tmp_path / "docs" / "value.md"
    report.parent.mkdir()
    for seed, accuracy in ((0, 0.80), (1, 0.82)):
        r = _result(seed, accuracy, 0.5, None)
        r["stages"][0]["eval"]["loss"] = 0.4
        r["stages"].append({**r["stages"][0], "minutes": 15, "steps": 610, "train_seconds": 1800.0,
                            "eval": {"accuracy": accuracy + 0.02, "auc": 0.9},
                            "step_matched": {"cpu": "Other CPU", "date": "2026-12-04",
                                             "source": "15 min at 1.5 s a step"}})
        r["checks"] = [{"minutes": 5, "steps": 200, "cpu": "Other CPU", "loss_reference": 0.4, "loss_here": 0.40002}]
        _write(results / f"rt-zo-sgd-s{seed}.json", r)
    write_report(results, report, {"rt-zo-sgd": ROWS["rt-zo-sgd"]}, {"rt": TASKS["rt"]})
    text = report.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| rt-zo-sgd |")).split(" | ")
    assert row[3:5] == ["81.0 ± 1.4", "83.0 ± 1.4 †"]  # 5 min measured, 15 min matched
    assert row[-2] == "1,800"  # FE: 15 minutes on the tables' CPU over its 0.5 s forward, not the 1,800 s taken here
    assert "rt-zo-sgd s1 at 15 min: step 610 (15 min at 1.5 s a step)" in text
    assert "made on another CPU (Other CPU, 2026-12-04) at the step count" in text
    assert re.search(r"Checks: 2 readings .* at most 5\.0e-05 of the loss", text)
    assert "## Runs on other machines" not in text


def test_a_check_that_did_not_agree_is_listed_apart_from_those_that_did(tmp_path):
    results, report = tmp_path / "value", tmp_path / "docs" / "value.md"
    report.parent.mkdir()
    r = _result(0, 0.80, 0.5, None)
    r["checks"] = [{"minutes": 5, "steps": 200, "cpu": "Other CPU", "loss_reference": 0.4, "loss_here": 0.40002,
                    "agrees": True},
                   {"minutes": 15, "steps": 600, "cpu": "Other CPU", "loss_reference": 0.5, "loss_here": 0.501,
                    "agrees": False}]
    _write(results / "rt-zo-sgd-s0.json", r)
    write_report(results, report, {"rt-zo-sgd": ROWS["rt-zo-sgd"]}, {"rt": TASKS["rt"]})
    text = report.read_text(encoding="utf-8")
    assert re.search(r"Checks: 1 reading .* at most 5\.0e-05 of the loss", text)  # the parted one not counted
    assert ("- rt-zo-sgd s0 at 15 min (step 600) on Other CPU: test loss 0.501000 against 0.500000, 2.0e-03 of the "
            "loss; at 5 min (step 200) it was 5.0e-05") in text


def test_a_reading_only_some_seeds_have_is_drawn_as_those_seeds_own_curve(tmp_path, monkeypatch):
    import pocketzo.plots

    drawn = {}
    monkeypatch.setattr(pocketzo.plots, "curves_figure", lambda curves, levels, *_: drawn.update(curves))
    results, report = tmp_path / "value", tmp_path / "docs" / "value.md"
    report.parent.mkdir()
    for seed, accuracy in ((0, 0.80), (1, 0.82)):
        result = _result(seed, accuracy, 0.46, None)
        result["stages"].append({**result["stages"][0], "minutes": 15, "eval": {"accuracy": accuracy + 0.02}})
        if seed == 1:
            result["stages"].append({**result["stages"][0], "minutes": 60, "eval": {"accuracy": 0.78}})
        _write(results / f"rt-zo-sgd-s{seed}.json", result)
    write_report(results, report, {"rt-zo-sgd": ROWS["rt-zo-sgd"]}, {"rt": TASKS["rt"]})
    def flat(points):
        return [x for point in points for x in point]
    assert flat(drawn["zo-sgd"]) == pytest.approx([0, 76.0, 5, 81.0, 15, 83.0])  # one seed's 60 min not mixed in
    assert flat(drawn["zo-sgd, seed 1"]) == pytest.approx([0, 76.0, 5, 82.0, 15, 84.0, 60, 78.0])
