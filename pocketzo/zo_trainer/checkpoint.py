"""What lets a run survive being killed: checkpoints, and cutting the logs back to one.

    RUN/checkpoints/step-00000100/weights.safetensors   the trainable buffer after step 100
    RUN/checkpoints/step-00000100/state.json            CheckpointState (with the files' sha256)
    RUN/checkpoints/step-00000100/<name>.npy            optimizer arrays (momentum, sigma), if any

A checkpoint directory is written under a temporary name, fsynced and renamed, so it appears
whole or not at all; on resume a checkpoint whose state or weights do not verify is skipped
for the next older one. The checkpoint records the length of both step logs at its step.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pocketzo._io import atomic_dir, sha256_file, write_json
from pocketzo.errors import PocketzoError
from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.steplog import LOG, LOG_BIN
from pocketzo.zo_trainer.updates import State

CHECKPOINTS, STATE, WEIGHTS = "checkpoints", "state.json", "weights.safetensors"
STATE_VERSION = 4  # 4: good steps since the last lr back-off; 3: the length of log.bin; 2: optimizer state
READABLE_VERSIONS = (3, 4)  # a version 3 checkpoint resumes with no good steps counted since its last back-off


@dataclass(frozen=True)
class CheckpointState:
    """Everything besides the weights needed to continue a run exactly where it stopped."""

    step: int  # steps completed
    lr_scale: float  # divergence back-off so far
    failures: int  # consecutive undone steps so far
    log_bytes: int  # log.jsonl length at this step (longer logs are cut back on resume)
    log_bin_bytes: int  # log.bin length at this step
    weights_sha256: str
    evals: list[dict] = field(default_factory=list)
    optimizer: dict = field(default_factory=dict)  # scalars, and the sha256 of each array file
    good_steps: int = 0  # good steps in a row since the last lr back-off (counts towards taking it back)
    version: int = STATE_VERSION


def save_checkpoint(run: Path, params: FlatParameters, state: CheckpointState, keep: int,
                    optimizer: State | None = None) -> Path:
    """Write ``run/checkpoints/step-N`` atomically, then drop all but the newest ``keep``."""
    root = run / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{state.step:08d}"
    with atomic_dir(final) as tmp:
        params.save(tmp / WEIGHTS, {"format": "pt", "producer": "pocketzo", "step": str(state.step)})
        opt: dict = {}
        if optimizer is not None:
            opt = {"scalars": optimizer.scalars(), "sha256": {}}
            for name, array in optimizer.arrays().items():
                np.save(tmp / f"{name}.npy", array, allow_pickle=False)
                opt["sha256"][name] = sha256_file(tmp / f"{name}.npy")
        state = CheckpointState(**{**asdict(state), "weights_sha256": sha256_file(tmp / WEIGHTS), "optimizer": opt})
        write_json(tmp / STATE, asdict(state))
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path, params: FlatParameters) -> CheckpointState | None:
    """Load the newest checkpoint that verifies into ``params``; None if there is none. Its optimizer
    arrays are verified here and loaded by ``load_optimizer`` once the trainer exists."""
    for stale in (run / CHECKPOINTS).glob(".step-*.tmp"):  # a checkpoint being written when the run was killed
        shutil.rmtree(stale, ignore_errors=True)
    for ckpt in sorted((p for p in (run / CHECKPOINTS).glob("step-*") if p.is_dir()), reverse=True):
        try:
            state = CheckpointState(**json.loads((ckpt / STATE).read_text(encoding="utf-8")))
            if state.version not in READABLE_VERSIONS or sha256_file(ckpt / WEIGHTS) != state.weights_sha256:
                raise ValueError("weights do not match the recorded sha256")
            _optimizer_arrays(ckpt, state.optimizer)
            params.load(ckpt / WEIGHTS)
        except (OSError, ValueError, TypeError, KeyError, PocketzoError) as e:
            print(f"note: skipping checkpoint {ckpt} ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        return state
    return None


def _optimizer_arrays(ckpt: Path, saved: dict) -> dict[str, np.ndarray]:
    arrays = {}
    for name, digest in saved.get("sha256", {}).items():
        if sha256_file(ckpt / f"{name}.npy") != digest:
            raise ValueError(f"optimizer array {name} does not match the recorded sha256")
        arrays[name] = np.load(ckpt / f"{name}.npy", allow_pickle=False)
    return arrays


def load_optimizer(run: Path, state: CheckpointState, optimizer: State) -> None:
    """Load the optimizer state saved with checkpoint ``state`` of ``run``."""
    ckpt = run / CHECKPOINTS / f"step-{state.step:08d}"
    try:
        optimizer.load(_optimizer_arrays(ckpt, state.optimizer), state.optimizer.get("scalars", {"v": 0.0, "t": 0}))
    except (OSError, ValueError, KeyError) as e:
        raise PocketzoError(f"{ckpt}: cannot load the optimizer state ({e}); start the run again") from None


def truncate_logs(run: Path, state: CheckpointState) -> None:
    """Cut log.jsonl and log.bin back to the checkpoint's step: later steps will run again."""
    for name, size in ((LOG, state.log_bytes), (LOG_BIN, state.log_bin_bytes)):
        with open(run / name, "r+b") as f:
            f.truncate(size)
