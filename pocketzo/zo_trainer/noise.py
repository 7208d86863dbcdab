"""Counter-based perturbation noise over the flat weight buffer.

z is never held whole. The buffer is cut into fixed chunks of ``CHUNK_ELEMENTS``; chunk i of
step seed s draws from its own generator keyed by ``(s, i)``, so z is the same whatever the
thread count or order in which chunks run, and regenerating z costs no stored state: the
seed trick of MeZO, made parallel. Extra memory is one chunk buffer per thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Distribution = Literal["rademacher", "gaussian"]
CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32: part of the noise definition, fixed across versions
_TWO_PI = np.float32(2 * np.pi)


def chunk_generator(seed: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, chunk])))


def fill_noise(
    seed: int, chunk: int, distribution: Distribution, out: npt.NDArray[np.float32], scale: float = 1.0
) -> None:
    """Write ``scale * z`` for the unit-variance noise z of (seed, chunk) into ``out`` (length <= CHUNK_ELEMENTS).

    Rademacher: one random bit per element, 1 -> +1, 0 -> -1; ``scale * z`` is exact.
    Gaussian: Box-Muller on pairs of 23-bit uniforms from the generator's raw 64-bit words,
    exact up to float32 resolution (|z| <= 5.65); about 4x faster than numpy's ziggurat.
    """
    rng = chunk_generator(seed, chunk)
    n = out.shape[0]
    s = np.float32(scale)
    if distribution == "rademacher":
        # the generator's raw 64-bit words, little-endian, are the bit stream (as Generator.bytes gives it)
        words = rng.bit_generator.random_raw((n + 63) // 64).astype("<u8", copy=False)
        bits = np.unpackbits(words.view(np.uint8), count=n)
        np.copyto(out, bits, casting="unsafe")  # 0.0 or 1.0
        np.multiply(out, s + s, out=out)  # 0 or 2s, exact
        np.subtract(out, s, out=out)  # -s or +s, exact
        return
    half = (n + 1) // 2
    u = rng.bit_generator.random_raw(half).view(np.uint32)  # 2 * half words
    np.right_shift(u, np.uint32(9), out=u)
    np.bitwise_or(u, np.uint32(0x3F800000), out=u)  # a float32 in [1, 2) with 23 random mantissa bits
    f = u.view(np.float32)
    radius, angle = f[:half], f[half:]
    np.subtract(np.float32(2), radius, out=radius)  # (0, 1]: log is finite
    np.log(radius, out=radius)
    np.multiply(radius, np.float32(-2), out=radius)
    np.sqrt(radius, out=radius)
    np.multiply(radius, s, out=radius)  # scale * sqrt(-2 ln u1)
    np.subtract(angle, np.float32(1), out=angle)  # [0, 1)
    np.multiply(angle, _TWO_PI, out=angle)
    cos_n, sin_n = half, n - half
    np.cos(angle[:cos_n], out=out[:cos_n])
    np.multiply(out[:cos_n], radius[:cos_n], out=out[:cos_n])
    np.sin(angle[:sin_n], out=out[cos_n:])
    np.multiply(out[cos_n:], radius[:sin_n], out=out[cos_n:])


@dataclass(frozen=True)
class Term:
    """``theta += coef * z(seed)``; on decay segments ``theta = decay_factor * theta + decay_coef * z(seed)``."""

    seed: int
    coef: float
    decay_factor: float = 1.0
    decay_coef: float | None = None  # None: same as coef


class ChunkOp(Protocol):
    """Any other per-chunk work that ``Perturber.apply`` can fuse into its pass (an optimizer update)."""

    def apply_chunk(self, perturber: Perturber, chunk: int, theta: npt.NDArray[np.float32],
                    z: npt.NDArray[np.float32], worker: int) -> None: ...


class Perturber:
    """Applies terms ``theta += c * z(seed)`` to a flat float32 buffer, chunk by chunk, on a thread pool.

    Several terms given to one ``apply`` run in ONE pass over memory: each chunk of theta stays
    in cache while its terms are applied in order, with exactly the float32 operations (and so
    the rounding) of separate passes. ``decay_segments`` are element ranges whose weights a term
    may also scale (decoupled weight decay fused into the update). ``sigma``, if given, is a
    per-element scale of the direction: terms add ``c * sigma * z`` (sparse perturbation: sigma is
    0 or 1; curvature: sigma = h^-1/2). It is read at each pass, so its owner may change it.

    Extra memory: one chunk (1 MiB) of scratch per thread.
    """

    def __init__(
        self,
        buffer: npt.NDArray[np.float32],
        distribution: Distribution = "rademacher",
        threads: int = 1,
        decay_segments: Sequence[tuple[int, int]] = (),
        sigma: npt.NDArray[np.float32] | None = None,
    ):
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
        if buffer.dtype != np.float32 or buffer.ndim != 1:
            raise ValueError("buffer must be a 1-D float32 array")
        if sigma is not None and (sigma.shape != buffer.shape or decay_segments):
            raise ValueError("sigma must match the buffer, and cannot be combined with decay segments")
        self.buffer, self.sigma = buffer, sigma
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

    def decay_ranges(self, chunk: int) -> list[tuple[int, int]]:
        """The decayed element ranges of ``chunk``, relative to its start."""
        return self._decay[chunk]

    def add(self, seed: int, coef: float, decay_factor: float = 1.0, decay_coef: float | None = None) -> None:
        """One term in its own pass (see ``Term``)."""
        self.apply(Term(seed, coef, decay_factor, decay_coef))

    def apply(self, *terms: Term | ChunkOp) -> None:
        """Apply ``terms`` (and chunk ops) in order, in one pass over the buffer."""
        if not terms:
            return
        workers = min(self.threads, self.n_chunks)  # a buffer of one chunk (small adapters) runs inline
        if self._pool is None or workers == 1:
            self._run(0, range(self.n_chunks), terms)
            return
        futures = [self._pool.submit(self._run, w, range(w, self.n_chunks, workers), terms) for w in range(workers)]
        for f in futures:
            f.result()

    def _run(self, worker: int, chunks: range, terms: Sequence[Term | ChunkOp]) -> None:
        buf, scratch = self.buffer, self._scratch[worker]
        for i in chunks:
            start = i * CHUNK_ELEMENTS
            theta = buf[start : start + CHUNK_ELEMENTS]
            z = scratch[: theta.shape[0]]
            for t in terms:
                if isinstance(t, Term):
                    self._apply_term(i, theta, z, t)
                else:
                    t.apply_chunk(self, i, theta, z, worker)

    def _apply_term(self, chunk: int, theta: npt.NDArray[np.float32], z: npt.NDArray[np.float32], t: Term) -> None:
        c, d = np.float32(t.coef), np.float32(t.decay_factor)
        dc = c if t.decay_coef is None else np.float32(t.decay_coef)
        ranges = self._decay[chunk] if (d != 1.0 or dc != c) else ()
        if not ranges:
            fill_noise(t.seed, chunk, self.distribution, z, c)
            if self.sigma is not None:
                start = chunk * CHUNK_ELEMENTS
                np.multiply(z, self.sigma[start : start + z.shape[0]], out=z)
            np.add(theta, z, out=theta)
            return
        fill_noise(t.seed, chunk, self.distribution, z)
        edges = [0]
        for a, b in ranges:
            edges += [a, b]
        edges.append(theta.shape[0])
        for k in range(len(edges) - 1):  # alternating plain / decayed runs
            a, b = edges[k], edges[k + 1]
            if a == b:
                continue
            tt, zz = theta[a:b], z[a:b]
            if k % 2:
                np.multiply(tt, d, out=tt)
                np.multiply(zz, dc, out=zz)
            else:
                np.multiply(zz, c, out=zz)
            np.add(tt, zz, out=tt)

    def noise(self, seed: int) -> npt.NDArray[np.float32]:
        """The whole z of ``seed`` as one array: for tests and references, never the hot path."""
        z = np.empty_like(self.buffer)
        for i in range(self.n_chunks):
            fill_noise(seed, i, self.distribution, z[i * CHUNK_ELEMENTS : (i + 1) * CHUNK_ELEMENTS])
        return z
