"""LoRA, prompt tuning, BitFit and perturbation slots: what becomes trainable, slot semantics, slotted ZO."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import resume_without_the_newest_checkpoint

from pocketzo.errors import ExportError
from pocketzo.export import ExportConfig
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession
from pocketzo.runtime.data import TextEncoder
from pocketzo.zo_trainer import Method, RunPolicy, read_log, replay_run, train
from pocketzo.zo_trainer.trainer import make_trainer

NAMES = {
    "llama-lora": r"^model\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]\.weight$",
    "opt-lora-causal": r"^model\.decoder\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]\.weight$",
    "llama-prompt-slots": r"^prompt_embeddings$",
    "bert-bitfit": r"(\.bias|LayerNorm\.weight)$|^classifier\.",  # BitFit + the new head
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_only_adapters_are_inputs_and_base_weights_stay_initializers(name, bundles):
    bundle = Bundle(bundles(name))
    trainable = [s.name for s in bundle.manifest.trainable]
    assert trainable and all(re.search(NAMES[name], n) for n in trainable)
    graph = onnx.load(str(bundle.model_path)).graph
    inputs = {i.name for i in graph.input} - {"input_ids", "attention_mask", "labels"}
    assert inputs == set(trainable)
    frozen = {i.name for i in graph.initializer}
    if "lora" in name:  # every adapted layer's own weight is still a frozen initializer, under its HF name
        adapted = {n.rsplit(".lora_", 1)[0] + ".weight" for n in trainable}
        assert adapted <= frozen
    assert bundle.manifest.adapter["method"] in name


def test_lora_starts_at_the_base_model(bundles):
    """B = 0: the LoRA bundle's loss equals the plain bundle's before training."""
    losses = []
    for name in ("llama-classify", "llama-lora"):
        bundle = Bundle(bundles(name))
        ids = np.array([[6, 10, 14, 20, 7, 11]] * 2)
        losses.append(float(TrainingSession(bundle, SessionConfig(threads=1)).run(
            ids, np.ones_like(ids), np.array([0, 1]))["loss"]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.parametrize("name", ["llama-lora-slots", "llama-prompt-slots"])
def test_slot_k_computes_its_rows_with_its_own_adapter(name, bundles, sentiment_files):
    bundle = Bundle(bundles(name))
    p = bundle.manifest.slots
    batch = TextEncoder(bundle).dataset(sentiment_files["train"]).batch(range(3))
    session = TrainingSession(bundle, SessionConfig(threads=1))
    rng = np.random.default_rng(0)
    for view in session.params.views.values():
        view[...] = rng.normal(0, 0.3, view.shape)  # every slot different
    tiled = [np.tile(a, (p,) + (1,) * (a.ndim - 1)) for a in (batch.input_ids, batch.attention_mask, batch.labels)]
    per_slot = session.run(*tiled)["loss"]
    assert per_slot.shape == (p,) and len(set(per_slot.round(6))) == p
    values = {n: v.copy() for n, v in session.params.views.items()}
    for k in range(p):
        for n, view in session.params.views.items():
            view[...] = values[n][k]  # all slots = slot k
        alone = session.run(*tiled)["loss"]
        np.testing.assert_allclose(alone, per_slot[k], rtol=0, atol=1e-5)


def test_per_row_outputs_come_back_per_row_for_any_batch_size(bundles, sentiment_files):
    """Evaluation feeds batches that do not divide by the slots: rows are padded and cut back."""
    bundle = Bundle(bundles("llama-lora-slots"))
    data = TextEncoder(bundle).dataset(sentiment_files["dev"])
    session = TrainingSession(bundle, SessionConfig(threads=1))
    plain = TrainingSession(Bundle(bundles("llama-lora")), SessionConfig(threads=1))
    b = data.batch(range(7))
    got = session.run(b.input_ids, b.attention_mask, b.labels, ("example_loss", "candidate_loss"))
    want = plain.run(b.input_ids, b.attention_mask, b.labels, ("example_loss", "candidate_loss"))
    assert got["example_loss"].shape == (7,) and got["candidate_loss"].shape == (7, 2)
    np.testing.assert_allclose(got["candidate_loss"], want["candidate_loss"], atol=1e-5)


def test_slotted_step_matches_the_sequential_step(bundles, sentiment_files):
    """With 2 slots, one run gives the L+ and L- that two sequential runs give."""
    batch = TextEncoder(Bundle(bundles("llama-lora"))).dataset(sentiment_files["train"]).batch(range(8))
    cfg = Method(steps=1, lr=1e-2, eps=1e-2)
    seq = make_trainer(TrainingSession(Bundle(bundles("llama-lora")), SessionConfig(threads=1)), cfg, 1)
    want = seq.step(0, batch).directions[0]
    slotted_bundle = Bundle(bundles("llama-lora-slots"))  # 4 slots: 2 directions, the first is seq's
    record = make_trainer(TrainingSession(slotted_bundle, SessionConfig(threads=1)), cfg, 1).step(0, batch)
    got = record.directions
    assert len(got) == 2 and got[0].seed == want.seed
    assert got[0].loss_plus == pytest.approx(want.loss_plus, abs=1e-6)
    assert got[0].loss_minus == pytest.approx(want.loss_minus, abs=1e-5)
    assert got[1].seed != got[0].seed and record.lr == cfg.lr  # the step's lr; each direction gets lr / q


def test_slotted_training_learns_replays_and_resumes_bit_for_bit(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=40, lr=2e-2, eps=1e-2, batch_size=8, seed=3)
    policy = RunPolicy(threads=1, checkpoint_every=10, progress=False)
    bundle = bundles("llama-lora-slots")
    summary = train(bundle, sentiment_files["train"], tmp_path / "run", cfg, eval_path=sentiment_files["dev"],
                    policy=policy)
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"]
    assert summary["forward_passes"] == 40 and summary["perturbed_losses"] == 160
    records = read_log(tmp_path / "run" / "log.bin")
    assert len(records) == 40 and {len(r.directions) for r in records} == {2}
    slotted = sum(s.numel for s in Bundle(bundle).manifest.trainable)
    assert summary["trainable_parameters"] == slotted // 4  # theta, not its 4 slot copies
    trained = FlatParameters.from_bundle(Bundle(bundle), tmp_path / "run" / "weights.safetensors")
    for log in ("log.jsonl", "log.bin"):
        assert np.array_equal(replay_run(bundle, tmp_path / "run" / log).buffer, trained.buffer)
    # resumed from its step-30 checkpoint (the newest one deleted), a run ends identical
    resumed, _ = resume_without_the_newest_checkpoint(bundle, sentiment_files["train"], tmp_path / "run2", cfg,
                                                      policy, sentiment_files["dev"])
    assert len(read_log(tmp_path / "run2" / "log.bin")) == 40
    assert np.array_equal(resumed, trained.buffer)


@pytest.mark.parametrize("kw, match", [
    ({"peft": "lora", "trainable": "norm"}, "only one"),
    ({"peft": "bitfit", "slots": 2}, "slots"),
    ({"peft": "lora", "slots": 3}, "slots"),
    ({"peft": "lora", "lora_rank": 0}, "lora-rank"),
    ({"peft": "lora", "prompt_init": "a review"}, "--prompt-init"),
    ({"peft": "prompt", "prompt_init": "  "}, "--prompt-init"),
])
def test_bad_adapter_options_are_refused(kw, match):
    with pytest.raises(ExportError, match=match):
        ExportConfig(task="causal-lm", **kw)


@pytest.mark.parametrize("slots", [1, 2])
def test_prompt_init_text_fills_the_virtual_tokens_with_its_embeddings(slots):
    """--prompt-init: virtual token i starts as the embedding of the text's token i mod its length, in every slot;
    without it, as embeddings of vocabulary tokens drawn by the seed."""
    import torch

    from pocketzo.export import adapters

    table = torch.randn(50, 4)
    net = torch.nn.Module()
    net.get_input_embeddings = lambda: torch.nn.Embedding.from_pretrained(table)
    init = adapters.prompt_init(net, 5, slots, seed=0, text_ids=[7, 3])
    expected = table[torch.tensor([7, 3, 7, 3, 7])]
    assert torch.equal(init, expected if slots == 1 else expected.expand(slots, 5, 4))
    drawn = adapters.prompt_init(net, 5, 1, seed=0)
    assert all(any(torch.equal(row, t) for t in table) for row in drawn)  # real token embeddings
    assert not torch.equal(drawn, adapters.prompt_init(net, 5, 1, seed=1))


def test_prompt_init_is_what_the_embedding_module_outputs():
    """Gemma's embedding module scales its rows by sqrt(H) before the first layer: the virtual tokens must start
    as what it outputs (they are fed past it, as inputs_embeds), not as the raw rows of its table."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from pocketzo.export import adapters

    embed = Gemma3TextScaledWordEmbedding(50, 4, padding_idx=0, embed_scale=4.0 ** 0.5)
    net = torch.nn.Module()
    net.get_input_embeddings = lambda: embed
    init = adapters.prompt_init(net, 3, 1, seed=0, text_ids=[5, 9])
    assert torch.allclose(init, 2.0 * embed.weight.detach()[torch.tensor([5, 9, 5])])


def test_lora_targets_that_match_nothing_name_the_layers(tiny_models, tmp_path):
    from pocketzo.export import export_bundle

    with pytest.raises(ExportError, match="q_proj"):
        export_bundle(tiny_models["llama"], tmp_path / "b", ExportConfig(
            task="causal-lm", peft="lora", lora_targets=("query",), max_length=32))
    assert not (tmp_path / "b").exists()


def test_slots_on_an_encoder_head_are_refused(tiny_models, tmp_path):
    """The new classification head trains too and has no slot axis: with --slots 2 its (2, hidden) weight used
    to pass as two slots."""
    from pocketzo.export import export_bundle

    with pytest.raises(ExportError, match="--slots with a classification head"):
        export_bundle(tiny_models["bert"], tmp_path / "b", ExportConfig(
            task="classify", labels=("negative", "positive"), peft="lora", lora_targets=("query", "value"),
            slots=2, max_length=32))
    assert not (tmp_path / "b").exists()
