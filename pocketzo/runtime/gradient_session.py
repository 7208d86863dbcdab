"""ONNX Runtime session over a bundle's gradient graph: the loss and its exact gradient, with no autograd.

``gradients.onnx`` (``pocketzo export --gradients``) takes the loss graph's inputs and gives its outputs,
plus ``grad/<name>`` for each tensor of the manifest's ``gradient_tensors``. Its backward pass sits behind
the boolean input ``compute_gradients``: ``backward`` feeds true, ``run`` feeds false and costs one
forward, so this one session serves training, evaluation and a hybrid step's ZO points, and the frozen
weights are held once (a second, loss-graph session would hold them again).

The weights are read from the training buffer (zero-copy, as in ``session``) and ONNX Runtime writes each
gradient straight into its place in ``gradient``, a flat float32 buffer of the same layout (zeros for the
tensors without an exact gradient), so an optimizer step is a fused pass over two flat buffers.

The backward pass keeps every layer's activations until it reads them, so its memory grows with the rows
of a run. With ``micro_batch`` the session runs at most that many rows at a time and sums the parts: the
gradient (one more buffer of the weights' size holds the sum), the loss, each weighted by its share of the
batch's loss (its rows, or for a causal LM its labelled next tokens), and the per-row outputs, concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pocketzo.errors import BundleError
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.data import IGNORE
from pocketzo.runtime.manifest import GRADIENT_PREFIX, GRADIENT_SWITCH
from pocketzo.runtime.session import FlatParameters, SessionConfig, load_session, run_failed

USER_INPUTS = ("input_ids", "attention_mask", "labels")


class GradientSession:
    """Runs the bundle's gradient graph over ``params``: ``backward`` fills ``self.gradient``, ``run`` is a
    forward pass with the interface of ``TrainingSession.run``."""

    slots = 1  # a gradient graph is exported without perturbation slots

    def __init__(self, bundle: Bundle, config: SessionConfig, params: FlatParameters, micro_batch: int = 0):
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: the whole batch), got {micro_batch}")
        path = bundle.gradient_path
        if path is None:
            raise BundleError(f"{bundle.path}: has no gradient graph; export it with `pocketzo export --gradients` "
                              "to train with exact gradients (--method fo / hybrid)")
        if bundle.manifest.format_version < 4:
            raise BundleError(f"{path}: a gradient graph of bundle format {bundle.manifest.format_version} (no "
                              f"{GRADIENT_SWITCH} input); re-export the bundle with `pocketzo export --gradients`")
        ort_path = bundle.gradient_ort_path if config.prefer_ort else None
        path = ort_path or path
        self.bundle, self.config, self.params, self.model_path = bundle, config, params, path
        self.micro_batch = micro_batch
        self._sum: npt.NDArray[np.float32] | None = None  # the parts' weighted gradient sum, made on first use
        # Without the arena and memory patterns SmolLM2's gradient graph (16 x 64, norms) peaked at 2.9 GB instead
        # of 4.4 GB and ran as fast (1.82 vs 1.9 s; 2026-12-01); without prepacked weight copies at 3.1 GB
        # instead of 3.6 GB, forward and backward as fast (2026-12-02, 4 runs each).
        options = replace(config, cpu_mem_arena=False, mem_pattern=False).session_options(
            bundle.weights_file_backed(path), prepacking=False)
        self.session = load_session(path, options)
        exact = bundle.manifest.gradient_tensors
        self.exact: tuple[str, ...] = tuple(s.name for s in params.specs) if exact is None else exact
        outputs = {o.name for o in self.session.get_outputs()}
        inputs = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.exact if GRADIENT_PREFIX + n not in outputs]
        missing += [n for n in params.views if n not in inputs]
        if missing or "loss" not in outputs or GRADIENT_SWITCH not in inputs:
            raise BundleError(f"{path}: lacks the inputs / outputs loss, {GRADIENT_SWITCH} or those of "
                              f"{missing[:3]}; the bundle is inconsistent, re-export it")
        self.gradient = FlatParameters(params.specs, params.buffer.shape[0])
        self.gradient.buffer[:] = 0.0  # tensors without an exact gradient stay zero
        self._values = {}  # the OrtValues must outlive the bindings
        self._backward = self.session.io_binding()
        self._forward = self.session.io_binding()
        for name, view in params.views.items():
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(view)
            self._backward.bind_ortvalue_input(name, self._values[name])
            self._forward.bind_ortvalue_input(name, self._values[name])
        for name in self.exact:
            key = GRADIENT_PREFIX + name
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(self.gradient.views[name])
            self._backward.bind_ortvalue_output(key, self._values[key])
        self._loss = np.zeros((), np.float32)
        self._values["loss"] = ort.OrtValue.ortvalue_from_numpy(self._loss)
        self._backward.bind_ortvalue_output("loss", self._values["loss"])
        self._switch = {True: np.array(True), False: np.array(False)}  # bound by pointer: kept alive here
        self._backward.bind_cpu_input(GRADIENT_SWITCH, self._switch[True])
        self._forward.bind_cpu_input(GRADIENT_SWITCH, self._switch[False])

    def backward(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
                 labels: npt.NDArray[np.int64]) -> float:
        """One forward and backward pass at the buffer's current weights; returns the loss, fills ``gradient``."""
        parts = self._parts(labels)
        if len(parts) == 1:
            self._execute(self._backward, _feeds(input_ids, attention_mask, labels))
            return float(self._loss)
        if self._sum is None:
            self._sum = np.empty_like(self.gradient.buffer)
        total, part, loss = self._sum, self.gradient.buffer, 0.0
        for i, (rows, share) in enumerate(parts):
            self._execute(self._backward, _feeds(input_ids[rows], attention_mask[rows], labels[rows]))
            loss += share * float(self._loss)
            if i == 0:  # the first part's weighted gradient starts the sum
                np.multiply(part, np.float32(share), out=total)
            else:
                np.multiply(part, np.float32(share), out=part)
                np.add(total, part, out=total)
        part[:] = total
        return loss

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
            labels: npt.NDArray[np.int64], outputs: Sequence[str] = ("loss",)) -> dict[str, np.ndarray]:
        """One forward pass (the backward is switched off): the requested outputs of the loss graph."""
        parts = self._parts(labels)
        if len(parts) == 1:
            return self._forward_run(_feeds(input_ids, attention_mask, labels), outputs)
        results = [(share, self._forward_run(_feeds(input_ids[rows], attention_mask[rows], labels[rows]), outputs))
                   for rows, share in parts]
        return {name: np.asarray(sum(share * float(r[name]) for share, r in results), np.float32) if name == "loss"
                else np.concatenate([r[name] for _, r in results]) for name in outputs}

    def _parts(self, labels: npt.NDArray[np.int64]) -> list[tuple[slice, float]]:
        """The batch's row ranges of at most ``micro_batch`` rows, each with its share of the batch's loss: the
        mean over rows, or for a causal LM over the labelled next tokens (as the graph's loss is formed)."""
        n, m = labels.shape[0], self.micro_batch
        if not m or m >= n:
            return [(slice(0, n), 1.0)]
        cuts = [slice(i, min(i + m, n)) for i in range(0, n, m)]
        if self.bundle.manifest.task.kind == "causal-lm":
            counted = (labels[:, 1:] != IGNORE).sum(1)
            if counted.sum() > 0:  # with none, every part's loss and gradient are zero
                return [(c, float(counted[c].sum() / counted.sum())) for c in cuts]
        return [(c, (c.stop - c.start) / n) for c in cuts]

    def _forward_run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        b = self._forward
        b.clear_binding_outputs()  # shapes follow the batch
        for name in outputs:
            b.bind_output(name, "cpu")
        self._execute(b, feeds)
        return dict(zip(outputs, b.copy_outputs_to_cpu(), strict=True))

    def _execute(self, binding: ort.IOBinding, feeds: dict[str, np.ndarray]) -> None:
        for name, array in feeds.items():  # ORT binds these by pointer: the caller keeps them alive
            binding.bind_cpu_input(name, array)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise run_failed(self.model_path, feeds["input_ids"].shape, e) from None


def _feeds(*arrays: npt.NDArray[np.int64]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(a, dtype=np.int64) for name, a in zip(USER_INPUTS, arrays, strict=True)}
