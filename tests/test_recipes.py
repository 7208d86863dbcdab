"""The recipe a new run takes when none is named (zo_trainer.recipes): what the bundle can run, the choice among
it, the CLI that says what it chose, and the choice against the measured table (benchmarks/value/*.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pocketzo.cli import main
from pocketzo.runtime import Bundle
from pocketzo.zo_trainer.method import Method
from pocketzo.zo_trainer.recipes import CANDIDATES, DEFAULTS, RECIPES, choose_recipe, gradient_graph

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from report_value import mean_ranks  # noqa: E402 (a benchmark script beside its results)

RESULTS = BENCHMARKS / "value"


@pytest.mark.parametrize("name, graph", [("llama-norms", "none"), ("llama-norms-grad", "all"),
                                         ("llama-lora-grad", "all"), ("llama-norms-hybrid", "top")])
def test_the_gradient_graph_a_bundle_carries(bundles, name, graph):
    assert gradient_graph(Bundle(bundles(name)).manifest) == graph


def test_the_choice_follows_the_gradient_graph_and_the_method():
    for graph in ("none", "top", "all"):
        choice = choose_recipe(graph)
        assert choice.recipe == DEFAULTS[graph] and choice.recipe in CANDIDATES[graph]
        assert DEFAULTS[graph] in choice.reason and "docs/value.md" in choice.reason
    assert choose_recipe("none").settings.get("method", "zo") == "zo"
    assert choose_recipe("all").settings["method"] == "fo" and choose_recipe("top").settings["method"] == "hybrid"
    # --method zo on a gradient bundle takes the ZO default (an fo recipe would be refused with it)
    assert choose_recipe("all", "zo").recipe == DEFAULTS["none"]
    assert choose_recipe("none", "hybrid").recipe == "hybrid-adamw"
    with pytest.raises(ValueError, match="method must be one of"):
        choose_recipe("all", "adam")


def test_every_candidate_needs_no_hand_set_lr():
    """A default never asks the user for --lr: every candidate fixes its own, and each is a valid method."""
    for name in {n for names in CANDIDATES.values() for n in names}:
        assert "lr" in RECIPES[name], name
        Method(steps=1, **RECIPES[name])
    assert "zo-sgd" not in {n for names in CANDIDATES.values() for n in names}  # its lr depends on the tensors


def test_train_says_what_it_chose_and_trains_with_it(bundles, sentiment_files, tmp_path, capsys):
    args = ["--data", str(sentiment_files["train"]), "--steps", "2", "--batch-size", "4", "--quiet"]
    assert main(["train", str(bundles("llama-norms-grad")), "--out", str(tmp_path / "fo"), *args]) == 0
    assert "recipe fo-adamw" in capsys.readouterr().err
    config = json.loads((tmp_path / "fo" / "config.json").read_text())
    assert config["method"]["method"] == "fo" and config["method"]["optimizer"] == "adamw"
    assert main(["train", str(bundles("llama-norms-grad")), "--out", str(tmp_path / "zo"), "--method", "zo",
                 *args]) == 0
    assert f"recipe {DEFAULTS['none']}" in capsys.readouterr().err
    config = json.loads((tmp_path / "zo" / "config.json").read_text())
    assert config["method"]["method"] == "zo" and config["method"]["lr"] == RECIPES[DEFAULTS["none"]]["lr"]
    assert main(["train", str(bundles("llama-norms-grad")), "--out", str(tmp_path / "named"), "--recipe", "zo-sgd",
                 *args]) == 0
    assert "[train] recipe" not in capsys.readouterr().err  # named: nothing chosen


def _result(task: str, recipe: str, minutes: int, score: float) -> dict:
    metric = {"rt": "accuracy", "tweets": "macro_f1", "hamlet": "perplexity"}[task]
    return {"row": f"{task}-{recipe}", "task": task, "stages": [{"minutes": minutes, "eval": {metric: score}}]}


def test_mean_ranks_compare_at_the_latest_shared_reading():
    results = [_result("rt", "a", 5, 0.80), _result("rt", "b", 5, 0.79), _result("rt", "b", 15, 0.90),
               _result("hamlet", "a", 5, 20.0), _result("hamlet", "b", 5, 10.0),  # perplexity: lower wins
               _result("tweets", "a", 5, 0.5)]  # b never ran on tweets: not compared
    ranks, tasks = mean_ranks(results, ("a", "b"))
    assert tasks == ["hamlet", "rt"] and ranks == {"a": 1.5, "b": 1.5}
    ranks, _ = mean_ranks([*results, _result("rt", "a", 15, 0.85)], ("a", "b"))  # now compared at 15 minutes
    assert ranks == {"a": 2.0, "b": 1.0}
    ranks, _ = mean_ranks([_result("rt", "a", 5, 0.7), _result("rt", "b", 5, 0.7)], ("a", "b"))
    assert ranks == {"a": 1.5, "b": 1.5}


@pytest.mark.parametrize("graph", ["none", "top", "all"])
def test_the_default_is_the_best_ranked_recipe_measured(graph):
    """DEFAULTS must follow the committed results of `make bench-value`: a new measurement that ranks another
    recipe higher fails here until the table (and docs/value.md's text) is updated."""
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("*.json"))]
    ranks, tasks = mean_ranks(results, CANDIDATES[graph])
    assert tasks, f"no task has a result for every recipe of {CANDIDATES[graph]}: the default is not measured"
    best = min(ranks.values())
    assert ranks[DEFAULTS[graph]] == best, f"on {tasks}: mean ranks {ranks}"


