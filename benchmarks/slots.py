"""Perturbation slots: two-sided estimate pairs per second, one session run of P slots vs sequential steps.

For each batch size B, a LoRA bundle without slots takes ZO steps (two runs of B rows each: one
pair per step), and LoRA bundles with P slots take slotted steps (one run of P x B rows: P/2
pairs per step). Whole steps are timed (noise passes included), median of --steps after a warm-up.

    python benchmarks/slots.py --cache ~/.cache/pocketzo --json benchmarks/slots.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLOTS = (2, 4, 8)
BATCHES = (1, 4, 16)
SEQ = 64


def export(model: Path, out: Path, slots: int) -> Path:
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "pocketzo", "export", str(model), "--out", str(out), "--task", "causal-lm",
               "--peft", "lora", "--max-length", str(SEQ), "--slots", str(slots)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return out


def pairs_per_second(bundle: Path, batch: int, steps: int, threads: int) -> dict:
    from pocketzo.runtime import Bundle, SessionConfig, TrainingSession
    from pocketzo.runtime.data import Batch
    from pocketzo.zo_trainer import Method
    from pocketzo.zo_trainer.trainer import make_trainer

    b = Bundle(bundle)
    session = TrainingSession(b, SessionConfig(threads=threads))
    ids = np.random.default_rng(0).integers(4, 49152, size=(batch, SEQ), dtype=np.int64)
    labels = ids.copy() if b.task.kind == "causal-lm" else np.zeros(batch, np.int64)
    data = Batch(ids, np.ones_like(ids), labels)
    trainer = make_trainer(session, Method(steps=steps + 2, lr=0.0), threads)
    seconds = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        record = trainer.step(i, data)
        seconds.append(time.perf_counter() - t0)
    trainer.close()
    step = statistics.median(seconds[2:])
    return {"slots": b.manifest.slots, "batch": batch, "step_s": step, "pairs_per_step": len(record.directions),
            "pairs_per_s": len(record.directions) / step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "slots")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "slots.json")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--slots", default=",".join(map(str, SLOTS)), help="comma-separated slot counts")
    args = ap.parse_args()
    model = args.cache / "smollm2-135m-instruct"
    slots = [int(p) for p in args.slots.split(",")]
    bundles = {p: export(model, args.work / f"lora-slots{p}", p) for p in (1, *slots)}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        base = pairs_per_second(bundles[1], batch, args.steps, args.threads)
        rows.append({**base, "speedup": 1.0})
        print(json.dumps(rows[-1]), flush=True)
        for p in slots:
            r = pairs_per_second(bundles[p], batch, args.steps, args.threads)
            rows.append({**r, "speedup": r["pairs_per_s"] / base["pairs_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
    task = json.loads((bundles[1] / "manifest.json").read_text())["task"]["kind"]
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "seq": SEQ,
                                     "model": f"SmolLM2-135M-Instruct, LoRA r8 q_proj,v_proj, {task}",
                                     "steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
