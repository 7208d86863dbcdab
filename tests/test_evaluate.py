"""Classification metrics beyond accuracy: the label AUC and the label prior (the recalibrated zero-shot rule)."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from pocketzo.cli import main
from pocketzo.zo_trainer.evaluate import label_auc, macro_f1, roc_auc


def _pairwise_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg)]
    return float(np.mean(wins))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(np.float64)  # many ties
    positive = rng.random(40) < 0.4
    assert roc_auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive), abs=1e-12)
    assert roc_auc(-scores, positive) == pytest.approx(1 - _pairwise_auc(scores, positive), abs=1e-12)
    assert roc_auc(scores, np.zeros(40, bool)) is None


def test_label_auc_of_two_labels_is_the_auc_of_the_margin_and_ignores_a_shift():
    rng = np.random.default_rng(0)
    loss = rng.normal(size=(50, 2))
    y = rng.integers(0, 2, 50)
    margin = loss[:, 0] - loss[:, 1]  # large: label 1 is likelier
    assert label_auc(loss, y) == pytest.approx(roc_auc(margin, y == 1), abs=1e-12)
    assert label_auc(loss - np.array([0.7, -0.3]), y) == pytest.approx(label_auc(loss, y), abs=1e-12)
    perfect = np.where(y[:, None] == np.arange(2), 0.0, 5.0)
    assert label_auc(perfect, y) == 1.0
    assert macro_f1(y, y, 2) == 1.0


class _FixedScores:
    """A stand-in session whose candidate losses are a function of each row's first token: row i scores
    ``loss[i]``, so what the decision rule does to them is known."""

    def __init__(self, loss: np.ndarray):
        from types import SimpleNamespace

        self.loss = loss
        self.bundle = SimpleNamespace(task=SimpleNamespace(kind="classify", labels=("negative", "positive")))

    def run(self, input_ids, attention_mask, labels, outputs):
        rows = input_ids[:, 0]
        return {"example_loss": self.loss[rows, labels], "candidate_loss": self.loss[rows]}


def test_the_label_prior_undoes_a_bias_toward_one_label_and_keeps_the_ranking():
    from pathlib import Path

    from pocketzo.runtime.data import Dataset
    from pocketzo.zo_trainer.evaluate import evaluate, fit_label_prior

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    signal = np.where(y == 1, 1.0, -1.0) + rng.normal(scale=1.5, size=400)  # judgement: AUC well above 0.5
    loss = np.stack([1.0 + signal / 2, 1.0 - signal / 2 + 2.0], axis=1)  # and a strong bias toward "negative"
    data = Dataset(Path("rows"), tuple(np.array([i, 5], np.int64) for i in range(400)), 0, 0, classes=y)
    session = _FixedScores(loss)
    plain = evaluate(session, data, 64)
    offsets = fit_label_prior(session, data, 64)
    calibrated = evaluate(session, data, 64, offsets)
    assert plain.predicted_shares[1] < 0.2  # the bias: "positive" is rarely chosen
    assert abs(calibrated.predicted_shares[1] - np.mean(y)) < 0.1
    assert calibrated.accuracy > plain.accuracy + 0.15
    assert calibrated.auc == pytest.approx(plain.auc, abs=1e-12) and plain.auc > 0.75
    # a prior of 3 to 1 in the fitted rows moves the decision toward the frequent label
    skewed = Dataset(Path("rows"), data.ids, 0, 0, classes=np.where(rng.random(400) < 0.75, 0, 1))
    toward_negative = evaluate(session, data, 64, fit_label_prior(session, skewed, 64))
    assert toward_negative.predicted_shares[0] > calibrated.predicted_shares[0]


def test_eval_reports_auc_and_shares_and_calibrates_from_a_file(bundles, sentiment_files, capsys):
    b = str(bundles("llama-classify"))
    assert main(["eval", b, "--data", str(sentiment_files["dev"]), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", b, "--data", str(sentiment_files["dev"]), "--json", "--calibrate",
                 str(sentiment_files["train"]), "--calibrate-rows", "64"]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert sum(plain["predicted_shares"]) == pytest.approx(1.0) and 0.0 <= plain["auc"] <= 1.0
    assert len(calibrated["label_offsets"]) == 2 and "label_offsets" not in plain
    # moving the threshold leaves the ranking, hence the AUC, as it was
    assert calibrated["auc"] == pytest.approx(plain["auc"], abs=1e-9)
