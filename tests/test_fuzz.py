"""Bad input, fuzzed with hypothesis: every case ends in a one-line error (or a clean run), never a traceback,
and a failed `train` leaves no run directory behind."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketzo.cli import main

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow], derandomize=True)


def _run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])  # any exception escaping main() fails the test
    return code, err.getvalue()


def _assert_clean(code: int, err: str) -> None:
    assert code in (0, 1), err
    if code:
        last = err.strip().splitlines()[-1]
        assert last.startswith("pocketzo: error: ") and "Traceback" not in err, err


@pytest.fixture(scope="module")
def sandbox(bundles, sentiment_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    pristine = Path(bundles("llama-norms"))
    work = root / "bundle"
    shutil.copytree(pristine, work)
    return {"root": root, "pristine": pristine, "bundle": work, "data": sentiment_files["dev"]}


def _reset(sandbox, name: str) -> Path:
    target = sandbox["bundle"] / name
    shutil.copyfile(sandbox["pristine"] / name, target)
    return target


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                     max_size=4), max_leaves=10)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzzed_manifest(sandbox, data):
    path = _reset(sandbox, "manifest.json")
    manifest = json.loads(path.read_text())
    how = data.draw(st.sampled_from(["drop", "replace", "nested", "truncate", "bytes", "escape"]))
    if how in ("drop", "replace"):
        key = data.draw(st.sampled_from(sorted(manifest)))
        if how == "drop":
            del manifest[key]
        else:
            manifest[key] = data.draw(json_values)
        path.write_text(json.dumps(manifest))
    elif how == "nested":
        for key in ("task", "trainable", "inputs"):
            manifest[key] = data.draw(json_values) if data.draw(st.booleans()) else manifest[key]
        if isinstance(manifest.get("trainable"), list) and manifest["trainable"] \
                and isinstance(manifest["trainable"][0], dict):
            spec = dict(manifest["trainable"][0])
            spec[data.draw(st.sampled_from(["shape", "offset", "dtype", "name"]))] = data.draw(json_values)
            manifest["trainable"][0] = spec
        path.write_text(json.dumps(manifest))
    elif how == "truncate":
        text = path.read_bytes()
        path.write_bytes(text[: data.draw(st.integers(0, len(text) - 1))])
    elif how == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=200)))
    else:
        manifest[data.draw(st.sampled_from(["model_file", "trainable_file", "tokenizer_file", "ort_model_file"]))] = \
            data.draw(st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", "sub/../../x", ""]))
        path.write_text(json.dumps(manifest))
    _assert_clean(*_run(["eval", sandbox["bundle"], "--data", sandbox["data"], "--batch-size", "8"]))


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzzed_safetensors(sandbox, data):
    path = _reset(sandbox, "trainable.safetensors")
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "header", "length"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif how == "header":
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(json_values)
        blob = json.dumps(header).encode()
        raw = bytearray(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    else:
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    _assert_clean(*_run(["eval", sandbox["bundle"], "--data", sandbox["data"], "--batch-size", "8"]))


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzzed_onnx_model(sandbox, data):
    path = _reset(sandbox, "model.onnx")
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 16))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    _assert_clean(*_run(["eval", sandbox["bundle"], "--data", sandbox["data"], "--batch-size", "8"]))


rows = st.one_of(
    st.binary(max_size=300),  # anything, including non-UTF-8
    st.builds(lambda v: json.dumps(v).encode(), json_values),  # JSON of the wrong shape
    st.builds(lambda t, lab: json.dumps({"text": t, "label": lab}).encode(),
              st.text(max_size=400) | st.just("word " * 5000), st.sampled_from(["positive", "negative", "other", 1])),
    st.just(b""), st.just(b"\xff\xfe\x00"),
)


@settings(FUZZ, max_examples=300)
@given(lines=st.lists(rows, max_size=6))
def test_fuzzed_data_for_train_never_leaves_a_broken_run(sandbox, lines):
    data = sandbox["root"] / "fuzz.jsonl"
    data.write_bytes(b"\n".join(lines))
    _reset(sandbox, "manifest.json")
    _reset(sandbox, "trainable.safetensors")
    _reset(sandbox, "model.onnx")
    run = sandbox["root"] / "run"
    shutil.rmtree(run, ignore_errors=True)
    code, err = _run(["train", sandbox["bundle"], "--data", data, "--steps", "1", "--batch-size", "2",
                      "--out", run, "--quiet"])
    _assert_clean(code, err)
    if code:
        assert not run.exists(), "a rejected input must not leave a run directory"
    else:
        assert (run / "weights.safetensors").is_file() and (run / "summary.json").is_file()
