"""Evaluation: mean loss, and for classify accuracy and macro-F1, computed in the loss graph."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from pocketzo.runtime.data import IGNORE, Dataset
from pocketzo.runtime.gradient_session import GradientSession
from pocketzo.runtime.session import TrainingSession


@dataclass(frozen=True)
class EvalResult:
    n: int
    loss: float  # classify: mean example loss; causal-lm: mean over predicted tokens
    accuracy: float | None = None
    macro_f1: float | None = None
    perplexity: float | None = None
    forward_passes: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def macro_f1(y_true: npt.NDArray[np.int64], y_pred: npt.NDArray[np.int64], n_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both counts as 1."""
    scores = []
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        denom = int(np.sum(y_pred == c)) + int(np.sum(y_true == c))
        scores.append(1.0 if denom == 0 else 2 * tp / denom)
    return float(np.mean(scores))


def evaluate(session: TrainingSession | GradientSession, data: Dataset, batch_size: int = 32) -> EvalResult:
    """One pass over ``data`` in length-sorted batches (less padding); the prediction of a classify
    row is the label with the lowest loss (``candidate_loss``), as in MeZO's prompt classification."""
    task = session.bundle.task
    order = np.argsort(data.lengths(), kind="stable")
    losses = np.empty(len(data), np.float64)
    weights = np.ones(len(data), np.float64)
    preds = np.empty(len(data), np.int64)
    outputs = ("example_loss", "candidate_loss") if task.kind == "classify" else ("example_loss",)
    passes = 0
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        b = data.batch(idx)
        out = session.run(b.input_ids, b.attention_mask, b.labels, outputs)
        passes += 1
        losses[idx] = out["example_loss"]
        if task.kind == "classify":
            preds[idx] = np.argmin(out["candidate_loss"], axis=1)
        else:  # weight each row by its number of predicted tokens
            weights[idx] = (b.labels[:, 1:] != IGNORE).sum(axis=1)
    loss = float(np.sum(losses * weights) / np.sum(weights))
    if task.kind == "classify":
        y = data.classes
        return EvalResult(len(data), loss, float(np.mean(preds == y)), macro_f1(y, preds, len(task.labels)),
                          forward_passes=passes)
    return EvalResult(len(data), loss, perplexity=math.exp(min(loss, 700.0)), forward_passes=passes)
