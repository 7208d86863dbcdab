"""Export configuration (no torch here, so the CLI can build its flags without importing it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Literal

from pocketzo.errors import ExportError
from pocketzo.runtime.manifest import TaskKind

Peft = Literal["none", "lora", "prompt", "bitfit"]
Quantize = Literal["none", "int8", "int4", "int8-dynamic", "gguf"]
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 = unset (fp32 compute), 1 fp32, 2 fp16, 3 bf16, 4 int8


@dataclass(frozen=True)
class QuantRecipe:
    """How ``export --quantize`` stores the frozen MatMul weights (and embedding tables) of every graph of a bundle.

    ``int8`` and ``int4`` are weight-only: ONNX Runtime's ``MatMulNBits`` holds the weights in 8 or 4 bits, one
    scale (and with ``symmetric=False`` a zero point) per ``block_size`` weights along K; ``GatherBlockQuantized``
    holds the embedding tables the same way (a tied LM head's bytes, once). At ``accuracy_level``
    0 computes in float32, so a bundle is the same function on every ONNX Runtime build and the ZO estimate
    through it follows the float32 one (correlation 0.997 for 8 bits on SmolLM2, docs/quantization.md). Level 4
    quantizes the activations to int8 per block on x86-64 and ARM CPUs: 5 % faster there, and ZO estimates that
    follow float32's at eps 1e-2 (0.980) but not at 1e-3 (0.918). 4 bits change the model itself (estimates
    correlate 0.29-0.81). ``int8-dynamic`` is ``quantize_dynamic``: per-channel int8 weights and activations
    quantized at run time (MatMulInteger), 2.5x faster here, and the one ZO training collapsed on (0.01-0.40).
    """

    mode: Literal["int8", "int4", "int8-dynamic"]
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    # int4: a regex searched in the frozen weight names, whose matches keep 8 bits (e.g. 'down_proj|lm_head'; a
    # tied LM head has the embedding's name, e.g. model.embed_tokens.weight)
    eight_bit: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "int4", "int8-dynamic"):
            raise ExportError(f"quantization mode must be 'int8', 'int4' or 'int8-dynamic', got {self.mode!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"--quant-block-size must be a power of two >= 16 (MatMulNBits), got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ExportError(f"--quant-accuracy-level must be one of {list(ACCURACY_LEVELS)}, got "
                              f"{self.accuracy_level}")
        if self.eight_bit is not None:
            if self.mode != "int4":
                raise ExportError("--quant-8bit keeps some weights of an int4 base at 8 bits; it needs --quantize "
                                  "int4")
            try:
                re.compile(self.eight_bit)
            except re.error as e:
                raise ExportError(f"--quant-8bit: bad regex {self.eight_bit!r} ({e})") from None

    @property
    def weight_only(self) -> bool:
        return self.mode != "int8-dynamic"

    def bits_for(self, weight: str) -> int:
        """A weight-only recipe's bits for the frozen weight (or embedding table) named ``weight``."""
        return 8 if self.mode == "int8" or (self.eight_bit and re.search(self.eight_bit, weight)) else 4


@dataclass(frozen=True)
class ExportConfig:
    task: TaskKind
    max_length: int = 256
    template: str | None = None  # classify on a causal LM: e.g. "Review: {text}\nSentiment:"
    # classify on a causal LM: the template becomes one user turn of the model's chat template, and each label is
    # scored as the first word of the assistant's reply (rendered once, at export: the bundle holds plain text)
    chat: bool = False
    labels: tuple[str, ...] = ()  # classify: class names; a causal LM scores " <name>"
    trainable: str = "all"  # "all" or a regex searched in parameter names (with --peft none)
    freeze: str | None = None  # regex of parameter names to keep frozen
    peft: Peft = "none"  # lora: low-rank adapters; prompt: trainable virtual tokens; bitfit: biases and norms
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # last name part of the Linear layers to adapt
    prompt_tokens: int = 16  # --peft prompt: virtual tokens prepended to every row
    prompt_init: str | None = None  # --peft prompt: start from this text's token embeddings (None: random tokens)
    slots: int = 1  # perturbation slots P (even, lora/prompt): one run evaluates P adapter values
    quantize: Quantize = "none"  # frozen MatMul weights: int8 / int4 weight-only, int8-dynamic (QuantRecipe), gguf
    gguf: str | None = None  # --quantize gguf: the GGUF the model was converted from (default: the model, a .gguf)
    quant_block_size: int = 32  # int8, int4: weights per scale along K
    quant_symmetric: bool = True  # int8, int4: no zero points
    quant_accuracy_level: int = 0  # int8, int4: MatMulNBits accuracy_level (0: float32 compute)
    quant_8bit: str | None = None  # int4: regex of frozen weight names kept at 8 bits
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
        if self.chat and (self.task != "classify" or self.template is None):
            raise ExportError("--chat wraps a classify --template in the model's chat template; for causal-lm rows, "
                              "write the chat markup into each row's prompt and text")
        if self.peft not in ("none", "lora", "prompt", "bitfit"):
            raise ExportError(f"--peft must be none, lora, prompt or bitfit, got {self.peft!r}")
        if self.quantize not in ("none", "int8", "int4", "int8-dynamic", "gguf"):
            raise ExportError(f"--quantize must be none, int8, int4, int8-dynamic or gguf, got {self.quantize!r}")
        if self.gguf is not None and self.quantize != "gguf":
            raise ExportError("--gguf names the file whose blocks --quantize gguf keeps; it needs --quantize gguf")
        recipe = self.quant_recipe  # validates the --quant-* options
        given = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                 if f.name.startswith("quant_") and getattr(self, f.name) != f.default]
        if given and (recipe is None or not recipe.weight_only):
            raise ExportError(f"{', '.join(given)}: these shape a weight-only base; they need --quantize int8 or int4")
        if self.peft != "none" and self.trainable != "all":
            raise ExportError("--trainable and --peft both choose what trains; give only one of them")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or self.prompt_tokens < 1 or not self.lora_targets:
            raise ExportError("--lora-rank and --prompt-tokens must be >= 1, --lora-alpha > 0, and "
                              "--lora-targets must name at least one layer")
        if self.prompt_init is not None and (self.peft != "prompt" or not self.prompt_init.strip()):
            raise ExportError("--prompt-init gives the virtual tokens' starting text: it needs --peft prompt and a "
                              "non-empty text")
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
    def quant_recipe(self) -> QuantRecipe | None:
        """The --quantize options as one recipe; None without --quantize, and for gguf (the file's own blocks)."""
        if self.quantize in ("none", "gguf"):
            return None
        return QuantRecipe(self.quantize, self.quant_block_size, self.quant_symmetric, self.quant_accuracy_level,
                           self.quant_8bit)

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
