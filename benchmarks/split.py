"""``make bench-split``: what the frozen-trunk split buys, in step time and in accuracy at equal wall-clock.

    python benchmarks/split.py [--seeds 0,1,2] [--only lora8-whole,...] [--rerun] [--report-only]

Rows (each one ``pocketzo train`` process, 2 threads, one at a time, on an otherwise idle machine; batch 16
of Rotten Tomatoes train; bundles exported once into bundles/):

    interleaved  ``benchmarks/split_speed.py``: the three kinds of step below interleaved in one process (the
              ratios share the machine's state), on fixed 16 x 64 batches and on training batches, and the loss
              error of float16 cached trunk outputs
    speed     LoRA (r 8, q_proj and v_proj) on the last 8 of SmolLM2-135M's 30 layers, ZO-SGD, 40 steps, no
              evaluation: the whole graph at each point (--no-split), the split (trunk once per batch), the
              split with --cache-trunk (the cache's build time recorded apart)
    accuracy  ZO-SGD (lr 1e-4, eps 1e-3, constant) on the RMSNorm weights of the last K layers (and the final
              norm), K = 4, 8, 15 on split bundles and K = 30 on the demo's whole graph, evaluated on the first
              500 test rows every 25 steps; the accuracy read at the same training seconds for every K; and
              K = 4, 8 with lr 1e-3

A run's result goes to ``benchmarks/split/<row>-s<seed>.json`` as soon as it finishes, so the grid continues
where it stopped. A forward-equivalent (FE) is one forward of the whole loss graph at the same batches: the
median forward time of the ``lora8-whole`` run (each of its steps is two whole forwards).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "split"
WORK = ROOT / "benchmarks" / "work" / "split"
REPORT = ROOT / "docs" / "split.md"
EVAL_ROWS, THREADS, BUDGET_SECONDS = 500, 2, 200
TEMPLATE = "Review: {text}\\nSentiment:"
TASK = ["--task", "classify", "--template", TEMPLATE, "--labels", "negative,positive", "--max-length", "64"]
NORMS = ["--trainable", r"norm\.weight$"]
BUNDLES = {  # bundle -> export flags
    "bundles/smollm2-lora8-split": [*TASK, "--peft", "lora", "--trainable-layers", "8", "--split", "auto"],
    "bundles/smollm2-norms4-split": [*TASK, *NORMS, "--trainable-layers", "4", "--split", "auto"],
    "bundles/smollm2-norms8-split": [*TASK, *NORMS, "--trainable-layers", "8", "--split", "auto"],
    "bundles/smollm2-norms15-split": [*TASK, *NORMS, "--trainable-layers", "15", "--split", "auto"],
    "bundles/smollm2-sentiment": [*TASK, *NORMS],  # the demo's bundle: all 30 layers, no split
}
ZO = ("--recipe", "zo-sgd", "--eps", "1e-3", "--schedule", "constant")


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # speed or accuracy
    what: str
    bundle: str
    flags: tuple[str, ...]


def _accuracy_row(k: int, est_step_s: float, lr: str = "1e-4") -> Row:
    steps = int(1.15 * BUDGET_SECONDS / est_step_s)  # a margin: accuracy is read at BUDGET_SECONDS
    bundle = "bundles/smollm2-sentiment" if k == 30 else f"bundles/smollm2-norms{k}-split"
    what = f"norms of the last {k} layers" + (" (whole graph)" if k == 30 else f", split at layer {30 - k}")
    name = f"norms{k}" if lr == "1e-4" else f"norms{k}-lr{lr}"
    return Row(name, "accuracy", what + ("" if lr == "1e-4" else f", lr {lr}"), bundle,
               (*ZO, "--lr", lr, "--steps", str(steps), "--eval-every", "25"))


ROWS = {r.name: r for r in (
    Row("lora8-whole", "speed", "whole graph at each point (--no-split)", "bundles/smollm2-lora8-split",
        ("--recipe", "zo-sgd", "--steps", "40", "--no-split")),
    Row("lora8-split", "speed", "trunk once per batch, head at each point", "bundles/smollm2-lora8-split",
        ("--recipe", "zo-sgd", "--steps", "40")),
    Row("lora8-cache", "speed", "--cache-trunk: head only", "bundles/smollm2-lora8-split",
        ("--recipe", "zo-sgd", "--steps", "40", "--cache-trunk", str(WORK / "cache-lora8"))),
    Row("interleaved", "interleaved", "the three step kinds interleaved in one process (benchmarks/split_speed.py)",
        "bundles/smollm2-lora8-split", ()),
    # step-time estimates (s) from one forward of 0.5 s: trunk (30 - K) / 30 + 2 heads K / 30
    *(_accuracy_row(k, 0.5 * ((30 - k) / 30 + 2 * k / 30)) for k in (4, 8, 15)),
    _accuracy_row(30, 1.0),
    # is a smaller K held back by the shared lr? ten times larger for two of them
    *(_accuracy_row(k, 0.5 * ((30 - k) / 30 + 2 * k / 30), "1e-3") for k in (4, 8)),
)}


def cache() -> Path:
    return Path(os.environ.get("POCKETZO_CACHE", "~/.cache/pocketzo")).expanduser()


def ensure_inputs(rows: list[Row]) -> tuple[Path, Path]:
    """The rows' bundles (exported once) and the 500-row test file; returns (train, test)."""
    model, data = cache() / "smollm2-135m-instruct", cache() / "data" / "rotten_tomatoes"
    if not model.is_dir() or not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "pocketzo", "assets"], cwd=ROOT, check=True)
    for bundle in sorted({r.bundle for r in rows}):
        if not (ROOT / bundle / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "pocketzo", "export", str(model), "--out", bundle, *BUNDLES[bundle],
                            "--overwrite"], cwd=ROOT, check=True)
    test = WORK / f"test-{EVAL_ROWS}.jsonl"
    if not test.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        lines = (data / "test.jsonl").read_text(encoding="utf-8").splitlines()[:EVAL_ROWS]
        test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data / "train.jsonl", test


def run_interleaved(row: Row, train: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        out = Path(tmp) / "speed.json"
        cmd = ["benchmarks/split_speed.py", row.bundle, "--data", str(train), "--cache", str(WORK / "cache-lora8"),
               "--json", str(out), "--threads", str(THREADS)]
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        return {"command": "python " + " ".join(cmd[:2] + ["..."]), **json.loads(out.read_text(encoding="utf-8"))}


def run_one(row: Row, seed: int, train: Path, test: Path) -> dict:
    if row.kind == "interleaved":
        return _save(row, seed, run_interleaved(row, train))
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        out = Path(tmp) / "run"
        cmd = ["-m", "pocketzo", "train", row.bundle, "--data", str(train), "--out", str(out), "--batch-size", "16",
               "--seed", str(seed), "--threads", str(THREADS), "--quiet", *row.flags]
        if row.kind == "accuracy":
            cmd += ["--eval", str(test)]
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        steps = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    seconds = [r["seconds"] for r in steps if "seconds" in r]
    result = {"command": "python " + " ".join(cmd[:4] + ["..."] + cmd[5:]),
              "step_seconds_median": summary["step_seconds_median"], "peak_rss_mb": summary["peak_rss_mb"],
              "forward_seconds": sorted(r["forward_seconds"] / 2 for r in steps)[len(steps) // 2],
              "trunk_cache": summary.get("trunk_cache"), "steps": len(seconds)}
    if row.kind == "accuracy":
        result["curve"] = [{"step": e["step"], "train_seconds": sum(seconds[: e["step"]]), "accuracy": e["accuracy"]}
                           for e in summary["evals"]]
    return _save(row, seed, result)


def _save(row: Row, seed: int, result: dict) -> dict:
    result = {"row": row.name, "seed": seed, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {THREADS} threads, otherwise idle", **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{row.name}-s{seed}.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(f"{row.name} seed {seed} done", flush=True)
    return result


def main() -> int:
    from report_split import write_report  # noqa: PLC0415 (a sibling script)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="accuracy rows; speed rows run at seed 0 only")
    ap.add_argument("--only", help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--rerun", action="store_true", help="run again where a result exists")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if not args.report_only:
        train, test = ensure_inputs([ROWS[n] for n in names])
        for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: every row gets seed 0 first
            for name in names:
                if (seed == 0 or ROWS[name].kind == "accuracy") and \
                        (args.rerun or not (RESULTS / f"{name}-s{seed}.json").is_file()):
                    run_one(ROWS[name], seed, train, test)
    write_report(RESULTS, REPORT, ROWS, BUDGET_SECONDS)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
