"""The gradient graph's parity check: ONNX Runtime's loss and gradients against PyTorch autograd of
the same loss head, on the export's sample batch, at the initial values and at random adapter values.

Per tensor (and for the loss), the error is max |onnx - torch| / max(1, max |torch|). It must be at most
``tolerance`` (1e-5). Float32 rounding alone can exceed that through a deep model: on SmolLM2-135M
(norms trainable) PyTorch's own float32 gradients differ from its float64 ones by 2.1e-5, ONNX Runtime's
by 3.5e-5. So a tensor over the tolerance is judged again against float64 autograd, where ONNX Runtime
may be off by ``NOISE`` times PyTorch's own float32 error; a wrong gradient (a scale, a lost term) is off
by far more. The worst tensor is named when the check fails, and recorded in ``export.gradient_parity``.

PyTorch's float32 error is measured over the whole trainable set, also when the graph differentiates only
its top layers (``--gradient-layers``): it is the model's yardstick, and a graph cut at layer 22 must not
be held to a tighter one than the uncut graph. On SmolLM2-135M with LoRA at random values, ONNX Runtime's
error on the top 8 layers' tensors is about 10x PyTorch's there (2.5e-5 against 2.4e-6), the same as in
the uncut graph, whose lower layers' PyTorch error (2.4e-5) set a bound the cut graph also meets.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pocketzo.errors import ExportError
from pocketzo.runtime.gradient_session import USER_INPUTS
from pocketzo.runtime.manifest import GRADIENT_PREFIX as PREFIX
from pocketzo.runtime.manifest import GRADIENT_SWITCH

TOLERANCE = 1e-5
NOISE = 4.0  # against float64 autograd, ONNX Runtime may be off by this many times PyTorch's float32 error

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels


def named(head: nn.Module) -> dict[str, nn.Parameter]:
    """The head's parameters under Hugging Face names (without "net.")."""
    return {n.removeprefix("net."): p for n, p in head.named_parameters()}


@contextlib.contextmanager
def requires_grad(head: nn.Module, names: set[str]) -> Iterator[None]:
    """Within the block only the parameters in ``names`` (HF names, without "net.") require grad."""
    before = {n: p.requires_grad for n, p in head.named_parameters()}
    try:
        for n, p in head.named_parameters():
            p.requires_grad_(n.removeprefix("net.") in names)
        yield
    finally:
        for n, p in head.named_parameters():
            p.requires_grad_(before[n])


def check_gradients(path: Path, head: nn.Module, sample: Sample, exact: list[str],
                    random_values: dict[str, np.ndarray], tolerance: float = TOLERANCE,
                    trainable: list[str] | None = None) -> dict[str, Any]:
    """ONNX Runtime's loss and gradients (for the tensors of ``exact``) at the head's values of the
    ``trainable`` tensors (default: ``exact``), then at ``random_values`` (adapter tensors, when there are
    any), against PyTorch autograd; raise ExportError naming the worst tensor."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    params = named(head)
    initial = {n: params[n].detach().numpy().copy() for n in (trainable or exact)}
    precise = functools.cache(lambda: copy.deepcopy(head).double())  # built only when a tensor needs it
    result: dict[str, Any] = {"batch": list(sample[0].shape), "tolerance": tolerance,
                              **_compare(session, head, precise, sample, initial, exact, tolerance, ""),
                              "random_adapters": None}
    if random_values:
        result["random_adapters"] = _compare(session, head, precise, sample, {**initial, **random_values}, exact,
                                             tolerance,
                                             f" with random adapter values ({len(random_values)} tensors)")
    return result


@contextlib.contextmanager
def _values(params: dict[str, nn.Parameter], values: dict[str, np.ndarray]) -> Iterator[None]:
    """Within the block the named parameters hold ``values``."""
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(torch.from_numpy(v))
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def _autograd(head: nn.Module, sample: Sample, values: dict[str, np.ndarray], wrt: list[str]) -> list[np.ndarray]:
    """PyTorch's loss and its gradient for each tensor of ``wrt``, the head holding ``values`` (float64)."""
    params = named(head)
    with _values(params, values), requires_grad(head, set(wrt)):
        loss = head(*sample)[0]
        grads = torch.autograd.grad(loss, [params[n] for n in wrt], allow_unused=True)
    return [loss.detach().double().numpy()] + [np.zeros(values[n].shape) if g is None else g.double().numpy()
                                               for n, g in zip(wrt, grads, strict=True)]


def _compare(session: Any, head: nn.Module, precise: Callable[[], nn.Module], sample: Sample,
             values: dict[str, np.ndarray], exact: list[str], tolerance: float, where: str) -> dict[str, Any]:
    """One run of ONNX Runtime at ``values`` against autograd (float32, then float64 if needed)."""
    names = ["loss", *exact]
    feed = {**dict(zip(USER_INPUTS, (x.numpy() for x in sample), strict=True)), **values,
            GRADIENT_SWITCH: np.array(True)}
    got = session.run(["loss", *(PREFIX + n for n in exact)], feed)
    want = _autograd(head, sample, values, exact)
    worst, error = _worst(names, got, want)
    record = {"loss_onnx": float(got[0]), "loss_torch": float(want[0]), "max_error": error, "worst_tensor": worst}
    if error <= tolerance:
        return record
    trainable = list(values)  # the noise of the whole trainable set, not only of the differentiated tensors
    single = _autograd(head, sample, values, trainable) if trainable != exact else want
    double = _autograd(precise(), sample, values, trainable)
    noise = max(_error(w, e) for w, e in zip(single, double, strict=True))
    at = {n: i + 1 for i, n in enumerate(trainable)}
    reference = [double[0], *(double[at[n]] for n in exact)]
    worst, error = _worst(names, got, reference)
    bound = max(tolerance, NOISE * noise)
    record["float64"] = {"max_error": error, "worst_tensor": worst, "torch_float32_error": noise, "bound": bound}
    if error <= bound:
        return record
    what = "the loss" if worst == "loss" else PREFIX + worst
    raise ExportError(f"gradient parity{where}: {what} differs from PyTorch autograd by {error:.2e} relative (float64 "
                      f"reference; allowed {bound:.2g}: tolerance {tolerance:g} or {NOISE:g}x PyTorch's own float32 "
                      f"error {noise:.2g}); refusing --gradients for this model and trainable set")


def _worst(names: list[str], got: list[np.ndarray], want: list[np.ndarray]) -> tuple[str, float]:
    """The name with the largest error, and that error (NaN counts as the largest)."""
    errors = [_error(g, w) for g, w in zip(got, want, strict=True)]
    k = max(range(len(errors)), key=lambda i: errors[i] if np.isfinite(errors[i]) else np.inf)
    return names[k], errors[k]


def _error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|)."""
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, float(np.abs(want).max())))
