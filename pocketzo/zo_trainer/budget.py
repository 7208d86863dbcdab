"""A run's memory: the evaluation batch the session can afford and the ``--memory-budget`` check (probe
runs on the largest batches the run will send, plus what the trainer allocates beyond the session)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pocketzo.errors import PocketzoError
from pocketzo.mobile_harness.memory import parse_bytes, peak_rss_mb
from pocketzo.runtime.data import Batch, Dataset
from pocketzo.runtime.gradient_session import GradientSession
from pocketzo.runtime.trunk_cache import TrunkCache, cache_bytes, open_trunk_cache
from pocketzo.zo_trainer.first_order import first_order_bytes
from pocketzo.zo_trainer.method import Method, RunPolicy
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS
from pocketzo.zo_trainer.trainer import Session, resolve_directions
from pocketzo.zo_trainer.updates import state_bytes


def eval_batch_size(session: Session, method: Method, policy: RunPolicy) -> int:
    """Rows per evaluation batch. On the gradient graph at most the training batch: its forward keeps the
    activations the (skipped) backward would read until the end of the run, so a larger evaluation batch
    would set the run's peak memory (SmolLM2 norms, fo-adamw seed 0: 3,528 MB peak with 32 rows, 3,272 MB with 16)."""
    if isinstance(session, GradientSession):
        return min(policy.eval_batch_size, method.batch_size)
    return policy.eval_batch_size


def check_trunk_cache(session: Session, method: Method, policy: RunPolicy, run_dir: Path) -> None:
    """Refuse ``--cache-trunk`` where it cannot work, before anything is built."""
    if policy.cache_trunk is None:
        return
    bundle = session.bundle
    if bundle.manifest.split is None:
        raise PocketzoError(f"--cache-trunk needs a split bundle; {bundle.path} has none "
                            "(pocketzo export --split auto)")
    if method.first_order or not policy.split:
        what = f"--method {method.method}" if method.first_order else "--no-split"
        raise PocketzoError(f"--cache-trunk feeds the split's head in ZO steps: not with {what}")
    cache, run_dir = Path(policy.cache_trunk).resolve(), run_dir.resolve()
    if cache == run_dir or run_dir in cache.parents:
        raise PocketzoError(f"--cache-trunk {policy.cache_trunk}: inside the run directory, which --overwrite would "
                            "delete; choose a directory outside it")


def trunk_cache(session: Session, data: Dataset, policy: RunPolicy) -> TrunkCache | None:
    """The training set's trunk outputs (``--cache-trunk DIR``), opened or built; None without the option."""
    if policy.cache_trunk is None:
        return None
    budget = parse_bytes(policy.memory_budget) if policy.memory_budget else None
    return open_trunk_cache(policy.cache_trunk, session, data, budget, policy.progress)


def check_memory(session: Session, data: Dataset, method: Method, policy: RunPolicy) -> dict:
    """Estimate the run's peak memory against ``policy.memory_budget``: the peak RSS over probe runs on the
    longest rows of the largest batches the run will send (P x batch rows with P slots; fo and hybrid: a
    forward+backward at the batch size and a forward at the evaluation batch size), plus what the trainer
    allocates beyond the session (optimizer state, the slotted theta and work copies, noise scratch), plus all
    of a trunk cache, not built yet (memory-mapped, but every page is read each epoch)."""
    limit_mb = parse_bytes(policy.memory_budget) / 1e6
    slots = session.slots
    rows = max(slots * method.batch_size, eval_batch_size(session, method, policy))

    def longest(n: int) -> Batch:  # a data set smaller than the batch is sampled with repeats
        return data.batch(np.resize(np.argsort([-len(ids) for ids in data.ids], kind="stable")[:n], n))

    b = longest(rows)
    session.run(b.input_ids, b.attention_mask, b.labels)
    if isinstance(session, GradientSession):
        g = longest(method.batch_size)
        session.backward(g.input_ids, g.attention_mask, g.labels)
    threads = policy.threads or os.cpu_count() or 1
    theta = session.params.buffer.shape[0] // slots  # the one-slot layout, up to alignment padding
    perturbers = 1 if slots == 1 else 2
    if method.first_order:  # the gradient buffer, m, v and scratch (hybrid: a second perturber's scratch)
        trainer_bytes = first_order_bytes(method, theta, threads) + (threads * CHUNK_ELEMENTS * 4
                                                                     if method.method == "hybrid" else 0)
    else:
        trainer_bytes = (state_bytes(resolve_directions(method, slots), theta, threads)
                         + perturbers * threads * CHUNK_ELEMENTS * 4 + (2 * theta * 4 if slots > 1 else 0))
    cached = cache_bytes(session, data) if policy.cache_trunk is not None else 0
    estimate = peak_rss_mb() + (trainer_bytes + cached) / 1e6
    if estimate > limit_mb:
        cache = f" + {cached / 1e6:,.0f} MB of trunk cache" if cached else ""
        # the backward's activations follow the rows of one gradient-graph run (docs/memory.md)
        split = ("--micro-batch 4 (or fewer rows), " if method.first_order and not 0 < method.micro_batch <= 4
                 else "")
        raise PocketzoError(f"this run needs about {estimate:,.0f} MB (weights + a probe batch of {rows} x "
                            f"{b.input_ids.shape[1]} tokens + {trainer_bytes / 1e6:,.0f} MB of optimizer state and "
                            f"buffers{cache}), more than --memory-budget {policy.memory_budget}; try {split}lower "
                            "--batch-size/--eval-batch-size, train fewer tensors, or use a smaller model")
    return {"estimated_peak_mb": estimate, "trainer_mb": trainer_bytes / 1e6, "trunk_cache_mb": cached / 1e6,
            "budget_mb": limit_mb}
