"""The export's parity check: the bundle's loss through the device runtime against PyTorch's.

The reference is the plain Hugging Face model, not the loss head that was traced: a LoRA layer
is replaced by a plain one with the merged weight ``W + (alpha / r) B A``, virtual tokens are fed
as ``inputs_embeds``. So an adapter the graph applies wrongly (scale, transpose, slot routing)
shows as a loss difference instead of being traced into graph and reference alike.

Two checks run on the same padded sample batch, both per perturbation slot:

1. the shipped initial values (what ``trainable.safetensors`` holds; LoRA's B = 0, slots equal);
2. random adapter values, only in the session's buffer: LoRA A and B both non-zero, virtual
   tokens random, every slot different. The bundle's files are not changed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pocketzo.errors import ExportError
from pocketzo.export import adapters, heads
from pocketzo.export.config import ExportConfig
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.manifest import HeadKind, TaskSpec
from pocketzo.runtime.session import SessionConfig, TrainingSession
from pocketzo.runtime.split_session import SplitSession

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels
ADAPTER = re.compile(r"(\.lora_[AB]\.weight|^prompt_embeddings)$")
# A random LoRA update (alpha / r) B A has this RMS relative to its layer's weight. Large enough to show a
# wrong scale (2x on the tests' tiny Llama: 3.4e-4, over the 1e-4 tolerance; SmolLM2-135M's loss moves 1.23 ->
# 1.37), small enough that an int8 graph stays within QUANTIZED_TOLERANCE (SmolLM2: 0.27 off; 0.58 at 0.25).
RANDOM_LORA_SIZE = 0.1


@dataclass(frozen=True)
class Reference:
    """PyTorch's loss per slot for the sample: at the initial values and at ``random_values``."""

    initial: np.ndarray  # (slots,)
    random_values: dict[str, np.ndarray]  # trainable adapter tensors (slot axis included); empty: no adapter
    random: np.ndarray | None  # (slots,), None without an adapter


def sample_batch(task: TaskSpec, vocab: int, seed: int, slots: int) -> Sample:
    """3 random rows, two of them padded; with P slots the 3 rows repeated P times (one group per slot)."""
    g = torch.Generator().manual_seed(seed)
    b, t = 3, min(16, task.max_length)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5)):
        if pad:
            mask[row, -pad:] = 0
    if task.kind == "classify":
        labels = torch.randint(0, len(task.labels), (b,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, heads.IGNORE)
    ids, mask, labels = (x.repeat(slots, *([1] * (x.dim() - 1))) for x in (ids, mask, labels))  # (P * 3, ...)
    return ids, mask, labels


def reference(wrapper: nn.Module, head: HeadKind, sample: Sample, task: TaskSpec, config: ExportConfig,
              trainable: list[str]) -> Reference:
    """PyTorch's losses for ``sample``, from the loss head ``wrapper`` before it is freed."""
    params = {n.removeprefix("net."): p.detach().numpy() for n, p in wrapper.named_parameters()}
    initial = {n: v for n, v in params.items() if ADAPTER.search(n)}
    net = wrapper.net
    losses = _losses(net, head, sample, task, config, initial)
    rng = np.random.default_rng(config.seed)
    random: dict[str, np.ndarray] = {}
    for name in (n for n in initial if n in trainable):  # A before B: B is sized from the random A
        params[name] = random[name] = _random_adapter(name, initial[name], params, config, rng)
    if not random:
        return Reference(losses, {}, None)
    return Reference(losses, random, _losses(net, head, sample, task, config, {**initial, **random}))


def check(bundle_dir: Path, ref: Reference, sample: Sample, tolerance: float, split: bool = False,
          cause: str | None = None) -> dict[str, Any]:
    """Run the bundle at its initial values and at ``ref.random_values``; raise ExportError on a mismatch.
    ``split``: run its trunk and head graphs instead of the loss graph. ``cause``: the message of a mismatch, with
    ``{differs}`` where the numbers go (default: the graph computes something else than the model)."""
    ids, mask, labels = (x.numpy() for x in sample)
    bundle, config = Bundle(bundle_dir), SessionConfig(threads=1)
    session = SplitSession(bundle, config) if split else TrainingSession(bundle, config)
    got = np.atleast_1d(session.run(ids, mask, labels)["loss"]).astype(np.float64)  # (slots,)
    result: dict[str, Any] = {"loss_onnx": float(got[0]), "loss_torch": float(ref.initial[0]),
                              "abs_error": _compare(got, ref.initial, tolerance, cause=cause), "batch": list(ids.shape),
                              "random_adapters": None}
    if ref.random is not None:
        for name, value in ref.random_values.items():
            session.params.views[name][...] = value
        got = np.atleast_1d(session.run(ids, mask, labels)["loss"]).astype(np.float64)
        result["random_adapters"] = {"loss_onnx": got.tolist(), "loss_torch": ref.random.tolist(),
                                     "abs_error": _compare(got, ref.random, tolerance, len(ref.random_values), cause)}
    return result


def _compare(got: np.ndarray, want: np.ndarray, tolerance: float, random_tensors: int = 0,
             cause: str | None = None) -> float:
    """Largest error over the slots (``random_tensors``: how many adapter tensors hold random values).

    Relative above a loss of 1: a 30-layer fp32 model on random tokens (loss ~15) differs from
    PyTorch by ~1e-4 absolute (6e-6 relative) from accumulation order alone."""
    err = np.abs(got - want)  # (slots,)
    bound = tolerance * np.maximum(1.0, np.abs(want))
    bad = np.flatnonzero(~(err <= bound))  # NaN counts as bad
    if bad.size == 0:
        return float(err.max())
    k, slots = bad[0], len(want)
    differs = (f"the exported {f'slot {k} ' if slots > 1 else ''}loss {got[k]:.6f} differs from PyTorch's "
               f"{want[k]:.6f} by {err[k]:.2e} (> {bound[k]:.2g})")
    if cause:
        raise ExportError(cause.format(differs=differs))
    if not random_tensors:
        raise ExportError(f"{differs}; this architecture is not supported as exported")
    values = f"{random_tensors} tensors" + (f", different in each of the {slots} slots" if slots > 1 else "")
    raise ExportError(f"with random adapter values ({values}), {differs}: the graph applies the adapters wrongly "
                      "(LoRA scale or layout, virtual tokens or slot routing)")


def _random_adapter(name: str, value: np.ndarray, params: dict[str, np.ndarray], config: ExportConfig,
                    rng: np.random.Generator) -> np.ndarray:
    """Random values for one adapter tensor, drawn afresh for every slot."""
    if name == "prompt_embeddings":  # (P, k, H) or (k, H): the size of real token embeddings
        return rng.normal(0.0, _rms(value), value.shape).astype(np.float32)
    if name.endswith(".lora_A.weight"):  # (P, r, in) or (r, in): PEFT's init bound
        bound = 1.0 / np.sqrt(value.shape[-1])
        return rng.uniform(-bound, bound, value.shape).astype(np.float32)
    # B (P, out, r) or (out, r), sized so that (alpha / r) B A is RANDOM_LORA_SIZE of the layer's weight
    layer = name.removesuffix(".lora_B.weight")
    a = params[layer + ".lora_A.weight"]
    b = rng.normal(0.0, 1.0, value.shape)
    update = (config.lora_alpha / config.lora_rank) * (b @ a)  # (P, out, in) or (out, in)
    return (b * RANDOM_LORA_SIZE * _rms(params[layer + ".weight"]) / _rms(update)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-6)


def _losses(net: nn.Module, head: HeadKind, sample: Sample, task: TaskSpec, config: ExportConfig,
            values: dict[str, np.ndarray]) -> np.ndarray:
    """The plain Hugging Face loss of each slot's rows, with the adapter tensors at ``values``."""
    losses = []
    for k in range(config.slots):
        group = tuple(x.reshape(config.slots, -1, *x.shape[1:])[k] for x in sample)  # slot k's rows
        slot = {n: torch.from_numpy(v[k] if config.slots > 1 else v) for n, v in values.items()}
        with _merged_lora(net, slot, config.lora_alpha / config.lora_rank):
            loss = heads.reference_loss(net, head, *group, task.label_token_ids,
                                        prompt=slot.get("prompt_embeddings"))
        losses.append(float(loss))
    return np.array(losses)


class _MergedLinear(nn.Module):
    """A plain linear layer with the weight W + scale B A, merged at each call (one layer's copy at a time)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                 scale: float):
        super().__init__()
        self.weight, self.bias, self.a, self.b, self.scale = weight, bias, a, b, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight + self.scale * (self.b @ self.a), self.bias)  # W: (out, in)


@contextlib.contextmanager
def _merged_lora(net: nn.Module, values: dict[str, torch.Tensor], scale: float) -> Iterator[None]:
    """Within the block, every LoRA layer of ``net`` is a plain layer with the weight W + scale B A."""
    swapped = []
    for name, module in list(net.named_modules()):
        if isinstance(module, adapters.LoRALinear):
            a, b = values[f"{name}.lora_A.weight"], values[f"{name}.lora_B.weight"]  # (r, in), (out, r)
            merged = _MergedLinear(module.weight.detach(), module.bias, a, b, scale)
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, merged)
            swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)
