"""The step log: one ``StepRecord`` per step, as JSON lines (``log.jsonl``) and compact binary (``log.bin``).

``log.bin`` holds what replay needs and nothing else: an 8-byte header, then per step

    step q, lr d, eps d, L(theta) f, flags B, directions H       31 bytes
    per direction: seed Q, g d, L+ f, L- f                      24 bytes

(little-endian; flags: 1 undone, 2 L(theta) measured, 4 L- measured). A one-direction step takes 55
bytes: 10,000 steps are about 550 KB. Losses are float32 as the session returns them, so both files
replay bit for bit. Either file is checked to run step 0, 1, 2, ... without a gap.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from pocketzo.errors import PocketzoError
from pocketzo.zo_trainer.trainer import DirectionRecord, StepRecord

LOG, LOG_BIN = "log.jsonl", "log.bin"
MAGIC = b"PZSTEP03"
_STEP = struct.Struct("<qddfBH")
_DIRECTION = struct.Struct("<Qdff")
UNDONE, HAS_THETA, HAS_MINUS = 1, 2, 4


def start_logs(run: Path) -> None:
    """Empty step logs for a new run: log.jsonl, and log.bin holding its header."""
    (run / LOG).write_bytes(b"")
    (run / LOG_BIN).write_bytes(MAGIC)


def pack_record(r: StepRecord) -> bytes:
    flags = ((UNDONE if r.status == "undone" else 0) | (HAS_THETA if r.loss_theta is not None else 0)
             | (HAS_MINUS if r.directions and r.directions[0].loss_minus is not None else 0))
    theta = math.nan if r.loss_theta is None else r.loss_theta
    parts = [_STEP.pack(r.step, r.lr, r.eps, theta, flags, len(r.directions))]
    for d in r.directions:
        parts.append(_DIRECTION.pack(d.seed, math.nan if d.grad is None else d.grad, d.loss_plus,
                                     math.nan if d.loss_minus is None else d.loss_minus))
    return b"".join(parts)


def check_order(records: list[StepRecord], where: str) -> None:
    for i, r in enumerate(records):
        if r.step != i:
            raise PocketzoError(f"{where}: record {i} is step {r.step}; the log is incomplete, corrupt or out of order")


def read_bin_log(path: Path) -> list[StepRecord]:
    data = path.read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise PocketzoError(f"{path}: not a pocketzo step log of this version (it does not start with {MAGIC!r}); "
                            "replay it with the pocketzo that wrote it")
    records, at = [], len(MAGIC)
    while at < len(data):
        if at + _STEP.size > len(data):
            raise PocketzoError(f"{path}: truncated after {len(records)} steps (byte {at} of {len(data)})")
        step, lr, eps, theta, flags, q = _STEP.unpack_from(data, at)
        at += _STEP.size
        if at + q * _DIRECTION.size > len(data):
            raise PocketzoError(f"{path}: step {step} is truncated (byte {at} of {len(data)})")
        directions = []
        for seed, grad, plus, minus in _DIRECTION.iter_unpack(data[at : at + q * _DIRECTION.size]):
            directions.append(DirectionRecord(seed, None if flags & UNDONE else grad, plus,
                                              minus if flags & HAS_MINUS else None))
        at += q * _DIRECTION.size
        records.append(StepRecord(step, lr, eps, tuple(directions), theta if flags & HAS_THETA else None,
                                  "undone" if flags & UNDONE else "ok"))
    return records


def read_log(path: str | Path) -> list[StepRecord]:
    """The step records of a run's log.jsonl or log.bin, checked to be consecutive from step 0."""
    path = Path(path)
    if path.suffix == ".bin":
        records = read_bin_log(path)
    else:
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    records.append(StepRecord.from_json(json.loads(line)))
                except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as e:
                    raise PocketzoError(f"{path}:{lineno}: not a step record of this pocketzo ({e})") from None
    check_order(records, str(path))
    return records
