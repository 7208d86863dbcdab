"""Evaluation: mean loss, and for classify accuracy, macro-F1, the AUC of the label scores and the share of
each predicted label, from the loss graph's candidate losses; a label prior fitted on a few training rows
(the free baseline a fine-tune must beat: the zero-shot model with its decision rule recalibrated)."""

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
    # one-vs-rest ROC AUC of the label scores (softmax over the labels of -candidate_loss), averaged over the
    # labels; with two labels the AUC of the margin. A gain here is better judgement, not a moved threshold.
    auc: float | None = None
    predicted_shares: tuple[float, ...] | None = None  # the share of rows predicted as each label
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


def roc_auc(scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_]) -> float | None:
    """P(score of a positive row > score of a negative row), ties counting one half (Mann-Whitney U, from
    average ranks); None without both kinds of row."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends, strict=True):  # tied scores share their average rank (1-based)
        ranks[order[a:b]] = (a + b + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def label_auc(candidate_loss: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> float | None:
    """Mean over the labels present (and absent somewhere) of the one-vs-rest AUC of the label's softmax score."""
    logits = -candidate_loss
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    aucs = [a for c in range(candidate_loss.shape[1]) if (a := roc_auc(probs[:, c], y == c)) is not None]
    return float(np.mean(aucs)) if aucs else None


def fit_label_prior(session: TrainingSession | GradientSession, data: Dataset,
                    rows: int = 64) -> npt.NDArray[np.float64]:
    """Per-label offsets subtracted from ``candidate_loss`` before the argmin, from ``rows`` rows of ``data``
    drawn with a fixed seed (a file sorted by label gives a fair sample too): each label's mean candidate loss
    over them (the model's own preference for the label, whatever the text) plus the log of the label's share
    among them (add-one smoothed): the decision is then argmax of log p(label | text) - mean log p(label) +
    log prior(label), the data's prior in place of the model's. Costs one forward pass of ``rows`` rows."""
    task = session.bundle.task
    if task.kind != "classify":
        raise ValueError("a label prior needs a classify bundle")
    idx = np.sort(np.random.default_rng(0).choice(len(data), min(rows, len(data)), replace=False))
    b = data.batch(idx)
    loss = np.asarray(session.run(b.input_ids, b.attention_mask, b.labels, ("candidate_loss",))["candidate_loss"],
                      np.float64)
    counts = np.bincount(data.classes[idx], minlength=len(task.labels)) + 1.0
    return loss.mean(axis=0) + np.log(counts / counts.sum())


def evaluate(session: TrainingSession | GradientSession, data: Dataset, batch_size: int = 32,
             label_offsets: npt.NDArray[np.float64] | None = None) -> EvalResult:
    """One pass over ``data`` in length-sorted batches (less padding); the prediction of a classify
    row is the label with the lowest loss (``candidate_loss``, less ``label_offsets`` when given: see
    ``fit_label_prior``), as in MeZO's prompt classification."""
    task = session.bundle.task
    order = np.argsort(data.lengths(), kind="stable")
    losses = np.empty(len(data), np.float64)
    weights = np.ones(len(data), np.float64)
    scores = np.zeros((len(data), len(task.labels)), np.float64)
    outputs = ("example_loss", "candidate_loss") if task.kind == "classify" else ("example_loss",)
    passes = 0
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        b = data.batch(idx)
        out = session.run(b.input_ids, b.attention_mask, b.labels, outputs)
        passes += 1
        losses[idx] = out["example_loss"]
        if task.kind == "classify":
            scores[idx] = out["candidate_loss"]
        else:  # weight each row by its number of predicted tokens
            weights[idx] = (b.labels[:, 1:] != IGNORE).sum(axis=1)
    loss = float(np.sum(losses * weights) / np.sum(weights))
    if task.kind == "classify":
        y, n_labels = data.classes, len(task.labels)
        if label_offsets is not None:
            scores -= label_offsets
        preds = np.argmin(scores, axis=1)
        shares = tuple(float(x) for x in np.bincount(preds, minlength=n_labels) / len(data))
        return EvalResult(len(data), loss, float(np.mean(preds == y)), macro_f1(y, preds, n_labels),
                          label_auc(scores, y), shares, forward_passes=passes)
    return EvalResult(len(data), loss, perplexity=math.exp(min(loss, 700.0)), forward_passes=passes)
