"""merge: --to-hf and --to-peft reproduce pocketzo's loss in transformers / PEFT; --to-onnx generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import EXPORTS

from pocketzo.errors import ExportError
from pocketzo.export import heads, merge
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession, _safetensors
from pocketzo.runtime.data import TextEncoder
from pocketzo.zo_trainer import Method, RunPolicy, train


@pytest.fixture(scope="module")
def trained(bundles, sentiment_files, tmp_path_factory):
    """A short, large-step run per bundle, so that LoRA's B and the biases move away from their start."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}

    def get(name):
        if name not in runs:
            cfg = Method(steps=12, lr=0.5, eps=1e-2, batch_size=8)
            train(bundles(name), sentiment_files["train"], root / name, cfg,
                  RunPolicy(threads=1, spike_factor=0, progress=False))
            runs[name] = root / name
        return runs[name]

    return get


def _pocketzo_loss(bundle_path, run, batch) -> float:
    """Mean loss over the batch's rows (per row: a slotted bundle's ``loss`` is per slot, over its rows only)."""
    bundle = Bundle(bundle_path)
    params = FlatParameters.from_bundle(bundle, run / "weights.safetensors") if run else None
    session = TrainingSession(bundle, SessionConfig(threads=1), params)
    if bundle.task.kind == "classify":
        return float(session.run(batch.input_ids, batch.attention_mask, batch.labels, ("example_loss",))[
            "example_loss"].mean())
    return float(session.run(batch.input_ids, batch.attention_mask, batch.labels)["loss"])


def _hf_loss(net, bundle_path, batch) -> float:
    task = Bundle(bundle_path).task
    t = [torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.labels)]
    return float(heads.reference_loss(net.eval(), task.head, *t, task.label_token_ids))


def _batch(bundle_path, files):
    return TextEncoder(Bundle(bundle_path)).dataset(files["dev"]).batch(range(6))


@pytest.mark.parametrize("name", ["llama-lora", "opt-lora-causal", "bert-bitfit", "llama-lora-slots", "bert-lora"])
def test_to_hf_reproduces_the_trained_loss(name, bundles, trained, sentiment_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run, bundle = trained(name), bundles(name)
    batch = _batch(bundle, sentiment_files)
    start = _pocketzo_loss(bundle, None, batch)
    want = _pocketzo_loss(bundle, run, batch)
    assert abs(want - start) > 1e-3  # training moved the adapters: the comparison is not trivially equal
    merge.to_hf(run, tmp_path / "hf")
    cls = AutoModelForSequenceClassification if EXPORTS[name][0] == "bert" else AutoModelForCausalLM
    net = cls.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert _hf_loss(net, bundle, batch) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("from_base", [False, True])
def test_to_hf_writes_the_trained_head_of_a_lora_encoder(from_base, bundles, trained, tiny_models, tmp_path):
    """BERT with --peft lora trains LoRA on query/value and its classification head: both reach the HF model."""
    from transformers import AutoModelForSequenceClassification

    run, bundle = trained("bert-lora"), bundles("bert-lora")
    start = _safetensors.load(bundle / "trainable.safetensors")
    want = _safetensors.load(run / "weights.safetensors")
    assert {"classifier.weight", "classifier.bias"} < set(want)
    assert not np.array_equal(want["classifier.weight"], start["classifier.weight"])  # the head moved
    merge.to_hf(run, tmp_path / "hf", base=tiny_models["bert"] if from_base else None)
    state = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").state_dict()
    for name in ("classifier.weight", "classifier.bias"):
        np.testing.assert_array_equal(state[name].numpy(), want[name])


@pytest.mark.parametrize("name", ["llama-lora", "opt-lora-causal"])
def test_to_peft_loads_onto_the_original_model(name, bundles, trained, tiny_models, sentiment_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, bundle = trained(name), bundles(name)
    batch = _batch(bundle, sentiment_files)
    merge.to_peft(run, tmp_path / "adapter")
    original = AutoModelForCausalLM.from_pretrained(tiny_models[EXPORTS[name][0]], attn_implementation="eager")
    net = PeftModel.from_pretrained(original, tmp_path / "adapter")
    got = _hf_loss(net, bundle, batch)
    assert got == pytest.approx(_pocketzo_loss(bundle, run, batch), abs=1e-4)


def test_to_peft_prompt_tuning_loads_onto_the_original_model(bundles, trained, tiny_models, sentiment_files,
                                                              tmp_path):
    """The trained virtual tokens reproduce the loss under PEFT, and the adapter says which text they started as."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, bundle = trained("llama-prompt-text"), bundles("llama-prompt-text")
    batch = _batch(bundle, sentiment_files)
    merge.to_peft(run, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"]) == ("TEXT", "a short review")
    original = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="eager")
    net = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    with torch.no_grad():
        logits = net(input_ids=ids, attention_mask=mask).logits  # (B, k + T, V): PEFT puts the k tokens first
    last = config["num_virtual_tokens"] + mask.sum(1) - 1
    answer = logits[torch.arange(len(ids)), last][:, list(Bundle(bundle).task.label_token_ids)]
    got = float(F.cross_entropy(answer.float(), torch.from_numpy(batch.labels)))
    assert got == pytest.approx(_pocketzo_loss(bundle, run, batch), abs=1e-4)


def test_merge_refusals(bundles, trained, tmp_path):
    with pytest.raises(ExportError, match="not an adapter"):
        merge.to_peft(trained("bert-bitfit"), tmp_path / "a")
    with pytest.raises(ExportError, match="not a pocketzo run"):
        merge.to_hf(tmp_path, tmp_path / "b")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="exists"):
        merge.to_hf(trained("llama-lora"), tmp_path / "exists")


@pytest.mark.parametrize("name", ["llama-lora", "opt-lora-causal"])
def test_to_onnx_generates_what_transformers_generates(name, bundles, trained, tmp_path):
    """--to-onnx of a trained LoRA run: greedy tokens equal transformers' greedy generate() of the --to-hf model."""
    from transformers import AutoModelForCausalLM

    from pocketzo.runtime.generate import GenerationConfig, Generator

    run = trained(name)
    merge.to_onnx(run, tmp_path / "onnx")
    merge.to_hf(run, tmp_path / "hf")
    gen = Generator(tmp_path / "onnx", SessionConfig(threads=1))
    ids = gen.encode("the film was good and the plot")
    net = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    want = net.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                        do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)[0, len(ids):]
    got = list(gen.token_ids(ids, GenerationConfig(10)))
    want = want.tolist()
    assert got == want[: len(got)]
    assert len(got) == 10 or want[len(got)] in gen.manifest.eos_token_ids  # it stopped at EOS, nowhere else
