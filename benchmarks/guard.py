"""The divergence guard on runs whose training loss falls below 0.01 (issue 40): docs/reliability.md.

Two easy binary tasks made from the assets' real rows, each 600 balanced training rows and 400 balanced dev rows,
trained as a new user would (the default recipe of a bundle with a gradient graph, fo-adamw; 120 steps of 16):

- ``source``: a Rotten Tomatoes snippet or a tweet (``"Text: {text}\\nSource (review or tweet):"``);
- ``tweet-polarity``: the tweet sentiment set's negative and positive rows only.

    python benchmarks/guard.py --task source --out benchmarks/guard/source-new.json

One JSON per run: the guard's undone steps and lr scale, the lowest 32-step median of the training loss, the dev
accuracy before and after, and where the guard before the fix would first have undone a step of this run
(``old_rule_first_undo``). ``--pocketzo DIR`` runs another checkout's pocketzo (the guard before the fix).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from pocketzo.zo_trainer.steplog import read_log

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("POCKETZO_CACHE", Path.home() / ".cache" / "pocketzo"))
WORK = ROOT / "benchmarks" / "work" / "guard"
TASKS = {
    "source": ("Text: {text}\nSource (review or tweet):", "review,tweet"),
    "tweet-polarity": ("Tweet: {text}\nSentiment (negative or positive):", "negative,positive"),
}
TRAIN = ("--steps", "120", "--batch-size", "16", "--seed", "0", "--eval-every", "40", "--threads", "2")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pick(rows: list[dict], n: int, label: str, rng: random.Random) -> list[dict]:
    return [{"text": r["text"], "label": label} for r in rng.sample(rows, n)]


def make_data(task: str, out: Path) -> tuple[Path, Path]:
    """train.jsonl (300 + 300 rows) and dev.jsonl (200 + 200) of ``task``, from the assets' splits."""
    rng = random.Random(0)
    data = CACHE / "data"
    files = {}
    for split, source, n in (("train", "train", 300), ("dev", "test", 200)):
        tweets = _rows(data / "tweets" / f"{source}.jsonl")
        if task == "source":
            rows = (_pick(_rows(data / "rotten_tomatoes" / f"{source}.jsonl"), n, "review", rng)
                    + _pick(tweets, n, "tweet", rng))
        else:
            rows = [r for label in ("negative", "positive")
                    for r in _pick([t for t in tweets if t["label"] == label], n, label, rng)]
        rng.shuffle(rows)
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files["train"], files["dev"]


def old_rule_first_undo(records) -> dict | None:
    """Where the guard before the fix (limit: 10 x the median of the last 32 good losses, from the 8th on) would first
    have undone a step of this run: a run is the same step for step up to there, so None says the old guard's run
    would have been this very run."""
    good: list[float] = []
    for r in records:
        if len(good) >= 8 and r.loss > 10 * statistics.median(good[-32:]):
            return {"step": r.step, "loss": r.loss, "limit": 10 * statistics.median(good[-32:])}
        if r.status == "ok":
            good.append(r.loss)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--out", type=Path, required=True, help="the result JSON")
    ap.add_argument("--pocketzo", type=Path, default=ROOT, help="the checkout whose pocketzo trains")
    args = ap.parse_args()
    work = WORK / args.task
    work.mkdir(parents=True, exist_ok=True)
    train, dev = make_data(args.task, work)
    template, labels = TASKS[args.task]
    bundle = work / "bundle"
    env = {**os.environ, "PYTHONPATH": str(args.pocketzo)}
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "pocketzo", "export", str(CACHE / "smollm2-135m-instruct"),
                        "--task", "classify", "--template", template, "--labels", labels, "--trainable",
                        r"norm\.weight$", "--max-length", "64", "--gradients", "--out", str(bundle)],
                       check=True, env=env, cwd=args.pocketzo)
    run = work / f"run-{args.out.stem}"
    # run from the checkout: `python -m` puts the working directory first on sys.path
    done = subprocess.run([sys.executable, "-m", "pocketzo", "train", str(bundle), "--data", str(train), "--eval",
                           str(dev), "--out", str(run), *TRAIN, "--overwrite", "--quiet"],
                          env=env, cwd=args.pocketzo, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    done.check_returncode()
    summary = json.loads((run / "summary.json").read_text())
    records = read_log(run / "log.jsonl")
    good = [r.loss for r in records if r.status == "ok"]
    medians = [statistics.median(good[max(0, i - 32):i]) for i in range(8, len(good) + 1)]
    result = {
        "task": args.task, "pocketzo": subprocess.run(["git", "-C", str(args.pocketzo), "rev-parse", "--short",
                                                       "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": "python benchmarks/guard.py " + " ".join(sys.argv[1:]),
        "undone_steps": [r.step for r in records if r.status == "undone"],
        "first_lr": records[0].lr, "last_lr": records[-1].lr,
        "lowest_32_step_median_loss": min(medians),
        "old_rule_first_undo": old_rule_first_undo(records),
        "evals": [{k: e[k] for k in ("step", "loss", "accuracy", "auc")} for e in summary["evals"]],
        "step_seconds_median": summary["step_seconds_median"], "peak_rss_mb": summary["peak_rss_mb"],
        "guard_notes": [line for line in done.stderr.splitlines()
                        if line.startswith("note:") and ("undone" in line or "back-off" in line)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("undone_steps", "last_lr", "lowest_32_step_median_loss")}))


if __name__ == "__main__":
    main()
