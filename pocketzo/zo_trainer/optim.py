"""Update rules beyond plain ZO-SGD, and the shape of the perturbation, as one state object.

A step measures q projected gradients g_j along directions u_j = sigma * z_j. The estimate is

    e = (1/q) sum_j g_j sigma z_j

and the update rule turns it into theta -= lr_t * d:

    momentum beta      m = beta m + (1 - beta) e;  d = m / (1 - beta^t)      (ZO-SGD-MMT, bias-corrected)
    adaptive           lr_t = lr / (sqrt(v / (1 - 0.99^t)) + 1e-8),  v = 0.99 v + 0.01 mean_j g_j^2
    sign               d = sign(d)
    sparsity s         sigma_i = 0 on the fraction s of each tensor's largest-magnitude weights, else 1
                       (as Sparse MeZO, the mask is fixed from the initial weights)
    curvature alpha    h = ((1 - alpha) + alpha mean_j c_j z_j^2) h,  sigma = h^-1/2,  h_0 = 1
                       with c_j = |L+ + L- - 2 L(theta)| / (2 eps^2) the curvature along u_j (HiZOO-like:
                       the directions, and so the steps, shrink where the loss is curved)

Why the adaptive second moment is a scalar: with +-1 noise every element of g z has magnitude |g|,
so Adam's per-element second moment of a one-direction estimate is the same number for every
weight. Keeping one scalar is exact there and an approximation otherwise (q > 1, sigma != 1).

Memory beyond the weights (n = trainable elements; everything float32):

    plain ZO-SGD (the fused fast path)    0
    sparsity > 0 or curvature > 0         n  (sigma; a sparse mask alone could be n/32 bits: not done)
    momentum > 0                          n  (m)
    adaptive                              2 scalars
    sign                                  0
    any non-plain update                  one chunk (1 MiB) per thread, two with curvature

``State.extra_bytes`` reports it, and the tests hold it to this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.config import TrainConfig
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS, Perturber, fill_noise

BETA2, ADAPTIVE_EPS = 0.99, 1e-8


def sparse_sigma(params: FlatParameters, sparsity: float) -> npt.NDArray[np.float32]:
    """1 on the (1 - sparsity) smallest-magnitude weights of each tensor, 0 elsewhere (and in padding)."""
    sigma = np.zeros(params.buffer.shape[0], np.float32)
    for spec in params.specs:
        w = np.abs(params.views[spec.name].ravel())
        keep = max(1, round(w.size * (1.0 - sparsity)))
        chosen = np.argsort(w, kind="stable")[:keep]
        view = sigma[spec.offset : spec.offset + w.size]
        view[chosen] = 1.0
    return sigma


@dataclass
class State:
    """The optimizer's memory: what a checkpoint saves besides the weights."""

    sigma: npt.NDArray[np.float32] | None = None
    momentum: npt.NDArray[np.float32] | None = None
    v: float = 0.0  # adaptive: EMA of g^2
    t: int = 0  # updates applied (bias corrections)
    scratch: list[npt.NDArray[np.float32]] = field(default_factory=list, repr=False)

    @classmethod
    def initial(cls, params: FlatParameters, config: TrainConfig, threads: int) -> State:
        n = params.buffer.shape[0]
        sigma = None
        if config.sparsity:
            sigma = sparse_sigma(params, config.sparsity)
        elif config.curvature:
            sigma = np.ones(n, np.float32)
        momentum = np.zeros(n, np.float32) if config.momentum else None
        per_thread = 0 if config.plain_update else (2 if config.curvature else 1)
        scratch = [np.empty(CHUNK_ELEMENTS, np.float32) for _ in range(per_thread * threads)]
        return cls(sigma, momentum, scratch=scratch)

    @property
    def extra_bytes(self) -> int:
        arrays = [a for a in (self.sigma, self.momentum) if a is not None] + self.scratch
        return sum(a.nbytes for a in arrays)

    def arrays(self) -> dict[str, npt.NDArray[np.float32]]:
        return {k: a for k, a in (("sigma", self.sigma), ("momentum", self.momentum)) if a is not None}

    def scalars(self) -> dict[str, float]:
        return {"v": self.v, "t": self.t}

    def load(self, arrays: dict[str, npt.NDArray[np.float32]], scalars: dict[str, float]) -> None:
        for name, have in self.arrays().items():
            if name not in arrays or arrays[name].shape != have.shape:
                raise ValueError(f"optimizer state {name!r} is missing or has the wrong shape")
            have[...] = arrays[name]
        self.v, self.t = float(scalars["v"]), int(scalars["t"])


class Update:
    """One step's update as a chunk op for ``Perturber.apply`` (fused with the step's last restore
    and the next step's first perturbation). Creating it advances the scalar state (t, v)."""

    def __init__(self, config: TrainConfig, state: State, seeds: list[int], grads: list[float], lr: float,
                 curvatures: list[float] | None = None):
        self.config, self.state = config, state
        self.seeds, self.curvatures = seeds, curvatures
        q = len(seeds)
        self.coefs = [g / q for g in grads]
        state.t += 1
        scale = 1.0
        if config.momentum:
            scale /= 1.0 - config.momentum ** state.t
        if config.adaptive:
            state.v = BETA2 * state.v + (1.0 - BETA2) * sum(g * g for g in grads) / q
            scale /= math.sqrt(state.v / (1.0 - BETA2 ** state.t)) + ADAPTIVE_EPS
        self.step_size = np.float32(lr * scale)

    def apply_chunk(self, p: Perturber, chunk: int, theta: npt.NDArray[np.float32], z: npt.NDArray[np.float32],
                    worker: int) -> None:
        cfg, st = self.config, self.state
        n, start = theta.shape[0], chunk * CHUNK_ELEMENTS
        per_thread = 2 if cfg.curvature else 1
        est = st.scratch[per_thread * worker][:n]
        curv = st.scratch[per_thread * worker + 1][:n] if cfg.curvature else None
        for j, seed in enumerate(self.seeds):
            fill_noise(seed, chunk, p.distribution, z)
            if j == 0:
                np.multiply(z, np.float32(self.coefs[j]), out=est)
            else:
                est += np.float32(self.coefs[j]) * z
            if curv is not None:
                c = np.float32(cfg.curvature * self.curvatures[j] / len(self.seeds))
                np.multiply(z, z, out=z)
                if j == 0:
                    np.multiply(z, c, out=curv)
                else:
                    curv += c * z
        if st.sigma is not None:
            sigma = st.sigma[start : start + n]
            est *= sigma  # the estimate lies along the directions that were measured (old sigma)
            if curv is not None:  # h <- f h, so sigma <- sigma / sqrt(f)
                curv += np.float32(1.0 - cfg.curvature)
                np.sqrt(curv, out=curv)
                np.divide(sigma, curv, out=sigma)
        d = est
        if st.momentum is not None:
            m = st.momentum[start : start + n]
            m *= np.float32(cfg.momentum)
            est *= np.float32(1.0 - cfg.momentum)
            m += est
            d = m
        if cfg.sign:
            np.sign(d, out=est)
            d = est
        np.multiply(d, self.step_size, out=est)
        np.subtract(theta, est, out=theta)
