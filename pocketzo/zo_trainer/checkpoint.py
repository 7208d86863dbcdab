"""What lets a run survive being killed: checkpoints and the compact binary step log.

    RUN/checkpoints/step-00000100/weights.safetensors   the trainable buffer after step 100
    RUN/checkpoints/step-00000100/state.json            CheckpointState (with the files' sha256)
    RUN/checkpoints/step-00000100/<name>.npy            optimizer arrays (momentum, sigma), if any
    RUN/log.bin                                          one 56-byte record per step and direction

A checkpoint directory is written under a temporary name, fsynced and renamed, so it appears
whole or not at all; on resume a checkpoint whose state or weights do not verify is skipped
for the next older one. ``log.bin`` holds what replay needs (seed, g, lr, eps, both losses,
status, and L(theta) when measured): 10,000 steps take 560 KB, next to the human-readable log.jsonl.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pocketzo._io import atomic_dir, sha256_file, write_json
from pocketzo.errors import PocketzoError
from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.optim import State
from pocketzo.zo_trainer.trainer import StepRecord

CHECKPOINTS, LOG_BIN, STATE, WEIGHTS = "checkpoints", "log.bin", "state.json", "weights.safetensors"
STATE_VERSION = 2  # 2: optimizer state
# step, seed, grad, lr, eps, loss+, loss-, undone, direction, loss0; 56 bytes (the last two were padding)
_RECORD = struct.Struct("<qQdddffBHf1x")
RECORD_BYTES = _RECORD.size


def pack_record(r: StepRecord) -> bytes:
    return _RECORD.pack(r.step, r.seed, r.grad, r.lr, r.eps, r.loss_plus, r.loss_minus, r.status == "undone",
                        r.direction, r.loss_zero)


def check_order(records: list[StepRecord], where: str) -> None:
    """Records must run step 0, 1, ... with directions 0, 1, ... within each step."""
    prev = None
    for i, r in enumerate(records):
        allowed = [(0, 0)] if prev is None else [(prev.step, prev.direction + 1), (prev.step + 1, 0)]
        if (r.step, r.direction) not in allowed:
            raise PocketzoError(f"{where}: record {i} is step {r.step} direction {r.direction}; the log is "
                                "incomplete, corrupt or out of order")
        prev = r


def read_bin_log(path: str | Path) -> list[StepRecord]:
    """The step records of a log.bin, checked to be whole and consecutive from step 0."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) % RECORD_BYTES:
        raise PocketzoError(f"{path}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte step records; "
                            "the log is truncated or not a pocketzo log.bin")
    records = [StepRecord(step, seed, grad, lr, eps, lp, lm, 0.0, 0.0, "undone" if undone else "ok", direction,
                          l0 if l0 else math.nan)  # 0.0: a log written before L(theta) was recorded
               for step, seed, grad, lr, eps, lp, lm, undone, direction, l0 in _RECORD.iter_unpack(data)]
    check_order(records, str(path))
    return records


@dataclass(frozen=True)
class CheckpointState:
    """Everything besides the weights needed to continue a run exactly where it stopped."""

    step: int  # steps completed
    lr_scale: float  # divergence back-off so far
    failures: int  # consecutive undone steps so far
    log_bytes: int  # log.jsonl length at this step (longer logs are cut back on resume)
    weights_sha256: str
    evals: list[dict] = field(default_factory=list)
    optimizer: dict = field(default_factory=dict)  # scalars, and the sha256 of each array file
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
            if state.version != STATE_VERSION or sha256_file(ckpt / WEIGHTS) != state.weights_sha256:
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


def truncate_logs(run: Path, jsonl: str, state: CheckpointState, records_per_step: int = 1) -> None:
    """Cut log.jsonl and log.bin back to the checkpoint's step: later steps will run again."""
    with open(run / jsonl, "r+b") as f:
        f.truncate(state.log_bytes)
    with open(run / LOG_BIN, "r+b") as f:
        f.truncate(state.step * records_per_step * RECORD_BYTES)
