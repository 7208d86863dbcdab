"""Counter-based perturbation noise over the flat weight buffer.

z is never held whole. The buffer is cut into fixed chunks of ``CHUNK_ELEMENTS``; chunk i of
step seed s draws from its own generator keyed by ``(s, i)``, so z is the same whatever the
thread count or order in which chunks run, and regenerating z costs no stored state: the
seed trick of MeZO, made parallel. Extra memory is one chunk buffer per thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import numpy.typing as npt

Distribution = Literal["rademacher", "gaussian"]
CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32: part of the noise definition, fixed across versions
_UNIT = np.array([-1.0, 1.0], dtype=np.float32)


def chunk_generator(seed: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, chunk])))


def fill_noise(seed: int, chunk: int, distribution: Distribution, out: npt.NDArray[np.float32]) -> None:
    """Write unit-variance noise of (seed, chunk) into ``out`` (length <= CHUNK_ELEMENTS)."""
    rng = chunk_generator(seed, chunk)
    n = out.shape[0]
    if distribution == "rademacher":
        bits = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8), count=n)
        np.take(_UNIT, bits, out=out)
    else:
        rng.standard_normal(dtype=np.float32, out=out)


class Perturber:
    """Applies ``theta += c * z(seed)`` to a flat float32 buffer, chunk by chunk, on a thread pool.

    ``decay_segments`` are element ranges whose weights may also be scaled by a factor in the
    same pass (decoupled weight decay fused into the update).
    """

    def __init__(
        self,
        buffer: npt.NDArray[np.float32],
        distribution: Distribution = "rademacher",
        threads: int = 1,
        decay_segments: Sequence[tuple[int, int]] = (),
    ):
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
        if buffer.dtype != np.float32 or buffer.ndim != 1:
            raise ValueError("buffer must be a 1-D float32 array")
        self.buffer = buffer
        self.distribution: Distribution = distribution
        self.threads = max(1, threads)
        n = buffer.shape[0]
        self.n_chunks = -(-n // CHUNK_ELEMENTS)
        # Per chunk: its decayed sub-ranges, relative to the chunk start.
        self._decay: list[list[tuple[int, int]]] = [[] for _ in range(self.n_chunks)]
        for a, b in decay_segments:
            for c in range(a // CHUNK_ELEMENTS, -(-b // CHUNK_ELEMENTS)):
                lo, hi = max(a, c * CHUNK_ELEMENTS), min(b, (c + 1) * CHUNK_ELEMENTS)
                if lo < hi:
                    self._decay[c].append((lo - c * CHUNK_ELEMENTS, hi - c * CHUNK_ELEMENTS))
        self._scratch = [np.empty(CHUNK_ELEMENTS, np.float32) for _ in range(self.threads)]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Perturber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, seed: int, coef: float, decay_factor: float = 1.0, decay_coef: float | None = None) -> None:
        """``theta += coef * z``; on decay segments ``theta = decay_factor * theta + decay_coef * z``."""
        c = np.float32(coef)
        d = np.float32(decay_factor)
        dc = np.float32(coef if decay_coef is None else decay_coef)
        if self._pool is None:
            self._run(0, range(self.n_chunks), seed, c, d, dc)
            return
        futures = [
            self._pool.submit(self._run, w, range(w, self.n_chunks, self.threads), seed, c, d, dc)
            for w in range(self.threads)
        ]
        for f in futures:
            f.result()

    def _run(self, worker: int, chunks: range, seed: int, c: np.float32, d: np.float32, dc: np.float32) -> None:
        buf, scratch = self.buffer, self._scratch[worker]
        decaying = d != 1.0 or dc != c
        for i in chunks:
            start = i * CHUNK_ELEMENTS
            theta = buf[start : start + CHUNK_ELEMENTS]
            z = scratch[: theta.shape[0]]
            fill_noise(seed, i, self.distribution, z)
            ranges = self._decay[i] if decaying else ()
            if not ranges:
                np.multiply(z, c, out=z)
                np.add(theta, z, out=theta)
                continue
            edges = [0]
            for a, b in ranges:
                edges += [a, b]
            edges.append(theta.shape[0])
            for k in range(len(edges) - 1):  # alternating plain / decayed runs
                a, b = edges[k], edges[k + 1]
                if a == b:
                    continue
                t, zz = theta[a:b], z[a:b]
                if k % 2:
                    np.multiply(t, d, out=t)
                    np.multiply(zz, dc, out=zz)
                else:
                    np.multiply(zz, c, out=zz)
                np.add(t, zz, out=t)

    def noise(self, seed: int) -> npt.NDArray[np.float32]:
        """The whole z of ``seed`` as one array: for tests and references, never the hot path."""
        z = np.empty_like(self.buffer)
        for i in range(self.n_chunks):
            fill_noise(seed, i, self.distribution, z[i * CHUNK_ELEMENTS : (i + 1) * CHUNK_ELEMENTS])
        return z
