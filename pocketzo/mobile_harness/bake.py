"""Bake a bundle's trainable weights back into its graph: the inference model users would ship.

The benchmark's yardstick is this baked session: the same graph with every weight an
initializer, so ONNX Runtime may constant-fold, prepack and fuse as it does for inference.
No ``onnx`` package on the device, so the ModelProto is edited at the protobuf wire level
(stdlib only): the trainable graph inputs are dropped and one TensorProto initializer per
trainable tensor is added, whose data is *external*: it points into the bundle's
``trainable.safetensors`` (or a run's weights file) at that tensor's byte offset. Nothing
is copied; the baked model is a few KB plus links to the bundle's files.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pocketzo.errors import BundleError
from pocketzo.runtime import _safetensors
from pocketzo.runtime.bundle import Bundle

# Field numbers of onnx.proto (ModelProto.graph, GraphProto.initializer/input, TensorProto.*).
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER, _GRAPH_INPUT = 5, 11
_VALUE_INFO_NAME = 1
_T_DIMS, _T_DATA_TYPE, _T_NAME, _T_EXTERNAL_DATA, _T_DATA_LOCATION = 1, 2, 8, 13, 14
_FLOAT, _EXTERNAL = 1, 1
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(number, first, payload_start, end)`` of each top-level field: ``buf[first:end]``
    is the whole field, ``buf[payload_start:end]`` its value. ``number`` is negated for non-LEN
    fields, so that only length-delimited fields (messages, strings) match a positive number."""
    pos = 0
    while pos < len(buf):
        first = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        start = pos
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        elif wire == _LEN:
            length, start = _read_varint(buf, pos)
            pos = start + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("a field runs past the end of the message")
        yield number if wire == _LEN else -number, first, start, pos


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _tensor_proto(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> bytes:
    entries = (("location", location), ("offset", str(offset)), ("length", str(length)))
    body = b"".join(_varint(_T_DIMS << 3 | _VARINT) + _varint(d) for d in shape)
    body += _varint(_T_DATA_TYPE << 3 | _VARINT) + _varint(_FLOAT)
    body += _field(_T_NAME, name.encode())
    for key, value in entries:
        body += _field(_T_EXTERNAL_DATA, _field(1, key.encode()) + _field(2, value.encode()))
    return body + _varint(_T_DATA_LOCATION << 3 | _VARINT) + _varint(_EXTERNAL)


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (absolute byte offset, byte length)`` of each tensor in a safetensors file."""
    header, _, data_start = _safetensors.read_header(path)
    return {k: (data_start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items()}


def bake(bundle: Bundle, out_dir: str | Path, weights: str | Path | None = None) -> Path:
    """Write ``out_dir/model.onnx``: the bundle's graph with its trainable weights as initializers.

    ``out_dir`` gets hard links to the bundle's external data and to ``weights`` (default: the
    bundle's initial trainable weights), which the baked initializers reference; ONNX Runtime
    refuses external data that resolves outside the model's directory, so symlinks will not do.
    Put ``out_dir`` on the bundle's file system, or the files are copied.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = bundle.model_path
    weights_path = Path(weights) if weights is not None else bundle.trainable_path
    specs = {s.name: s for s in bundle.manifest.trainable}
    offsets = safetensors_offsets(weights_path)
    missing = sorted(set(specs) - set(offsets))
    if missing:
        raise BundleError(f"{weights_path}: has no tensor {missing[0]!r} of the bundle")
    link_name = "baked_weights.safetensors"
    for entry in bundle.path.iterdir():  # the graph's own external data, if any
        if entry.name.startswith(src.name + ".") or entry.suffix == ".data":
            _link(entry, out_dir / entry.name)
    _link(weights_path, out_dir / link_name)

    out = out_dir / "model.onnx"
    tmp = out.with_name(out.name + ".tmp")
    # Stream: the source is memory-mapped and copied field by field, never held twice in RAM.
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, open(tmp, "wb") as dst:
        model = memoryview(mapped)
        try:
            _write_baked(model, dst, specs, offsets, weights_path, link_name)
        except ValueError as e:
            raise BundleError(f"{src}: not a readable ONNX model ({e}); re-export the bundle") from None
        finally:
            model.release()
    os.replace(tmp, out)
    return out


def _write_baked(model: memoryview, dst, specs: dict, offsets: dict, weights_path: Path, link_name: str) -> None:
    fields = list(_fields(model))
    graphs = [f for f in fields if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1:
        raise ValueError("no graph")
    _, _, g_start, g_end = graphs[0]
    graph = model[g_start:g_end]
    kept = [(first, end) for number, first, start, end in _fields(graph)
            if not (number == _GRAPH_INPUT and _value_info_name(graph[start:end]) in specs)]
    added = []
    for name, spec in specs.items():
        offset, length = offsets[name]
        if length != spec.numel * 4:
            raise BundleError(f"{weights_path}: tensor {name!r} has {length} bytes, expected {spec.numel * 4}")
        added.append(_field(_GRAPH_INITIALIZER, _tensor_proto(name, spec.shape, link_name, offset, length)))
    graph_len = sum(end - first for first, end in kept) + sum(map(len, added))
    for number, first, _, end in fields:
        if number != _MODEL_GRAPH:
            dst.write(model[first:end])
    dst.write(_varint(_MODEL_GRAPH << 3 | _LEN) + _varint(graph_len))
    for first, end in kept:
        dst.write(graph[first:end])
    for piece in added:
        dst.write(piece)
    graph.release()


def _value_info_name(msg: memoryview) -> str | None:
    for number, _, start, end in _fields(msg):
        if number == _VALUE_INFO_NAME:
            return bytes(msg[start:end]).decode()
    return None


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        os.link(target, link)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(target, link)
