"""The bundle's manifest: the one contract between the desktop exporter and the device runtime.

A bundle is a directory (documented in docs/bundle.md; opened by ``pocketzo.runtime.bundle``) of
``manifest.json`` (this module's ``Manifest``, with ``format_version``) and the files its ``files`` names,
by role::

    model                model.onnx               loss graph; trainable weights are graph inputs
    model_data           model.onnx.data          its frozen weights as ONNX external data (gradients.onnx reads
                                                  them too); ONNX Runtime memory-maps them
    ort_model            model.ort                the same graph in ORT format (``export --ort``); preferred
    required_operators   required_operators.config  the operators model.ort needs (reduced ONNX Runtime builds)
    trainable            trainable.safetensors    initial values of the trainable tensors, HF names
    tokenizer            tokenizer.json           a `tokenizers` tokenizer
    tokenizer_config     tokenizer_config.json    Hugging Face tokenizer files, for desktop users
    special_tokens_map   special_tokens_map.json
    base_config          hf_config.json           the base model's Hugging Face config (merge)
    gradient_model       gradients.onnx           gradient graph (``export --gradients``): the loss graph's inputs
                                                  and outputs, plus d loss / d each tensor of
                                                  ``gradient_tensors`` as ``grad/<name>``, computed only
                                                  when the boolean input ``compute_gradients`` is true
    gradient_ort_model   gradients.ort            the same in ORT format (``export --gradients --ort``); preferred
    trunk_model          trunk.onnx               frozen-trunk split (``export --split``): the layers below the split,
                                                  input_ids + attention_mask -> ``hidden``; no trainable input
    trunk_data           trunk.onnx.data          its weights as external data
    head_model           head.onnx                the rest: ``hidden`` + attention_mask + labels + the trainable
                                                  tensors -> the loss graph's outputs
    head_data            head.onnx.data           its weights as external data
    trunk_ort_model      trunk.ort                the trunk and head in ORT format (``export --split --ort``)
    head_ort_model       head.ort

The device side reads it with the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pocketzo.errors import BundleError

FORMAT = "pocketzo-bundle"
# 5: the frozen-trunk split (``split``: trunk and head graphs beside the loss graph). 4: the gradient graph
# also gives the loss graph's outputs, gates its backward pass on compute_gradients and
# may differentiate a subset (gradient_tensors); gradient_ort_file names its ORT form. 3 added files and
# gradient_file; 2 added slots, adapter and base_config_file. Versions 1-3 are still read (a version-3
# gradient graph is not used: re-export it).
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
# A bundle without a split is written as version 4, which version-4 readers read as it is
UNSPLIT_VERSION = 4
MANIFEST = "manifest.json"
# The names the exporter gives a bundle's files, by role (the keys of ``Manifest.files``; see the docstring)
FILE_NAMES = {
    "model": "model.onnx", "model_data": "model.onnx.data", "ort_model": "model.ort",
    "required_operators": "required_operators.config", "trainable": "trainable.safetensors",
    "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
    "special_tokens_map": "special_tokens_map.json", "base_config": "hf_config.json",
    "gradient_model": "gradients.onnx", "gradient_ort_model": "gradients.ort",
    "trunk_model": "trunk.onnx", "trunk_data": "trunk.onnx.data", "head_model": "head.onnx",
    "head_data": "head.onnx.data", "trunk_ort_model": "trunk.ort", "head_ort_model": "head.ort",
}
GRADIENT_PREFIX = "grad/"  # the gradient graph's output for trainable tensor T is "grad/T"
GRADIENT_SWITCH = "compute_gradients"  # its boolean input: false runs the forward alone
HIDDEN = "hidden"  # the trunk's output and the head's first input (split bundles)
ALIGN_ELEMENTS = 16  # every tensor starts on a 64-byte boundary of the float32 buffer

TaskKind = Literal["causal-lm", "classify"]
# How the in-graph loss is formed:
#   lm      - next-token cross-entropy over every labelled position (causal-lm)
#   prompt  - cross-entropy over the label words' first-token logits at the last prompt position (classify, decoder)
#   head    - cross-entropy of a sequence-classification head (classify, encoder)
HeadKind = Literal["lm", "prompt", "head"]


@dataclass(frozen=True)
class TaskSpec:
    kind: TaskKind
    head: HeadKind
    max_length: int
    template: str | None = None  # prompt head: contains "{text}" once
    labels: tuple[str, ...] = ()  # class names in class-index order (classify)
    label_token_ids: tuple[int, ...] = ()  # prompt head: first token of " <label>"

    def __post_init__(self) -> None:
        heads = {"causal-lm": ("lm",), "classify": ("prompt", "head")}
        if self.head not in heads.get(self.kind, ()):
            raise BundleError(f"task kind {self.kind!r} with head {self.head!r} is not a known combination")
        if self.max_length < 2:
            raise BundleError(f"max_length must be >= 2, got {self.max_length}")
        if self.kind == "classify" and len(self.labels) < 2:
            raise BundleError("a classify task needs at least two labels")
        if self.head == "prompt" and (
            self.template is None or self.template.count("{text}") != 1
            or len(self.label_token_ids) != len(self.labels)
        ):
            raise BundleError("a prompt head needs a template with one '{text}' and one token per label")


@dataclass(frozen=True)
class TensorSpec:
    """A trainable tensor: its place in the flat float32 buffer (offset in elements)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    decay: bool  # weight decay applies (matrices); biases and norm weights (1-D) are exempt
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ValueSpec:
    """A graph input or output: name, element type and (symbolic) shape."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class SplitSpec:
    """A frozen-trunk split: the trunk runs transformer layers [0, layer) and has no trainable input, the head
    runs the others and the loss; trunk then head computes the loss graph's outputs."""

    layer: int  # the head's first transformer layer
    layers: int  # the model's transformer layers
    hidden: ValueSpec  # the trunk's output = the head's first input: float32 (batch, seq, hidden size)
    trunk_file: str
    head_file: str
    trunk_ort_file: str | None = None
    head_ort_file: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> SplitSpec:
        hidden = obj["hidden"]
        optional = {k: None if obj.get(k) is None else _str(obj[k]) for k in ("trunk_ort_file", "head_ort_file")}
        spec = cls(_count(obj["layer"]), _count(obj["layers"]),
                   ValueSpec(_str(hidden["name"]), _str(hidden["dtype"]), tuple(hidden["shape"])),
                   _str(obj["trunk_file"]), _str(obj["head_file"]), **optional)
        if not 0 < spec.layer <= spec.layers:
            raise ValueError(f"split layer {spec.layer} is not in 1..{spec.layers}")
        return spec

    @property
    def file_names(self) -> tuple[str | None, ...]:
        return self.trunk_file, self.head_file, self.trunk_ort_file, self.head_ort_file


@dataclass(frozen=True)
class Manifest:
    task: TaskSpec
    inputs: tuple[ValueSpec, ...]
    outputs: tuple[ValueSpec, ...]
    trainable: tuple[TensorSpec, ...]
    buffer_elements: int  # flat buffer length, including alignment padding
    pad_token_id: int
    source: dict[str, Any]  # name, model_type, sha256 of the source weights
    export: dict[str, Any] = field(default_factory=dict)  # exporter config, versions, parity error
    model_file: str = "model.onnx"
    trainable_file: str = "trainable.safetensors"
    tokenizer_file: str = "tokenizer.json"
    ort_model_file: str | None = None  # optional; readers that predate it ignore it
    base_config_file: str | None = None  # the Hugging Face config.json of the base model (for merge)
    # Perturbation slots: every trainable tensor has a leading axis of this size and a batch's rows are
    # this many equal groups, group k computed with slot k; outputs get a leading slot axis.
    slots: int = 1
    adapter: dict[str, Any] | None = None  # method ("lora", "prompt", "bitfit") and its settings
    # The gradient graph (``export --gradients``) and the trainable tensors it differentiates, in manifest
    # order (all of them unless exported with --gradient-layers); the others get no grad/<name> output.
    gradient_file: str | None = None
    gradient_tensors: tuple[str, ...] | None = None
    gradient_ort_file: str | None = None  # the gradient graph in ORT format (export --gradients --ort)
    split: SplitSpec | None = None  # the frozen-trunk split (export --split); model.onnx stays the whole graph
    # Every file of the bundle but manifest.json, by role (FILE_NAMES): what a client that fetches a bundle
    # file by file (a web page) downloads, and the name it passes ONNX Runtime for model_data.
    files: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), so ``from_json(to_json())`` round-trips."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST) -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise BundleError(f"{where}: not a pocketzo bundle manifest")
        version = obj.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"{where}: bundle format_version {version!r}, this pocketzo reads {list(READABLE_VERSIONS)}; "
                "re-export the model with this version of pocketzo"
            )
        try:
            task = obj["task"]
            known = {f.name for f in fields(TaskSpec)}  # newer optional keys are ignored
            return cls(
                task=TaskSpec(**{**{k: v for k, v in task.items() if k in known},
                                 "labels": tuple(task.get("labels", ())),
                                 "label_token_ids": tuple(task.get("label_token_ids", ()))}),
                inputs=tuple(ValueSpec(v["name"], v["dtype"], tuple(v["shape"])) for v in obj["inputs"]),
                outputs=tuple(ValueSpec(v["name"], v["dtype"], tuple(v["shape"])) for v in obj["outputs"]),
                trainable=tuple(
                    TensorSpec(_str(t["name"]), tuple(_count(d) for d in t["shape"]), _count(t["offset"]),
                               bool(t["decay"]), _str(t.get("dtype", "float32")))
                    for t in obj["trainable"]
                ),
                buffer_elements=int(obj["buffer_elements"]),
                pad_token_id=int(obj["pad_token_id"]),
                source=dict(obj["source"]),
                export=dict(obj.get("export", {})),
                model_file=_str(obj["model_file"]),
                trainable_file=_str(obj["trainable_file"]),
                tokenizer_file=_str(obj["tokenizer_file"]),
                ort_model_file=None if obj.get("ort_model_file") is None else _str(obj["ort_model_file"]),
                base_config_file=None if obj.get("base_config_file") is None else _str(obj["base_config_file"]),
                slots=_count(obj.get("slots", 1)),
                adapter=None if obj.get("adapter") is None else dict(obj["adapter"]),
                gradient_file=None if obj.get("gradient_file") is None else _str(obj["gradient_file"]),
                gradient_tensors=None if obj.get("gradient_tensors") is None
                else tuple(_str(n) for n in obj["gradient_tensors"]),
                gradient_ort_file=None if obj.get("gradient_ort_file") is None else _str(obj["gradient_ort_file"]),
                split=None if obj.get("split") is None else SplitSpec.from_json(obj["split"]),
                files={_str(k): _str(v) for k, v in obj["files"].items()} if version >= 3 else _implied_files(obj),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    def validate_files(self, where: str = MANIFEST) -> None:
        """``files`` must name the files the other fields name."""
        named = (self.model_file, self.trainable_file, self.tokenizer_file, self.ort_model_file,
                 self.base_config_file, self.gradient_file, self.gradient_ort_file,
                 *(self.split.file_names if self.split else ()))
        for name in named:
            if name is not None and name not in self.files.values():
                raise BundleError(f"{where}: {name!r} is not in the manifest's files {sorted(self.files.values())}")

    def validate_layout(self, where: str = MANIFEST) -> None:
        """Tensors must be float32, aligned, in order, non-overlapping and inside the buffer."""
        if self.slots < 1:
            raise BundleError(f"{where}: slots must be >= 1, got {self.slots}")
        end = 0
        for t in self.trainable:
            if self.slots > 1 and (not t.shape or t.shape[0] != self.slots):
                raise BundleError(f"{where}: trainable tensor {t.name!r} has shape {list(t.shape)}, but the bundle "
                                  f"has {self.slots} perturbation slots (a leading axis of {self.slots})")
            if t.dtype != "float32":
                raise BundleError(f"{where}: trainable tensor {t.name!r} is {t.dtype}; only float32 is supported")
            if t.offset % ALIGN_ELEMENTS or t.offset < end:
                raise BundleError(f"{where}: trainable tensor {t.name!r} has a bad offset {t.offset}")
            end = t.offset + t.numel
        if end > self.buffer_elements:
            raise BundleError(f"{where}: trainable tensors overflow the buffer ({end} > {self.buffer_elements})")
        specs, n = layout([(t.name, t.shape, t.decay) for t in self.trainable])
        if n != self.buffer_elements or [t.offset for t in specs] != [t.offset for t in self.trainable]:
            raise BundleError(f"{where}: the trainable tensors are not laid out as the format defines (each on the "
                              f"next 64-byte boundary, buffer_elements {n}); re-export the bundle")
        if self.gradient_tensors is not None:
            names = [t.name for t in self.trainable]
            if [x for x in names if x in self.gradient_tensors] != list(self.gradient_tensors):
                raise BundleError(f"{where}: gradient_tensors must be trainable tensors in manifest order, got "
                                  f"{list(self.gradient_tensors)[:3]}...; re-export the bundle")


def _implied_files(obj: dict[str, Any]) -> dict[str, str]:
    """``files`` of a version 1 or 2 manifest: the files it names, and its external data if it says it has some."""
    files = {"model": obj["model_file"], "trainable": obj["trainable_file"], "tokenizer": obj["tokenizer_file"],
             "ort_model": obj.get("ort_model_file"), "base_config": obj.get("base_config_file")}
    if dict(obj.get("export", {})).get("external_data"):
        files["model_data"] = FILE_NAMES["model_data"]
    return {role: _str(name) for role, name in files.items() if name is not None}


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {value!r:.60}")
    return value


def _count(value: Any) -> int:
    """A non-negative integer (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r:.60}")
    return value


def layout(named_shapes: list[tuple[str, tuple[int, ...], bool]]) -> tuple[tuple[TensorSpec, ...], int]:
    """Place tensors one after another, each on a 64-byte boundary; return specs and buffer length."""
    specs, offset = [], 0
    for name, shape, decay in named_shapes:
        spec = TensorSpec(name, tuple(shape), offset, decay)
        specs.append(spec)
        offset += -(-spec.numel // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
    return tuple(specs), offset
