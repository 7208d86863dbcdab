"""Runtime: zero-copy binding, alignment, bundle validation, safetensors compatibility."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pocketzo.errors import BundleError
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession, _safetensors
from pocketzo.runtime.data import TextEncoder


def _batch(bundle, path, n=8):
    data = TextEncoder(bundle).dataset(path)
    b = data.batch(range(n))
    return b.input_ids, b.attention_mask, b.labels


def test_in_place_edit_is_seen_without_rebinding(bundles, sentiment_files, tmp_path):
    bundle = Bundle(bundles("llama-classify"))
    batch = _batch(bundle, sentiment_files["dev"])
    session = TrainingSession(bundle, SessionConfig(threads=1))
    before = float(session.run(*batch)["loss"])
    buf = session.params.buffer
    rng = np.random.default_rng(0)
    buf += rng.standard_normal(buf.shape).astype(np.float32) * 0.05  # in place, no rebind
    after = float(session.run(*batch)["loss"])
    assert abs(after - before) > 1e-3

    session.params.save(tmp_path / "edited.safetensors")
    fresh = TrainingSession(bundle, SessionConfig(threads=1),
                            FlatParameters.from_bundle(bundle, tmp_path / "edited.safetensors"))
    assert abs(float(fresh.run(*batch)["loss"]) - after) <= 1e-6


@pytest.mark.parametrize("name", ["llama-norms", "opt-lora-causal"])
def test_mapped_weights_compute_the_same_losses(name, bundles, sentiment_files):
    """A session that leaves the weights mapped (no prepacked or folded copies) is the same function."""
    bundle = Bundle(bundles(name))
    assert bundle.weights_file_backed(bundle.model_path)
    batch = _batch(bundle, sentiment_files["dev"])
    mapped, packed = (TrainingSession(bundle, SessionConfig(threads=1, map_weights=m))
                      .run(*batch, outputs=("example_loss",)) for m in (True, False))
    np.testing.assert_allclose(mapped["example_loss"], packed["example_loss"], rtol=1e-5, atol=1e-6)


def test_quantized_and_ort_format_graphs_are_not_file_backed(bundles):
    bundle = Bundle(bundles("llama-lora-split-int8-ort"))
    assert not any(bundle.weights_file_backed(p) for p in (bundle.model_path, *bundle.split_paths(False)))
    assert not bundle.weights_file_backed(bundle.ort_path)


def test_weights_are_bound_zero_copy_and_aligned(bundles):
    bundle = Bundle(bundles("llama-classify"))
    session = TrainingSession(bundle)
    assert session.params.buffer.ctypes.data % 64 == 0
    for name, view in session.params.views.items():
        assert view.ctypes.data % 64 == 0
        assert session.weight_pointer(name) == view.ctypes.data
        assert np.shares_memory(view, session.params.buffer)


def test_int32_and_strided_inputs_are_accepted(bundles, sentiment_files):
    bundle = Bundle(bundles("llama-classify"))
    ids, mask, labels = _batch(bundle, sentiment_files["dev"])
    session = TrainingSession(bundle, SessionConfig(threads=1))
    want = float(session.run(ids, mask, labels)["loss"])
    wide = np.zeros((ids.shape[0], ids.shape[1] * 2), np.int32)
    wide[:, ::2] = ids
    got = float(session.run(wide[:, ::2], mask.astype(np.int32), labels.astype(np.int32))["loss"])
    assert got == want


def test_unknown_optional_manifest_keys_are_ignored(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["task"]["added_in_a_later_version"] = True
    m["something_new"] = {"x": 1}
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert Bundle(bundle_copy).task.kind == "classify"


def test_session_config_validates():
    with pytest.raises(ValueError):
        SessionConfig(threads=-1)
    with pytest.raises(ValueError):
        SessionConfig(optimization="fast")


def test_safetensors_compatible_with_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64)}
    _safetensors.save(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours = _safetensors.load(tmp_path / "theirs.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
        np.testing.assert_array_equal(ours[k], v)


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundles("llama-norms"), dst)
    return dst


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "model.onnx").unlink(), "model.onnx: missing"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "corrupt JSON"),
    (lambda p: _edit_manifest(p, format_version=99), "format_version 99"),
    (lambda p: _edit_manifest(p, tokenizer_file="../../etc/passwd"), "outside the bundle"),
    (lambda p: _edit_manifest(p, buffer_elements=3), "overflow"),
    (lambda p: _edit_manifest(p, files={"model": "model.onnx"}), "'trainable.safetensors' is not in the manifest's"),
    (lambda p: _edit_manifest(p, files={"model": "model.onnx", "x": "gone.bin"}), "gone.bin: missing"),
    (lambda p: _edit_manifest(p, task={"kind": "classify", "head": "lm", "max_length": 8}), "not a known"),
])
def test_bad_bundles_are_named(bundle_copy, breakage, message):
    breakage(bundle_copy)
    with pytest.raises(BundleError, match=message):
        Bundle(bundle_copy)


@pytest.mark.parametrize("version", [1, 2])
def test_older_bundles_are_read_with_the_files_they_name(bundle_copy, version):
    """Before version 3 a manifest had no ``files``: the files its fields name stand in for it."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["files"]
    m["format_version"] = version
    m["export"]["external_data"] = False  # the weights inside model.onnx, as small bundles had them then
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert Bundle(bundle_copy).manifest.files == {"model": "model.onnx", "trainable": "trainable.safetensors",
                                                  "tokenizer": "tokenizer.json", "base_config": "hf_config.json"}
    m["export"]["external_data"] = True  # then model.onnx.data is part of it
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert Bundle(bundle_copy).manifest.files["model_data"] == "model.onnx.data"


@pytest.mark.parametrize("victim, opener, message", [
    ("model.onnx", lambda b: TrainingSession(b), "ONNX Runtime cannot load it"),
    ("tokenizer.json", lambda b: TextEncoder(b), "not a valid tokenizer"),
])
def test_corrupt_files_are_named(bundle_copy, victim, opener, message):
    path = bundle_copy / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match=f"{victim}: {message}"):
        opener(Bundle(bundle_copy))


def test_truncated_weights_are_refused(bundle_copy):
    path = bundle_copy / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="truncated or corrupt"):  # at open, from the header
        FlatParameters.from_bundle(Bundle(bundle_copy))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(buffer_elements=2**33), "not laid out as the format defines"),
    (lambda m: m["trainable"][-1].update(offset=m["trainable"][-1]["offset"] + 2**30), "overflow the buffer"),
    (lambda m: m["trainable"][0].update(shape=[2**17, 2**17]), "bad offset"),  # the next tensor now overlaps it
    (lambda m: (m["trainable"][-1].update(shape=[2**17]),  # a layout that fits, but not the file
                m.update(buffer_elements=m["trainable"][-1]["offset"] + 2**17)), "manifest says shape"),
], ids=["huge-buffer", "far-offset", "huge-shape", "shape-not-in-file"])
def test_a_manifest_cannot_make_the_runtime_allocate_more_than_its_weights(bundle_copy, edit, match):
    """Found by the fuzz suite: a manifest's sizes are checked against the layout and the weights file's
    header before any buffer is allocated (an 8 GB buffer used to be allocated and zeroed first)."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        Bundle(bundle_copy)
