"""ZO step time of a split bundle three ways, interleaved in one process so that the ratios share the
machine's state: the whole loss graph at each point, the split (trunk once per batch, head per point),
and the head alone (the trunk's output read from a ``--cache-trunk`` cache, or reused).

    python benchmarks/split_speed.py BUNDLE --data TRAIN.jsonl --cache DIR --json OUT [--rounds 12]

Two kinds of batches, 16 rows each: random token ids at a fixed 16 x 64 (the shape of the issue's target;
the head-only step reuses one batch's trunk output, as a cache would give it, without the read), and
consecutive rows of the training file (the head-only step reads them from the cache in DIR, built first).
Every step is plain ZO-SGD with lr 0 (the weights stay as exported; the work is the same). Last, the head's
losses over the cached (float16) and the live (float32) trunk outputs of the same training batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pocketzo.runtime import Bundle, SessionConfig, TrainingSession
from pocketzo.runtime.data import Batch, TextEncoder
from pocketzo.runtime.split_session import SplitSession
from pocketzo.runtime.trunk_cache import open_trunk_cache
from pocketzo.zo_trainer import Method
from pocketzo.zo_trainer.trainer import make_trainer

BATCH = 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bundle = Bundle(args.bundle)
    config = SessionConfig(threads=args.threads)
    method = Method(steps=10**6, lr=0.0, eps=1e-3, batch_size=BATCH)
    split = SplitSession(bundle, config)
    data = TextEncoder(bundle).dataset(args.data)
    cache = open_trunk_cache(args.cache, split, data)
    trainers = {("whole", "fixed"): make_trainer(TrainingSession(bundle, config), method, args.threads),
                ("split", "fixed"): make_trainer(split, method, args.threads),
                ("head_only", "fixed"): make_trainer(SplitSession(bundle, config), method, args.threads),
                ("head_only", "data"): make_trainer(SplitSession(bundle, config), method, args.threads, cache)}
    trainers["whole", "data"], trainers["split", "data"] = trainers["whole", "fixed"], trainers["split", "fixed"]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49152, (BATCH, 64))
    fixed = Batch(ids, np.ones_like(ids), rng.integers(0, 2, BATCH))
    times: dict[str, list[float]] = {f"{kind}_{mode}": [] for mode, kind in trainers}
    step = 0
    for r in range(args.rounds + 2):  # two warm-up rounds
        real = data.batch(np.arange(r * BATCH, (r + 1) * BATCH))
        for (mode, kind), trainer in trainers.items():
            # a new Batch object per step, except the fixed head-only one: its trunk output is reused
            batch = real if kind == "data" else fixed if mode == "head_only" else Batch(*_rows(fixed))
            t = time.perf_counter()
            trainer.step(step, batch)
            if r >= 2:
                times[f"{kind}_{mode}"].append(time.perf_counter() - t)
            step += 1
    result = {k: statistics.median(v) for k, v in times.items()}
    result["float16_cache"] = float16_parity(split, data, cache, args.rounds)
    for kind in ("fixed", "data"):
        result[f"{kind}_split_speedup"] = result[f"{kind}_whole"] / result[f"{kind}_split"]
        result[f"{kind}_head_only_speedup"] = result[f"{kind}_whole"] / result[f"{kind}_head_only"]
    result.update(rounds=args.rounds, threads=args.threads, samples=times)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def float16_parity(session: SplitSession, data, cache, batches: int) -> dict:
    """What float16 storage does to the loss: the head's losses over cached against live trunk outputs."""
    loss_err, example_err, rows = [], [], 0
    for r in range(batches):
        b = data.batch(np.arange(r * BATCH, (r + 1) * BATCH))
        live = session.trunk(b.input_ids, b.attention_mask)
        out = [session.run_head(h, b.attention_mask, b.labels, ["loss", "example_loss"])
               for h in (live, cache.rows(b.rows, b.input_ids.shape[1]))]
        loss_err.append(abs(float(out[0]["loss"]) - float(out[1]["loss"])))
        example_err.append(float(np.abs(out[0]["example_loss"] - out[1]["example_loss"]).max()))
        rows += len(b.rows)
    return {"batches": batches, "rows": rows, "loss_abs_error_max": max(loss_err),
            "loss_abs_error_median": statistics.median(loss_err), "example_loss_abs_error_max": max(example_err)}


def _rows(b: Batch) -> tuple[np.ndarray, ...]:
    """A batch's arrays, for a new Batch object (a split trainer reuses a trunk output only for the same one)."""
    return b.input_ids, b.attention_mask, b.labels


if __name__ == "__main__":
    sys.exit(main())
