"""ONNX Runtime session over a bundle's gradient graph: the loss and its exact gradient, with no autograd.

``gradients.onnx`` (``pocketzo export --gradients``) takes the loss graph's inputs and outputs ``loss``
and ``grad/<name>`` for every trainable tensor. Both sides are bound ONCE to flat float32 buffers of
the same layout: the weights are read from the training buffer (zero-copy, as in ``session``) and
ONNX Runtime writes each gradient straight into its place in ``gradient``, so an optimizer step is
a fused pass over two flat buffers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pocketzo.errors import BundleError
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.session import FlatParameters, SessionConfig

GRAD_PREFIX = "grad/"


class GradientSession:
    """Runs the bundle's gradient graph over ``params``; gradients land in ``self.gradient``."""

    def __init__(self, bundle: Bundle, config: SessionConfig, params: FlatParameters):
        path = bundle.gradient_path
        if path is None:
            raise BundleError(f"{bundle.path}: has no gradient graph; export it with `pocketzo export --gradients` "
                              "to train with exact gradients (--method fo)")
        self.bundle, self.params, self.model_path = bundle, params, path
        # Without the arena and memory patterns SmolLM2's gradient graph (16 x 64, norms) peaked at 2.9 GB instead
        # of 4.4 GB and ran as fast (1.82 vs 1.9 s; export/gradients measurements, 2026-12-01).
        options = replace(config, cpu_mem_arena=False, mem_pattern=False).session_options()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own unrelated exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({first}); re-export the bundle") from None
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [s.name for s in params.specs if GRAD_PREFIX + s.name not in outputs]
        if missing or "loss" not in outputs:
            raise BundleError(f"{path}: lacks the outputs loss / {GRAD_PREFIX}<name> for {missing[:3]}; re-export "
                              "the bundle")
        self.gradient = FlatParameters(params.specs, params.buffer.shape[0])
        self._binding = self.session.io_binding()
        self._values = {}  # the OrtValues must outlive the binding
        for name, view in params.views.items():
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(view)
            self._binding.bind_ortvalue_input(name, self._values[name])
        for name, view in self.gradient.views.items():
            self._values[GRAD_PREFIX + name] = ort.OrtValue.ortvalue_from_numpy(view)
            self._binding.bind_ortvalue_output(GRAD_PREFIX + name, self._values[GRAD_PREFIX + name])
        self._loss = np.zeros((), np.float32)
        self._values["loss"] = ort.OrtValue.ortvalue_from_numpy(self._loss)
        self._binding.bind_ortvalue_output("loss", self._values["loss"])

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
            labels: npt.NDArray[np.int64]) -> float:
        """One forward and backward pass at the buffer's current weights; returns the loss, fills ``gradient``."""
        feeds = {name: np.ascontiguousarray(a, dtype=np.int64)
                 for name, a in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels))}
        for name, array in feeds.items():
            self._binding.bind_cpu_input(name, array)
        try:
            self.session.run_with_iobinding(self._binding)
        except Exception as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            reason = lines[-1][:300] if lines else type(e).__name__
            raise BundleError(f"{self.model_path}: ONNX Runtime failed on a batch of shape "
                              f"{feeds['input_ids'].shape} ({reason})") from None
        return float(self._loss)
