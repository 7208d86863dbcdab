"""The frozen-trunk split (export --split, --trainable-layers): parity of trunk then head with the whole graph,
what each graph holds, the refusals, and ZO training on the split (trunk once per batch, resume, replay)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from conftest import LABELS, TEMPLATE, resume_without_the_newest_checkpoint

from pocketzo.errors import BundleError, ExportError
from pocketzo.export import ExportConfig, export_bundle
from pocketzo.runtime import Bundle, FlatParameters, Manifest, SessionConfig, TrainingSession
from pocketzo.runtime.data import IGNORE, TextEncoder
from pocketzo.runtime.manifest import HIDDEN
from pocketzo.runtime.split_session import SplitSession
from pocketzo.zo_trainer import Method, RunPolicy, read_log, replay_run, train
from pocketzo.zo_trainer.trainer import make_trainer, open_session

SPLIT_BUNDLES = ["llama-norms-split", "llama-lora-split", "llama-causal-split", "opt-lora-causal-split",
                 "bert-bitfit-split", "llama-lora-slots-split", "llama-lora-split-int8-ort"]
LAYER = re.compile(r"\.(?:layers|layer)\.(\d+)\.")


def _padded_batch(bundle: Bundle, files, tmp_path, rows: int) -> tuple[np.ndarray, ...]:
    """``rows`` real rows, row k right-padded by k tokens."""
    encoder = TextEncoder(bundle)
    if bundle.task.kind == "causal-lm":
        text = tmp_path / "text.txt"
        text.write_text("the film was good and the plot is fun\nthe movie was dull and awful\n" * 20)
        b = encoder.text_windows(text).batch(range(rows))
    else:
        b = encoder.dataset(files["train"]).batch(range(rows))
    ids, mask, labels = b.input_ids.copy(), b.attention_mask.copy(), b.labels.copy()
    for k in range(1, rows):
        mask[k, -k:], ids[k, -k:] = 0, bundle.manifest.pad_token_id
        if labels.ndim == 2:
            labels[k, -k:] = IGNORE
    return ids, mask, labels


def _layers(graph: onnx.GraphProto) -> set[int]:
    """The transformer layers whose weights (frozen initializers or trainable inputs) the graph holds."""
    return {int(m.group(1)) for i in (*graph.initializer, *graph.input) if (m := LAYER.search(i.name))}


@pytest.mark.parametrize("name", SPLIT_BUNDLES)
def test_trunk_then_head_is_the_whole_graph(name, bundles, sentiment_files, tmp_path):
    bundle = Bundle(bundles(name))
    split = bundle.manifest.split
    assert split is not None and (split.layer, split.layers) == (1, 2)
    assert bundle.manifest.export["split_parity"]["whole_graph_error"] <= 1e-5
    trunk_path, head_path = bundle.split_paths(prefer_ort=False)
    trunk, head = onnx.load(trunk_path).graph, onnx.load(head_path).graph
    trainable = {t.name for t in bundle.manifest.trainable}
    assert [i.name for i in trunk.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in trunk.output] == [HIDDEN]
    assert _layers(trunk) == {0} and _layers(head) == {1}  # each layer's weights in one graph only
    assert {i.name for i in head.input} == {HIDDEN, "attention_mask", "labels"} | trainable
    # at random trainable values, on real rows of different lengths, the split computes the whole graph's outputs
    config = SessionConfig(threads=1)
    whole, parts = TrainingSession(bundle, config), SplitSession(bundle, config)
    rng = np.random.default_rng(0)
    whole.params.buffer[:] += rng.normal(0, 0.05, whole.params.buffer.shape).astype(np.float32)
    parts.params.buffer[:] = whole.params.buffer
    rows = _padded_batch(bundle, sentiment_files, tmp_path, 8)
    outputs = [o.name for o in bundle.manifest.outputs]
    want, got = whole.run(*rows, outputs=outputs), parts.run(*rows, outputs=outputs)
    for key in outputs:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    odd = tuple(a[:3] for a in rows)  # with P slots, rows that do not divide into P groups
    np.testing.assert_allclose(parts.run(*odd)["loss"], whole.run(*odd)["loss"], rtol=1e-5, atol=1e-5)


def test_trainable_layers_equal_to_the_depth_still_keep_the_embeddings_frozen(tiny_models, tmp_path):
    m = export_bundle(tiny_models["llama"], tmp_path / "b", ExportConfig(
        task="causal-lm", trainable="all", trainable_layers=2, max_length=32))
    names = [t.name for t in m.trainable]
    assert "model.norm.weight" in names and "model.layers.0.input_layernorm.weight" in names
    assert "model.embed_tokens.weight" not in names  # --trainable-layers never trains the input side
    assert m.format_version == 4 and m.split is None  # no split: readable by version-4 readers


def test_trainable_layers_train_only_the_top_layers(bundles):
    lora = Bundle(bundles("llama-lora-split"))
    names = [t.name for t in lora.manifest.trainable]
    assert names and all(".layers.1." in n for n in names)
    model = onnx.load(lora.model_path).graph
    assert not any("lora" in i.name for i in model.initializer)  # no adapter (frozen at B = 0) in layer 0
    causal = [t.name for t in Bundle(bundles("llama-causal-split")).manifest.trainable]
    assert "model.norm.weight" in causal and all(LAYER.search(n) is None or ".layers.1." in n for n in causal)
    assert "model.embed_tokens.weight" not in causal  # the tied embedding / LM head acts below layer 1


def test_a_quantized_split_is_checked_and_converted_too(bundles):
    bundle = Bundle(bundles("llama-lora-split-int8-ort"))
    export = bundle.manifest.export
    assert export["split_parity_quantized"]["whole_graph_error"] <= 1e-5
    assert export["split_parity_ort"]["whole_graph_error"] <= 1e-5
    trunk, head = bundle.split_paths()
    assert (trunk.name, head.name) == ("trunk.ort", "head.ort")
    ops = [n.op_type for n in onnx.load(bundle.split_paths(prefer_ort=False)[0]).graph.node]
    assert export["quantized"]["split"]["trunk.onnx"]["quantized"] == ops.count("MatMulNBits") > 0


@pytest.mark.parametrize("kw, match", [
    ({"peft": "prompt", "split": "auto"}, "virtual tokens"),
    ({"gradients": True, "split": "auto"}, "not built yet"),
    ({"split": "top"}, "auto or a layer number"),
    ({"split": "0"}, "auto or a layer number"),
    ({"trainable_layers": -1}, "trainable-layers"),
])
def test_bad_split_options_are_refused(kw, match):
    with pytest.raises(ExportError, match=match):
        ExportConfig(task="classify", labels=LABELS, template=TEMPLATE, **kw)


@pytest.mark.parametrize("kw, match", [
    ({"trainable": r"layers\.", "split": "auto"}, "so no layer is frozen below it"),  # layer 0 trains
    ({"trainable": r"norm\.weight$", "trainable_layers": 1, "split": "2"}, r"is in layer 1, below the split"),
    ({"trainable": r"norm\.weight$", "trainable_layers": 1, "split": "3"}, "the model has 2 layers"),
    ({"trainable": r"embed_tokens|layers\.1\.", "split": "auto"}, "acts below the first layer"),
    ({"trainable": r"norm\.weight$", "trainable_layers": 3}, "has 2 layers"),
])
def test_a_split_that_would_train_the_trunk_is_refused(kw, match, tiny_models, tmp_path):
    with pytest.raises(ExportError, match=match):
        export_bundle(tiny_models["llama"], tmp_path / "b", ExportConfig(
            task="classify", template=TEMPLATE, labels=LABELS, max_length=32, **kw))
    assert not (tmp_path / "b").exists()


def test_a_zo_step_on_the_split_runs_the_trunk_once_and_matches_the_whole_graph(bundles, sentiment_files, tmp_path):
    bundle = Bundle(bundles("llama-lora-split"))
    cfg = Method(steps=6, lr=5e-2, eps=1e-2, batch_size=8, seed=1)
    config = SessionConfig(threads=1)
    split_session = open_session(bundle, config, cfg)
    assert isinstance(split_session, SplitSession)
    trunk_runs = []
    trunk = split_session.trunk
    split_session.trunk = lambda *a: trunk_runs.append(1) or trunk(*a)
    whole = make_trainer(TrainingSession(bundle, config), cfg, 1)
    parts = make_trainer(split_session, cfg, 1)
    data = TextEncoder(bundle).dataset(sentiment_files["train"])
    for step in range(cfg.steps):
        b = data.batch(range(8 * step, 8 * step + 8))
        want, got = whole.step(step, b).directions[0], parts.step(step, b).directions[0]
        assert got.seed == want.seed
        assert got.loss_plus == pytest.approx(want.loss_plus, abs=1e-5)
        assert got.loss_minus == pytest.approx(want.loss_minus, abs=1e-5)
    assert len(trunk_runs) == cfg.steps  # two points per step, one trunk run
    whole.close(), parts.close()
    np.testing.assert_allclose(split_session.params.buffer, whole.evaluator.theta.buffer, atol=1e-6)


def test_slotted_split_matches_the_sequential_split(bundles, sentiment_files):
    cfg = Method(steps=1, lr=1e-2, eps=1e-2, batch_size=8, seed=2)
    config = SessionConfig(threads=1)
    batch = TextEncoder(Bundle(bundles("llama-lora-split"))).dataset(sentiment_files["train"]).batch(range(8))
    want = make_trainer(SplitSession(Bundle(bundles("llama-lora-split")), config), cfg, 1).step(0, batch)
    got = make_trainer(SplitSession(Bundle(bundles("llama-lora-slots-split")), config), cfg, 1).step(0, batch)
    assert got.directions[0].seed == want.directions[0].seed
    assert got.directions[0].loss_plus == pytest.approx(want.directions[0].loss_plus, abs=1e-5)
    assert got.directions[0].loss_minus == pytest.approx(want.directions[0].loss_minus, abs=1e-5)


def test_split_training_learns_replays_and_resumes_bit_for_bit(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=30, lr=5e-2, eps=1e-2, batch_size=8, seed=3)
    policy = RunPolicy(threads=1, checkpoint_every=10, progress=False)
    bundle = bundles("llama-lora-split")
    summary = train(bundle, sentiment_files["train"], tmp_path / "run", cfg, eval_path=sentiment_files["dev"],
                    policy=policy)
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"]
    trained = FlatParameters.from_bundle(Bundle(bundle), tmp_path / "run" / "weights.safetensors")
    assert np.array_equal(replay_run(bundle, tmp_path / "run" / "log.bin").buffer, trained.buffer)
    resumed, _ = resume_without_the_newest_checkpoint(bundle, sentiment_files["train"], tmp_path / "run2", cfg,
                                                      policy, sentiment_files["dev"])
    assert len(read_log(tmp_path / "run2" / "log.bin")) == 30
    assert np.array_equal(resumed, trained.buffer)


def test_the_manifest_describes_the_split_and_a_bad_one_is_refused(bundles, tmp_path):
    src = bundles("llama-norms-split")
    manifest = Bundle(src).manifest
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert {"trunk_model", "head_model"} <= set(manifest.files)
    copy = tmp_path / "b"
    shutil.copytree(src, copy)
    obj = json.loads((copy / "manifest.json").read_text())
    obj["split"]["layer"] = 3  # beyond the model's 2 layers
    (copy / "manifest.json").write_text(json.dumps(obj))
    with pytest.raises(BundleError, match="split layer 3"):
        Bundle(copy)
    obj["split"]["layer"] = 1
    (copy / "manifest.json").write_text(json.dumps(obj))
    (copy / "head.onnx").unlink()
    with pytest.raises(BundleError, match="head.onnx: missing"):
        Bundle(copy)
    with pytest.raises(BundleError, match="not a split bundle"):
        SplitSession(Bundle(bundles("llama-lora")))
