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
    accuracy  ZO-SGD (eps 1e-3, constant lr) on the last K layers, K = 4, 8, 15 on split bundles and K = 30 on
              the whole graph, evaluated on the first 500 test rows every 25 steps; the accuracy read at the
              same training seconds for every K. Two trainable modes: the RMSNorm weights (and the final norm)
              at the demo's lr 1e-4, and K = 4, 8 again at lr 1e-3; LoRA (r 8 on q_proj and v_proj) at an lr of
              about 1e-2 x 8 / K (LORA_LR), and at one lr for every K: 1e-2, and docs/modes.md's 1e-3

A run's result goes to ``benchmarks/split/<row>-s<seed>.json`` as soon as it finishes, so the grid continues
where it stopped. A forward-equivalent (FE) is one forward of the whole loss graph at the same batches: the
median forward time of the ``lora8-whole`` run (each of its steps is two whole forwards).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grid

RESULTS = grid.ROOT / "benchmarks" / "split"
WORK = grid.ROOT / "benchmarks" / "work" / "split"
REPORT = grid.ROOT / "docs" / "split.md"
BUDGET_SECONDS = 200
TEMPLATE = "Review: {text}\\nSentiment:"
TASK = ["--task", "classify", "--template", TEMPLATE, "--labels", "negative,positive", "--max-length", "64"]
NORMS = ["--trainable", r"norm\.weight$"]
BUNDLES = {  # bundle -> export flags
    "bundles/smollm2-lora8-split": [*TASK, "--peft", "lora", "--trainable-layers", "8", "--split", "auto"],
    "bundles/smollm2-norms4-split": [*TASK, *NORMS, "--trainable-layers", "4", "--split", "auto"],
    "bundles/smollm2-norms8-split": [*TASK, *NORMS, "--trainable-layers", "8", "--split", "auto"],
    "bundles/smollm2-norms15-split": [*TASK, *NORMS, "--trainable-layers", "15", "--split", "auto"],
    "bundles/smollm2-sentiment": [*TASK, *NORMS],  # the demo's bundle: all 30 layers, no split
    "bundles/smollm2-lora4-split": [*TASK, "--peft", "lora", "--trainable-layers", "4", "--split", "auto"],
    "bundles/smollm2-lora15-split": [*TASK, "--peft", "lora", "--trainable-layers", "15", "--split", "auto"],
    "bundles/smollm2-lora30": [*TASK, "--peft", "lora"],  # all 30 layers: nothing to split
}
ZO = ("--recipe", "zo-sgd", "--eps", "1e-3", "--schedule", "constant")
# LoRA's lr by K: 1e-2 moved the last 8 layers' adapters (one probe) but diverged on 15 and 30 layers, whose
# estimates are noisier (the noise grows with the number of weights): about 1e-2 x 8 / K, and for K = 30 half
# of that, 3e-3 having diverged after 130 steps
LORA_LR = {4: "2e-2", 8: "1e-2", 15: "5e-3", 30: "1.5e-3"}


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # speed or accuracy
    what: str
    bundle: str
    flags: tuple[str, ...]


def _accuracy_row(mode: str, k: int, lr: str) -> Row:
    """ZO-SGD on ``mode`` ("norms" or "lora") in the last ``k`` layers; the row's name is ``<mode><k>``, with
    ``-lr<lr>`` where the lr is not the mode's own."""
    est_step_s = 0.5 * ((30 - k) / 30 + 2 * k / 30)  # one forward of 0.5 s: the trunk once, the head twice
    steps = int(1.15 * BUDGET_SECONDS / est_step_s)  # a margin: accuracy is read at BUDGET_SECONDS
    if mode == "norms":
        bundle = "bundles/smollm2-sentiment" if k == 30 else f"bundles/smollm2-norms{k}-split"
        what, own_lr = f"norms of the last {k} layers", "1e-4"
    else:
        bundle = "bundles/smollm2-lora30" if k == 30 else f"bundles/smollm2-lora{k}-split"
        what, own_lr = f"LoRA on the last {k} layers", LORA_LR[k]
    what += " (whole graph)" if k == 30 else f", split at layer {30 - k}"
    name = f"{mode}{k}" if lr == own_lr else f"{mode}{k}-lr{lr}"
    return Row(name, "accuracy", what + ("" if lr == own_lr else f", lr {lr}"), bundle,
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
    *(_accuracy_row("norms", k, "1e-4") for k in (4, 8, 15, 30)),
    # is a smaller K held back by the shared lr? ten times larger for two of them
    *(_accuracy_row("norms", k, "1e-3") for k in (4, 8)),
    *(_accuracy_row("lora", k, LORA_LR[k]) for k in (4, 8, 15, 30)),
    # docs/modes.md's lr for LoRA on every layer: in 200 s it barely moves the last 4 or 8 layers' adapters
    *(_accuracy_row("lora", k, "1e-3") for k in (4, 8)),
    # one lr for every K: the last 4 layers' adapters move slowly, 15 and 30 layers diverge
    *(_accuracy_row("lora", k, "1e-2") for k in (4, 15, 30)),
    _accuracy_row("lora", 30, "3e-3"),  # 1e-2 x 8 / K for K = 30
)}


def run_interleaved(row: Row, train: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        out = Path(tmp) / "speed.json"
        cmd = ["benchmarks/split_speed.py", row.bundle, "--data", str(train), "--cache", str(WORK / "cache-lora8"),
               "--json", str(out), "--threads", str(grid.THREADS)]
        subprocess.run([sys.executable, *cmd], cwd=grid.ROOT, check=True, stderr=subprocess.DEVNULL)
        return {"command": "python " + " ".join(cmd[:2] + ["..."]), **json.loads(out.read_text(encoding="utf-8"))}


def run_one(name: str, seed: int) -> None:
    row = ROWS[name]
    train, test = grid.ensure_inputs([(row.bundle, BUNDLES[row.bundle])], WORK)
    if row.kind == "interleaved":
        grid.save(RESULTS, name, seed, run_interleaved(row, train))
        return
    run = grid.train(row.bundle, row.flags, seed, train, test if row.kind == "accuracy" else None)
    result = {"command": run.command, "step_seconds_median": run.summary["step_seconds_median"],
              "peak_rss_mb": run.summary["peak_rss_mb"],
              "forward_seconds": sorted(r["forward_seconds"] / 2 for r in run.log)[len(run.log) // 2],
              "trunk_cache": run.summary.get("trunk_cache"), "steps": len(run.step_seconds)}
    if row.kind == "accuracy":
        result["curve"] = run.curve("accuracy")
    grid.save(RESULTS, name, seed, result)


if __name__ == "__main__":
    from report_split import write_report  # noqa: PLC0415 (a sibling script)

    sys.exit(grid.main(__doc__.splitlines()[0], ROWS, RESULTS, run_one, REPORT,
                       lambda: write_report(RESULTS, REPORT, ROWS, BUDGET_SECONDS),
                       seeded=lambda name: ROWS[name].kind == "accuracy"))
