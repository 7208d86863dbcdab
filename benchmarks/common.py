"""Shared by every benchmark mode: the models, the batch, timing and the result file.

Every mode runs in a fresh process (``python benchmarks/<mode>.py ... --json OUT``) so that its
peak RSS is its own. A mode writes one JSON object with at least ``step_s`` (median seconds of
the timed steps), ``step_s_all`` and ``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Model shapes that are random-initialised from a config: speed and memory do not depend on the values.
SHAPES = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048),
}


def make_shape_model(shape: str, out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Save a randomly initialised fp32 OPT model of ``shape`` to ``out`` (once; reused if present).

    There is no OPT tokenizer offline: the one of ``tokenizer_from`` (SmolLM2's, 49,152 tokens,
    all below OPT's 50,272) is copied in, because a bundle carries a tokenizer. Benchmarks feed
    random token ids, so it only bounds the ids drawn.
    """
    import shutil

    import torch
    from transformers import OPTConfig, OPTForCausalLM

    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SHAPES[shape])
    model = OPTForCausalLM(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (no padding), labels = ids: a causal-LM batch every mode sees identically."""
    ids = np.random.default_rng(seed).integers(4, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB (10**6 bytes): VmHWM, because getrusage's ru_maxrss
    carries the parent's RSS across fork+exec (run.py may hold a whole model when it starts a mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def time_steps(step, steps: int, warmup: int) -> list[float]:
    """Call ``step()`` ``warmup`` times untimed, then ``steps`` times; return the timed seconds."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-dir", type=Path, required=True, help="a Hugging Face model directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True, help="write the result object here")
    return p


def write_result(path: Path, result: dict) -> None:
    """Add the common fields and write ``result`` atomically."""
    times = result.get("step_s_all")
    if times:
        result.setdefault("step_s", statistics.median(times))
    result.setdefault("peak_rss_mb", peak_rss_mb())
    result.setdefault("python", platform.python_version())
    result.setdefault("argv", sys.argv[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
