"""Export: parity with PyTorch per architecture, names, tied weights, round trip."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import EXPORTS, LABELS, TEMPLATE

from pocketzo.errors import ExportError
from pocketzo.export import ExportConfig, adapters, export_bundle, heads
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession, _safetensors
from pocketzo.runtime.data import TextEncoder
from pocketzo.runtime.manifest import Manifest


def _hf_model(path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["llama-classify", "llama-causal", "opt-classify", "opt-causal", "bert-classify"])
def test_loss_matches_pytorch(name, bundles, tiny_models, sentiment_files):
    """The bundle's loss through the device runtime equals the Hugging Face loss on a padded batch."""
    kind, task = EXPORTS[name][:2]
    bundle = Bundle(bundles(name))
    encoder = TextEncoder(bundle)
    rows = [json.loads(line) for line in sentiment_files["dev"].read_text().splitlines()[:5]]
    rows = [{**r, "text": r["text"] + " good" * i} for i, r in enumerate(rows)]  # padding in the batch
    ids, targets = zip(*[encoder.encode(r)[:2] for r in rows], strict=True)
    t = max(len(i) for i in ids)
    input_ids = np.zeros((len(ids), t), np.int64)
    mask = np.zeros_like(input_ids)
    for j, i in enumerate(ids):
        input_ids[j, : len(i)], mask[j, : len(i)] = i, 1
    labels = np.array(targets, np.int64) if task == "classify" else np.where(mask == 1, input_ids, heads.IGNORE)
    assert (mask == 0).any()

    got = TrainingSession(bundle).run(input_ids, mask, labels, ("loss", "example_loss"))
    net = _hf_model(tiny_models[kind], kind)
    tids = bundle.task.label_token_ids
    want = heads.reference_loss(net, bundle.task.head, *map(torch.from_numpy, (input_ids, mask, labels)), tids)
    assert abs(float(got["loss"]) - float(want)) <= 1e-4
    if task == "classify":  # example losses average to the loss
        assert abs(float(got["example_loss"].mean()) - float(got["loss"])) <= 1e-5


@pytest.mark.parametrize("name", ["llama-classify", "opt-causal", "bert-classify"])
def test_inputs_are_hf_names_and_values(name, bundles, tiny_models):
    kind = EXPORTS[name][0]
    bundle = Bundle(bundles(name))
    net = _hf_model(tiny_models[kind], kind)
    state = {k: v.detach().numpy() for k, v in net.named_parameters()}
    params = FlatParameters.from_bundle(bundle)
    assert [s.name for s in bundle.manifest.trainable] == list(state)  # all, in HF order
    for tensor_name, view in params.views.items():
        np.testing.assert_array_equal(view, state[tensor_name])


def test_tied_embedding_is_one_tensor(bundles):
    import onnx

    bundle = Bundle(bundles("llama-classify"))
    names = [s.name for s in bundle.manifest.trainable]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    graph = onnx.load(str(bundle.model_path)).graph
    assert "lm_head.weight" not in {i.name for i in graph.input} | {i.name for i in graph.initializer}


def test_frozen_weights_stay_initializers(bundles):
    import onnx

    bundle = Bundle(bundles("llama-norms"))
    graph = onnx.load(str(bundle.model_path)).graph
    inputs = {i.name for i in graph.input}
    inits = {i.name for i in graph.initializer}
    trainable = {s.name for s in bundle.manifest.trainable}
    assert trainable and all(n.endswith("norm.weight") for n in trainable)
    assert trainable <= inputs and not trainable & inits
    assert "model.layers.0.self_attn.q_proj.weight" in inits


def test_bundle_round_trip(bundles, tmp_path):
    """Manifest and weights written and read back are identical."""
    bundle = Bundle(bundles("opt-classify"))
    obj = json.loads((bundle.path / "manifest.json").read_text())
    assert Manifest.from_json(obj).to_json() == obj
    params = FlatParameters.from_bundle(bundle)
    params.save(tmp_path / "w.safetensors")
    again = FlatParameters.from_bundle(bundle, tmp_path / "w.safetensors")
    assert again.buffer.tobytes() == params.buffer.tobytes()
    assert _safetensors.read_header(tmp_path / "w.safetensors")[0].keys() == params.views.keys()


def test_prompt_labels_are_label_words(bundles):
    from tokenizers import Tokenizer

    bundle = Bundle(bundles("llama-classify"))
    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    assert list(bundle.task.labels) == list(LABELS)
    assert [tok.token_to_id(w) for w in LABELS] == list(bundle.task.label_token_ids)


def _assert_portable(directory):
    """The manifest names every file of the bundle (manifest.json aside); files are 0644, directories 0755."""
    files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
    assert files == set(Bundle(directory).manifest.files.values()) | {"manifest.json"}
    for p in [directory, *directory.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


@pytest.mark.parametrize("name", ["llama-lora-slots", "bert-classify", "opt-causal"])
def test_manifest_names_every_file(name, bundles):
    _assert_portable(bundles(name))
    assert Bundle(bundles(name)).manifest.files["base_config"] == "hf_config.json"


@pytest.fixture
def private_umask():
    """Export under umask 077, as in a locked-down CI job: the bundle must come out readable anyway."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_weights_are_external_data_the_manifest_names(tiny_models, tmp_path, sentiment_files, private_umask):
    """The frozen weights go to model.onnx.data, which ONNX Runtime memory-maps, and the graph file keeps only the
    graph; the manifest names the data file, for clients that fetch a bundle file by file."""
    import onnx

    from pocketzo.export import ExportConfig, export_bundle
    from pocketzo.export.tracing import WEIGHT_MIN_BYTES, tensor_bytes

    manifest = export_bundle(tiny_models["llama"], tmp_path / "b", ExportConfig(
        task="classify", template="review : {text} sentiment :", labels=LABELS, trainable=r"norm\.weight$",
        max_length=32))
    graph = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph
    weights = [t for t in graph.initializer if tensor_bytes(t) >= WEIGHT_MIN_BYTES]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert (tmp_path / "b" / "model.onnx.data").stat().st_size >= sum(tensor_bytes(t) for t in weights)
    assert manifest.export["external_data"] and manifest.export["parity"]["abs_error"] <= 1e-4
    assert manifest.files["model_data"] == "model.onnx.data" and manifest.files["model"] == "model.onnx"
    _assert_portable(tmp_path / "b")


def test_encoder_without_head_gets_a_seeded_new_head(tmp_path):
    """all-MiniLM-L6-v2 ships as a bare BertModel: export adds a classifier, the same for the same seed."""
    import torch
    from conftest import _tokenizer
    from transformers import BertConfig, BertModel

    from pocketzo.export import ExportConfig, export_bundle

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(tmp_path / "m")
    _tokenizer(encoder=True).save_pretrained(tmp_path / "m")
    heads_ = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        manifest = export_bundle(tmp_path / "m", tmp_path / name, ExportConfig(
            task="classify", labels=LABELS, trainable=r"^classifier\.", seed=seed, max_length=16))
        assert [t.name for t in manifest.trainable] == ["classifier.weight", "classifier.bias"]
        heads_.append(FlatParameters.from_bundle(Bundle(tmp_path / name)).buffer.copy())
    assert np.array_equal(heads_[0], heads_[1]) and not np.array_equal(heads_[0], heads_[2])


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(tiny_models, tmp_path):
    from pocketzo.errors import ExportError
    from pocketzo.export import ExportConfig, export_bundle

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(tiny_models["llama"], tmp_path, ExportConfig(task="causal-lm", max_length=32), overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="classify"), "needs --labels"),
    (dict(task="classify", labels=("a", "a")), "duplicates"),
    (dict(task="causal-lm", trainable="(("), "bad regex"),
    (dict(task="causal-lm", max_length=1), "max-length must be"),
    (dict(task="classify", labels=LABELS, template="no placeholder"), "exactly once"),
    (dict(task="causal-lm", chat=True), "chat markup into each row"),
])
def test_export_config_rejects_bad_options(kwargs, message):
    from pocketzo.errors import ExportError
    from pocketzo.export import ExportConfig

    with pytest.raises(ExportError, match=message):
        ExportConfig(**kwargs)


@pytest.mark.parametrize("kind, architectures, gguf, causal", [
    ("llama", ["LlamaForCausalLM"], None, True),
    ("llama", None, None, True),  # a bare config
    ("llama", None, "m.gguf", True),  # GGUF configs name no architectures
    ("opt", None, None, True),
    ("bert", None, None, False),
    ("bert", ["BertModel"], None, False),  # all-MiniLM-L6-v2
    ("bert", ["BertForSequenceClassification"], None, False),
])
def test_decoder_or_encoder_is_told_apart(kind, architectures, gguf, causal):
    from transformers import BertConfig, LlamaConfig, OPTConfig

    from pocketzo.export.loading import is_causal_lm

    config = {"llama": LlamaConfig, "opt": OPTConfig, "bert": BertConfig}[kind](architectures=architectures)
    assert is_causal_lm(config, gguf) is causal


def test_ort_format_bundle_gives_the_onnx_loss(tiny_models, tmp_path):
    out = tmp_path / "ort-bundle"
    export_bundle(tiny_models["llama"], out, ExportConfig(task="classify", template=TEMPLATE, labels=LABELS,
                                                          max_length=32, ort=True))
    bundle = Bundle(out)
    assert bundle.ort_path is not None and (out / "required_operators.config").read_text().strip()
    via_ort = TrainingSession(bundle, SessionConfig(threads=1))
    via_onnx = TrainingSession(bundle, SessionConfig(threads=1, prefer_ort=False))
    assert via_ort.model_path.suffix == ".ort" and via_onnx.model_path.suffix == ".onnx"
    ids = np.random.default_rng(0).integers(0, 20, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    labels = np.array([0, 1, 0])
    for session in (via_ort, via_onnx):
        session.params.buffer *= 1.25  # zero-copy binding works through the .ort model too
    a = via_ort.run(ids, mask, labels, ("loss", "example_loss"))
    b = via_onnx.run(ids, mask, labels, ("loss", "example_loss"))
    np.testing.assert_allclose(a["example_loss"], b["example_loss"], rtol=0, atol=1e-6)
    assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6
    assert bundle.manifest.export["parity_ort"]["abs_error"] <= 1e-4
    assert bundle.manifest.files["ort_model"] == "model.ort"
    assert bundle.manifest.files["required_operators"] == "required_operators.config"
    _assert_portable(out)


@pytest.mark.parametrize("name", ["llama-lora", "llama-lora-slots", "llama-prompt-slots", "bert-lora"])
def test_parity_is_also_checked_at_random_adapter_values(name, bundles):
    """Random adapters (LoRA B != 0, every slot different) are checked; the bundle still ships the initial ones."""
    bundle = Bundle(bundles(name))
    checked = bundle.manifest.export["parity"]["random_adapters"]
    slots = bundle.manifest.slots
    assert len(checked["loss_torch"]) == slots and len(set(checked["loss_torch"])) == slots
    assert checked["abs_error"] <= 1e-4
    initial = FlatParameters.from_bundle(bundle).views
    for tensor_name, view in initial.items():
        if tensor_name.endswith(".lora_B.weight"):
            assert not view.any()
        if slots > 1:
            assert (view == view[:1]).all()


def test_parity_has_no_random_check_without_an_adapter(bundles):
    assert Bundle(bundles("bert-bitfit")).manifest.export["parity"]["random_adapters"] is None


def _wrong_scale(monkeypatch):
    """The traced LoRA layers scale B A by 2 alpha / r: invisible while B = 0."""
    init = adapters.LoRALinear.__init__

    def scaled(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.scale *= 2

    monkeypatch.setattr(adapters.LoRALinear, "__init__", scaled)


def _swapped_slots(monkeypatch):
    """The traced LoRA layers compute slot k's rows with slot P-1-k's adapter: invisible while slots are equal."""
    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight, self.bias)  # (N, T, out)
        a, b = self.lora_A.weight.flip(0), self.lora_B.weight.flip(0)  # (P, r, in), (P, out, r)
        grouped = x.reshape(self.slots, -1, x.shape[-1])  # (P, N/P * T, in)
        return y + (grouped @ a.transpose(1, 2) @ b.transpose(1, 2)).reshape(y.shape) * self.scale

    monkeypatch.setattr(adapters.LoRALinear, "forward", forward)


@pytest.mark.parametrize("breakage, slots", [(_wrong_scale, 1), (_swapped_slots, 4)])
def test_a_wrongly_applied_adapter_is_refused(breakage, slots, tiny_models, tmp_path, monkeypatch):
    breakage(monkeypatch)
    out = tmp_path / "b"
    with pytest.raises(ExportError, match=r"with random adapter values .* the graph applies the adapters wrongly"):
        export_bundle(tiny_models["llama"], out, ExportConfig(
            task="classify", template=TEMPLATE, labels=LABELS, max_length=32, peft="lora", lora_rank=4, slots=slots))
    assert not out.exists()


def test_chat_needs_a_tokenizer_with_a_chat_template(tiny_models, tmp_path):
    from pocketzo.errors import ExportError
    from pocketzo.export import ExportConfig, export_bundle

    with pytest.raises(ExportError, match="no chat template"):
        export_bundle(tiny_models["llama"], tmp_path / "b", ExportConfig(task="classify", template=TEMPLATE,
                                                                          labels=LABELS, chat=True, max_length=32))
    assert not (tmp_path / "b").exists()
