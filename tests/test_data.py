"""Data: rows checked with file and line, truncation keeps the answer cue, padding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocketzo.errors import DataError
from pocketzo.runtime import Bundle
from pocketzo.runtime.data import IGNORE, TextEncoder


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return p


@pytest.mark.parametrize("lines, message", [
    ([json.dumps({"text": "good", "label": "positive"}), json.dumps({"label": "positive"})], r"d\.jsonl:2: .*\"text\""),
    ([json.dumps({"text": "good", "label": "meh"})], r"d\.jsonl:1: label 'meh' is not one of"),
    ([json.dumps({"text": "good", "label": "positive"}), b"{\"text\": \"caf\xe9\"}"], r"d\.jsonl:2: not valid UTF-8"),
    (["{oops"], r"d\.jsonl:1: not valid JSON"),
    ([json.dumps({"text": "   ", "label": "positive"})], r"non-empty"),
    ([""], "no rows"),
])
def test_bad_rows_are_named(bundles, tmp_path, lines, message):
    encoder = TextEncoder(Bundle(bundles("llama-norms")))
    with pytest.raises(DataError, match=message):
        encoder.dataset(_write(tmp_path, lines))


def test_missing_file(bundles, tmp_path):
    with pytest.raises(DataError, match="not found"):
        TextEncoder(Bundle(bundles("llama-norms"))).dataset(tmp_path / "nope.jsonl")


def test_long_prompt_is_cut_but_keeps_the_answer_cue(bundles, tmp_path):
    bundle = Bundle(bundles("llama-classify"))  # max_length 32
    encoder = TextEncoder(bundle)
    long_text = " ".join(["good"] * 100)
    data = encoder.dataset(_write(tmp_path, [json.dumps({"text": long_text, "label": "positive"}),
                                             json.dumps({"text": "bad", "label": "negative"})]))
    assert data.n_truncated == 1
    assert len(data.ids[0]) == bundle.task.max_length
    tail = encoder.tokenizer.encode(" sentiment :", add_special_tokens=False).ids
    assert list(data.ids[0][-len(tail):]) == tail


def test_encoder_cut_keeps_closing_token(bundles, tmp_path):
    encoder = TextEncoder(Bundle(bundles("bert-classify")))
    data = encoder.dataset(_write(tmp_path, [json.dumps({"text": " ".join(["fun"] * 60), "label": "positive"})]))
    sep = encoder.tokenizer.token_to_id("[SEP]")
    assert len(data.ids[0]) == 32 and data.ids[0][-1] == sep and data.n_truncated == 1


def test_causal_batches_pad_right_and_mask_prompt(bundles, tmp_path):
    encoder = TextEncoder(Bundle(bundles("llama-causal")))
    data = encoder.dataset(_write(tmp_path, [json.dumps({"prompt": "review :", "text": "the film was good"}),
                                             json.dumps({"text": "bad film"})]))
    b = data.batch([0, 1])
    assert b.input_ids.shape == (2, 6)
    np.testing.assert_array_equal(b.attention_mask[1], [1, 1, 0, 0, 0, 0])
    assert list(b.labels[0, :2]) == [IGNORE, IGNORE] and (b.labels[0, 2:] != IGNORE).all()
    assert (b.labels[1, 2:] == IGNORE).all()


def test_plain_text_becomes_consecutive_token_windows(bundles, tmp_path):
    bundle = Bundle(bundles("llama-causal"))
    encoder = TextEncoder(bundle)
    words = ("the film was good and the plot is dull . " * 20).split()
    (tmp_path / "notes.txt").write_text(" ".join(words), encoding="utf-8")
    data = encoder.dataset(tmp_path / "notes.txt")
    n = bundle.task.max_length
    assert [len(r) for r in data.ids] == [n] * (len(words) // n) + ([len(words) % n] if len(words) % n else [])
    assert np.array_equal(np.concatenate(data.ids), encoder.tokenizer.encode(" ".join(words)).ids)
    b = data.batch([0])
    assert np.array_equal(b.labels, b.input_ids)  # the graph shifts; every token is a target
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8"):
        encoder.dataset(tmp_path / "bad.txt")


def test_every_plain_text_window_opens_with_the_bos_the_tokenizer_adds(bundles, tmp_path):
    """Gemma's tokenizer puts <bos> before every text, and the model reads text without it as noise: each window
    of a plain text gets it, not only the first, and the text's own tokens still follow in order."""
    from tokenizers import processors

    bundle = Bundle(bundles("llama-causal"))
    encoder = TextEncoder(bundle)
    plain = encoder.tokenizer.encode("the film was good and the plot is dull . " * 20).ids
    bos = 1
    encoder.tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    (tmp_path / "notes.txt").write_text("the film was good and the plot is dull . " * 20, encoding="utf-8")
    data = encoder.dataset(tmp_path / "notes.txt")
    n = bundle.task.max_length
    assert all(r[0] == bos for r in data.ids) and all(len(r) <= n for r in data.ids)
    assert [len(r) for r in data.ids[:-1]] == [n] * (len(data.ids) - 1)
    assert np.array_equal(np.concatenate([r[1:] for r in data.ids]), plain)


# Which format a file is in is decided by its content, not its name (see pocketzo.runtime.data).

ROWS = [{"prompt": "review :", "text": "the film was good"}, {"text": "the plot is dull and boring"}]


def _jsonl(rows):
    return [json.dumps(r) for r in rows]


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.JSONL", "train.ndjson", "train.txt", "train"])
def test_causal_jsonl_rows_are_read_whatever_the_name(bundles, tmp_path, name):
    encoder = TextEncoder(Bundle(bundles("llama-causal")))
    data = encoder.dataset(_write(tmp_path, ["", *_jsonl(ROWS), ""], name))
    tok = encoder.tokenizer
    assert len(data) == 2
    prompt, text = tok.encode("review :").ids, tok.encode("the film was good", add_special_tokens=False).ids
    assert list(data.ids[0]) == prompt + text
    assert list(data.ids[1]) == tok.encode("the plot is dull and boring").ids
    assert tok.token_to_id("<unk>") not in np.concatenate(data.ids)  # no braces, quotes or keys
    assert list(data.token_labels[0][:2]) == [IGNORE, IGNORE]


def test_utf8_bom_is_not_part_of_the_first_row(bundles, tmp_path):
    bom = b"\xef\xbb\xbf"
    causal = TextEncoder(Bundle(bundles("llama-causal"))).dataset(
        _write(tmp_path, [bom + _jsonl(ROWS)[1].encode()], "c.jsonl"))
    assert len(causal) == 1
    classify = TextEncoder(Bundle(bundles("llama-classify"))).dataset(
        _write(tmp_path, [bom + json.dumps({"text": "good", "label": "positive"}).encode()], "k.json"))
    assert list(classify.classes) == [1]


@pytest.mark.parametrize("name, first_line", [
    ("notes.txt", "the film was good"),
    ("notes", "the film was good"),
    ("notes.md", "[ the film ] was good"),  # starts like JSON, is not
    ("notes.TXT", "{ the film } was good"),
])
def test_plain_text_stays_plain_text_whatever_the_name(bundles, tmp_path, name, first_line):
    encoder = TextEncoder(Bundle(bundles("llama-causal")))
    text = "\n".join([first_line, '{"text": "a later row is still text"}', "and the plot is dull ."])
    (tmp_path / name).write_text(text, encoding="utf-8")
    data = encoder.dataset(tmp_path / name)
    assert np.array_equal(np.concatenate(data.ids), encoder.tokenizer.encode(text).ids)


@pytest.mark.parametrize("name, lines, message", [
    ("train.json", [json.dumps(ROWS)], r"train\.json: holds one JSON array.*one .* per line"),
    ("train.json", json.dumps(ROWS, indent=2).splitlines(), r"train\.json: holds one JSON array"),
    ("notes.txt", json.dumps(ROWS, indent=2).splitlines(), r"notes\.txt: holds one JSON array"),
    ("train.json", json.dumps(ROWS[1], indent=2).splitlines(), r"train\.json: holds one JSON object over several"),
    ("train.jsonl", ["", "the film was good"], r"train\.jsonl:2: not JSON Lines \(not valid JSON.*rename it to \.txt"),
    ("train.JSONL", ["the film was good"], r"train\.JSONL:1: not JSON Lines"),
    ("train.json", ['"the film was good"'], r"train\.json:1: not JSON Lines \(not a JSON object\)"),
    ("train.json", [_jsonl(ROWS)[0], "the film was good"], r"train\.json:2: not valid JSON"),
    ("train.txt", [_jsonl(ROWS)[0], "the film was good"], r"train\.txt:2: not valid JSON"),
    ("notes.txt", [json.dumps({"content": "the film"})], r"notes\.txt:1: each row needs a non-empty string \"text\""),
    ("big.jsonl", [json.dumps({"text": "the film"}), "1" * 5000], r"big\.jsonl:2: not valid JSON"),
    ("empty.jsonl", ["", "  "], r"empty\.jsonl: no rows"),
    ("empty.txt", [""], r"empty\.txt: fewer than 2 tokens"),
])
def test_causal_data_that_is_not_what_it_claims_is_refused(bundles, tmp_path, name, lines, message):
    encoder = TextEncoder(Bundle(bundles("llama-causal")))
    with pytest.raises(DataError, match=message):
        encoder.dataset(_write(tmp_path, lines, name))


@pytest.mark.parametrize("name, lines, message", [
    ("train.JSON", [json.dumps({"text": "good", "label": "positive"})], None),
    ("train.txt", [json.dumps({"text": "good", "label": "positive"})], None),
    ("train.json", [json.dumps([{"text": "good", "label": "positive"}])], r"train\.json: holds one JSON array"),
    ("train.txt", ["the film was good"], r"train\.txt:1: not valid JSON"),
    ("train.txt", ["", " "], r"train\.txt: no rows"),
])
def test_classify_data_is_always_jsonl(bundles, tmp_path, name, lines, message):
    encoder = TextEncoder(Bundle(bundles("llama-classify")))
    path = _write(tmp_path, lines, name)
    if message is None:
        assert list(encoder.dataset(path).classes) == [1]
    else:
        with pytest.raises(DataError, match=message):
            encoder.dataset(path)
