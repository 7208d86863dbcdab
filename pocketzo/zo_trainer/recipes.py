"""Named starting points for ``pocketzo train`` (``--recipe``) and the one a new run takes when none is named.

A recipe fixes the method and its step size, so that a run needs no ``--lr``. The default depends on what the
bundle can run: a gradient graph over every trainable tensor (``export --gradients``) allows exact gradients,
one over the top layers only (``--gradient-layers K``) the hybrid, and any bundle allows the ZO recipes. Among
the recipes a bundle can run, the default is the one ranked best over the tasks of docs/value.md (the mean of
its rank per task at the latest reading every candidate has); ``tests/test_recipes.py`` checks this table
against the committed results, so a new measurement that overturns it fails the tests until it is updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pocketzo.runtime.manifest import Manifest

GradientGraph = Literal["none", "top", "all"]  # what the bundle's gradient graph differentiates

RECIPES: dict[str, dict[str, Any]] = {
    # ZO with a scalar second moment: lr is the step per weight, so one lr serves every trainable set. The step
    # does not shrink as the loss flattens, so the lr must: held for 300 steps, then as 1/step, which needs no
    # horizon (at a constant lr, rt's training loss rose after step 300 and its accuracy fell 81.0 -> 74.8 %
    # from 5 to 15 minutes: docs/value.md)
    "best": {"adaptive": True, "lr": 1e-3, "schedule": "inverse-time", "hold_steps": 300},
    # FZOO (Dang et al., 2025): q one-sided Rademacher directions sharing L(theta), the step divided by the spread
    # of the q losses; its 8 directions, lr as the step per weight, as in "best"
    "fzoo": {"estimator": "one-sided", "directions": 8, "normalize": True, "lr": 1e-3},
    # MeZO's ZO-SGD: one two-sided direction, plain update; its lr depends on the trainable set (docs/value.md:
    # 1e-4 for RMSNorm weights, 1e-3 for LoRA), which is why it is never chosen for the user
    "zo-sgd": {},
    "fo-adamw": {"method": "fo", "optimizer": "adamw", "lr": 1e-3},  # exact gradients (export --gradients)
    # exact gradients for the top layers (export --gradient-layers K), one-sided ZO for the tensors below
    "hybrid-adamw": {"method": "hybrid", "optimizer": "adamw", "lr": 1e-3, "estimator": "one-sided"},
}

# The recipes a bundle can run without a hand-set lr, by its gradient graph, and the default among them.
CANDIDATES: dict[GradientGraph, tuple[str, ...]] = {
    "none": ("best", "fzoo"),
    "top": ("best", "fzoo", "hybrid-adamw"),
    "all": ("best", "fzoo", "fo-adamw"),
}
DEFAULTS: dict[GradientGraph, str] = {"none": "best", "top": "hybrid-adamw", "all": "fo-adamw"}
ZO_DEFAULT = DEFAULTS["none"]
_BY_METHOD = {"zo": ZO_DEFAULT, "fo": "fo-adamw", "hybrid": "hybrid-adamw"}
# what a bundle of each kind carries (``gradient_graph``), as the choice and docs/value.md say it
GRAPH_KINDS = {"none": "no gradient graph", "top": "a gradient graph of its top layers (export --gradient-layers K)",
               "all": "a gradient graph of every trainable tensor (export --gradients)"}


@dataclass(frozen=True)
class RecipeChoice:
    """The recipe a new run starts from, and why (printed when the user named none)."""

    recipe: str
    reason: str

    @property
    def settings(self) -> dict[str, Any]:
        return RECIPES[self.recipe]


def gradient_graph(manifest: Manifest) -> GradientGraph:
    """What the bundle's gradient graph differentiates (a format-3 graph is not used: "none")."""
    if manifest.gradient_file is None or manifest.format_version < 4:
        return "none"
    every = [t.name for t in manifest.trainable]
    return "all" if manifest.gradient_tensors is None or list(manifest.gradient_tensors) == every else "top"


def choose_recipe(graph: GradientGraph, method: str | None = None) -> RecipeChoice:
    """The default recipe for a bundle whose gradient graph is ``graph``; with ``--method`` given, that
    method's recipe (its optimizer and lr), so that ``--method zo`` on a gradient bundle is plain ZO."""
    if method is not None:
        if method not in _BY_METHOD:
            raise ValueError(f"method must be one of {', '.join(_BY_METHOD)}, got {method!r}")
        return RecipeChoice(_BY_METHOD[method], f"--method {method}")
    recipe = DEFAULTS[graph]
    others = ", ".join(r for r in CANDIDATES[graph] if r != recipe)
    return RecipeChoice(recipe, f"the bundle has {GRAPH_KINDS[graph]}; of the recipes it can run ({recipe}, {others}) "
                        f"{recipe} gained most per minute in docs/value.md")
