"""First-order update rules: a step with the exact gradient g (``--method fo``), as one chunked pass over
the weights, the gradient and the optimizer state (the gradient comes from the bundle's gradient graph,
``runtime.gradient_session``).

    sgd      m = mu m + g (mu = --momentum; none when 0);  theta -= lr (m or g)
    adamw    m = 0.9 m + 0.1 g;  v = 0.999 v + 0.001 g^2;  theta -= lr m_hat / (sqrt(v_hat) + 1e-8)
    both     decoupled weight decay theta -= lr wd theta on matrices (decay=True in the manifest);
             --grad-clip c scales g by min(1, c / |g|) first (|g| the global L2 norm)
    hybrid   g is the exact gradient above the gradient graph's cut and the ZO estimate
             (1/q) sum_j g_j z_j below it (the first ``zo_elements`` of the buffer, where the exact
             gradient is zero); z_j is regenerated chunk by chunk inside the same pass. The clip
             scales the exact part only.

Memory beyond the weights (n = trainable elements, float32): the gradient buffer n; sgd with momentum n
more, adamw 2n; scratch one chunk (sgd) or two (adamw) per thread. A first-order run is rebuilt from its
checkpoints (which hold m and v), not from its log: its steps are not a function of seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pocketzo.runtime.session import FlatParameters
from pocketzo.zo_trainer.estimators import Estimate
from pocketzo.zo_trainer.method import Method
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS, ChunkOp, Perturber, fill_noise
from pocketzo.zo_trainer.updates import State

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


def first_order_state(params: FlatParameters, method: Method, threads: int) -> State:
    n = params.buffer.shape[0]
    adam = method.optimizer == "adamw"
    m = np.zeros(n, np.float32) if adam or method.momentum else None
    v = np.zeros(n, np.float32) if adam else None
    scratch = [np.empty(CHUNK_ELEMENTS, np.float32) for _ in range((2 if adam else 1) * threads)]
    return State(momentum=m, second_moment=v, scratch=scratch)


def first_order_bytes(method: Method, elements: int, threads: int) -> int:
    """What a first-order trainer allocates beyond the session: gradient buffer, m, v, scratch and, with
    a ``micro_batch`` that splits the batch, the gradient session's sum of the parts."""
    adam = method.optimizer == "adamw"
    split = 0 < method.micro_batch < method.batch_size
    arrays = 1 + (1 if adam or method.momentum else 0) + (1 if adam else 0) + (1 if split else 0)
    return 4 * (arrays * elements + (2 if adam else 1) * threads * CHUNK_ELEMENTS)


class FirstOrderRule:
    """(exact gradient, lr) -> one ``DenseUpdate`` pass; owns m and v."""

    def __init__(self, method: Method, theta: FlatParameters, threads: int, zo_elements: int = 0):
        self.method, self.zo_elements = method, zo_elements
        self.state = first_order_state(theta, method, threads)

    def ops(self, estimate: Estimate, lr: float) -> tuple[ChunkOp, ...]:
        st, m = self.state, self.method
        st.t += 1
        scale = 1.0
        if m.grad_clip and estimate.grad_norm > m.grad_clip:
            scale = m.grad_clip / estimate.grad_norm
        zo = tuple((seed, g / len(estimate.seeds)) for seed, g in zip(estimate.seeds, estimate.grads, strict=True))
        return (DenseUpdate(m, st, estimate.gradient, lr, scale, zo, self.zo_elements),)


@dataclass
class DenseUpdate:
    """One first-order step as a chunk op for ``Perturber.apply`` (the noise scratch ``z`` is unused)."""

    method: Method
    state: State
    gradient: npt.NDArray[np.float32]
    lr: float
    clip_scale: float
    zo: tuple[tuple[int, float], ...] = ()  # hybrid: (seed, g_j / q) of each direction
    zo_elements: int = 0  # hybrid: the buffer's first elements get the ZO estimate

    def apply_chunk(self, p: Perturber, chunk: int, theta: npt.NDArray[np.float32], z: npt.NDArray[np.float32],
                    worker: int) -> None:
        m, st = self.method, self.state
        n, start = theta.shape[0], chunk * CHUNK_ELEMENTS
        adam = m.optimizer == "adamw"
        per_thread = 2 if adam else 1
        g = st.scratch[per_thread * worker][:n]
        np.multiply(self.gradient[start : start + n], np.float32(self.clip_scale), out=g)
        below = min(n, self.zo_elements - start)  # z of the chunk's length in the ZO perturber's buffer
        for seed, coef in self.zo if below > 0 else ():
            fill_noise(seed, chunk, p.distribution, z[:below], coef)
            g[:below] += z[:below]
        if m.weight_decay:  # decoupled: on the weights before this step's update
            d = np.float32(1.0 - self.lr * m.weight_decay)
            for a, b in p.decay_ranges(chunk):
                theta[a:b] *= d
        if adam:
            mom, sec = st.momentum[start : start + n], st.second_moment[start : start + n]
            tmp = st.scratch[per_thread * worker + 1][:n]
            np.multiply(g, np.float32(1.0 - BETA1), out=tmp)
            mom *= np.float32(BETA1)
            mom += tmp
            np.multiply(g, g, out=g)
            g *= np.float32(1.0 - BETA2)
            sec *= np.float32(BETA2)
            sec += g
            np.multiply(sec, np.float32(1.0 / (1.0 - BETA2 ** st.t)), out=tmp)
            np.sqrt(tmp, out=tmp)
            tmp += np.float32(ADAM_EPS)
            np.divide(mom, tmp, out=g)
            g *= np.float32(self.lr / (1.0 - BETA1 ** st.t))
        else:
            if st.momentum is not None:
                mom = st.momentum[start : start + n]
                mom *= np.float32(m.momentum)
                mom += g
                np.copyto(g, mom)
            g *= np.float32(self.lr)
        np.subtract(theta, g, out=theta)


def gradient_norm(gradient: npt.NDArray[np.float32]) -> float:
    return math.sqrt(float(np.dot(gradient, gradient)))
