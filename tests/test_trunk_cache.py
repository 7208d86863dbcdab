"""train --cache-trunk: the training set's trunk outputs computed once (float16, memory-mapped, checksummed,
resumable), the refusals, and training on the head alone."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
from conftest import resume_without_the_newest_checkpoint

from pocketzo.errors import PocketzoError
from pocketzo.runtime import Bundle, FlatParameters, SessionConfig
from pocketzo.runtime import trunk_cache as tc
from pocketzo.runtime.data import TextEncoder
from pocketzo.runtime.split_session import SplitSession
from pocketzo.zo_trainer import Method, RunPolicy, read_log, train
from pocketzo.zo_trainer.trainer import make_trainer


def _open(name, bundles, data_path, directory, **kw):
    bundle = Bundle(bundles(name))
    session = SplitSession(bundle, SessionConfig(threads=1))
    data = TextEncoder(bundle).dataset(data_path)
    return session, data, tc.open_trunk_cache(directory, session, data, progress=False, **kw)


def test_the_cache_holds_each_rows_trunk_output_in_float16(bundles, sentiment_files, tmp_path):
    session, data, cache = _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "c")
    assert cache.hidden.dtype == np.float16 and cache.hidden.shape[0] == int(data.lengths().sum())
    b = data.batch(np.array([5, 3, 200, 17]))
    live = session.trunk(b.input_ids, b.attention_mask)
    cached = cache.hidden_of(b.rows, b.input_ids.shape[1])
    real = b.attention_mask.astype(bool)
    np.testing.assert_allclose(cached[real], live[real], rtol=1e-3, atol=1e-3)  # float16 rounding
    assert not cached[~real].any()  # padded positions read zeros
    want = session.run_head(live, b.attention_mask, b.labels, ["example_loss"])["example_loss"]
    got = session.run_head(cached, b.attention_mask, b.labels, ["example_loss"])["example_loss"]
    np.testing.assert_allclose(got, want, atol=1e-3)
    state = json.loads((tmp_path / "c" / tc.STATE_FILE).read_text())
    assert len(state["chunks"]) == -(-len(data) // tc.CHUNK_ROWS)


@pytest.mark.parametrize("dies_at", [1, 5])  # in the first chunk, and after four were written
def test_a_killed_build_continues_where_it_stopped(dies_at, bundles, sentiment_files, tmp_path):
    session, data, _ = _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "whole")
    trunk, calls = session.trunk, []

    def dies(*a):
        calls.append(1)
        if len(calls) == dies_at:
            raise KeyboardInterrupt  # as a kill during this chunk would leave it
        return trunk(*a)

    session.trunk = dies
    with pytest.raises(KeyboardInterrupt):
        tc.open_trunk_cache(tmp_path / "killed", session, data, progress=False)
    assert len(json.loads((tmp_path / "killed" / tc.STATE_FILE).read_text())["chunks"]) == dies_at - 1
    session.trunk = trunk
    rebuilt = tc.open_trunk_cache(tmp_path / "killed", session, data, progress=False)
    assert (tmp_path / "killed" / tc.HIDDEN_FILE).read_bytes() == (tmp_path / "whole" / tc.HIDDEN_FILE).read_bytes()
    assert rebuilt.hidden.shape[0] == int(data.lengths().sum()) and rebuilt.build_seconds > 0


def test_a_cache_of_other_inputs_or_a_torn_file_is_refused(bundles, sentiment_files, tmp_path):
    _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "c")
    with pytest.raises(PocketzoError, match="another data file"):
        _open("llama-lora-split", bundles, sentiment_files["dev"], tmp_path / "c")
    with pytest.raises(PocketzoError, match="another bundle's trunk graph"):
        _open("bert-bitfit-split", bundles, sentiment_files["train"], tmp_path / "c")
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "c", torn)
    with open(torn / tc.HIDDEN_FILE, "r+b") as f:
        f.seek(1000)
        f.write(b"\x7f\x7f")  # a changed byte in chunk 0
    with pytest.raises(PocketzoError, match="chunk 0 does not match its checksum"):
        _open("llama-lora-split", bundles, sentiment_files["train"], torn)
    with open(torn / tc.HIDDEN_FILE, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(PocketzoError, match="a torn file"):
        _open("llama-lora-split", bundles, sentiment_files["train"], torn)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PocketzoError, match="not a trunk cache"):
        _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "other")


def test_a_cache_too_large_for_the_disk_or_the_budget_is_refused(bundles, sentiment_files, tmp_path, monkeypatch):
    with pytest.raises(PocketzoError, match="more than --memory-budget"):
        _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "c", budget_bytes=1000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(tc.shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(PocketzoError, match="MB free"):
        _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "d")
    assert not (tmp_path / "d" / tc.HIDDEN_FILE).exists()


def test_training_on_the_cache_runs_no_trunk_and_resumes_bit_for_bit(bundles, sentiment_files, tmp_path):
    cfg = Method(steps=30, lr=5e-2, eps=1e-2, batch_size=8, seed=3)
    bundle = bundles("llama-lora-split")
    policy = RunPolicy(threads=1, checkpoint_every=10, progress=False, cache_trunk=str(tmp_path / "cache"))
    summary = train(bundle, sentiment_files["train"], tmp_path / "run", cfg, policy=policy,
                    eval_path=sentiment_files["dev"])
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"]
    assert summary["trunk_cache"]["build_seconds"] > 0 and summary["trunk_cache"]["rows"] == 256
    trained = FlatParameters.from_bundle(Bundle(bundle), tmp_path / "run" / "weights.safetensors")
    resumed, again = resume_without_the_newest_checkpoint(bundle, sentiment_files["train"], tmp_path / "run2", cfg,
                                                          policy, sentiment_files["dev"])
    assert again["trunk_cache"]["build_seconds"] == 0  # the cache was complete: nothing rebuilt
    assert len(read_log(tmp_path / "run2" / "log.bin")) == 30
    assert np.array_equal(resumed, trained.buffer)
    # the steps ran on the head alone
    session, data, cache = _open("llama-lora-split", bundles, sentiment_files["train"], tmp_path / "cache")
    session.trunk = None  # any trunk run would fail
    trainer = make_trainer(session, cfg, 1, cache)
    record = trainer.step(0, data.batch(np.arange(8)))
    assert record.status == "ok" and record.directions[0].loss_minus is not None


@pytest.mark.parametrize("bundle, cache, more, match", [
    ("llama-lora", "cache", {}, "needs a split bundle"),
    ("llama-lora-split", "cache", {"split": False}, "not with --no-split"),
    ("llama-lora-split", "run/cache", {}, "inside the run directory"),
])
def test_cache_trunk_is_refused_where_it_cannot_work(bundle, cache, more, match, bundles, sentiment_files,
                                                     tmp_path):
    policy = RunPolicy(threads=1, progress=False, cache_trunk=str(tmp_path / cache), **more)
    with pytest.raises(PocketzoError, match=match):
        train(bundles(bundle), sentiment_files["train"], tmp_path / "run", Method(steps=1, batch_size=4),
              policy=policy)
    assert not (tmp_path / cache).exists()  # refused before anything was built
