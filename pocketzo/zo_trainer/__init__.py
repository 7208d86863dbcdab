"""Device side: zeroth-order (MeZO / SPSA) training over a bundle's flat weight buffer."""

from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.evaluate import EvalResult, evaluate
from pocketzo.zo_trainer.noise import Perturber
from pocketzo.zo_trainer.run import BatchSampler, read_log, replay_run, train
from pocketzo.zo_trainer.trainer import StepRecord, make_trainer, replay, step_seed

__all__ = [
    "BatchSampler",
    "EvalResult",
    "Perturber",
    "StepRecord",
    "TrainConfig",
    "evaluate",
    "make_trainer",
    "read_log",
    "replay",
    "replay_run",
    "step_seed",
    "train",
]
