"""Export configuration (no torch here, so the CLI can build its flags without importing it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pocketzo.errors import ExportError
from pocketzo.runtime.bundle import TaskKind


@dataclass(frozen=True)
class ExportConfig:
    task: TaskKind
    max_length: int = 256
    template: str | None = None  # classify on a causal LM: e.g. "Review: {text}\nSentiment:"
    labels: tuple[str, ...] = ()  # classify: class names; a causal LM scores " <name>"
    trainable: str = "all"  # "all" or a regex searched in parameter names
    freeze: str | None = None  # regex of parameter names to keep frozen
    seed: int = 0  # initialises a new classification head; draws the parity batch
    parity_tolerance: float = 1e-4  # times max(1, |loss|)
    ort: bool = False  # also write the ORT-format model + required_operators.config (ONNX Runtime Mobile)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ExportError(f"--max-length must be >= 2, got {self.max_length}")
        if self.task not in ("causal-lm", "classify"):
            raise ExportError(f"task must be 'causal-lm' or 'classify', got {self.task!r}")
        if self.task == "classify" and len(self.labels) < 2:
            raise ExportError("--task classify needs --labels with at least two names, e.g. negative,positive")
        if len(set(self.labels)) != len(self.labels):
            raise ExportError(f"--labels has duplicates: {list(self.labels)}")
        if self.template is not None and self.template.count("{text}") != 1:
            raise ExportError("--template must contain '{text}' exactly once")
        for flag, pattern in (("--trainable", self.trainable), ("--freeze", self.freeze)):
            if pattern and pattern != "all":
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ExportError(f"{flag}: bad regex {pattern!r} ({e})") from None
