"""End to end on the real encoder: all-MiniLM-L6-v2 (from a PyPI wheel) with a new classification head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketzo.export import ExportConfig
from pocketzo.export.assets import prepare_assets
from pocketzo.export.wheels import ENCODER_FILES
from pocketzo.runtime import FlatParameters, TrainingSession
from pocketzo.runtime.data import TextEncoder

pytestmark = pytest.mark.assets
ASSETS = ("encoder",)  # the extras real_assets (conftest) fetches for this module
REAL_EXPORT = ("encoder_dir", ExportConfig(task="classify", labels=("negative", "positive"), trainable=r"^classifier\.",
                                           max_length=64))  # real_bundle


def test_encoder_assets_are_a_model_directory(real_assets):
    assert sorted(p.name for p in real_assets.encoder_dir.iterdir()) == sorted(
        spec.member.rsplit("/", 1)[1] for spec in ENCODER_FILES)
    assert "encoder_dir" in real_assets.to_json()
    assert "encoder_dir" not in prepare_assets(progress=False).to_json()


def test_head_only_bundle_matches_pytorch_on_real_rows(real_bundle, real_assets):
    """The new head is the only graph input; the loss of real padded rows equals transformers' with the
    bundle's head weights, before and after an in-place edit of the bound buffer."""
    from transformers import AutoModelForSequenceClassification

    assert real_bundle.task.head == "head"
    assert [(t.name, t.shape) for t in real_bundle.manifest.trainable] == [("classifier.weight", (2, 384)),
                                                                           ("classifier.bias", (2,))]
    b = TextEncoder(real_bundle).dataset(real_assets.dev).batch(range(8))
    assert (b.attention_mask == 0).any()  # padded rows
    params = FlatParameters.from_bundle(real_bundle)
    session = TrainingSession(real_bundle, params=params)
    net = AutoModelForSequenceClassification.from_pretrained(real_assets.encoder_dir, num_labels=2,
                                                             attn_implementation="eager").eval()
    inputs = {"input_ids": torch.from_numpy(b.input_ids), "attention_mask": torch.from_numpy(b.attention_mask),
              "labels": torch.from_numpy(b.labels)}
    losses = []
    for scale in (1.0, 50.0):  # 50x: a head whose logits are far from zero
        params.views["classifier.weight"][...] *= scale
        got = float(session.run(b.input_ids, b.attention_mask, b.labels)["loss"])
        with torch.no_grad():
            for name in ("weight", "bias"):
                getattr(net.classifier, name).copy_(torch.from_numpy(params.views[f"classifier.{name}"]))
            want = float(net(**inputs).loss)
        assert np.isfinite(got) and abs(got - want) <= 1e-4 * max(1.0, abs(want))
        losses.append(got)
    assert abs(losses[1] - losses[0]) > 1e-3  # the edit was seen by the bound session
