"""ONNX Runtime session over a bundle, with every trainable tensor in one flat buffer bound zero-copy.

Each tensor is a numpy view into one 64-byte-aligned float32 buffer and is bound ONCE to the
session's IOBinding as an OrtValue over that memory. Editing the buffer in place (the ZO
trainer's perturbations) is therefore seen by the very next run, with no copy and no rebind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pocketzo.errors import BundleError
from pocketzo.runtime import _safetensors
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.manifest import TensorSpec

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime settings for a training (or evaluation) session."""

    threads: int = 0  # intra-op threads; 0 lets ONNX Runtime choose (one per core)
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    optimization: Literal["disable", "basic", "extended", "all"] = "all"
    log_severity: int = 3  # 0 verbose .. 4 fatal
    # ONNX Runtime's worker threads busy-wait after each run by default: on a phone that burns battery,
    # and between ZO forwards it takes the cores from the noise passes (off: steps ~4 % faster here).
    spinning: bool = False
    prefer_ort: bool = True  # load the bundle's model.ort when it has one
    # Leave the frozen weights of a float32 external-data graph memory-mapped from the bundle's file: no prepacked
    # or constant-folded (transposed) copies. The demo bundle's ZO run at 16 x 64: peak RSS 809 -> 753 MB, anonymous
    # 654 -> 173 MB, no step-time difference measurable here (docs/memory.md).
    map_weights: bool = True

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization must be one of {sorted(_OPT_LEVELS)}, got {self.optimization!r}")

    def session_options(self, file_backed: bool = False, prepacking: bool = True) -> ort.SessionOptions:
        """Options for a session over a graph; ``file_backed``: its weights can stay mapped
        (``Bundle.weights_file_backed``), which ``map_weights`` then does; ``prepacking`` off: no prepacked
        weight copies either way."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = self.cpu_mem_arena
        so.enable_mem_pattern = self.mem_pattern
        so.graph_optimization_level = _OPT_LEVELS[self.optimization]
        so.log_severity_level = self.log_severity
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        mapped = file_backed and self.map_weights
        if mapped or not prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if mapped:
            # folding Transpose(W) would write a transposed copy of every weight; unfolded, the MatMul reads W
            so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        return so


def load_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over one of a bundle's graphs; a one-line BundleError if it cannot load."""
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own unrelated exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({first}); re-export the bundle") from None


def run_failed(model_path: Path, rows_shape: tuple[int, ...], error: Exception) -> BundleError:
    """The one-line error for a graph ONNX Runtime could not run on a batch (e.g. a sequence longer than the model's
    position table): the graph, the batch's shape and the last line of ONNX Runtime's message."""
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    reason = lines[-1][:300] if lines else type(error).__name__
    return BundleError(f"{model_path}: ONNX Runtime failed on a batch of shape {rows_shape} ({reason})")


def aligned_empty(n: int, alignment: int = 64) -> npt.NDArray[np.float32]:
    """An uninitialised float32 array of ``n`` elements whose data starts on an ``alignment``-byte boundary."""
    raw = np.empty(n * 4 + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + n * 4].view(np.float32)


class FlatParameters:
    """All trainable tensors in one aligned float32 buffer, with a named view per tensor."""

    def __init__(self, specs: Sequence[TensorSpec], buffer_elements: int):
        self.specs = tuple(specs)
        self.buffer = aligned_empty(buffer_elements)
        self.buffer[:] = 0.0  # alignment gaps: read by no tensor (the noise passes touch them too)
        self.views = {
            s.name: self.buffer[s.offset : s.offset + s.numel].reshape(s.shape) for s in self.specs
        }

    @classmethod
    def from_bundle(cls, bundle: Bundle, weights: str | Path | None = None) -> FlatParameters:
        """The bundle's initial weights, or those of ``weights`` (a run's weights.safetensors)."""
        params = cls(bundle.manifest.trainable, bundle.manifest.buffer_elements)
        params.load(weights if weights is not None else bundle.trainable_path)
        return params

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    def load(self, path: str | Path) -> None:
        _safetensors.read_into(path, self.views)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        _safetensors.save(path, self.views, metadata)

    def segments(self, decay: bool | None = None) -> list[tuple[int, int]]:
        """``(start, end)`` element ranges of the tensors (only those with ``decay`` if given)."""
        return [(s.offset, s.offset + s.numel) for s in self.specs if decay is None or s.decay == decay]


class TrainingSession:
    """Runs the bundle's loss graph with the trainable tensors bound once from ``params``."""

    def __init__(self, bundle: Bundle, config: SessionConfig | None = None, params: FlatParameters | None = None,
                 model_path: Path | None = None):
        """``model_path``: another graph of the bundle with the same trainable inputs (a split bundle's head)."""
        self.bundle = bundle
        self.config = config or SessionConfig()
        self.params = params if params is not None else FlatParameters.from_bundle(bundle)
        ort_path = bundle.ort_path if self.config.prefer_ort else None
        self.model_path = model_path or ort_path or bundle.model_path
        self.session = load_session(self.model_path,
                                    self.config.session_options(bundle.weights_file_backed(self.model_path)))
        # feeds are converted to the graph's element types (token ids int64, a split head's hidden state float32)
        self._feed_types = {i.name: np.float32 if i.type == "tensor(float)" else np.int64
                            for i in self.session.get_inputs()}
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = [name for name in self.params.views if name not in graph_inputs]
        if missing:
            raise BundleError(f"{self.model_path}: the manifest's trainable tensors {missing[:3]} are not inputs "
                              "of the graph; the bundle is inconsistent, re-export it")
        self._binding = self.session.io_binding()
        # The OrtValues must outlive the binding: keep them on self.
        self._weights = {
            name: ort.OrtValue.ortvalue_from_numpy(view) for name, view in self.params.views.items()
        }
        for name, value in self._weights.items():
            self._binding.bind_ortvalue_input(name, value)

    def weight_pointer(self, name: str) -> int:
        """Data address of the OrtValue bound for ``name`` (equals the buffer view's address)."""
        return self._weights[name].data_ptr()

    @property
    def slots(self) -> int:
        return self.bundle.manifest.slots

    def run(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        outputs: Sequence[str] = ("loss",),
    ) -> dict[str, np.ndarray]:
        """One forward pass over the current contents of the flat buffer.

        With perturbation slots the rows are split into ``slots`` equal groups (padded by repeating the
        last row when they do not divide): ``loss`` comes back per slot, (P,); per-row outputs come back
        per row, (N, ...), as without slots.
        """
        return self.run_feeds({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, outputs)

    def run_feeds(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] = ("loss",)) -> dict[str, np.ndarray]:
        """``run`` with the graph's data inputs by name (all with the batch's rows first)."""
        rows, p = next(iter(feeds.values())).shape[0], self.slots
        pad = -rows % p
        if pad:
            feeds = {k: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for k, a in feeds.items()}
        result = self._run(feeds, outputs)
        if p > 1:
            result = {k: v if k == "loss" else v.reshape(-1, *v.shape[2:])[:rows] for k, v in result.items()}
        return result

    def _run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        b = self._binding
        # ORT binds these by pointer: keep the (possibly converted) arrays alive until the run ends.
        feeds = {name: np.ascontiguousarray(a, dtype=self._feed_types.get(name, np.int64))
                 for name, a in feeds.items()}
        for name, array in feeds.items():
            b.bind_cpu_input(name, array)
        # Outputs are re-bound unallocated each run: their shapes follow the batch.
        b.clear_binding_outputs()
        for name in outputs:
            b.bind_output(name, "cpu")
        try:
            self.session.run_with_iobinding(b)
        except Exception as e:
            raise run_failed(self.model_path, next(iter(feeds.values())).shape, e) from None
        return dict(zip(outputs, b.copy_outputs_to_cpu(), strict=True))
