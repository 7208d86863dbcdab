"""Labelled text rows as a balanced, deduplicated train/dev/test split, and its JSONL files.

A data set's reader (``rotten_tomatoes``, ``tweets``) gives ``(text, label)`` rows; ``split_balanced``
normalizes and deduplicates them and draws the same number of rows from every label for test and dev,
and for train as many as the smallest label has left. The split depends only on the set of rows and the
seed, never on their order.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pocketzo._io import atomic_open
from pocketzo.errors import AssetError

Row = tuple[str, str]
"""One labelled example: ``(text, label)``."""


@dataclass(frozen=True)
class SplitConfig:
    """How the balanced train/dev/test split is drawn."""

    seed: int
    n_test_per_class: int
    n_dev_per_class: int

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


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

    def parts(self) -> dict[str, tuple[Row, ...]]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def summary(self) -> dict[str, Any]:
        """The split config, the counts per part and label, and how many rows were dropped and why."""
        parts = self.parts()
        return {
            **self.config.to_json(),
            "counts": {name: {**_label_counts(rows), "total": len(rows)} for name, rows in parts.items()},
            "dropped": {
                "empty": self.deduped.n_empty,
                "duplicates": self.deduped.n_duplicates,
                "conflicting_texts": self.deduped.n_conflicting_texts,
                "train_downsampled": len(self.deduped.rows) - sum(len(rows) for rows in parts.values()),
            },
        }


# --------------------------------------------------------------------------- dedupe and split


def normalize_text(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def dedupe_rows(rows: Iterable[Row]) -> Deduped:
    """Normalize texts, drop empty ones, keep one copy of each text, drop texts with two labels."""
    labels_of: dict[str, set[str]] = {}
    n_input = n_empty = n_pairs = 0
    for text, label in rows:
        n_input += 1
        norm = normalize_text(text)
        if not norm:
            n_empty += 1
            continue
        labels = labels_of.setdefault(norm, set())
        n_pairs += label not in labels
        labels.add(label)
    kept = sorted((label, text) for text, labels in labels_of.items() if len(labels) == 1 for label in labels)
    return Deduped(
        rows=tuple((text, label) for label, text in kept),
        n_input=n_input,
        n_empty=n_empty,
        n_duplicates=n_input - n_empty - n_pairs,
        n_conflicting_texts=sum(1 for labels in labels_of.values() if len(labels) > 1),
    )


def split_balanced(rows: Iterable[Row], config: SplitConfig) -> Split:
    """Deduplicate ``rows`` and draw a balanced train/dev/test split, deterministically.

    Each class gives ``n_test_per_class`` rows to test and ``n_dev_per_class`` to dev; train
    takes the same number from every class (the smallest class's remainder), so larger classes
    are downsampled. The result depends only on the set of rows and the seed, not on their order.
    """
    deduped = dedupe_rows(rows)
    by_label: dict[str, list[str]] = {}
    for text, label in deduped.rows:
        by_label.setdefault(label, []).append(text)
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


def _label_counts(rows: Sequence[Row]) -> dict[str, int]:
    return dict(sorted(Counter(label for _, label in rows).items()))


# --------------------------------------------------------------------------- writing


def write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    """Write ``rows`` as ``{"text": ..., "label": ...}`` lines, atomically."""
    with atomic_open(path, "w") as handle:
        for text, label in rows:
            handle.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
