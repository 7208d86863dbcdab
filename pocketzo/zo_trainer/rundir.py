"""The run directory and its ``config.json``: what a run trains, on what, and with which method.

    RUN/config.json          RunConfig: bundle, data (with their sha256), Method, RunPolicy, session
    RUN/log.jsonl            one StepRecord per line, flushed as the run goes
    RUN/log.bin              the same records, compact (``steplog``)
    RUN/checkpoints/         the newest checkpoints (every --checkpoint-every steps, and on SIGINT/SIGTERM)
    RUN/weights.safetensors  final trainable tensors under their Hugging Face names (never NaN)
    RUN/summary.json         evaluations, timings, memory; "status": completed, failed or interrupted

A resumed run must be the same run: the same bundle weights and training data (by sha256) and the
same Method, field by field. The policy and the session settings may change.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pocketzo._io import sha256_file, write_json
from pocketzo.errors import PocketzoError
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.session import SessionConfig
from pocketzo.zo_trainer.method import Method, RunPolicy
from pocketzo.zo_trainer.replay import CONFIG, method_of, read_run_config

RUN_CONFIG_VERSION = 3
WEIGHTS, SUMMARY = "weights.safetensors", "summary.json"


@dataclass(frozen=True)
class RunConfig:
    bundle: str
    bundle_trainable_sha256: str
    train_data: str
    train_data_sha256: str
    eval_data: str | None
    method: Method
    policy: RunPolicy
    session: SessionConfig
    version: int = RUN_CONFIG_VERSION

    @classmethod
    def new(cls, bundle: Bundle, train_data: str | Path, eval_data: str | Path | None, method: Method,
            policy: RunPolicy, session: SessionConfig) -> RunConfig:
        return cls(str(bundle.path), sha256_file(bundle.trainable_path), str(train_data), sha256_file(train_data),
                   str(eval_data) if eval_data else None, method, policy, session)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "method": self.method.to_json(), "policy": self.policy.to_json(),
                "session": asdict(self.session)}

    def save(self, run: Path) -> None:
        write_json(run / CONFIG, self.to_json())

    @classmethod
    def load(cls, run: Path) -> RunConfig:
        saved = read_run_config(run)
        method = method_of(run, saved)  # refuses a config.json of an older pocketzo with a message
        try:
            return cls(**{**saved, "method": method, "policy": RunPolicy.from_json(saved["policy"]),
                          "session": SessionConfig(**saved["session"])})
        except (TypeError, ValueError, KeyError) as e:
            raise PocketzoError(f"{run / CONFIG}: not a run config of this pocketzo ({e})") from None


def prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PocketzoError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PocketzoError(f"{out}: run directory is not empty; choose another --out or pass --overwrite")
        if not (out / CONFIG).is_file():
            raise PocketzoError(f"{out}: not a pocketzo run directory (no {CONFIG}); refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def check_same_run(run: Path, saved: RunConfig, bundle: Bundle, train_data: str | Path,
                   method_given: dict[str, Any]) -> None:
    """Refuse to resume ``run`` with other weights, data or method fields (naming the field and both values)."""
    if sha256_file(bundle.trainable_path) != saved.bundle_trainable_sha256:
        raise PocketzoError(f"{run}: the bundle's initial weights differ from those the run started with "
                            f"({saved.bundle}); resume with the same bundle")
    if sha256_file(train_data) != saved.train_data_sha256:
        raise PocketzoError(f"{run}: the training data differ from those the run started with ({saved.train_data}); "
                            "resume with the same data")
    for name, have, given in saved.method.differences(method_given):
        raise PocketzoError(f"{run}: --{name.replace('_', '-')} {given!r} differs from this run's {name} {have!r} "
                            f"({CONFIG}); a run continues with the method it started with (start a new run to "
                            "change it)")
