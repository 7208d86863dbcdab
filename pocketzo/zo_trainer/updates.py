"""Update rules: an ``Estimate`` (seeds and projected gradients g_j) becomes the ops of ONE pass over
theta, with the optimizer state they need. A step measures g_j along u_j = sigma * z_j; the estimate is

    e = (1/q) sum_j g_j sigma z_j

and the update is theta -= lr_t * d:

    plain              d = e
    momentum beta      m = beta m + (1 - beta) e;  d = m / (1 - beta^t)      (ZO-SGD-MMT, bias-corrected)
    adaptive           lr_t = lr / (sqrt(v / (1 - 0.99^t)) + 1e-8),  v = 0.99 v + 0.01 mean_j g_j^2
    normalize          lr_t = lr / (std_j g_j + 1e-8): the spread of this step's q estimates (FZOO; as
                       g_j = (L_j - L_0) / eps, that is the spread of the perturbed losses over eps)
    sign               d = sign(d)
    sparsity s         sigma_i = 0 on the fraction s of each tensor's largest-magnitude weights, else 1
                       (as Sparse MeZO, the mask is fixed from the initial weights)
    curvature alpha    h = ((1 - alpha) + alpha mean_j c_j z_j^2) h,  sigma = h^-1/2,  h_0 = 1
                       with c_j the curvature along u_j (HiZOO-like: the directions, and so the steps,
                       shrink where the loss is curved)

Plain, adaptive, normalized, sparse, and sign of one Rademacher direction only *rescale* the step: the update is
``Term(seed_j, -lr_t g_j / q)`` per direction (sign(g z) = sign(g) z when z = +-1), which the sequential
evaluator fuses with the restore of the last perturbation. Those updates generate z no more often
than plain ZO-SGD: 3 times per two-sided step. Momentum, curvature and sign over several directions
or Gaussian noise need per-weight work: ``PerWeightUpdate``, a chunk op that regenerates each z_j.

Why the adaptive second moment is a scalar: with +-1 noise every element of g z has magnitude |g|,
so Adam's per-element second moment of a one-direction estimate is the same number for every
weight. Keeping one scalar is exact there and an approximation otherwise (q > 1, sigma != 1).

Memory beyond the weights (n = trainable elements; everything float32):

    plain, adaptive, normalize, sign       0
    sparsity > 0 or curvature > 0          n  (sigma; a sparse mask alone could be n/32 bits: not done)
    momentum > 0                           n  (m)
    a per-weight update                    one chunk (1 MiB) per thread, two with curvature

``State.extra_bytes`` reports it, and the tests hold it to this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.estimators import Estimate
from pocketzo.zo_trainer.method import Method
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS, ChunkOp, Perturber, Term, fill_noise

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


def rescales_only(method: Method) -> bool:
    """Whether the update is a scalar times the estimate (see the module docstring): no per-weight work."""
    exact_sign = method.directions == 1 and method.perturbation == "rademacher"
    return not (method.momentum or method.curvature or (method.sign and not exact_sign))


@dataclass
class State:
    """The optimizer's memory: what a checkpoint saves besides the weights."""

    sigma: npt.NDArray[np.float32] | None = None
    momentum: npt.NDArray[np.float32] | None = None  # ZO momentum, SGD momentum, or AdamW's first moment
    second_moment: npt.NDArray[np.float32] | None = None  # AdamW's (first-order runs)
    v: float = 0.0  # adaptive: EMA of g^2
    t: int = 0  # updates applied (bias corrections)
    scratch: list[npt.NDArray[np.float32]] = field(default_factory=list, repr=False)

    @classmethod
    def initial(cls, params: FlatParameters, method: Method, threads: int) -> State:
        n = params.buffer.shape[0]
        sigma = None
        if method.sparsity:
            sigma = sparse_sigma(params, method.sparsity)
        elif method.curvature:
            sigma = np.ones(n, np.float32)
        momentum = np.zeros(n, np.float32) if method.momentum else None
        scratch = [np.empty(CHUNK_ELEMENTS, np.float32) for _ in range(scratch_chunks(method, threads))]
        return cls(sigma, momentum, scratch=scratch)

    @property
    def extra_bytes(self) -> int:
        arrays = [*self.arrays().values(), *self.scratch]
        return sum(a.nbytes for a in arrays)

    def arrays(self) -> dict[str, npt.NDArray[np.float32]]:
        named = (("sigma", self.sigma), ("momentum", self.momentum), ("second_moment", self.second_moment))
        return {k: a for k, a in named if a is not None}

    def scalars(self) -> dict[str, float]:
        return {"v": self.v, "t": self.t}

    def load(self, arrays: dict[str, npt.NDArray[np.float32]], scalars: dict[str, float]) -> None:
        for name, have in self.arrays().items():
            if name not in arrays or arrays[name].shape != have.shape:
                raise ValueError(f"optimizer state {name!r} is missing or has the wrong shape")
            have[...] = arrays[name]
        self.v, self.t = float(scalars["v"]), int(scalars["t"])


def scratch_chunks(method: Method, threads: int) -> int:
    return 0 if rescales_only(method) else (2 if method.curvature else 1) * threads


def state_bytes(method: Method, elements: int, threads: int) -> int:
    """What ``State.initial`` will allocate for ``elements`` trainable floats: the memory check's share."""
    arrays = (1 if (method.sparsity or method.curvature) else 0) + (1 if method.momentum else 0)
    return 4 * (arrays * elements + scratch_chunks(method, threads) * CHUNK_ELEMENTS)


class UpdateRule:
    """Turns a step's estimate into the ops of one pass over theta; owns the optimizer ``State``."""

    def __init__(self, method: Method, theta: FlatParameters, threads: int):
        self.method = method
        self.state = State.initial(theta, method, threads)
        self.rescales = rescales_only(method)

    def ops(self, estimate: Estimate, lr: float) -> tuple[Term | ChunkOp, ...]:
        """theta -= lr_t d (see the module docstring), for the unperturbed theta; advances the state."""
        m, st = self.method, self.state
        q = len(estimate.seeds)
        st.t += 1
        scale = 1.0
        if m.momentum:
            scale /= 1.0 - m.momentum ** st.t
        if m.adaptive:
            st.v = BETA2 * st.v + (1.0 - BETA2) * sum(g * g for g in estimate.grads) / q
            scale /= math.sqrt(st.v / (1.0 - BETA2 ** st.t)) + ADAPTIVE_EPS
        if m.normalize:
            scale /= float(np.std(np.asarray(estimate.grads, np.float64))) + ADAPTIVE_EPS
        if not self.rescales:
            return (PerWeightUpdate(m, st, estimate, np.float32(lr * scale)),)
        step = lr * scale / q
        coefs = [-step * (float(np.sign(g)) if m.sign else g) for g in estimate.grads]
        d = 1.0 - lr * m.weight_decay  # decoupled decay, on the decay segments, in the last term
        *first, last = (Term(s, c) for s, c in zip(estimate.seeds, coefs, strict=True))
        return (*first, Term(last.seed, last.coef, d, None) if d != 1.0 else last)


class PerWeightUpdate:
    """One step's per-weight update as a chunk op for ``Perturber.apply``: regenerates each z_j, forms
    the estimate chunk by chunk, and updates the momentum and curvature state in the same pass."""

    def __init__(self, method: Method, state: State, estimate: Estimate, step_size: np.float32):
        self.config, self.state, self.step_size = method, state, step_size
        self.seeds, self.curvatures = estimate.seeds, estimate.curvatures
        self.coefs = [g / len(estimate.seeds) for g in estimate.grads]

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
