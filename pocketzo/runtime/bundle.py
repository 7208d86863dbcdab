"""An opened bundle directory: its manifest (``pocketzo.runtime.manifest``) read and validated, and every file it
names checked to be inside the directory and present, before anything allocates or loads a graph."""

from __future__ import annotations

import json
from pathlib import Path

from pocketzo.errors import BundleError
from pocketzo.runtime import _safetensors
from pocketzo.runtime.manifest import MANIFEST, Manifest, TaskSpec


def member_file(directory: Path, name: str, what: str, manifest: str = MANIFEST) -> Path:
    """Resolve a file that ``directory``'s manifest names, refusing anything outside the directory."""
    p = (directory / name).resolve()
    if Path(name).is_absolute() or directory.resolve() not in p.parents:
        raise BundleError(f"{directory / manifest}: file name {name!r} points outside {what}")
    if not p.is_file():
        raise BundleError(f"{p}: missing from {what}; re-export it")
    return p


class Bundle:
    """An opened, validated bundle directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise BundleError(f"{self.path}: bundle directory not found; create one with `pocketzo export`")
        try:
            obj = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{manifest_path}: missing; is {self.path} a bundle made by `pocketzo export`?") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{manifest_path}: corrupt JSON ({e}); re-export the bundle") from None
        self.manifest = Manifest.from_json(obj, str(manifest_path))
        m = self.manifest
        m.validate_layout(str(manifest_path))
        for name in (m.model_file, m.trainable_file, m.tokenizer_file, m.ort_model_file, m.base_config_file,
                     m.gradient_file, m.gradient_ort_file, *(m.split.file_names if m.split else ()),
                     *m.files.values()):
            if name is not None:
                self._member(name)
        m.validate_files(str(manifest_path))
        self._check_trainable_file()

    def _check_trainable_file(self) -> None:
        """The manifest's tensors must be those of trainable.safetensors (read from its header, before anything
        allocates a buffer of the manifest's size)."""
        header, _, _ = _safetensors.read_header(self.trainable_path)
        for t in self.manifest.trainable:
            got = header.get(t.name)
            if got is None or [int(d) for d in got["shape"]] != list(t.shape):
                have = "missing" if got is None else f"shape {got['shape']}"
                raise BundleError(f"{self.trainable_path}: tensor {t.name!r} is {have}, the manifest says shape "
                                  f"{list(t.shape)}; re-export the bundle")

    def _member(self, name: str) -> Path:
        return member_file(self.path, name, "the bundle")

    @property
    def model_path(self) -> Path:
        return self._member(self.manifest.model_file)

    @property
    def ort_path(self) -> Path | None:
        """The ORT-format model, if the bundle has one."""
        name = self.manifest.ort_model_file
        return self._member(name) if name is not None else None

    @property
    def gradient_path(self) -> Path | None:
        """The gradient graph (``export --gradients``), if the bundle has one."""
        name = self.manifest.gradient_file
        return self._member(name) if name is not None else None

    @property
    def gradient_ort_path(self) -> Path | None:
        """The gradient graph in ORT format (``export --gradients --ort``), if the bundle has one."""
        name = self.manifest.gradient_ort_file
        return self._member(name) if name is not None else None

    def split_paths(self, prefer_ort: bool = True) -> tuple[Path, Path] | None:
        """The trunk and head graphs of a split bundle (ORT format when it has them and ``prefer_ort``)."""
        split = self.manifest.split
        if split is None:
            return None
        ort_files = prefer_ort and split.trunk_ort_file is not None and split.head_ort_file is not None
        trunk, head = (split.trunk_ort_file, split.head_ort_file) if ort_files else (split.trunk_file, split.head_file)
        return self._member(trunk), self._member(head)

    def weights_file_backed(self, graph: Path) -> bool:
        """Whether ``graph`` (one of this bundle's) reads float32 frozen weights from ONNX external data, which a
        session can leave memory-mapped from the bundle's files (``SessionConfig.map_weights``). Every bundle
        exported since the weights moved to model.onnx.data; before, only large ones. Not an ORT-format graph (it
        holds its weights inside) nor a quantized base (its kernels repack the weights at load either way)."""
        export = self.manifest.export
        return graph.suffix == ".onnx" and bool(export.get("external_data")) and not export.get("quantized")

    @property
    def base_config_path(self) -> Path | None:
        name = self.manifest.base_config_file
        return self._member(name) if name is not None else None

    @property
    def trainable_path(self) -> Path:
        return self._member(self.manifest.trainable_file)

    @property
    def tokenizer_path(self) -> Path:
        return self._member(self.manifest.tokenizer_file)

    @property
    def task(self) -> TaskSpec:
        return self.manifest.task
