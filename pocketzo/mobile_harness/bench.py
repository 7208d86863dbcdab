"""``pocketzo bench``: what a ZO step costs on this device, against inference of the same graph.

Two measurements, each in a fresh process so that each peak RSS is its own:

    baked   the bundle's graph with its weights baked in as initializers (``bake``): the
            inference session a user would ship; forward latency and inference peak RSS
    train   the training session (weights bound zero-copy from the flat buffer): forward
            latency, ZO step latency split into forward passes and noise passes, peak RSS

Both use the same session settings, batch and threads. A memory budget runs both under
RLIMIT_AS. The overhead ratio is step / (2 x baked forward): 1.0 is the physical floor of a
two-sided ZO step on the whole graph. The step in forward-equivalents is step / baked forward (the baked
graph is the whole loss graph, also for a split bundle). A split bundle's train process also times its
trunk and head alone (``trunk_s``, ``head_s``), and steps that reuse one batch's trunk output
(``step_head_only_s``, what ``train --cache-trunk`` does, without reading the cache); the floors are
trunk + (points per step) x head, and (points per step) x head.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pocketzo.errors import PocketzoError
from pocketzo.mobile_harness.bake import bake
from pocketzo.mobile_harness.bench_report import build_report, format_report
from pocketzo.mobile_harness.memory import (
    RssSampler,
    address_space_peak_mb,
    limit_address_space,
    parse_bytes,
    peak_rss_mb,
    profile,
    rss_kinds_mb,
    rss_mb,
)
from pocketzo.runtime.bundle import Bundle
from pocketzo.zo_trainer.noise import Distribution
from pocketzo.zo_trainer.recipes import RECIPES, ZO_DEFAULT

# 4: map_weights, rss_end_mb (anonymous / file-backed); 3: split bundles (trunk_s, head_s),
# step_forward_equivalents; 2: the step of a recipe
BENCH_VERSION = 4


@dataclass(frozen=True)
class BenchConfig:
    """What ``pocketzo bench`` measures; saved in its JSON report."""

    batch_size: int = 8
    seq_len: int = 64
    threads: int = 0  # 0: one per core (or the profile's big cores)
    steps: int = 5  # timed forward passes and ZO steps, each (median and p90 reported)
    warmup: int = 2
    recipe: str = ZO_DEFAULT  # the training method whose step is timed (pocketzo train --recipe)
    perturbation: Distribution = "rademacher"
    micro_batch: int = 0  # fo / hybrid recipes: rows per gradient-graph run (pocketzo train --micro-batch)
    cpu_mem_arena: bool = True  # ONNX Runtime's CPU arena, in both sessions; off saves memory, costs a little speed
    split: bool = True  # train on a split bundle's trunk and head (false: on its whole loss graph)
    map_weights: bool = True  # the training session leaves float32 weights mapped from the bundle (SessionConfig)
    memory_budget: str | None = None  # e.g. 4G: run under this address-space limit
    profile: str | None = None  # a phone profile: sets threads and memory_budget unless given
    version: int = BENCH_VERSION

    def __post_init__(self) -> None:
        if min(self.batch_size, self.seq_len, self.steps) < 1 or min(self.warmup, self.threads, self.micro_batch) < 0:
            raise ValueError("batch_size, seq_len and steps must be >= 1; warmup, threads and micro_batch >= 0")
        if self.perturbation not in ("rademacher", "gaussian"):
            raise ValueError("perturbation must be rademacher or gaussian")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(sorted(RECIPES))}")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)

    def resolved(self) -> BenchConfig:
        """Apply the phone profile (explicit threads / budget win) and fix the thread count."""
        cfg = self
        if cfg.profile is not None:
            p = profile(cfg.profile)
            cfg = replace(cfg, threads=cfg.threads or p.threads, memory_budget=cfg.memory_budget or p.app_budget)
        return replace(cfg, threads=cfg.threads or os.cpu_count() or 1)


def _batch(bundle: Bundle, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random tokens, no padding; timing and memory do not depend on the values."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, _vocab_size(bundle), size=(batch_size, seq_len), dtype=np.int64)
    task = bundle.task
    labels = rng.integers(0, len(task.labels), batch_size, dtype=np.int64) if task.kind == "classify" else ids
    return ids, np.ones_like(ids), labels


def _vocab_size(bundle: Bundle) -> int:
    """Tokens of the bundle's tokenizer.json (read as JSON: no tokenizers import needed)."""
    try:
        tok = json.loads(bundle.tokenizer_path.read_text(encoding="utf-8"))
        return len(tok["model"]["vocab"])
    except (OSError, ValueError, KeyError, TypeError):
        return 100  # an unusual tokenizer file: any vocabulary has 100 tokens


def _timed(fn, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _stats(name: str, xs: list[float]) -> dict[str, float]:
    return {f"{name}_s": statistics.median(xs), f"{name}_p90_s": float(np.percentile(xs, 90))}


# ----------------------------------------------------------------------------------------- worker (child process)

def _measure(mode: str, bundle_path: str, cfg: BenchConfig, baked_model: str | None, sampler: RssSampler) -> dict:
    import onnxruntime as ort

    from pocketzo.runtime.data import Batch
    from pocketzo.runtime.session import SessionConfig
    from pocketzo.runtime.split_session import SplitSession
    from pocketzo.zo_trainer.method import Method
    from pocketzo.zo_trainer.trainer import make_trainer, open_session

    base = rss_mb()
    bundle = Bundle(bundle_path)
    ids, mask, labels = _batch(bundle, cfg.batch_size, cfg.seq_len)
    session_config = SessionConfig(threads=cfg.threads, cpu_mem_arena=cfg.cpu_mem_arena, map_weights=cfg.map_weights)
    out: dict = {"rss_base_mb": base}
    t0 = time.perf_counter()
    sampler.mark("load")
    if mode == "baked":
        sess = ort.InferenceSession(baked_model, session_config.session_options(), providers=["CPUExecutionProvider"])
        out["load_s"] = time.perf_counter() - t0
        out["rss_loaded_mb"] = rss_mb()
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, (ids, mask, labels), strict=True))
        sampler.mark("forward")
        out.update(_stats("forward", _timed(lambda: sess.run(["loss"], feed), cfg.steps, cfg.warmup)))
    else:
        method = Method(**{"steps": cfg.steps + cfg.warmup, **RECIPES[cfg.recipe], "lr": 0.0,
                           "perturbation": cfg.perturbation, "micro_batch": cfg.micro_batch})
        # fo / hybrid: the gradient graph, forward alone
        session = open_session(bundle, session_config, method, split=cfg.split)
        out["load_s"] = time.perf_counter() - t0
        out["rss_loaded_mb"] = rss_mb()
        out["rss_loaded_kinds_mb"] = rss_kinds_mb()  # mapped weights are paged in later, by the first forward
        out["trainable_parameters"] = session.params.numel
        sampler.mark("forward")
        out.update(_stats("forward", _timed(lambda: session.run(ids, mask, labels), cfg.steps, cfg.warmup)))
        if isinstance(session, SplitSession):
            hidden = session.trunk(ids, mask)
            out.update(_stats("trunk", _timed(lambda: session.trunk(ids, mask), cfg.steps, cfg.warmup)))
            out.update(_stats("head", _timed(lambda: session.run_head(hidden, mask, labels), cfg.steps, cfg.warmup)))
        out["points_per_step"] = method.forwards_per_step()
        sampler.mark("training steps")
        trainer = make_trainer(session, method, cfg.threads)
        # a new batch each step, as in training: a split bundle's trunk runs once per batch, not once per bench
        records = [trainer.step(i, Batch(ids, mask, labels)) for i in range(cfg.warmup + cfg.steps)][cfg.warmup:]
        if isinstance(session, SplitSession):  # one batch for every step: its trunk output is reused, as cached
            sampler.mark("head-only steps")
            batch = Batch(ids, mask, labels)
            n = cfg.warmup + cfg.steps
            cached = [trainer.step(n + i, batch) for i in range(max(cfg.warmup, 1) + cfg.steps)][-cfg.steps:]
            out.update(_stats("step_head_only", [r.seconds for r in cached]))
        trainer.close()
        out.update(_stats("step", [r.seconds for r in records]))
        out["step_forward_s"] = statistics.median(r.forward_seconds for r in records)
        out["step_noise_s"] = statistics.median(r.seconds - r.forward_seconds for r in records)
    sampler.mark("end")
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_end_mb"] = rss_kinds_mb()
    out["address_space_peak_mb"] = address_space_peak_mb()
    out["timeline"] = sampler.stop()
    return out


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pocketzo.mobile_harness.bench (worker)")
    p.add_argument("mode", choices=("baked", "train"))
    p.add_argument("bundle")
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--baked-model")
    p.add_argument("--limit-bytes", type=int)
    a = p.parse_args(argv)
    # the sampler's thread starts before the cap: a thread whose start-up fails under it (MemoryError in its
    # thread-local data) leaves Thread.start() waiting for it forever, a hung worker instead of a clear error
    sampler = RssSampler()
    if a.limit_bytes:
        limit_address_space(a.limit_bytes)
    cfg = BenchConfig(**json.loads(a.config))
    try:
        result = _measure(a.mode, a.bundle, cfg, a.baked_model, sampler)
    except MemoryError:
        result = {"error": "out of memory (MemoryError)"}
    except Exception as e:  # ONNX Runtime reports allocation failures as its own exception types
        text = str(e).strip().splitlines()
        result = {"error": text[-1][:300] if text else type(e).__name__}
    Path(a.out).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# ----------------------------------------------------------------------------------------- orchestration (parent)

def _spawn(mode: str, bundle: Bundle, cfg: BenchConfig, baked: Path | None, limit: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="pocketzo-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "pocketzo.mobile_harness.bench", mode, str(bundle.path),
               json.dumps(asdict(cfg)), str(out)]
        if baked is not None:
            cmd += ["--baked-model", str(baked)]
        if limit:
            cmd += ["--limit-bytes", str(limit)]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # works when pocketzo is a copied directory
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.is_file():
            return json.loads(out.read_text())
    died = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return {"error": f"the {mode} process died ({died}): {lines[-1][:300] if lines else 'no message'}"}


def run_bench(bundle_path: str | Path, config: BenchConfig, log=print) -> dict:
    """Measure the bundle (see the module docstring); returns the report (also printed via ``log``)."""
    cfg = config.resolved()
    bundle = Bundle(bundle_path)
    if cfg.seq_len > bundle.task.max_length:
        raise PocketzoError(f"--seq-len {cfg.seq_len} exceeds the bundle's max_length {bundle.task.max_length}")
    limit = parse_bytes(cfg.memory_budget) if cfg.memory_budget else None
    try:  # next to the bundle, so that the baked model can hard-link the bundle's files
        workdir = tempfile.TemporaryDirectory(prefix=".pocketzo-bake-", dir=bundle.path.parent)
    except OSError:
        workdir = tempfile.TemporaryDirectory(prefix="pocketzo-bake-")
    with workdir as tmp:
        baked = bake(bundle, tmp)
        split = bundle.manifest.split
        graph = "" if split is None else (f"split at layer {split.layer}, " if cfg.split else "whole graph, ")
        log(f"bench: {bundle.path} batch {cfg.batch_size} x seq {cfg.seq_len}, {cfg.threads} threads, "
            f"recipe {cfg.recipe}, {cfg.perturbation}, arena {'on' if cfg.cpu_mem_arena else 'off'}, "
            f"weights {'mapped' if cfg.map_weights else 'copied'}, {graph}"
            f"{cfg.warmup} warm-up + {cfg.steps} timed"
            + (f", memory budget {cfg.memory_budget}" if limit else ""))
        runs = {mode: _spawn(mode, bundle, cfg, baked if mode == "baked" else None, limit)
                for mode in ("baked", "train")}
        fits = None
        if limit:
            failed = [m for m, r in runs.items() if "error" in r]
            fits = {"budget_mb": limit / 1e6, "fits": not failed}
            if failed:  # measure what it needs without the cap; if that works, the cap was the cause
                log(f"bench: does not fit in {cfg.memory_budget}; measuring what it needs without the limit")
                quick = replace(cfg, steps=1, warmup=1)
                runs = {mode: _spawn(mode, bundle, quick, baked if mode == "baked" else None, None)
                        for mode in ("baked", "train")}
                fits["needs_mb"] = max(r.get("address_space_peak_mb") or r.get("peak_rss_mb", 0)
                                       for r in runs.values() if "error" not in r)
                fits["needs_rss_mb"] = max(r.get("peak_rss_mb", 0) for r in runs.values() if "error" not in r)
        for mode, r in runs.items():
            if "error" in r:
                raise PocketzoError(f"bench ({mode}) failed: {r['error']}")
    report = build_report(bundle, cfg, runs["baked"], runs["train"], fits)
    for line in format_report(report):
        log(line)
    return report


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
