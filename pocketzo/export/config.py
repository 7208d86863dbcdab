"""Export configuration (no torch here, so the CLI can build its flags without importing it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pocketzo.errors import ExportError
from pocketzo.runtime.manifest import TaskKind

Peft = Literal["none", "lora", "prompt", "bitfit"]
Quantize = Literal["none", "int8", "int4"]


@dataclass(frozen=True)
class ExportConfig:
    task: TaskKind
    max_length: int = 256
    template: str | None = None  # classify on a causal LM: e.g. "Review: {text}\nSentiment:"
    labels: tuple[str, ...] = ()  # classify: class names; a causal LM scores " <name>"
    trainable: str = "all"  # "all" or a regex searched in parameter names (with --peft none)
    freeze: str | None = None  # regex of parameter names to keep frozen
    peft: Peft = "none"  # lora: low-rank adapters; prompt: trainable virtual tokens; bitfit: biases and norms
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # last name part of the Linear layers to adapt
    prompt_tokens: int = 16  # --peft prompt: virtual tokens prepended to every row
    slots: int = 1  # perturbation slots P (even, lora/prompt): one run evaluates P adapter values
    quantize: Quantize = "none"  # frozen MatMul weights: int8 (dynamic, per channel) or int4 (MatMulNBits)
    seed: int = 0  # initialises a new classification head; draws the parity batch
    parity_tolerance: float = 1e-4  # times max(1, |loss|)
    ort: bool = False  # also write the ORT-format model + required_operators.config (ONNX Runtime Mobile)
    gradients: bool = False  # also write gradients.onnx: the loss and d loss / d each trainable tensor
    gradient_layers: int = 0  # > 0: differentiate only the trainable tensors of the last K layers (--method hybrid)
    trainable_layers: int = 0  # > 0: train only in the last K transformer layers (and the final norm / head)
    split: str = "none"  # "auto" or K: also write a frozen trunk (layers below K) and a trainable head graph

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
        if self.peft not in ("none", "lora", "prompt", "bitfit"):
            raise ExportError(f"--peft must be none, lora, prompt or bitfit, got {self.peft!r}")
        if self.quantize not in ("none", "int8", "int4"):
            raise ExportError(f"--quantize must be none, int8 or int4, got {self.quantize!r}")
        if self.peft != "none" and self.trainable != "all":
            raise ExportError("--trainable and --peft both choose what trains; give only one of them")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or self.prompt_tokens < 1 or not self.lora_targets:
            raise ExportError("--lora-rank and --prompt-tokens must be >= 1, --lora-alpha > 0, and "
                              "--lora-targets must name at least one layer")
        if self.slots != 1 and (self.slots < 2 or self.slots % 2 or self.peft not in ("lora", "prompt")):
            raise ExportError(f"--slots {self.slots}: perturbation slots need --peft lora or prompt and an even "
                              "number >= 2 (a +eps and a -eps slot per direction)")
        if self.gradient_layers < 0 or (self.gradient_layers and not self.gradients):
            raise ExportError(f"--gradient-layers {self.gradient_layers}: give a number of layers >= 1, "
                              "with --gradients")
        if self.gradients:
            self._check_gradients()
        if self.trainable_layers < 0:
            raise ExportError(f"--trainable-layers must be >= 1 (0: all layers), got {self.trainable_layers}")
        if self.split != "none":
            self._check_split()
        for flag, pattern in (("--trainable", self.trainable), ("--freeze", self.freeze)):
            if pattern and pattern != "all":
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ExportError(f"{flag}: bad regex {pattern!r} ({e})") from None

    @property
    def split_layer(self) -> int | None:
        """--split K as a number; None for "auto" (and "none")."""
        return int(self.split) if self.split.isdigit() else None

    def _check_split(self) -> None:
        if self.split != "auto" and not (self.split.isdigit() and int(self.split) >= 1):
            raise ExportError(f"--split must be auto or a layer number >= 1 (the head's first layer), got "
                              f"{self.split!r}")
        if self.peft == "prompt":
            raise ExportError("--split with --peft prompt: the virtual tokens enter below the first layer, so no "
                              "layer can be frozen below them; export without --split")
        if self.gradients:
            raise ExportError("--split with --gradients is not built yet (the gradient graph is not split); "
                              "export them as two bundles")

    def _check_gradients(self) -> None:
        """--gradients is exported and checked for plain weights, BitFit, LoRA and prompt tuning, on an fp32 base
        (with --ort, in ORT format too)."""
        if self.slots != 1:
            raise ExportError("--gradients with --slots: slots evaluate several perturbed values in one run, "
                              "a gradient needs one; export without --slots")
        if self.quantize != "none":
            raise ExportError("--gradients with --quantize is not supported yet")
