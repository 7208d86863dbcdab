"""The mobile harness: baked model parity, bench report, memory budgets, phone profiles."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from pocketzo.errors import PocketzoError
from pocketzo.mobile_harness.bake import bake
from pocketzo.mobile_harness.bench import BenchConfig, run_bench
from pocketzo.mobile_harness.memory import PROFILES, parse_bytes
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession


def _batch(bundle, b=3, t=9):
    ids = np.random.default_rng(1).integers(0, 20, (b, t))
    mask = np.ones_like(ids)
    mask[0, 6:] = 0  # one padded row
    labels = np.array([0, 1, 1]) if bundle.task.kind == "classify" else np.where(mask == 1, ids, -100)
    return ids, mask, labels


@pytest.mark.parametrize("name", ["llama-classify", "opt-causal", "bert-classify", "llama-norms"])
def test_baked_model_computes_the_training_loss(name, bundles, tmp_path):
    # a copy: the baked model hard-links the bundle's model.onnx.data, which onnx.load then refuses to read (a
    # "hardlink attack") in the other tests sharing the session's bundle
    bundle = Bundle(shutil.copytree(bundles(name), tmp_path / "bundle"))
    # trained-looking weights: the baked graph must read the file it was given, not the bundle's
    params = FlatParameters.from_bundle(bundle)
    params.buffer *= 1.5
    params.save(tmp_path / "w.safetensors")
    baked = bake(bundle, tmp_path / "baked", tmp_path / "w.safetensors")
    sess = ort.InferenceSession(str(baked), providers=["CPUExecutionProvider"])
    trainable = {s.name for s in bundle.manifest.trainable}
    assert not trainable & {i.name for i in sess.get_inputs()}  # weights are no longer inputs
    ids, mask, labels = _batch(bundle)
    got = sess.run(["loss"], {"input_ids": ids, "attention_mask": mask, "labels": labels})[0]
    want = TrainingSession(bundle, SessionConfig(threads=1), params).run(ids, mask, labels)["loss"]
    assert abs(float(got) - float(want)) <= 1e-6
    assert baked.stat().st_size < bundle.model_path.stat().st_size + 64 * len(trainable) + 4096  # nothing copied


def test_bench_reports_every_number(bundles, tmp_path):
    lines = []
    r = run_bench(bundles("llama-classify"), BenchConfig(batch_size=2, seq_len=8, threads=1, steps=3, warmup=1),
                  log=lines.append)
    for key in ("forward_baked_s", "forward_train_s", "step_s", "overhead_ratio", "peak_rss_mb",
                "inference_peak_rss_mb"):
        assert r[key] > 0, key
    assert r["step_s"] >= r["step_forward_s"] > 0 and r["step_noise_s"] >= 0
    assert r["overhead_ratio"] == pytest.approx(r["step_s"] / (2 * r["forward_baked_s"]))
    # each measurement ran in its own fresh process: far below the test process's own RSS
    assert r["peak_rss_mb"] < 1000 and r["rss_split_mb"]["interpreter_and_libraries"] > 0
    assert r["timeline"]["train"]["samples"] and r["fits"] is None
    assert any("overhead ratio" in line for line in lines)
    from pocketzo.plots import bench_figure  # desktop extra

    png = bench_figure(r, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_of_a_split_bundle_times_trunk_and_head(bundles):
    lines = []
    cfg = BenchConfig(batch_size=2, seq_len=8, threads=1, steps=3, warmup=1, recipe="zo-sgd")
    r = run_bench(bundles("llama-lora-split"), cfg, log=lines.append)
    assert r["trunk_s"] > 0 and r["head_s"] > 0 and r["points_per_step"] == 2
    assert r["split_floor_ratio"] == pytest.approx(r["step_s"] / (r["trunk_s"] + 2 * r["head_s"]))
    assert r["step_forward_equivalents"] == pytest.approx(r["step_s"] / r["forward_baked_s"])
    assert r["head_only_floor_ratio"] == pytest.approx(r["step_head_only_s"] / (2 * r["head_s"]))
    assert any("split at layer 1" in line for line in lines) and any("split: trunk" in line for line in lines)
    whole = run_bench(bundles("llama-lora-split"), replace(cfg, split=False), log=lambda _: None)
    assert whole["trunk_s"] is None and whole["split_floor_ratio"] is None and whole["step_head_only_s"] is None


def test_memory_budget_fits_or_says_what_it_needs(bundles):
    roomy = run_bench(bundles("llama-classify"), BenchConfig(batch_size=1, seq_len=4, threads=1, steps=1, warmup=0,
                                                             memory_budget="16G"), log=lambda _: None)
    assert roomy["fits"]["fits"] is True
    lines = []
    tight = run_bench(bundles("llama-classify"), BenchConfig(batch_size=1, seq_len=4, threads=1, steps=1, warmup=0,
                                                             memory_budget="64M"), log=lines.append)
    assert tight["fits"]["fits"] is False and tight["fits"]["needs_mb"] > 64
    assert any("does not fit: needs about" in line for line in lines)


def test_profiles_and_sizes():
    assert parse_bytes("4G") == 4 * 10**9 and parse_bytes("1500M") == 1.5e9 and parse_bytes("2GiB") == 2 * 2**30
    with pytest.raises(PocketzoError, match="cannot read memory size"):
        parse_bytes("lots")
    cfg = BenchConfig(profile="budget-4gb").resolved()
    assert cfg.threads == PROFILES["budget-4gb"].threads and cfg.memory_budget == PROFILES["budget-4gb"].app_budget
    assert BenchConfig(profile="budget-4gb", threads=1).resolved().threads == 1  # explicit flags win
    with pytest.raises(PocketzoError, match="unknown phone profile"):
        BenchConfig(profile="nokia-3310").resolved()


def test_seq_len_beyond_the_bundle_is_refused(bundles):
    with pytest.raises(PocketzoError, match="exceeds the bundle's max_length"):
        run_bench(bundles("llama-classify"), BenchConfig(seq_len=1000), log=lambda _: None)


@pytest.fixture(scope="module")
def mapped_bundle(tmp_path_factory):
    """A llama whose frozen float32 weights (about 40 MB) stay memory-mapped from model.onnx.data; its norms train."""
    import torch
    from conftest import LABELS, TEMPLATE, _tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocketzo.export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("mapped")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8_000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True, pad_token_id=0)).save_pretrained(root / "model")
    _tokenizer(False).save_pretrained(root / "model")
    export_bundle(root / "model", root / "bundle", ExportConfig(task="classify", template=TEMPLATE, labels=LABELS,
                                                                trainable=r"norm\.weight$", max_length=32))
    return root / "bundle"


def test_bench_counts_mapped_weights_as_weights_not_activations(mapped_bundle):
    """Mapped weights are paged in by the first forward, after the bundle opened: the split counted them as
    activations (Qwen2.5-0.5B: 1,998 MB "activations+arena" beside 1,929 MB file-backed at the end)."""
    bundle = Bundle(mapped_bundle)
    assert bundle.weights_file_backed(bundle.model_path)
    weights_mb = (mapped_bundle / "model.onnx.data").stat().st_size / 1e6
    r = run_bench(mapped_bundle, BenchConfig(batch_size=2, seq_len=16, threads=1, steps=2, warmup=1, recipe="zo-sgd"))
    split = r["rss_split_mb"]
    assert split["mapped_after_load"] > 0.8 * weights_mb  # the weights were mapped, and paged in after the load
    assert split["weights_and_session"] > 0.9 * weights_mb
    assert split["activations_and_arena"] < 0.5 * weights_mb
    total = split["interpreter_and_libraries"] + split["weights_and_session"] + split["activations_and_arena"]
    assert total == pytest.approx(r["peak_rss_mb"])
