"""A training set's trunk outputs, computed once (``train --cache-trunk DIR``), so that training runs only the head.

A split bundle's trunk has no trainable input: its output for a row never changes during training. The
cache stores it for every row of the training file, as float16, in a memory-mapped file. ``DIR`` holds:

    hidden.f16          float16 (tokens, hidden size): each row's real (unpadded) positions, rows in file order
    trunk_cache.json    what the cache was made from (by sha256: the trunk graph the session runs, the data
                        file, the rows' token ids; rows, tokens, hidden size) and the chunks written so far,
                        each with the sha256 of its bytes

It is built in chunks of ``CHUNK_ROWS`` rows. A chunk is listed only after its bytes are flushed to the
file, so a build killed at any point continues where it stopped. A listed chunk whose bytes no longer
match its checksum (a torn or changed file) is refused, as is a cache made from another trunk graph, data
file or token ids (another template, tokenizer or max length). A batch read from the cache has zeros at
its padded positions, which the head masks exactly as the whole graph masks its own padded positions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo._io import sha256_file, write_json
from pocketzo._progress import Progress
from pocketzo.errors import PocketzoError
from pocketzo.runtime.data import Dataset
from pocketzo.runtime.split_session import SplitSession

FORMAT, VERSION = "pocketzo-trunk-cache", 1
HIDDEN_FILE, STATE_FILE = "hidden.f16", "trunk_cache.json"
CHUNK_ROWS = 16
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class TrunkCache:
    """The cached trunk outputs of a data set's rows (``open_trunk_cache``)."""

    directory: Path
    offsets: npt.NDArray[np.int64]  # (rows + 1,): row i's positions are hidden[offsets[i]:offsets[i + 1]]
    hidden: np.memmap  # (tokens, hidden size) float16
    build_seconds: float = 0.0  # spent computing chunks when it was opened (0: it was complete)

    @property
    def nbytes(self) -> int:
        return int(self.hidden.nbytes)

    def hidden_of(self, indices: npt.NDArray[np.int64], seq: int) -> npt.NDArray[np.float32]:
        """The trunk's output for the rows at ``indices``, right-padded with zeros to ``seq``: (rows, seq, H)."""
        out = np.zeros((len(indices), seq, self.hidden.shape[1]), dtype=np.float32)
        for j, i in enumerate(indices):
            start, end = self.offsets[i], self.offsets[i + 1]
            out[j, : end - start] = self.hidden[start:end]
        return out


def cache_bytes(session: SplitSession, data: Dataset) -> int:
    """The size of ``data``'s trunk cache, before it is built."""
    return int(data.lengths().sum()) * session.hidden_size * 2


def open_trunk_cache(directory: str | Path, session: SplitSession, data: Dataset, budget_bytes: int | None = None,
                     progress: bool = True) -> TrunkCache:
    """The cache of ``data``'s trunk outputs in ``directory``: checked and opened, continued, or built."""
    directory = Path(directory)
    identity = _identity(session, data)
    lengths = data.lengths()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    size = cache_bytes(session, data)
    state_path, hidden_path = directory / STATE_FILE, directory / HIDDEN_FILE
    chunks = _chunks_done(directory, identity)
    n_chunks = -(-len(lengths) // CHUNK_ROWS)
    _say(f"{directory}: {len(lengths):,} rows, {int(offsets[-1]):,} tokens, {size / 1e6:,.1f} MB as float16 "
         f"({len(chunks)} of {n_chunks} chunks done)")
    if budget_bytes is not None and size > budget_bytes:
        raise PocketzoError(f"{directory}: the trunk cache takes {size / 1e6:,.0f} MB, more than --memory-budget "
                            f"({budget_bytes / 1e6:,.0f} MB): training reads all of it each epoch; train without "
                            "--cache-trunk or on fewer rows")
    have = hidden_path.stat().st_size if hidden_path.is_file() else 0
    if chunks and have != size:
        raise PocketzoError(f"{hidden_path}: {have:,} bytes where the cache needs {size:,} (a torn file); delete "
                            f"{directory} to rebuild it")
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if size - have > free:
        raise PocketzoError(f"{directory}: the trunk cache needs {size / 1e6:,.0f} MB and the disk has "
                            f"{free / 1e6:,.0f} MB free; free some space or choose another --cache-trunk directory")
    if not chunks:  # the state first: a build killed from here on is recognised and continued
        write_json(state_path, {**identity, "chunks": {}})
    if have != size:
        with open(hidden_path, "r+b" if have else "wb") as f:
            _reserve(f, size)
    hidden = np.memmap(hidden_path, dtype=np.float16, mode="r+", shape=(int(offsets[-1]), session.hidden_size))
    _verify(hidden, offsets, chunks, hidden_path)
    todo = [c for c in range(n_chunks) if str(c) not in chunks]
    start = time.perf_counter()
    with Progress(len(todo), "trunk cache", enabled=progress and bool(todo)) as bar:
        for c in todo:
            rows = np.arange(c * CHUNK_ROWS, min((c + 1) * CHUNK_ROWS, len(lengths)))
            b = data.batch(rows)
            out = session.trunk(b.input_ids, b.attention_mask)  # (rows, T, H) float32
            real = out[b.attention_mask.astype(bool)]
            if not np.isfinite(real).all() or np.abs(real).max() > FLOAT16_MAX:
                raise PocketzoError(f"{directory}: the trunk's outputs on rows {rows[0]}..{rows[-1]} are not finite "
                                    f"or exceed float16's range ({np.abs(real).max():.3g}); train without "
                                    "--cache-trunk")
            for j, i in enumerate(rows):
                hidden[offsets[i]:offsets[i + 1]] = out[j, : lengths[i]]
            hidden.flush()  # the bytes are on disk before the chunk is listed
            chunks[str(c)] = _chunk_sha256(hidden, offsets, c)
            write_json(state_path, {**identity, "chunks": chunks})
            bar.update(1)
    return TrunkCache(directory, offsets, np.memmap(hidden_path, dtype=np.float16, mode="r", shape=hidden.shape),
                      time.perf_counter() - start if todo else 0.0)


def _identity(session: SplitSession, data: Dataset) -> dict:
    """What a cache's bytes depend on: the trunk graph the session runs (and its external data), and the rows'
    token ids (so the template, tokenizer and max length too); the data file by sha256 names the usual cause."""
    graph = [session.trunk_path] + [p for p in (session.trunk_path.with_name(session.trunk_path.name + ".data"),)
                                    if p.is_file()]
    tokens = hashlib.sha256()
    for ids in data.ids:
        tokens.update(np.int64(len(ids)).tobytes())
        tokens.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return {"format": FORMAT, "version": VERSION, "trunk_sha256": _sha256_files(graph),
            "data_sha256": sha256_file(data.path), "tokens_sha256": tokens.hexdigest(), "rows": len(data.ids),
            "tokens": int(data.lengths().sum()), "hidden_size": session.hidden_size}


def _chunks_done(directory: Path, identity: dict) -> dict[str, str]:
    """The chunks a cache in ``directory`` has written, after checking it was made from the same inputs."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        if directory.exists() and any(directory.iterdir()):
            raise PocketzoError(f"{directory}: exists and is not a trunk cache (no {STATE_FILE}); choose an empty or "
                                "new --cache-trunk directory")
        return {}
    state = _read_state(state_path)
    for key, what in (("format", "another format"), ("version", "another format version"),
                      ("trunk_sha256", "another bundle's trunk graph"), ("data_sha256", "another data file"),
                      ("tokens_sha256", "other token ids (another template, tokenizer or max length)"),
                      ("hidden_size", "another hidden size")):
        if state.get(key) != identity[key]:
            raise PocketzoError(f"{directory}: a trunk cache made from {what} ({key} differs); delete it or choose "
                                "another --cache-trunk directory")
    chunks = state.get("chunks")
    if not isinstance(chunks, dict):
        raise PocketzoError(f"{state_path}: no chunk list; delete {directory} to rebuild the trunk cache")
    return dict(chunks)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        sha256_file(p, h)
    return h.hexdigest()


def _reserve(f, size: int) -> None:
    """Allocate the file's blocks now (posix_fallocate), so a full disk fails here and not as SIGBUS on a write
    through the memory map; where the call is missing, a sparse file of the size."""
    f.truncate(size)
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            raise PocketzoError(f"{f.name}: cannot reserve {size / 1e6:,.0f} MB for the trunk cache "
                                f"({e.strerror}); free some disk space") from None


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PocketzoError(f"{path}: unreadable ({e}); delete {path.parent} to rebuild the trunk cache") from None
    if not isinstance(state, dict):
        raise PocketzoError(f"{path}: not a trunk cache state; delete {path.parent} to rebuild the trunk cache")
    return state


def _chunk_sha256(hidden: np.memmap, offsets: npt.NDArray[np.int64], chunk: int) -> str:
    start = offsets[chunk * CHUNK_ROWS]
    end = offsets[min((chunk + 1) * CHUNK_ROWS, len(offsets) - 1)]
    return hashlib.sha256(np.ascontiguousarray(hidden[start:end]).tobytes()).hexdigest()


def _verify(hidden: np.memmap, offsets: npt.NDArray[np.int64], chunks: dict[str, str], path: Path) -> None:
    for key, want in chunks.items():
        if not key.isdigit() or int(key) * CHUNK_ROWS >= len(offsets) - 1 or \
                _chunk_sha256(hidden, offsets, int(key)) != want:
            raise PocketzoError(f"{path}: chunk {key} does not match its checksum (the file was torn or changed); "
                                f"delete {path.parent} to rebuild the trunk cache")


def _say(msg: str) -> None:
    print(f"[trunk cache] {msg}", file=sys.stderr, flush=True)

