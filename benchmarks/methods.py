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

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grid

RESULTS = grid.ROOT / "benchmarks" / "methods"
WORK = grid.ROOT / "benchmarks" / "work" / "methods"
REPORT = grid.ROOT / "docs" / "methods.md"
TEMPLATE = "Review: {text}\\nSentiment:"
EXPORT = ["--task", "classify", "--template", TEMPLATE, "--labels", "negative,positive",
          "--trainable", r"norm\.weight$", "--max-length", "64", "--gradients"]
GRADIENT_BUNDLE = "bundles/smollm2-gradients"  # the loss graph (ZO) and the full gradient graph (fo)
HYBRID_BUNDLE = "bundles/smollm2-hybrid8"  # the gradient graph cut above the last 8 of 30 layers
BUNDLES = {GRADIENT_BUNDLE: EXPORT, HYBRID_BUNDLE: [*EXPORT, "--gradient-layers", "8"]}  # bundle -> export flags


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    bundle: str
    flags: tuple[str, ...]  # pocketzo train flags; empty for the PyTorch reference


ROWS = {r.name: r for r in (
    Row("fo-adamw", "exact gradients on ONNX Runtime (`--recipe fo-adamw`), AdamW lr 1e-3, 60 steps",
        GRADIENT_BUNDLE, ("--recipe", "fo-adamw", "--steps", "60", "--eval-every", "10")),
    Row("fo-adamw-micro4", "as fo-adamw, the gradient graph run over 4 rows at a time and the 4 parts' gradients "
        "summed (`--micro-batch 4`)", GRADIENT_BUNDLE,
        ("--recipe", "fo-adamw", "--micro-batch", "4", "--steps", "60", "--eval-every", "10")),
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


def run_pocketzo(row: Row, seed: int, train: Path, test: Path) -> dict:
    run = grid.train(row.bundle, row.flags, seed, train, test)
    zo = row.name == "zo-sgd"
    return {"command": run.command, "curve": run.curve("accuracy", "loss"),
            "step_seconds_median": run.summary["step_seconds_median"], "peak_rss_mb": run.summary["peak_rss_mb"],
            "forward_seconds_median": statistics.median(r["forward_seconds"] / 2 for r in run.log) if zo else None}


def run_backprop(seed: int, train: Path, test: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        out = Path(tmp) / "backprop.json"
        cmd = ["benchmarks/accuracy_backprop.py", "--bundle", GRADIENT_BUNDLE, "--model", str(grid.model_dir()),
               "--train", str(train), "--eval", str(test), "--steps", str(BACKPROP_STEPS), "--lr", "1e-3",
               "--eval-at", BACKPROP_EVAL_AT, "--seed", str(seed), "--threads", str(grid.THREADS), "--json", str(out)]
        subprocess.run([sys.executable, *cmd], cwd=grid.ROOT, check=True, stderr=subprocess.DEVNULL)
        result = json.loads(out.read_text(encoding="utf-8"))
    return {"command": "python " + " ".join(cmd), "curve": result["curve"],
            "step_seconds_median": result["step_seconds_median"], "peak_rss_mb": result["peak_rss_mb"],
            "forward_seconds_median": None}


def run_one(name: str, seed: int) -> None:
    train, test = grid.ensure_inputs(BUNDLES.items(), WORK)
    result = run_backprop(seed, train, test) if name == "backprop" else run_pocketzo(ROWS[name], seed, train, test)
    grid.save(RESULTS, name, seed, result)
    last = result["curve"][-1]
    print(f"{name} seed {seed}: accuracy {last['accuracy']:.3f} after {last['train_seconds']:.0f} s of training, "
          f"peak {result['peak_rss_mb']:,.0f} MB", flush=True)


if __name__ == "__main__":
    from report_methods import write_report  # noqa: PLC0415 (a sibling script)

    sys.exit(grid.main(__doc__.splitlines()[0], ROWS, RESULTS, run_one, REPORT,
                       lambda: write_report(RESULTS, REPORT, ROWS)))
