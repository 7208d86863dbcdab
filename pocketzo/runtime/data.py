"""JSONL (or plain text) data -> token ids -> padded batches, as the bundle's task expects them.

Rows are ``{"text": ...}`` (causal-lm; an optional ``"prompt"`` prefix gets no loss) or
``{"text": ..., "label": ...}`` (classify; ``label`` is one of the bundle's labels), one JSON
object per line (JSON Lines).

Which format a file is in is decided by its content, never by its name:

- its first non-empty line is a JSON object: JSON Lines, and every line must be a row;
- the whole file is one JSON array (or one object spread over several lines): refused, with a
  hint to write one object per line (``jq -c '.[]' rows.json > rows.jsonl``);
- anything else is plain UTF-8 text (causal-lm only; classify needs rows): the whole text is
  tokenized once and cut into consecutive windows of ``max_length`` tokens (a user's notes,
  messages or documents, as they are). Later lines that look like JSON are text too.
  Only a file named ``*.json``, ``*.jsonl`` or ``*.ndjson`` (any case) is refused instead: its
  name says rows, so plain text in it is a mistake, not something to train on.

A UTF-8 byte order mark is dropped. Batches are right-padded to their longest row.
``tokenizers`` is imported here only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo.errors import BundleError, DataError
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.manifest import TaskSpec

IGNORE = -100
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")  # names that promise rows
_BOM = b"\xef\xbb\xbf"
_FIRST_LINE = re.compile(rb"\S[^\r\n]*")  # from the first non-blank byte to the end of its line


@dataclass(frozen=True)
class Batch:
    input_ids: npt.NDArray[np.int64]  # (B, T)
    attention_mask: npt.NDArray[np.int64]  # (B, T)
    labels: npt.NDArray[np.int64]  # (B, T) token targets for causal-lm, (B,) class indices for classify
    rows: npt.NDArray[np.int64] | None = None  # (B,) the data set's row indices, when it came from one


@dataclass(frozen=True)
class Dataset:
    """Tokenized rows of one file: per-row token targets (causal-lm) or class indices (classify)."""

    path: Path
    ids: tuple[npt.NDArray[np.int64], ...]
    n_truncated: int
    pad_token_id: int
    token_labels: tuple[npt.NDArray[np.int64], ...] | None = None  # causal-lm
    classes: npt.NDArray[np.int64] | None = None  # classify

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int] | npt.NDArray[np.integer]) -> Batch:
        """Right-pad the rows at ``indices`` to the longest of them."""
        rows = [self.ids[i] for i in indices]
        t = max(len(r) for r in rows)
        ids = np.full((len(rows), t), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), t), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        if self.classes is not None:
            labels = self.classes[np.asarray(indices)]
        else:
            labels = np.full((len(rows), t), IGNORE, dtype=np.int64)
            for j, i in enumerate(indices):
                labels[j, : len(self.token_labels[i])] = self.token_labels[i]
        return Batch(ids, mask, labels, np.asarray(indices, dtype=np.int64))

    def lengths(self) -> npt.NDArray[np.int64]:
        return np.array([len(r) for r in self.ids], dtype=np.int64)


def read_data(path: str | Path) -> bytes:
    """The bytes of a data file, without a UTF-8 byte order mark. Errors say what to do."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found; check the path") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); pass a readable data file") from None
    return raw.removeprefix(_BOM)


def _parse(line: str) -> tuple[object, str]:
    """``(value, "")`` for one JSON text, or ``(None, why not)``."""
    try:
        return json.loads(line), ""
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg}"
    except (ValueError, RecursionError) as e:  # e.g. a 5,000-digit number, or [[[[... nested too deep
        return None, f"not valid JSON: {str(e).split(':')[0]}"


def reads_as_rows(path: str | Path, raw: bytes, task: TaskSpec) -> bool:
    """True if the file is read as JSON Lines rows, False if as plain text (causal-lm only), by the
    rule in the module docstring. Raises ``DataError`` for one JSON document (an array of rows, or
    an object over several lines) and for a ``*.json``/``*.jsonl`` file that does not start with a row."""
    path = Path(path)
    first = _FIRST_LINE.search(raw)  # not raw.splitlines(): a plain text file may be large
    if first is None:  # empty: the error speaks of rows or of text, as the task and the name say
        return task.kind == "classify" or path.suffix.lower() in JSON_SUFFIXES
    lineno = len((raw[: first.start()] + b".").splitlines())  # counted as read_jsonl counts lines
    head, why = _parse(first.group().decode("utf-8", "replace"))  # a bad byte is reported row by row later
    if isinstance(head, dict):
        return True
    if first.group()[:1] in (b"[", b"{"):
        whole, _ = _parse(raw.decode("utf-8", "replace"))
        out = f"{path.stem}-rows.jsonl"
        if isinstance(whole, list):
            raise DataError(f"{path}: holds one JSON array, not JSON Lines; write one {{\"text\": ...}} object "
                            f"per line, e.g. jq -c '.[]' {path.name} > {out}")
        if isinstance(whole, dict):
            raise DataError(f"{path}: holds one JSON object over several lines, not JSON Lines; write each "
                            f"{{\"text\": ...}} row on one line, e.g. jq -c . {path.name} > {out}")
    if task.kind == "classify":  # rows or nothing: read_jsonl names the first bad line
        return True
    if path.suffix.lower() in JSON_SUFFIXES:
        raise DataError(f"{path}:{lineno}: not JSON Lines ({why or 'not a JSON object'}); write one "
                        f"{{\"text\": ...}} object per line, or rename it to .txt to train on it as plain text")
    return False


def read_jsonl(path: str | Path, task: TaskSpec, raw: bytes | None = None) -> list[tuple[int, dict]]:
    """Read (unless ``raw`` is given) and check every row; returns ``(line number, row)`` pairs.
    Errors name the file and 1-based line and say what to fix."""
    path = Path(path)
    raw = read_data(path) if raw is None else raw
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):  # bytes: only \n, \r and \r\n end a line
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not valid UTF-8; re-save the file as UTF-8") from None
        row, why = _parse(text)
        if why:
            raise DataError(f"{where}: {why}; each line must be one JSON object")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f'{where}: each row needs a non-empty string "text"')
        if task.kind == "classify" and row.get("label") not in task.labels:
            raise DataError(
                f"{where}: label {row.get('label')!r} is not one of the bundle's labels {list(task.labels)}"
            )
        if "prompt" in row and not isinstance(row["prompt"], str):
            raise DataError(f'{where}: "prompt" must be a string')
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty")
    return rows


class TextEncoder:
    """Turns rows into token ids exactly as the bundle's task was exported."""

    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer  # lazy: only code that tokenizes text needs it

        self.task = bundle.task
        self.pad_token_id = bundle.manifest.pad_token_id
        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
            raise BundleError(f"{bundle.tokenizer_path}: not a valid tokenizer ({e}); re-export the bundle") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if self.task.head == "prompt":
            tail = self.task.template.split("{text}", 1)[1]
            self._tail_len = len(self.tokenizer.encode(tail, add_special_tokens=False).ids) if tail else 0
        elif self.task.head == "head":
            self._closing = self._ids("")[-1:]  # e.g. [SEP]: kept when an encoder input is cut

    def _ids(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def encode(self, row: dict) -> tuple[np.ndarray, np.ndarray | int, bool]:
        """Return ``(ids, target, truncated)`` for one checked row."""
        task, n = self.task, self.task.max_length
        if task.kind == "classify":
            target = task.labels.index(row["label"])
            if task.head == "prompt":
                ids = self._ids(task.template.replace("{text}", row["text"]))
                # Keep the template's tail (the answer cue) when cutting an over-long text.
                cut = len(ids) > n
                if cut:
                    ids = ids[: n - self._tail_len] + ids[len(ids) - self._tail_len :]
            else:
                ids = self._ids(row["text"])
                cut = len(ids) > n
                if cut:
                    ids = ids[: n - len(self._closing)] + self._closing
            return np.asarray(ids, np.int64), target, cut
        prompt = self._ids(row["prompt"]) if row.get("prompt") else []
        text = self._ids(row["text"], special=not prompt)
        ids = prompt + text
        labels = [IGNORE] * len(prompt) + text
        cut = len(ids) > n
        return np.asarray(ids[:n], np.int64), np.asarray(labels[:n], np.int64), cut

    def text_windows(self, path: str | Path, raw: bytes | None = None) -> Dataset:
        """A plain text file (read unless ``raw`` is given) as consecutive ``max_length``-token
        windows (the last one may be shorter), each opening with the tokens the tokenizer adds before a text."""
        path = Path(path)
        raw = read_data(path) if raw is None else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}: not valid UTF-8 at line {line} (byte {e.start}); "
                            "re-save the file as UTF-8") from None
        # What the tokenizer puts before every encoding (Gemma's <bos>; nothing for SmolLM2) starts every
        # window, not only the first: a model trained with a BOS reads text without one as noise.
        opening = self._ids("")
        ids = self._ids(text, special=False)
        n = self.task.max_length - len(opening)
        windows = tuple(np.asarray(opening + ids[i : i + n], np.int64) for i in range(0, len(ids), n)
                        if len(opening) + len(ids) - i >= 2)
        if not windows:
            raise DataError(f"{path}: fewer than 2 tokens of text; nothing to learn from")
        return Dataset(path, windows, 0, self.pad_token_id, token_labels=windows)

    def dataset(self, path: str | Path) -> Dataset:
        """Rows or plain-text windows, decided by the file's content (see the module docstring)."""
        path = Path(path)
        raw = read_data(path)
        if not reads_as_rows(path, raw, self.task):
            return self.text_windows(path, raw)
        rows = read_jsonl(path, self.task, raw)
        encoded = [self.encode(r) for _, r in rows]
        ids = tuple(e[0] for e in encoded)
        n_truncated = sum(e[2] for e in encoded)
        if self.task.kind == "classify":
            return Dataset(path, ids, n_truncated, self.pad_token_id,
                           classes=np.array([e[1] for e in encoded], np.int64))
        for (lineno, _), e in zip(rows, encoded, strict=True):
            if (e[1] != IGNORE).sum() < 2:
                raise DataError(f"{path}:{lineno}: fewer than 2 tokens to learn from; drop the row or "
                                "move text out of its prompt")
        return Dataset(path, ids, n_truncated, self.pad_token_id, token_labels=tuple(e[1] for e in encoded))
