"""A split bundle's session: the frozen trunk once per batch, the trainable head once per point.

``export --split`` cuts the loss graph below the lowest trainable layer. The trunk (input_ids,
attention_mask -> ``hidden``) has no trainable input, so its output is the same at every point a step
evaluates; the head (``hidden``, attention_mask, labels, the trainable tensors -> the losses) is bound to
the flat weight buffer exactly as ``TrainingSession`` binds the whole graph. ``run`` is trunk then head,
so evaluation and every caller of a ``TrainingSession`` see the same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pocketzo.errors import BundleError
from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.manifest import HIDDEN
from pocketzo.runtime.session import FlatParameters, SessionConfig, TrainingSession, load_session, run_failed

TRUNK_INPUTS = ("input_ids", "attention_mask")


class SplitSession:
    """The trunk and head sessions of a split bundle; ``run`` has ``TrainingSession.run``'s contract."""

    def __init__(self, bundle: Bundle, config: SessionConfig | None = None, params: FlatParameters | None = None):
        paths = bundle.split_paths((config or SessionConfig()).prefer_ort)
        if paths is None:
            raise BundleError(f"{bundle.path}: not a split bundle; export it with `pocketzo export --split auto`")
        self.bundle, self.config = bundle, config or SessionConfig()
        self.trunk_path, head_path = paths
        self.trunk_session = load_session(self.trunk_path,
                                          self.config.session_options(bundle.weights_file_backed(self.trunk_path)))
        outputs = self.trunk_session.get_outputs()
        self.hidden_size = int(bundle.manifest.split.hidden.shape[-1])
        if [o.name for o in outputs] != [HIDDEN] or outputs[0].shape[-1] != self.hidden_size or \
                [i.name for i in self.trunk_session.get_inputs()] != list(TRUNK_INPUTS):
            raise BundleError(f"{self.trunk_path}: a trunk graph takes {list(TRUNK_INPUTS)} and gives {HIDDEN!r} of "
                              f"hidden size {self.hidden_size}; the bundle is inconsistent, re-export it")
        self.head = TrainingSession(bundle, self.config, params, model_path=head_path)
        self.params, self.model_path = self.head.params, head_path

    @property
    def slots(self) -> int:
        return self.head.slots

    def trunk(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]) -> np.ndarray:
        """The hidden state at the split, float32 (rows, seq, hidden size)."""
        feeds = {name: np.ascontiguousarray(a, dtype=np.int64)
                 for name, a in zip(TRUNK_INPUTS, (input_ids, attention_mask), strict=True)}
        try:
            return self.trunk_session.run([HIDDEN], feeds)[0]
        except Exception as e:
            raise run_failed(self.trunk_path, feeds["input_ids"].shape, e) from None

    def run_head(self, hidden: np.ndarray, attention_mask: npt.NDArray[np.int64], labels: npt.NDArray[np.int64],
                 outputs: Sequence[str] = ("loss",)) -> dict[str, np.ndarray]:
        """The head at the buffer's current weights over a trunk output (``trunk``)."""
        return self.head.run_feeds({HIDDEN: hidden, "attention_mask": attention_mask, "labels": labels}, outputs)

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
            labels: npt.NDArray[np.int64], outputs: Sequence[str] = ("loss",)) -> dict[str, np.ndarray]:
        """Trunk then head: the loss graph's outputs."""
        return self.run_head(self.trunk(input_ids, attention_mask), attention_mask, labels, outputs)
