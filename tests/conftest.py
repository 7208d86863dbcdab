"""Tiny random-initialised models (built from configs) and their bundles, shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

WORDS = ("<pad> <unk> <s> </s> [CLS] [SEP] the a film movie plot acting good great fun moving bad awful dull "
         "boring review sentiment : was is and of it negative positive").split()
POSITIVE, NEGATIVE = ("good", "great", "fun", "moving"), ("bad", "awful", "dull", "boring")
TEMPLATE = "review : {text} sentiment :"
LABELS = ("negative", "positive")


def _tokenizer(encoder: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_model(kind: str, path: Path) -> Path:
    """Save a tiny random model of ``kind`` (llama, opt, bert) with a word-level tokenizer."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(0)
    v = len(WORDS)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=2, eos_token_id=3))
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(
            vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    elif kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, num_labels=2, pad_token_id=0))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    _tokenizer(kind == "bert").save_pretrained(path)
    return path


def write_sentiment(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            label = LABELS[int(rng.integers(2))]
            words = POSITIVE if label == "positive" else NEGATIVE
            w1, w2 = rng.choice(words, 2)
            f.write(json.dumps({"text": f"the film was {w1} and the plot is {w2}", "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: make_model(k, root / k) for k in ("llama", "opt", "bert")}


EXPORTS = {
    # name: (model, task, template, trainable[, more ExportConfig fields])
    "llama-classify": ("llama", "classify", TEMPLATE, "all"),
    "llama-causal": ("llama", "causal-lm", None, "all"),
    "opt-classify": ("opt", "classify", TEMPLATE, "all"),
    "opt-causal": ("opt", "causal-lm", None, "all"),
    "bert-classify": ("bert", "classify", None, "all"),
    "llama-norms": ("llama", "classify", TEMPLATE, r"norm\.weight$"),
    "llama-lora": ("llama", "classify", TEMPLATE, "all", {"peft": "lora", "lora_rank": 4}),
    "llama-lora-slots": ("llama", "classify", TEMPLATE, "all", {"peft": "lora", "lora_rank": 4, "slots": 4}),
    "opt-lora-causal": ("opt", "causal-lm", None, "all", {"peft": "lora", "lora_rank": 4}),
    "llama-prompt-slots": ("llama", "classify", TEMPLATE, "all", {"peft": "prompt", "prompt_tokens": 3, "slots": 2}),
    "llama-prompt-text": ("llama", "classify", TEMPLATE, "all", {"peft": "prompt", "prompt_tokens": 3,
                                                                 "prompt_init": "a short review"}),
    "bert-bitfit": ("bert", "classify", None, "all", {"peft": "bitfit"}),
    "bert-lora": ("bert", "classify", None, "all",
                  {"peft": "lora", "lora_rank": 4, "lora_targets": ("query", "value")}),  # + the new head
    # --gradients: the bundle also has gradients.onnx
    "llama-classify-grad": ("llama", "classify", TEMPLATE, "all", {"gradients": True}),
    "llama-norms-grad": ("llama", "classify", TEMPLATE, r"norm\.weight$", {"gradients": True}),
    "llama-causal-grad": ("llama", "causal-lm", None, "all", {"gradients": True}),
    "bert-classify-grad": ("bert", "classify", None, "all", {"gradients": True}),
    "bert-bitfit-grad": ("bert", "classify", None, "all", {"peft": "bitfit", "gradients": True}),
    "llama-lora-grad": ("llama", "classify", TEMPLATE, "all", {"peft": "lora", "lora_rank": 4, "gradients": True}),
    "opt-lora-causal-grad": ("opt", "causal-lm", None, "all", {"peft": "lora", "lora_rank": 4, "gradients": True}),
    "llama-prompt-grad": ("llama", "classify", TEMPLATE, "all", {"peft": "prompt", "prompt_tokens": 3,
                                                                 "gradients": True}),
    "llama-norms-grad-ort": ("llama", "classify", TEMPLATE, r"norm\.weight$", {"gradients": True, "ort": True}),
    # --gradient-layers 1: exact gradients for layer 1's norms and the final norm (--method hybrid)
    "llama-norms-hybrid": ("llama", "classify", TEMPLATE, r"norm\.weight$", {"gradients": True, "gradient_layers": 1}),
    # --trainable-layers 1 --split auto: a frozen trunk (layer 0) and a head (layer 1, final norm, LM head)
    "llama-norms-split": ("llama", "classify", TEMPLATE, r"norm\.weight$", {"trainable_layers": 1, "split": "auto"}),
    "llama-lora-split": ("llama", "classify", TEMPLATE, "all", {"peft": "lora", "lora_rank": 4, "trainable_layers": 1,
                                                                "split": "auto"}),
    "llama-causal-split": ("llama", "causal-lm", None, "all", {"trainable_layers": 1, "split": "auto"}),
    "opt-lora-causal-split": ("opt", "causal-lm", None, "all", {"peft": "lora", "lora_rank": 4, "trainable_layers": 1,
                                                                "split": "auto"}),
    "bert-bitfit-split": ("bert", "classify", None, "all", {"peft": "bitfit", "trainable_layers": 1, "split": "1"}),
    "llama-lora-slots-split": ("llama", "classify", TEMPLATE, "all", {"peft": "lora", "lora_rank": 4, "slots": 4,
                                                                      "trainable_layers": 1, "split": "auto"}),
    "llama-lora-split-int8-ort": ("llama", "classify", TEMPLATE, "all", {"peft": "lora", "lora_rank": 4,
                                                                         "trainable_layers": 1, "split": "auto",
                                                                         "quantize": "int8", "ort": True}),
}


@pytest.fixture(scope="session")
def bundles(tiny_models, tmp_path_factory):
    """Export lazily, once per session: ``bundles("llama-classify") -> Path``."""
    from pocketzo.export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            model, task, template, trainable, *more = EXPORTS[name]
            labels = LABELS if task == "classify" else ()
            export_bundle(tiny_models[model], root / name, ExportConfig(
                task=task, template=template, labels=labels, trainable=trainable, max_length=32,
                **(more[0] if more else {})))
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture(scope="module")
def real_assets(request):
    """The real assets (``pocketzo assets``) with the extras the test module's ``ASSETS`` names: flags (encoder,
    gemma3) or a dict of ``prepare_assets`` keywords (``{"qwen": ("0.5b",)}``)."""
    from pocketzo.export.assets import prepare_assets

    extras = getattr(request.module, "ASSETS", ())
    return prepare_assets(progress=False, **(extras if isinstance(extras, dict) else dict.fromkeys(extras, True)))


@pytest.fixture(scope="module")
def real_bundle(real_assets, request, tmp_path_factory):
    """The test module's ``REAL_EXPORT`` (the assets' model field, an ExportConfig), exported once per module."""
    from pocketzo.export import export_bundle
    from pocketzo.runtime import Bundle

    model, config = request.module.REAL_EXPORT
    out = tmp_path_factory.mktemp(model) / "bundle"
    export_bundle(getattr(real_assets, model), out, config)
    return Bundle(out)


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_sentiment(root / "train.jsonl", 256, 1), "dev": write_sentiment(root / "dev.jsonl", 64, 2)}


def resume_without_the_newest_checkpoint(bundle: Path, data: Path, run: Path, method, policy, eval_path=None,
                                         changes: dict | None = None) -> tuple[np.ndarray, dict]:
    """Train ``run`` (``policy`` must checkpoint), then lose its final weights and its newest checkpoint, as a
    kill would, and resume it (``changes`` to its policy); return the resumed weights and resume's summary."""
    import shutil

    from pocketzo.runtime import Bundle, FlatParameters
    from pocketzo.zo_trainer import resume, train

    assert policy.checkpoint_every > 0
    train(bundle, data, run, method, policy, eval_path=eval_path)
    (run / "weights.safetensors").unlink()
    shutil.rmtree(sorted((run / "checkpoints").glob("step-*"))[-1])
    summary = resume(run, changes)
    return FlatParameters.from_bundle(Bundle(bundle), run / "weights.safetensors").buffer, summary
