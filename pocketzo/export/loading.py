"""The model an export starts from: a Hugging Face directory or a GGUF file, loaded in fp32 with its fast tokenizer
by transformers, and the record of its weight files the manifest keeps."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pocketzo._io import sha256_file
from pocketzo.errors import ExportError
from pocketzo.export.config import ExportConfig
from pocketzo.runtime.manifest import HeadKind


def _source_files(model: Path) -> tuple[Path, str | None]:
    if model.is_file() and model.suffix == ".gguf":
        return model.parent, model.name
    if model.is_dir() and (model / "config.json").is_file():
        return model, None
    raise ExportError(f"{model}: not a Hugging Face model directory (no config.json) or a .gguf file")


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        sha256_file(p, h)
    return h.hexdigest()


def load_model(model: Path, config: ExportConfig):
    """The fp32 model, its fast tokenizer, the loss head it takes and its source record (name, model type,
    sha256 of the weight files), with a one-line ExportError for anything unusable."""
    directory, gguf = _source_files(model)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        return _load_hf(model, directory, gguf, kw, config)
    except (OSError, ValueError, KeyError) as e:  # what transformers raises for unusable model files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{model}: transformers cannot load it ({first})") from None


def _load_hf(model: Path, directory: Path, gguf: str | None, kw: dict, config: ExportConfig):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(directory, **kw)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ExportError(f"--max-length {config.max_length} exceeds the model's {positions} positions")
    causal = is_causal_lm(hf_config, gguf)
    if config.task == "causal-lm" and not causal:
        raise ExportError(f"{model}: --task causal-lm needs a causal LM (config.architectures: "
                          f"{hf_config.architectures})")
    head: HeadKind = "lm" if config.task == "causal-lm" else ("prompt" if causal else "head")
    try:  # before the model: a missing tokenizer should not cost a model load
        tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    except (OSError, TypeError, ValueError) as e:
        raise ExportError(f"{directory}: no usable tokenizer ({type(e).__name__}); a bundle needs the model's "
                          "tokenizer.json (or the files AutoTokenizer reads) next to its weights") from None
    if not tokenizer.is_fast:
        raise ExportError(f"{model}: no fast tokenizer (tokenizer.json) could be built; the device needs one")
    torch.manual_seed(config.seed)  # a new classification head is initialised reproducibly
    if causal:
        net = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                   attn_implementation="eager", **kw)
    else:
        net = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=len(config.labels), dtype=torch.float32, attn_implementation="eager",
            id2label=dict(enumerate(config.labels)), label2id={n: i for i, n in enumerate(config.labels)}, **kw)
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")) if not gguf \
        else [directory / gguf]
    source = {"name": model.name, "model_type": hf_config.model_type, "sha256": _sha256(weights),
              "files": [p.name for p in weights]}
    return net.eval(), tokenizer, head, source


def is_causal_lm(hf_config, gguf: str | None) -> bool:
    """Decoder-only LM? From ``architectures`` when the config names them; GGUF configs and bare
    configs do not, so then from the model type (encoders such as BERT also have a masked-LM head)."""
    if hf_config.architectures:
        return any(a.endswith("ForCausalLM") for a in hf_config.architectures)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = hf_config.model_type
    return bool(gguf) or (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                          and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
