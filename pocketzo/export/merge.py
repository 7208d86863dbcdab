"""A personalised model out of a run: Hugging Face weights, a PEFT adapter, or an inference ONNX model.

    pocketzo merge RUN --to-hf DIR     transformers directory; LoRA merged: W + (alpha / r) B A
    pocketzo merge RUN --to-peft DIR   adapter_config.json + adapter_model.safetensors (LoRA, prompt tuning)
    pocketzo merge RUN --to-onnx DIR   ONNX with the weights baked in, logits + KV cache (``inference``)

The base weights come from the bundle's own graph (its frozen fp32 initializers carry their
Hugging Face names), or from ``--base MODEL`` when the bundle's base is quantized.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pocketzo._io import atomic_dir, write_json
from pocketzo.errors import ExportError, PocketzoError
from pocketzo.runtime import _safetensors
from pocketzo.runtime.bundle import Bundle

RUN_CONFIG, RUN_WEIGHTS = "config.json", "weights.safetensors"


def _say(msg: str) -> None:
    print(f"[merge] {msg}", file=sys.stderr, flush=True)


class TrainedRun:
    """A run directory's bundle and trained tensors (slot 0 of slotted tensors)."""

    def __init__(self, run: Path, bundle: Path | None = None):
        self.run = run
        try:
            saved = json.loads((run / RUN_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{run}: not a pocketzo run directory ({e})") from None
        self.bundle = Bundle(bundle or saved["bundle"])
        weights = run / RUN_WEIGHTS
        if not weights.is_file():
            raise ExportError(f"{weights}: missing; the run did not complete (resume it, or merge another run)")
        m = self.bundle.manifest
        views = {s.name: np.empty(s.shape, np.float32) for s in m.trainable}
        try:
            _safetensors.read_into(weights, views)
        except PocketzoError as e:
            raise ExportError(f"{e}; pass the bundle the run trained with --bundle") from None
        self.trained = {n: v[0] if m.slots > 1 else v for n, v in views.items()}  # (shape without slots)
        self.adapter = (m.adapter or {}).get("method", "none")
        self.config = json.loads(self.bundle.base_config_path.read_text(encoding="utf-8")) \
            if self.bundle.base_config_path else None
        if self.config is None:
            raise ExportError(f"{self.bundle.path}: exported before bundles carried the base config "
                              "(hf_config.json); re-export it with this pocketzo")

    def base_weights(self, base: Path | None) -> dict[str, np.ndarray]:
        """Frozen weights by Hugging Face name: from --base, else from the bundle's fp32 graph."""
        if base is not None:
            from safetensors.numpy import load_file

            files = sorted(base.glob("*.safetensors"))
            if not files:
                raise ExportError(f"--base {base}: no .safetensors weights there")
            return {k: v.astype(np.float32) for f in files for k, v in load_file(f).items()}
        quantized = self.bundle.manifest.export.get("config", {}).get("quantize", "none")
        if quantized != "none":
            raise ExportError(f"{self.bundle.path}: its base is quantized ({quantized}); pass the original model "
                              "with --base MODEL_DIR")
        model = onnx.load(str(self.bundle.model_path), load_external_data=True)
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and not i.name.startswith(("val_", "_"))}

    def merged(self, base: Path | None) -> dict[str, np.ndarray]:
        """The full fine-tuned state dict (LoRA merged into its layers)."""
        if self.adapter == "prompt":
            raise ExportError("prompt tuning adds virtual tokens, which a plain model has no place for; "
                              "use --to-peft (PEFT's prompt tuning loads them)")
        weights = self.base_weights(base)
        if self.adapter != "lora":
            weights.update(self.trained)
            return weights
        scale = self.bundle.manifest.adapter["alpha"] / self.bundle.manifest.adapter["rank"]
        for name, a in self.trained.items():
            if name.endswith(".lora_A.weight"):
                layer = name.removesuffix(".lora_A.weight")
                b = self.trained[layer + ".lora_B.weight"]
                w = weights[layer + ".weight"]
                weights[layer + ".weight"] = (w.astype(np.float64) + scale * (b.astype(np.float64) @ a)).astype(
                    np.float32)  # (out, in)
        # what trained besides the LoRA factors (an encoder's new classification head) is written as trained
        weights.update({n: v for n, v in self.trained.items() if not _is_lora_factor(n)})
        return weights


def _is_lora_factor(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def _hf_model(config: dict, head: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(**config)
    cls = AutoModelForSequenceClassification if head == "head" else AutoModelForCausalLM
    return cls.from_config(cfg, dtype=torch.float32)


def to_hf(run: Path, out: Path, base: Path | None = None, bundle: Path | None = None,
          overwrite: bool = False) -> Path:
    """Write a transformers model directory with the fine-tuned weights."""
    r = TrainedRun(run, bundle)
    weights = r.merged(base)
    net = _hf_model(r.config, r.bundle.task.head)
    state = net.state_dict()
    missing = [k for k in state if k not in weights and not _tied(net, k)]
    if missing:
        raise ExportError(f"the bundle's graph lacks {missing[:3]} (unused by its loss); pass the original model "
                          "with --base MODEL_DIR")
    net.load_state_dict({k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in weights.items()
                         if k in state}, strict=False)
    net.tie_weights()
    with _target(out, overwrite) as tmp:
        net.save_pretrained(tmp)
        for f in r.bundle.path.iterdir():  # the tokenizer files
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, tmp / f.name)
    _say(f"wrote {out} ({r.adapter} from {run})")
    return out


def _tied(net, key: str) -> bool:
    out = net.get_output_embeddings()
    return out is not None and key.endswith("lm_head.weight") and getattr(net.config, "tie_word_embeddings", False)


def to_peft(run: Path, out: Path, bundle: Path | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT adapter (LoRA or prompt tuning) for the original base model."""
    r = TrainedRun(run, bundle)
    m = r.bundle.manifest
    task_type = "SEQ_CLS" if r.bundle.task.head == "head" else "CAUSAL_LM"
    common = {"task_type": task_type, "base_model_name_or_path": m.source.get("name"), "inference_mode": True,
              "revision": None}
    if r.adapter == "lora":
        config = {**common, "peft_type": "LORA", "r": m.adapter["rank"], "lora_alpha": m.adapter["alpha"],
                  "target_modules": sorted(m.adapter["targets"]), "lora_dropout": 0.0, "bias": "none",
                  "fan_in_fan_out": False, "modules_to_save": None}
        # PEFT's file names a tensor base_model.model.<HF name>, a new classification head included
        tensors = {"base_model.model." + n: v for n, v in r.trained.items()}
        heads = sorted({n.split(".")[0] for n in r.trained if not _is_lora_factor(n)})
        config["modules_to_save"] = heads or None
    elif r.adapter == "prompt":
        k, hidden = r.trained["prompt_embeddings"].shape
        config = {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": k, "token_dim": hidden,
                  "num_transformer_submodules": 1, "num_attention_heads": r.config.get("num_attention_heads"),
                  "num_layers": r.config.get("num_hidden_layers"), "prompt_tuning_init": "RANDOM"}
        if m.adapter.get("init_text"):  # as PEFT records a text init; loading keeps the trained tensor (to go on
            # training, PeftModel.from_pretrained(..., is_trainable=True) first loads this tokenizer, as for its own)
            config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=m.adapter["init_text"],
                          tokenizer_name_or_path=m.source.get("name"))
        tensors = {"prompt_embeddings": r.trained["prompt_embeddings"]}
    else:
        raise ExportError(f"the run trained {r.adapter!r}, not an adapter; use --to-hf for a full model")
    with _target(out, overwrite) as tmp:
        write_json(tmp / "adapter_config.json", config)
        _safetensors.save(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
    _say(f"wrote {out} ({r.adapter} adapter from {run})")
    return out


def to_onnx(run: Path, out: Path, base: Path | None = None, bundle: Path | None = None,
            overwrite: bool = False) -> Path:
    """Write an inference model (weights baked in, logits + KV cache) for ``pocketzo generate``."""
    from pocketzo.export.inference import export_inference

    with tempfile.TemporaryDirectory() as tmp:
        to_hf(run, Path(tmp) / "hf", base, bundle)
        export_inference(Path(tmp) / "hf", out, overwrite=overwrite)
    return out


def _target(out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; choose another directory or pass --overwrite")
    return atomic_dir(out)
