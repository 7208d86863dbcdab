"""A small safetensors reader/writer on numpy alone (the device side has no `safetensors`).

Format: an 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes. Reading straight into caller-owned views
lets the runtime fill its flat trainable buffer with no intermediate copy.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo._io import atomic_open
from pocketzo.errors import BundleError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str], int]:
    """Return ``(tensors, metadata, data_start)``; raise BundleError if the file is not valid safetensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise BundleError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(_MAX_HEADER, size - 8):
                raise BundleError(f"{path}: corrupt safetensors header length {n} (file is {size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    for name, spec in header.items():
        try:
            dtype = _DTYPES[spec["dtype"]]
            begin, end = (int(x) for x in spec["data_offsets"])
            numel = int(np.prod(spec["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{path}: corrupt entry for tensor {name!r}") from None
        if not (0 <= begin <= end and data_start + end <= size and end - begin == numel * dtype.itemsize):
            raise BundleError(
                f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit its shape or the "
                f"file ({size} bytes); the file is truncated or corrupt"
            )
    return header, metadata, data_start


def read_into(path: str | os.PathLike[str], views: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Fill each ``views[name]`` in place from the file; shapes and dtypes must match exactly."""
    header, metadata, data_start = read_header(path)
    missing = sorted(set(views) - set(header))
    if missing:
        raise BundleError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with open(path, "rb") as f:
        for name, view in views.items():
            spec = header[name]
            if _DTYPES[spec["dtype"]] != view.dtype or tuple(spec["shape"]) != view.shape:
                raise BundleError(
                    f"{path}: tensor {name!r} is {spec['dtype']}{spec['shape']}, expected "
                    f"{_CODES.get(view.dtype, view.dtype)}{list(view.shape)}"
                )
            f.seek(data_start + spec["data_offsets"][0])
            if not view.flags.c_contiguous:
                raise ValueError(f"view for {name!r} must be C-contiguous")
            got = f.readinto(memoryview(view).cast("B"))
            if got != view.nbytes:
                raise BundleError(f"{path}: tensor {name!r} is truncated")
    return metadata


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor into a fresh array (keeps file order)."""
    header, _, _ = read_header(path)
    out = {name: np.empty(spec["shape"], _DTYPES[spec["dtype"]]) for name, spec in header.items()}
    read_into(path, out)
    return out


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, npt.NDArray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (in the given order) atomically."""
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    save_streamed(path, {name: (a.shape, a.dtype) for name, a in arrays.items()}, arrays.__getitem__, metadata)


def save_streamed(
    path: str | os.PathLike[str],
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    produce: Callable[[str], npt.NDArray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the tensors ``specs`` names (shape, dtype; in that order) atomically, each made by
    ``produce(name)`` only when it is written: the header needs only the shapes, so at most one tensor
    is in memory at a time."""
    header: dict[str, object] = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype).newbyteorder("<")
        if dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in specs.items():
            a = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype).newbyteorder("<"))
            if a.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: made with shape {a.shape}, declared {tuple(shape)}")
            f.write(memoryview(a).cast("B"))
