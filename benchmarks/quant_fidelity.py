"""Does the ZO estimate through a quantized base follow the float32 one?

    python benchmarks/quant_fidelity.py --reference bundles/smollm2-sentiment \\
        --bundles bundles/smollm2-sentiment-int8,bundles/smollm2-sentiment-int4 \\
        --data ~/.cache/pocketzo/data/rotten_tomatoes/train.jsonl [--directions 32] [--eps 1e-3] --json OUT

For each bundle (the reference too) and each of ``--directions`` seeded Rademacher directions z over the
flat trainable buffer, the two-sided estimate g = (L(theta + eps z) - L(theta - eps z)) / (2 eps) on one batch
of the first ``--batch-size`` training rows, from the same initial theta. A bundle's fidelity is the Pearson
correlation of its g with the reference's over the directions, and the share of directions whose signs agree:
a ZO step moves theta by -lr g z, so a g that does not follow the reference's moves the weights elsewhere.
Also the loss at theta against the reference's. The bundles must have the same trainable tensors (export them
with the same --trainable / --peft and task, differing only in --quantize). Timings are not taken here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pocketzo.runtime import Bundle, SessionConfig, TrainingSession
from pocketzo.runtime.data import TextEncoder


def two_sided_estimates(session: TrainingSession, feeds: tuple, directions: int, eps: float,
                        seed: int = 1234) -> list[float]:
    """(L(theta + eps z) - L(theta - eps z)) / (2 eps) on ``feeds`` along each seeded Rademacher direction z over
    the session's flat trainable buffer; theta is restored after."""
    theta = session.params.buffer
    start, g = theta.copy(), []
    for d in range(directions):
        z = np.random.default_rng([seed, d]).integers(0, 2, theta.shape).astype(np.float32) * 2 - 1
        theta[:] = start + eps * z
        plus = float(session.run(*feeds)["loss"])
        theta[:] = start - eps * z
        minus = float(session.run(*feeds)["loss"])
        g.append((plus - minus) / (2 * eps))
    theta[:] = start
    return g


def estimates(bundle: Path, data: Path, batch_size: int, directions: int, eps: float, threads: int) -> dict:
    """The loss at theta and the two-sided estimate along each seeded direction, through ``bundle``."""
    opened = Bundle(bundle)
    session = TrainingSession(opened, SessionConfig(threads=threads))
    rows = TextEncoder(opened).dataset(data)
    batch = rows.batch(np.arange(min(batch_size, len(rows))))
    feeds = (batch.input_ids, batch.attention_mask, batch.labels)
    loss = float(session.run(*feeds)["loss"])
    g = two_sided_estimates(session, feeds, directions, eps)
    quantized = opened.manifest.export.get("quantized")
    return {"bundle": str(bundle), "quantized": None if quantized is None else
            {k: quantized.get(k) for k in ("mode", "recipe", "quantized", "eight_bit", "embedding_tables",
                                           "tied_tables", "file_bytes_after")}, "loss": loss, "g": g}


def fidelity(reference: dict, other: dict) -> dict:
    a, b = np.asarray(reference["g"]), np.asarray(other["g"])
    return {"g_correlation": float(np.corrcoef(a, b)[0, 1]), "sign_agreement": float(np.mean(np.sign(a) == np.sign(b))),
            "loss_difference": other["loss"] - reference["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="the float32 bundle")
    ap.add_argument("--bundles", required=True, help="comma-separated quantized bundles")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--directions", type=int, default=32)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    ref = estimates(args.reference, args.data, args.batch_size, args.directions, args.eps, args.threads)
    results = []
    for path in args.bundles.split(","):
        got = estimates(Path(path), args.data, args.batch_size, args.directions, args.eps, args.threads)
        results.append({**got, **fidelity(ref, got)})
        print(f"{path}: g correlation {results[-1]['g_correlation']:.3f}, signs agree "
              f"{results[-1]['sign_agreement']:.0%}, loss {got['loss']:.4f} (reference {ref['loss']:.4f})", flush=True)
    out = {"reference": ref, "bundles": results, "eps": args.eps, "directions": args.directions,
           "batch_size": args.batch_size, "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
