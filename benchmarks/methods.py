"""``make bench-methods``: ZO, exact gradients (fo) and hybrid on the demo task, against wall-clock and
forward-equivalents, with PyTorch AdamW (backprop) as the reference.

    python benchmarks/methods.py [--seeds 0,1,2] [--only fo-adamw,...] [--rerun] [--report-only]

Every run is one process with 2 threads, one run at a time (timings are only comparable on an otherwise
idle machine), on SmolLM2-135M-Instruct's 35,136 RMSNorm weights, batch 16 of Rotten Tomatoes train
(the same batches for every method at a seed), evaluated on the first 500 test rows. A run's result is
written to ``benchmarks/methods/<row>-s<seed>.json`` as soon as it finishes, so the grid continues where it
stopped; rows whose file exists are skipped unless ``--rerun``. The report goes to ``docs/methods.md``.

Training seconds exclude evaluation: they are the sum of the logged step times up to each evaluation
(PyTorch: of its timed steps). A forward-equivalent (FE) is one forward pass of the loss graph at the same
batches, measured in the ZO-SGD runs (each of their steps is two forwards), so FE = training seconds /
that median forward time: compute measured in time on this machine, not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "methods"
WORK = ROOT / "benchmarks" / "work" / "methods"
REPORT = ROOT / "docs" / "methods.md"
EVAL_ROWS = 500
THREADS = 2
TEMPLATE = "Review: {text}\\nSentiment:"
EXPORT = ["--task", "classify", "--template", TEMPLATE, "--labels", "negative,positive",
          "--trainable", r"norm\.weight$", "--max-length", "64", "--gradients"]
GRADIENT_BUNDLE = "bundles/smollm2-gradients"  # the loss graph (ZO) and the full gradient graph (fo)
HYBRID_BUNDLE = "bundles/smollm2-hybrid8"  # the gradient graph cut above the last 8 of 30 layers


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    bundle: str
    flags: tuple[str, ...]  # pocketzo train flags; empty for the PyTorch reference


ROWS = {r.name: r for r in (
    Row("fo-adamw", "exact gradients on ONNX Runtime (`--recipe fo-adamw`), AdamW lr 1e-3, 60 steps",
        GRADIENT_BUNDLE, ("--recipe", "fo-adamw", "--steps", "60", "--eval-every", "10")),
    Row("hybrid-adamw", "exact gradients for the last 8 layers' norms and the final norm, one-sided ZO below "
        "(`--recipe hybrid-adamw`), AdamW lr 1e-3, 60 steps", HYBRID_BUNDLE,
        ("--recipe", "hybrid-adamw", "--steps", "60", "--eval-every", "10")),
    Row("backprop", "PyTorch AdamW, same tensors, batches and loss, lr 1e-3, 60 steps (the reference)",
        GRADIENT_BUNDLE, ()),
    Row("zo-sgd", "ZO-SGD (MeZO: one two-sided direction), lr 1e-4, eps 1e-3, 400 steps = 800 forwards",
        GRADIENT_BUNDLE, ("--recipe", "zo-sgd", "--lr", "1e-4", "--eps", "1e-3", "--steps", "400",
                          "--eval-every", "50")),
)}
BACKPROP_STEPS, BACKPROP_EVAL_AT = 60, "10,20,30,40,50"


def cache() -> Path:
    return Path(os.environ.get("POCKETZO_CACHE", "~/.cache/pocketzo")).expanduser()


def ensure_inputs() -> tuple[Path, Path]:
    """The two bundles (exported once) and the 500-row test file; returns (train, test)."""
    model = cache() / "smollm2-135m-instruct"
    data = cache() / "data" / "rotten_tomatoes"
    if not model.is_dir() or not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "pocketzo", "assets"], cwd=ROOT, check=True)
    for bundle, extra in ((GRADIENT_BUNDLE, []), (HYBRID_BUNDLE, ["--gradient-layers", "8"])):
        if not (ROOT / bundle / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "pocketzo", "export", str(model), "--out", bundle, *EXPORT, *extra],
                           cwd=ROOT, check=True)
    test = WORK / f"test-{EVAL_ROWS}.jsonl"
    if not test.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        rows = (data / "test.jsonl").read_text(encoding="utf-8").splitlines()[:EVAL_ROWS]
        test.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return data / "train.jsonl", test


def run_pocketzo(row: Row, seed: int, train: Path, test: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        out = Path(tmp) / "run"
        cmd = ["-m", "pocketzo", "train", row.bundle, "--data", str(train), "--eval", str(test), "--out", str(out),
               "--batch-size", "16", "--seed", str(seed), "--threads", str(THREADS), *row.flags]
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        steps = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    seconds = [r["seconds"] for r in steps if "seconds" in r]
    curve = [{"step": e["step"], "train_seconds": sum(seconds[: e["step"]]), "accuracy": e["accuracy"],
              "loss": e["loss"]} for e in summary["evals"]]
    zo = row.name == "zo-sgd"
    return {"command": "python " + " ".join(cmd[:4] + ["..."] + cmd[6:]), "curve": curve,
            "step_seconds_median": summary["step_seconds_median"], "peak_rss_mb": summary["peak_rss_mb"],
            "forward_seconds_median": statistics.median(r["forward_seconds"] / 2 for r in steps) if zo else None}


def run_backprop(seed: int, train: Path, test: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        out = Path(tmp) / "backprop.json"
        cmd = ["benchmarks/accuracy_backprop.py", "--bundle", GRADIENT_BUNDLE, "--model",
               str(cache() / "smollm2-135m-instruct"), "--train", str(train), "--eval", str(test), "--steps",
               str(BACKPROP_STEPS), "--lr", "1e-3", "--eval-at", BACKPROP_EVAL_AT, "--seed", str(seed),
               "--threads", str(THREADS), "--json", str(out)]
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        result = json.loads(out.read_text(encoding="utf-8"))
    return {"command": "python " + " ".join(cmd), "curve": result["curve"],
            "step_seconds_median": result["step_seconds_median"], "peak_rss_mb": result["peak_rss_mb"],
            "forward_seconds_median": None}


def run_one(row: Row, seed: int, train: Path, test: Path) -> None:
    result = run_backprop(seed, train, test) if row.name == "backprop" else run_pocketzo(row, seed, train, test)
    result = {"row": row.name, "seed": seed, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {THREADS} threads", **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{row.name}-s{seed}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    last = result["curve"][-1]
    print(f"{row.name} seed {seed}: accuracy {last['accuracy']:.3f} after {last['train_seconds']:.0f} s of training, "
          f"peak {result['peak_rss_mb']:,.0f} MB", flush=True)


def main() -> int:
    from report_methods import write_report  # noqa: PLC0415 (a sibling script)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--rerun", action="store_true", help="run again where a result exists")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if not args.report_only:
        train, test = ensure_inputs()
        for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: every row gets seed 0 first
            for name in names:
                if args.rerun or not (RESULTS / f"{name}-s{seed}.json").is_file():
                    run_one(ROWS[name], seed, train, test)
    write_report(RESULTS, REPORT, ROWS)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
