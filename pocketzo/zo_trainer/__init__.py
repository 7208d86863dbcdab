"""Device side: zeroth-order (MeZO / SPSA) training over a bundle's flat weight buffer.

A step is plan -> evaluate -> update: ``estimators`` plan the points, ``evaluators`` (sequential or
slotted backends) return their losses, ``updates`` turn the estimate into one fused pass over the
weights; ``trainer`` runs the step, ``replay`` reruns it from the log, ``run`` is the training loop over ``batches``.
"""

from pocketzo.zo_trainer.batches import BatchSampler
from pocketzo.zo_trainer.evaluate import EvalResult, evaluate
from pocketzo.zo_trainer.method import Method, RunPolicy
from pocketzo.zo_trainer.noise import Perturber
from pocketzo.zo_trainer.recipes import RECIPES, RecipeChoice, choose_recipe, gradient_graph
from pocketzo.zo_trainer.replay import replay, replay_run
from pocketzo.zo_trainer.run import resume, train
from pocketzo.zo_trainer.steplog import read_log
from pocketzo.zo_trainer.trainer import DirectionRecord, StepRecord, Trainer, make_trainer

__all__ = [
    "RECIPES",
    "BatchSampler",
    "DirectionRecord",
    "EvalResult",
    "Method",
    "Perturber",
    "RecipeChoice",
    "RunPolicy",
    "StepRecord",
    "Trainer",
    "choose_recipe",
    "evaluate",
    "gradient_graph",
    "make_trainer",
    "read_log",
    "replay",
    "replay_run",
    "resume",
    "train",
]
