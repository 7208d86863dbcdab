"""``pocketzo bench``'s report: the measurements of its two processes (``bench``) turned into ratios, a memory
split and the lines it prints."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from pocketzo.runtime.bundle import Bundle

if TYPE_CHECKING:
    from pocketzo.mobile_harness.bench import BenchConfig


def build_report(bundle: Bundle, cfg: BenchConfig, baked: dict, train: dict, fits: dict | None) -> dict:
    """What ``pocketzo bench --json`` writes, from the baked and the training process's measurements."""

    tokens = cfg.batch_size * cfg.seq_len
    return {
        "bundle": str(bundle.path),
        "config": asdict(cfg),
        "trainable_parameters": train["trainable_parameters"],
        "load_s": train["load_s"],
        "baked_load_s": baked["load_s"],
        "forward_baked_s": baked["forward_s"],
        "forward_baked_p90_s": baked["forward_p90_s"],
        "forward_train_s": train["forward_s"],
        "forward_train_p90_s": train["forward_p90_s"],
        "step_s": train["step_s"],
        "step_p90_s": train["step_p90_s"],
        "step_forward_s": train["step_forward_s"],
        "step_noise_s": train["step_noise_s"],
        "overhead_ratio": train["step_s"] / (2 * baked["forward_s"]),
        "step_forward_equivalents": train["step_s"] / baked["forward_s"],
        "points_per_step": train["points_per_step"],
        "trunk_s": train.get("trunk_s"),
        "head_s": train.get("head_s"),
        "split_floor_ratio": (train["step_s"] / (train["trunk_s"] + train["points_per_step"] * train["head_s"])
                              if "trunk_s" in train and bundle.manifest.slots == 1 else None),
        "step_head_only_s": train.get("step_head_only_s"),
        "head_only_floor_ratio": (train["step_head_only_s"] / (train["points_per_step"] * train["head_s"])
                                  if "trunk_s" in train and bundle.manifest.slots == 1 else None),
        "tokens_per_s": tokens / baked["forward_s"],
        "train_tokens_per_s": tokens / train["step_s"],
        "peak_rss_mb": train["peak_rss_mb"],
        "inference_peak_rss_mb": baked["peak_rss_mb"],
        "memory_ratio": train["peak_rss_mb"] / baked["peak_rss_mb"],
        "rss_split_mb": memory_split(train),
        "rss_end_mb": train.get("rss_end_mb"),  # anonymous / file-backed (mapped weights) after the steps
        "fits": fits,
        "timeline": {"train": train["timeline"], "baked": baked["timeline"]},
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def memory_split(train: dict) -> dict[str, float]:
    """The training process's peak RSS split by phase: the interpreter and libraries before the bundle opens; the
    weights and session (what opening it took, plus the file-backed pages that grew after it: memory-mapped weights
    are paged in by the first forward, not at load); the rest of the peak, the activations and ONNX Runtime's arena.
    Without /proc (no RSS by kind) the mapped weights cannot be told apart and stay in the last part."""
    base, loaded = train["rss_base_mb"], train["rss_loaded_mb"]
    at_load, at_end = train.get("rss_loaded_kinds_mb") or {}, train.get("rss_end_mb") or {}
    mapped = (max(0.0, at_end["file_backed"] - at_load["file_backed"])
              if at_load.get("file_backed") is not None and at_end.get("file_backed") is not None else 0.0)
    return {
        "interpreter_and_libraries": base,
        "weights_and_session": loaded - base + mapped,
        "mapped_after_load": mapped,  # of weights_and_session: file-backed pages that grew after the bundle opened
        "activations_and_arena": train["peak_rss_mb"] - loaded - mapped,
    }


def format_report(r: dict) -> list[str]:
    """The report as the lines ``pocketzo bench`` prints."""
    ms = lambda s: f"{s * 1e3:8.1f} ms"  # noqa: E731
    split = r["rss_split_mb"]
    lines = [
        f"  trainable parameters      {r['trainable_parameters']:,}",
        f"  bundle load               {ms(r['load_s'])}  (baked: {ms(r['baked_load_s']).strip()})",
        f"  forward, baked weights    {ms(r['forward_baked_s'])}  p90 {ms(r['forward_baked_p90_s']).strip()}",
        f"  forward, training session {ms(r['forward_train_s'])}  p90 {ms(r['forward_train_p90_s']).strip()}",
        f"  training step             {ms(r['step_s'])}  p90 {ms(r['step_p90_s']).strip()}"
        f"  = forwards {ms(r['step_forward_s']).strip()} + noise passes {ms(r['step_noise_s']).strip()}",
        f"  overhead ratio            {r['overhead_ratio']:.3f}  (step / 2 baked forwards; 1.0 is the floor)",
        f"  step                      {r['step_forward_equivalents']:.3f} forward-equivalents (step / baked forward)",
        f"  tokens/s                  {r['tokens_per_s']:,.0f} inference, {r['train_tokens_per_s']:,.0f} training",
        f"  peak RSS                  {r['peak_rss_mb']:,.0f} MB training, {r['inference_peak_rss_mb']:,.0f} MB "
        f"inference (ratio {r['memory_ratio']:.3f})",
        f"  training RSS split        {split['interpreter_and_libraries']:,.0f} MB interpreter+libraries, "
        f"{split['weights_and_session']:,.0f} MB weights+session ({split.get('mapped_after_load', 0):,.0f} MB of it "
        f"mapped weights paged in after load), {split['activations_and_arena']:,.0f} MB activations+arena",
    ]
    kinds = r.get("rss_end_mb") or {}
    if kinds.get("anonymous") is not None and kinds.get("file_backed") is not None:
        lines.append(f"  training RSS at the end   {kinds['anonymous']:,.0f} MB anonymous, "
                     f"{kinds['file_backed']:,.0f} MB file-backed (mapped weights: page cache the OS can drop and "
                     "read again)")
    if r.get("trunk_s") is not None:
        floor = (f"; step / (trunk + {r['points_per_step']} x head) {r['split_floor_ratio']:.3f}"
                 if r.get("split_floor_ratio") is not None else "")
        lines.insert(5, f"  split: trunk {ms(r['trunk_s']).strip()}, head {ms(r['head_s']).strip()}{floor}")
        head_only = (f" = {r['head_only_floor_ratio']:.3f} x ({r['points_per_step']} x head)"
                     if r.get("head_only_floor_ratio") is not None else "")
        lines.insert(6, f"  step, trunk output given {ms(r['step_head_only_s'])}{head_only}  (as with --cache-trunk, "
                        "without reading the cache)")
    fits = r.get("fits")
    if fits:
        budget = f"{fits['budget_mb'] / 1e3:.2f} GB"
        lines.append(f"  memory budget {budget}: fits" if fits["fits"] else
                     f"  memory budget {budget}: does not fit: needs about {fits['needs_mb'] / 1e3:.2f} GB of "
                     f"address space ({fits['needs_rss_mb'] / 1e3:.2f} GB resident) in a run without the limit")
    return lines
