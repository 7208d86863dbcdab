"""The grid of ``make bench-value`` (``benchmarks/value.py``): its tasks, the trainable sets, and the rows (a method
on a task and trainable set), each with the bundle it trains and the export flags that make that bundle."""

from __future__ import annotations

from dataclasses import dataclass

from pocketzo.zo_trainer.recipes import DEFAULTS

STEPS = 100_000  # never reached: the time budget stops the run
HORIZON = ("--steps", str(STEPS))
CONSTANT = ("--schedule", "constant", *HORIZON)  # the rows read at 5, 15, 60 minutes of one run keep their lr
HYBRID = ["--gradient-layers", "8"]  # the gradient graph cut above the last 8 of 30 layers


@dataclass(frozen=True)
class Task:
    name: str
    bundle: str
    export: tuple[str, ...]  # the task's export flags; what trains comes from TRAINABLE[trainable]
    batch_size: int
    zo_lr: str  # ZO-SGD's lr on the task's trainable set
    classify: bool = True
    trainable: str = "norms"  # the task's own trainable set (its rows without a set of their own)


# What trains, as export flags, each with the gradient graph of every trainable tensor. A row on another set
# than its task's own uses the task's bundle name with the set's name appended.
PROMPT_TEXT = "The following is a movie review and its sentiment."  # rt's virtual tokens start as this text
TRAINABLE = {
    "norms": ("--trainable", r"norm\.weight$", "--gradients"),  # the RMSNorm weights of all 30 layers
    "lora": ("--peft", "lora", "--gradients"),  # rank 8, alpha 16, on q_proj and v_proj of all 30 layers
    "lora-top8": ("--peft", "lora", "--trainable-layers", "8", "--gradients"),  # of the last 8 layers only
    "prompt": ("--peft", "prompt", "--prompt-tokens", "16", "--prompt-init", PROMPT_TEXT, "--gradients"),
}
TASKS = {t.name: t for t in (
    Task("rt", "bundles/value-rt", ("--task", "classify", "--template", "Review: {text}\\nSentiment:", "--labels",
                                    "negative,positive", "--max-length", "64"), 16, "1e-4"),
    Task("tweets", "bundles/value-tweets", ("--task", "classify", "--template",
                                            "Tweet: {text}\\nSentiment (negative, neutral or positive):",
                                            "--labels", "negative,neutral,positive", "--max-length", "96"),
         16, "1e-4"),
    Task("hamlet", "bundles/value-hamlet", ("--task", "causal-lm", "--max-length", "128"), 8, "1e-3",
         classify=False, trainable="lora"),  # make demo-personal's
)}
# The other trainable sets, screened on rt with the two defaults (exact gradients, and ZO for a bundle without)
SCREENED = {"lora": "LoRA (rank 8 on q_proj, v_proj) of all 30 layers",
            "lora-top8": "LoRA (rank 8 on q_proj, v_proj) of the last 8 layers",
            "prompt": f"prompt tuning, 16 virtual tokens starting as the text {PROMPT_TEXT!r}"}


@dataclass(frozen=True)
class Row:
    name: str  # <task>-<method>, or <task>-<trainable set>-<method> on another set than the task's own
    task: str
    what: str
    flags: tuple[str, ...]  # pocketzo train flags; () for the rows without training
    minutes: tuple[int, ...] = (5, 15)  # the readings (training minutes)
    hybrid: bool = False  # on the task's bundle exported with HYBRID
    pytorch: bool = False  # the ceiling: PyTorch AdamW of the same tensors (benchmarks/accuracy_backprop.py)
    trainable: str | None = None  # a key of TRAINABLE; None: the task's own set

    @property
    def trains(self) -> bool:
        return bool(self.flags)


BEST = "`--recipe best` (the ZO default: adaptive step, lr 1e-3 for 300 steps, then falling as 1/step), eps 1e-3"
FO = "exact gradients, AdamW lr 1e-3 (`--recipe fo-adamw`)"


def _rows() -> dict[str, Row]:
    rows = []
    for t in TASKS.values():
        rows.append(Row(f"{t.name}-zero-shot", t.name, "the exported model, no training", ()))
        if t.classify:
            rows.append(Row(f"{t.name}-zero-shot-calibrated", t.name, "zero-shot with the label prior fitted on 64 "
                            "training rows (`pocketzo eval --calibrate`)", ()))
        rows += [
            Row(f"{t.name}-zo-sgd", t.name, f"ZO-SGD (MeZO), lr {t.zo_lr}, eps 1e-3: the baseline",
                ("--recipe", "zo-sgd", "--lr", t.zo_lr, "--eps", "1e-3", *CONSTANT), (5, 15, 60)),
            Row(f"{t.name}-best", t.name, BEST, ("--recipe", "best", "--eps", "1e-3", *HORIZON)),
            Row(f"{t.name}-fzoo", t.name, "`--recipe fzoo`: 8 one-sided directions sharing L(theta), the step divided "
                "by the spread of their losses (FZOO), lr 1e-3, eps 1e-3", ("--recipe", "fzoo", "--eps", "1e-3",
                                                                             *CONSTANT)),
            Row(f"{t.name}-fo-adamw", t.name, FO, ("--recipe", "fo-adamw", *CONSTANT)),
        ]
        if t.classify:
            rows.append(Row(f"{t.name}-pytorch-adamw", t.name, "the ceiling: PyTorch backprop, AdamW lr 1e-3, of the "
                            "same tensors on the same batches (benchmark only)", ("--lr", "1e-3"), pytorch=True))
        rows.append(Row(f"{t.name}-hybrid-adamw", t.name, "exact gradients for the last 8 layers, one-sided ZO "
                        "below, AdamW lr 1e-3 (`--recipe hybrid-adamw`)", ("--recipe", "hybrid-adamw", *CONSTANT),
                        hybrid=True))
    for name, what in SCREENED.items():
        if name == "prompt":  # the virtual tokens change the untrained model
            rows.append(Row(f"rt-{name}-zero-shot", "rt", f"{what}: its untrained start", (), trainable=name))
        rows += [Row(f"rt-{name}-fo-adamw", "rt", f"{what}: {FO}", ("--recipe", "fo-adamw", *CONSTANT),
                     trainable=name),
                 Row(f"rt-{name}-best", "rt", f"{what}: {BEST}", ("--recipe", "best", "--eps", "1e-3", *HORIZON),
                     trainable=name),
                 Row(f"rt-{name}-pytorch-adamw", "rt", f"{what}: the ceiling, PyTorch AdamW lr 1e-3 (benchmark only)",
                     ("--lr", "1e-3"), pytorch=True, trainable=name)]
    return {r.name: r for r in rows}


ROWS = _rows()
# the baseline and the recipe `pocketzo train` chooses for the rt bundle (it has a gradient graph)
QUICK = ("rt-zero-shot", "rt-zero-shot-calibrated", "rt-zo-sgd", f"rt-{DEFAULTS['all']}")


def bundle_of(row: Row) -> str:
    task = TASKS[row.task]
    own = row.trainable in (None, task.trainable)
    return task.bundle + ("" if own else f"-{row.trainable}") + ("-hybrid8" if row.hybrid else "")


def export_flags(row: Row) -> list[str]:
    task = TASKS[row.task]
    return [*task.export, *TRAINABLE[row.trainable or task.trainable], *(HYBRID if row.hybrid else [])]
