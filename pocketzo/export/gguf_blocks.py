"""A GGUF tensor's quantized blocks, unpacked into what ONNX Runtime's block-quantized operators take.

``MatMulNBits`` and ``GatherBlockQuantized`` store a weight row (an output channel, along K) as blocks of
``block_size`` unsigned integers q with one float32 scale s and one zero point z per block: w = s * (q - z). Their
CPU kernels take 4 or 8 bits (ONNX Runtime 1.32 also 2), and uint8 zero points; ``MatMulNBits`` also takes float
zero points at 4 bits, ``GatherBlockQuantized`` never (both checked 2026-12-07). So each GGUF block type maps as:

    type   GGUF block                                     here: bits, block, zero point
    Q8_0   32 int8 q, f16 d:           w = d q            8, 32, 128   (q + 128)
    Q5_0   32 5-bit q, f16 d:          w = d (q - 16)     8, 32, 16    (5-bit values in 8-bit storage)
    Q4_0   32 4-bit q, f16 d:          w = d (q - 8)      4, 32, 8
    Q6_K   256: 16 x 16 6-bit q, int8 scales, f16 d:  w = d sc (q - 32)          8, 16, 32
    Q4_K   256: 8 x 32 4-bit q, 6-bit scales and mins, f16 d, dmin:  w = d sc q - dmin m   4, 32, 0, minus a min

Q4_K's minimum cannot become a zero point everywhere (a sub-block may have sc = 0 and m > 0: 16 of the 1.5B
model's 42M sub-blocks), so it is kept apart, ``mins`` per block: w = s q - min. Every value is the GGUF's own,
with no second rounding; ``dequantize`` gives back gguf's reference dequantization, bit for bit in the tests.
The byte layouts are those of ggml's block structs (ggml-common.h), read with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Blocks:
    """A [rows, cols] weight as blocks along cols: w[r, b*block + i] = scales[r, b] * (q[r, ...] - zero_point)
    - mins[r, b]."""

    bits: int
    block_size: int
    q: npt.NDArray[np.uint8]  # [rows, cols], one value per weight (unpacked)
    scales: npt.NDArray[np.float32]  # [rows, cols / block_size]
    zero_point: int  # the same for every block
    mins: npt.NDArray[np.float32] | None = None  # [rows, cols / block_size], Q4_K's

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    def dequantize(self) -> npt.NDArray[np.float32]:
        rows, cols = self.shape
        q = self.q.reshape(rows, -1, self.block_size).astype(np.float32) - np.float32(self.zero_point)
        w = self.scales[..., None] * q
        if self.mins is not None:
            w = w - self.mins[..., None]
        return w.reshape(rows, cols).astype(np.float32)

    def packed(self) -> npt.NDArray[np.uint8]:
        """q as the operators store it: [rows, blocks, bytes per block], 4 bits two per byte, low nibble first."""
        rows, cols = self.shape
        q = self.q.reshape(rows, cols // self.block_size, self.block_size)
        return np.ascontiguousarray(q if self.bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4))


SUPPORTED = ("Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q4_K")


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def unpack(data: np.ndarray, kind: str, shape: tuple[int, int]) -> Blocks:
    """The blocks of a GGUF tensor: ``data`` its raw bytes (``ReaderTensor.data``), ``kind`` its type name,
    ``shape`` (rows, cols) as transformers holds it."""
    rows, cols = shape
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1)
    if kind not in SUPPORTED:
        raise ValueError(f"GGUF block type {kind} has no exact ONNX Runtime form here (supported: {SUPPORTED})")
    return {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_0": _q4_0, "Q6_K": _q6_k, "Q4_K": _q4_k}[kind](raw, rows, cols)


def _q8_0(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    b = raw.reshape(rows, cols // 32, 34)
    q = b[..., 2:].view(np.int8).astype(np.int16) + 128
    return Blocks(8, 32, q.astype(np.uint8).reshape(rows, cols), _f16(b[..., :2]).reshape(rows, -1), 128)


def _q5_0(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    b = raw.reshape(rows, cols // 32, 22)
    high = np.ascontiguousarray(b[..., 2:6]).view("<u4")  # [rows, blocks, 1]: bit j is value j's fifth bit
    bit = (high >> np.arange(32, dtype=np.uint32)) & 1  # [rows, blocks, 32]
    low = b[..., 6:22]
    nibbles = np.concatenate([low & 0x0F, low >> 4], axis=-1)  # values 0..15, then 16..31
    q = (nibbles | (bit.astype(np.uint8) << 4)).reshape(rows, cols)
    return Blocks(8, 32, q, _f16(b[..., :2]).reshape(rows, -1), 16)


def _q4_0(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    b = raw.reshape(rows, cols // 32, 18)
    q = np.concatenate([b[..., 2:] & 0x0F, b[..., 2:] >> 4], axis=-1).reshape(rows, cols)
    return Blocks(4, 32, q, _f16(b[..., :2]).reshape(rows, -1), 8)


def _q6_k(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    b = raw.reshape(rows, cols // 256, 210)
    ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208].view(np.int8), _f16(b[..., 208:210])
    q = np.empty((rows, cols // 256, 256), np.uint8)
    for half in range(2):  # each half: 128 values from 64 low-nibble bytes and 32 high-bit bytes
        lo, hi = ql[..., 64 * half : 64 * half + 64], qh[..., 32 * half : 32 * half + 32]
        at = 128 * half
        q[..., at : at + 32] = (lo[..., :32] & 0x0F) | ((hi & 3) << 4)
        q[..., at + 32 : at + 64] = (lo[..., 32:] & 0x0F) | (((hi >> 2) & 3) << 4)
        q[..., at + 64 : at + 96] = (lo[..., :32] >> 4) | (((hi >> 4) & 3) << 4)
        q[..., at + 96 : at + 128] = (lo[..., 32:] >> 4) | (((hi >> 6) & 3) << 4)
    scales = (d * sc.astype(np.float32)).reshape(rows, -1)  # one per 16 values
    return Blocks(8, 16, q.reshape(rows, cols), scales, 32)


def _q4_k(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    b = raw.reshape(rows, cols // 256, 144)
    d, dmin, packed, qs = _f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:16], b[..., 16:144]
    # 8 six-bit scales and mins in 12 bytes: the first four whole in bytes 0-3 / 4-7, the last four split between
    # the low / high nibble of bytes 8-11 and the top two bits of bytes 0-3 / 4-7
    sc = np.concatenate([packed[..., 0:4] & 63, (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)], -1)
    m = np.concatenate([packed[..., 4:8] & 63, (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)], -1)
    chunks = qs.reshape(rows, cols // 256, 4, 32)  # 4 x 32 bytes: low nibbles sub-block 2i, high nibbles 2i+1
    q = np.stack([chunks & 0x0F, chunks >> 4], axis=3).reshape(rows, cols)
    scales = (d * sc.astype(np.float32)).reshape(rows, -1)
    mins = (dmin * m.astype(np.float32)).reshape(rows, -1)
    return Blocks(4, 32, q, scales, 0, mins)
