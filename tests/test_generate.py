"""Generation: export_inference + Generator against transformers' generate(), sampling, streaming, the CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketzo.errors import BundleError, DataError, ExportError
from pocketzo.runtime.generate import GenerationConfig, Generator, TextStream, next_token
from pocketzo.runtime.session import SessionConfig

N = 12
PROMPTS = ("the film was good and the plot", "review : the acting was dull")
SHARP_STD = 0.5  # conftest's init (std 0.02) makes greedy decoding repeat one token whatever the cache holds


def _sharpen(src: Path, dst: Path) -> Path:
    """The tiny model with weight matrices redrawn at SHARP_STD, so its greedy output varies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * SHARP_STD)
    net.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def exported(tiny_models, tmp_path_factory):
    """Lazily, once per session: ``exported("llama") -> (model dir, inference dir)``."""
    from pocketzo.export.inference import export_inference

    root = tmp_path_factory.mktemp("inference")
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            model = _sharpen(tiny_models[kind], root / f"{kind}-model")
            export_inference(model, root / kind)
            made[kind] = model, root / kind
        return made[kind]

    return get


def _generator(directory: Path) -> Generator:
    return Generator(directory, SessionConfig(threads=1))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_greedy_matches_transformers_token_for_token(kind, prompt, exported):
    import torch
    from transformers import AutoModelForCausalLM

    model, directory = exported(kind)
    gen = _generator(directory)
    ids = gen.encode(prompt)
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    ref = net.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                       do_sample=False, max_new_tokens=N, pad_token_id=0)[0, len(ids):].tolist()
    got = list(gen.token_ids(ids, GenerationConfig(N)))
    assert got == ref
    assert len(got) == N and len(set(got)) > 3  # no EOS cut it short, and the tokens depend on the context


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_left_padded_rows_match_their_runs_alone(kind, exported):
    """Positions come from attention_mask inside the graph: padding on the left changes nothing."""
    gen = _generator(exported(kind)[1])
    a, b = gen.encode(PROMPTS[0]), gen.encode("a movie")
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])  # (2, T)
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])  # (2, T)
    logits, present = gen.forward(ids, mask, gen.empty_cache(2))
    alone, alone_present = gen.forward(np.array([b]), np.ones((1, len(b)), np.int64), gen.empty_cache())
    np.testing.assert_allclose(logits[1], alone[0], rtol=1e-4, atol=1e-4)
    step = np.array([[5], [5]])  # (2, 1): one cached step for both rows
    logits, _ = gen.forward(step, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), present)
    alone, _ = gen.forward(step[:1], np.ones((1, len(b) + 1), np.int64), alone_present)
    np.testing.assert_allclose(logits[1], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_manifest_describes_the_graph(kind, exported):
    _, directory = exported(kind)
    m = json.loads((directory / "inference.json").read_text())
    assert (m["format"], m["format_version"], m["num_layers"], m["dtype"], m["logits"]) == \
        ("pocketzo-inference", 1, 2, "float32", "last")
    assert list(m["inputs"])[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert m["inputs"]["attention_mask"] == ["batch", "past_seq + seq"]
    assert m["inputs"]["past_key_values.1.value"] == ["batch", m["num_kv_heads"], "past_seq", m["head_dim"]]
    assert m["outputs"]["logits"] == ["batch", 30] and list(m["outputs"])[-1] == "present.1.value"
    assert (m["eos_token_ids"], m["bos_token_id"], m["prepend_bos"], m["vocab_size"]) == ([3], 2, False, 30)
    assert m["export"]["parity"]["prompt"] < 1e-4 and m["export"]["parity"]["step"] < 1e-4
    assert all((directory / name).is_file() for name in ("tokenizer.json", "model.onnx", "model.onnx.data"))


def test_streamed_text_is_the_decoded_continuation(exported):
    gen = _generator(exported("llama")[1])
    ids = gen.encode(PROMPTS[0])
    tokens = list(gen.token_ids(ids, GenerationConfig(N)))
    pieces = list(gen.generate(PROMPTS[0], N))
    full = gen.tokenizer.decode(ids + tokens)
    assert len(pieces) > N // 2 and "".join(pieces) == full[len(gen.tokenizer.decode(ids)):]


def _byte_tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte, so characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_text_stream_emits_whole_characters_only():
    tok, text = _byte_tokenizer(), "naïve café ✓ 日本!"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode())
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "日" in pieces and pieces.count("") > 0  # 3 bytes in, one character out


def test_text_stream_keeps_the_space_after_the_prompt(exported):
    gen = _generator(exported("llama")[1])
    stream = TextStream(gen.tokenizer, gen.encode("the film"))
    assert [stream.push(i) for i in gen.encode("was good")] == [" was", " good"]


def test_top_p_sampling_is_seeded(exported):
    gen = _generator(exported("opt")[1])
    ids = gen.encode(PROMPTS[0])

    def sample(seed: int) -> list[int]:
        return list(gen.token_ids(ids, GenerationConfig(N, temperature=1.0, top_p=0.9, seed=seed)))

    assert sample(0) == sample(0)
    assert len({tuple(sample(s)) for s in range(4)}) > 1


@pytest.mark.parametrize("top_p, allowed", [(0.01, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_draws_from_the_smallest_set_holding_p(top_p, allowed):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))  # (V,)
    rng = np.random.default_rng(0)
    config = GenerationConfig(temperature=1.0, top_p=top_p)
    assert {next_token(logits, config, rng) for _ in range(500)} == allowed


def test_temperature_zero_is_argmax():
    logits = np.array([0.1, 2.0, 1.9], np.float32)
    assert next_token(logits, GenerationConfig(top_p=0.5), np.random.default_rng(0)) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
])
def test_generation_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_prompt_limits(exported):
    gen = _generator(exported("llama")[1])
    with pytest.raises(DataError, match="empty"):
        gen.generate("", N)
    with pytest.raises(DataError, match="at most 128 positions"):
        gen.token_ids([6] * 129, GenerationConfig(N))
    with pytest.raises(ValueError, match="top_p"):
        gen.generate("the", N, top_p=2.0)
    # 125 prompt tokens + 3 fed back = 128 positions, the last run still yields a token: 4 in all.
    assert len(list(gen.token_ids([6] * 125, GenerationConfig(N)))) == 4


def _edit_manifest(directory: Path, **changes) -> None:
    path = directory / "inference.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: shutil.rmtree(d), "inference directory not found"),
    (lambda d: (d / "inference.json").unlink(), "inference.json: missing"),
    (lambda d: (d / "inference.json").write_text("{"), "corrupt JSON"),
    (lambda d: _edit_manifest(d, format_version=2), "format_version 2"),
    (lambda d: _edit_manifest(d, format="pocketzo-bundle"), "not a pocketzo-inference manifest"),
    (lambda d: _edit_manifest(d, num_layers=3), "do not match 3 layers"),
    (lambda d: _edit_manifest(d, head_dim="8"), "head_dim must be a positive integer"),
    (lambda d: _edit_manifest(d, vocab_size=None), "vocab_size"),
    (lambda d: (d / "model.onnx").unlink(), "missing from the inference directory"),
    (lambda d: (d / "model.onnx.data").unlink(), "model.onnx.data: missing from the inference directory"),
    (lambda d: (d / "model.onnx").write_bytes(b"not onnx"), "ONNX Runtime cannot load it"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "not a valid tokenizer"),
])
def test_a_broken_directory_gives_a_clear_error(breakage, message, exported, tmp_path):
    directory = shutil.copytree(exported("llama")[1], tmp_path / "gen")
    breakage(directory)
    with pytest.raises(BundleError, match=message):
        Generator(directory)


def test_export_refuses_to_clobber_and_rejects_non_causal_models(exported, tiny_models, tmp_path):
    from pocketzo.export.inference import export_inference

    model, directory = exported("llama")
    with pytest.raises(ExportError, match="pass overwrite=True"):
        export_inference(model, directory)
    (tmp_path / "other").mkdir()
    with pytest.raises(ExportError, match="is not an inference directory"):
        export_inference(model, tmp_path / "other", overwrite=True)
    with pytest.raises(ExportError, match="no config.json"):
        export_inference(tmp_path, tmp_path / "x")
    with pytest.raises(ExportError, match="not a decoder-only causal LM"):
        export_inference(tiny_models["bert"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


class _Stdout(io.StringIO):
    """Records what had been written at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_cli_streams_text(exported, monkeypatch):
    from pocketzo.cli import main

    directory = exported("llama")[1]
    want = list(_generator(directory).generate(PROMPTS[0], 6))
    out = _Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", str(directory), "--prompt", PROMPTS[0], "--max-new-tokens", "6", "--threads", "1"]) == 0
    assert out.getvalue() == "".join(want) + "\n"
    assert len(set(out.flushed)) == len(want) > 1  # one flush per piece, as it was produced


def test_cli_generate_runs_without_desktop_libraries(exported):
    """pocketzo.runtime.generate and `pocketzo generate` import only the device side."""
    blocked = ("pocketzo.export", "torch", "transformers", "onnx", "onnxscript", "optimum", "matplotlib")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None  # any import of them fails\n"
            "import pocketzo.runtime.generate\nfrom pocketzo.cli import main\n"
            f"sys.exit(main(['generate', {str(exported('opt')[1])!r}, '--prompt', 'a movie', "
            "'--max-new-tokens', '3', '--temperature', '0.8', '--top-p', '0.9', '--seed', '1']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.split()) == 3


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "--prompt", "x"], "inference directory not found"),
    (["{tmp}", "--prompt", "x"], "inference.json: missing"),
    (["{dir}", "--prompt", "the", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["{dir}", "--prompt", "the", "--threads", "-1"], "threads must be >= 0"),
    (["{dir}", "--prompt", ""], "the prompt is empty"),
])
def test_cli_errors_are_one_line(args, message, exported, tmp_path):
    fill = {"tmp": tmp_path, "dir": exported("llama")[1]}
    proc = subprocess.run([sys.executable, "-m", "pocketzo", "generate", *[a.format(**fill) for a in args]],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketzo: error:") and message in lines[0]
