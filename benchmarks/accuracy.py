"""``make bench-accuracy``: test accuracy per forward pass of every ZO method, against zero-shot and backprop.

The task is the demo's: SmolLM2-135M-Instruct as a prompt classifier of Rotten Tomatoes snippets,
training the norm weights (35,136 numbers; bundles/smollm2-sentiment, built by `make demo`). Every
ZO run gets the same budget of forward passes (steps = budget / forwards per step), batch 16, and
is evaluated on the first 500 test rows after 1/4, 1/2 and all of its budget. The ceiling is
PyTorch AdamW on the same tensors, batches and loss (benchmarks/accuracy_backprop.py).

    python benchmarks/accuracy.py --cache ~/.cache/pocketzo [--quick] [--budget 200] [--seeds 0,1,2]
                                  [--only zo-sgd,best] [--jobs 2] [--report-only]

--quick runs zero-shot, the ZO-SGD baseline, the default method and the backprop ceiling for seed 0
only. Each run is a fresh process with one thread (two run side by side on a 2-core machine) and
writes work/accuracy/<method>-s<seed>.json; a run whose file exists with the same settings is
not run again. Writes benchmarks/accuracy.json, docs/accuracy.md and docs/img/accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "smollm2-sentiment"
EVAL_ROWS = 500
COMMON = {"eps": 1e-3, "batch_size": 16, "lr": 1e-4}
# name: (what it is, TrainConfig fields over COMMON). lr of adaptive/sign: their step per weight is lr
# itself, where ZO-SGD's is lr |g| with |g| ~ 5 here.
METHODS = {
    "zo-sgd": ("ZO-SGD, MeZO's recipe: Gaussian z, one two-sided direction (the baseline)",
               {"perturbation": "gaussian"}),
    "rademacher": ("ZO-SGD with +-1 noise (pocketzo's noise)", {}),
    "q4": ("4 two-sided directions per step, averaged", {"directions": 4}),
    "one-sided-q4": ("4 one-sided directions sharing L(theta)", {"estimator": "one-sided", "directions": 4}),
    "momentum": ("momentum 0.9 on the estimate (ZO-SGD-MMT)", {"momentum": 0.9}),
    "adaptive": ("scalar second moment (memory-light ZO-Adam), lr 1e-3", {"adaptive": True, "lr": 1e-3}),
    "sign": ("sign of the estimate, lr 5e-4", {"sign": True, "lr": 5e-4}),
    "sparse": ("perturb the 25 % smallest-magnitude weights of each tensor", {"sparsity": 0.75}),
    "curvature": ("diagonal curvature scaling (HiZOO-like), Gaussian z, lr 1e-3", {"perturbation": "gaussian",
                                                                          "curvature": 1e-3, "lr": 1e-3}),
    "eps-decay": ("eps 1e-3 -> 1e-4 and lr decaying linearly", {"eps_end": 1e-4, "schedule": "linear"}),
    # lr probes: averaging q directions lowers the estimate's variance about q-fold, which allows a q-fold lr
    "zo-sgd-lr4e-4": ("ZO-SGD, +-1 noise, lr 4e-4", {"lr": 4e-4}),
    "adaptive-lr4e-3": ("adaptive, lr 4e-3", {"adaptive": True, "lr": 4e-3}),
    "one-sided-q4-adaptive-lr4e-3": ("4 one-sided directions, adaptive, lr 4e-3",
                                     {"estimator": "one-sided", "directions": 4, "adaptive": True, "lr": 4e-3}),
    "one-sided-q4-lr4e-4": ("4 one-sided directions, lr 4e-4", {"estimator": "one-sided", "directions": 4,
                                                                "lr": 4e-4}),
}
BASELINE, BEST = "zo-sgd", "best"
# chosen from the seed-0 rows above (highest final accuracy, no extra memory)
METHODS[BEST] = ("the best measured: 4 one-sided directions, lr 4e-4 (pocketzo train's default)",
                 {"estimator": "one-sided", "directions": 4, "lr": 4e-4})


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_one(method: str, seed: int, budget: int, train: Path, test: Path, out: Path) -> None:
    """One ZO run in this process (one thread): evaluations at 1/4, 1/2 and all of the budget."""
    import numpy as np

    from pocketzo.runtime import SessionConfig, TrainingSession
    from pocketzo.runtime.bundle import Bundle
    from pocketzo.runtime.data import TextEncoder
    from pocketzo.runtime.session import FlatParameters
    from pocketzo.zo_trainer import BatchSampler, TrainConfig, evaluate, make_trainer

    fields = {**COMMON, **METHODS[method][1]}
    probe = TrainConfig(steps=1, **fields)
    steps = budget // probe.forwards_per_step()
    cfg = TrainConfig(steps=steps, seed=seed, threads=1, **fields)
    bundle = Bundle(BUNDLE)
    encoder = TextEncoder(bundle)
    train_data, test_data = encoder.dataset(train), encoder.dataset(test)
    session = TrainingSession(bundle, SessionConfig(threads=1), FlatParameters.from_bundle(bundle))
    trainer = make_trainer(session, cfg)
    sampler = BatchSampler(len(train_data), cfg.batch_size, seed)
    checkpoints = {max(1, steps // 4), max(1, steps // 2), steps}
    curve, losses, step_s, t0 = [], [], [], time.perf_counter()
    for step in range(steps):
        records = trainer.step(step, train_data.batch(sampler.indices(step)))
        step_s.append(records[0].seconds)
        losses.append(float(np.mean([r.loss_plus for r in records])))
        if step + 1 in checkpoints:
            trainer.sync()
            result = evaluate(session, test_data, 32)
            curve.append({"step": step + 1, "forward_passes": (step + 1) * cfg.forwards_per_step(),
                          "accuracy": result.accuracy, "loss": result.loss})
            log(f"{method} seed {seed}: {curve[-1]['forward_passes']} forwards -> {result.accuracy:.3f}")
    trainer.close()
    finite = bool(np.isfinite(losses).all() and np.isfinite(session.params.buffer).all())
    _write(out, {"method": method, "seed": seed, "budget": budget, "config": cfg.to_json(), "curve": curve,
                 "final_accuracy": curve[-1]["accuracy"], "diverged": not finite or max(losses) > 10 * losses[0],
                 "train_loss_first_last": [losses[0], losses[-1]], "extra_state_bytes": trainer.state.extra_bytes,
                 "trainable": session.params.numel, "step_seconds_median": statistics.median(step_s),
                 "wall_seconds": time.perf_counter() - t0})


def zero_shot(test: Path, out: Path) -> None:
    from pocketzo.runtime import SessionConfig, TrainingSession
    from pocketzo.runtime.bundle import Bundle
    from pocketzo.runtime.data import TextEncoder
    from pocketzo.zo_trainer import evaluate

    bundle = Bundle(BUNDLE)
    result = evaluate(TrainingSession(bundle, SessionConfig(threads=1)), TextEncoder(bundle).dataset(test), 32)
    _write(out, {"method": "zero-shot", "final_accuracy": result.accuracy, "loss": result.loss})


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _job(cmd: list[str], out: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {proc.stderr.strip().splitlines()[-3:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("POCKETZO_CACHE", "~/.cache/pocketzo")))
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "accuracy")
    ap.add_argument("--budget", type=int, default=200, help="forward passes per ZO run")
    ap.add_argument("--backprop-steps", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", help="comma-separated methods")
    ap.add_argument("--quick", action="store_true", help="zero-shot, zo-sgd, best and backprop, seed 0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--zero-shot", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = args.cache.expanduser() / "data" / "rotten_tomatoes"
    test = args.work / f"test-{EVAL_ROWS}.jsonl"
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.budget, data / "train.jsonl", test, args.out)
        return 0
    if args.zero_shot:
        zero_shot(test, args.out)
        return 0

    import report_accuracy

    if not args.report_only:
        if not BUNDLE.is_dir():
            raise SystemExit(f"{BUNDLE}: missing; run `make demo` first (it exports the bundle)")
        args.work.mkdir(parents=True, exist_ok=True)
        if not test.is_file():
            rows = (data / "test.jsonl").read_text(encoding="utf-8").splitlines()[:EVAL_ROWS]
            test.write_text("\n".join(rows) + "\n", encoding="utf-8")
        seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
        methods = [BASELINE, BEST] if args.quick else [m for m in (args.only or ",".join(METHODS)).split(",")
                                                        if m in METHODS]  # "backprop" is not a ZO method
        jobs = [] if (args.work / "zero-shot.json").is_file() else [
            (["benchmarks/accuracy.py", "--zero-shot", "--out", str(args.work / "zero-shot.json"), "--work",
              str(args.work)], args.work / "zero-shot.json")]
        for m in methods:
            for s in seeds:
                out = args.work / f"{m}-s{s}.json"
                if out.is_file() and _same(out, m, args.budget):
                    continue
                jobs.append((["benchmarks/accuracy.py", "--one", m, str(s), "--budget", str(args.budget),
                              "--cache", str(args.cache), "--work", str(args.work), "--out", str(out)], out))
        if args.quick or not args.only or "backprop" in args.only:
            for s in seeds:
                out = args.work / f"backprop-s{s}.json"
                if not out.is_file():
                    jobs.append((["benchmarks/accuracy_backprop.py", "--bundle", str(BUNDLE), "--model",
                                  str(args.cache.expanduser() / "smollm2-135m-instruct"), "--train",
                                  str(data / "train.jsonl"), "--eval", str(test), "--steps",
                                  str(args.backprop_steps), "--eval-at", f"{args.backprop_steps // 4},"
                                  f"{args.backprop_steps // 2}", "--seed", str(s), "--threads", "1",
                                  "--json", str(out)], out))
        log(f"{len(jobs)} runs on {args.jobs} workers")
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in pool.map(lambda j: _job(*j), jobs):
                log(f"wrote {done.relative_to(ROOT)}")
    report_accuracy.write(args.work, ROOT, {"machine": f"{platform.processor() or platform.machine()}, "
                                            f"{os.cpu_count()} CPUs", "budget": args.budget})
    return 0


def _same(path: Path, method: str, budget: int) -> bool:
    got = json.loads(path.read_text())
    return got.get("budget") == budget and got["config"] == {**got["config"], **COMMON, **METHODS[method][1]}


if __name__ == "__main__":
    sys.exit(main())
