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
