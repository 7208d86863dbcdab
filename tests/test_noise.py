"""Counter-based noise: thread-count independence, distributions, drift, fused decay."""

from __future__ import annotations

import numpy as np
import pytest

from pocketzo.runtime.session import aligned_empty
from pocketzo.zo_trainer.noise import CHUNK_ELEMENTS, Perturber, Term


def _buffer(n, seed=0):
    buf = aligned_empty(n)
    buf[:] = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return buf


N = 2 * CHUNK_ELEMENTS + 12345  # three chunks, the last one partial


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_noise_is_identical_for_1_and_2_threads(distribution):
    a, b = _buffer(N), _buffer(N)
    with Perturber(a, distribution, threads=1) as p1, Perturber(b, distribution, threads=2) as p2:
        p1.add(42, 0.01)
        p2.add(42, 0.01)
        assert a.tobytes() == b.tobytes()
        np.testing.assert_array_equal(p1.noise(7), p2.noise(7))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_noise_statistics(distribution):
    z = Perturber(_buffer(N), distribution).noise(3)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    if distribution == "rademacher":
        assert set(np.unique(z)) == {-1.0, 1.0}
    assert not np.array_equal(z, Perturber(_buffer(N), distribution).noise(4))


def test_add_applies_scaled_noise():
    buf = _buffer(N)
    ref = buf.astype(np.float64)
    p = Perturber(buf, "gaussian", threads=2)
    z = p.noise(5).astype(np.float64)
    p.add(5, 0.25)
    np.testing.assert_allclose(buf, ref + 0.25 * z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_perturb_and_restore_drift_is_bounded(distribution):
    """+eps, -2eps, +eps (a step with lr 0) many times: float32 rounding only, no growth."""
    buf = _buffer(N)
    start = buf.copy()
    eps = 1e-3
    with Perturber(buf, distribution, threads=2) as p:
        for seed in range(50):
            p.add(seed, eps)
            p.add(seed, -2 * eps)
            p.add(seed, eps)
    drift = np.abs(buf - start).max()
    assert drift < 50 * 4 * np.finfo(np.float32).eps * max(1.0, np.abs(start).max())


def test_fused_decay_matches_reference():
    buf = _buffer(N)
    ref = buf.astype(np.float64)
    segments = [(10, 5000), (CHUNK_ELEMENTS - 7, CHUNK_ELEMENTS + 20)]  # one crosses a chunk edge
    p = Perturber(buf, "gaussian", threads=2, decay_segments=segments)
    z = p.noise(9).astype(np.float64)
    p.add(9, 0.5, decay_factor=0.9, decay_coef=0.3)
    want = ref + 0.5 * z
    for a, b in segments:
        want[a:b] = 0.9 * ref[a:b] + 0.3 * z[a:b]
    np.testing.assert_allclose(buf, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_fused_terms_equal_separate_passes_bit_for_bit(distribution):
    """The trainer fuses a step's update with the next step's perturbation; replay runs them apart."""
    segments = [(100, CHUNK_ELEMENTS + 50)]
    a, b = _buffer(N), _buffer(N)
    terms = (Term(3, -0.02, decay_factor=0.99, decay_coef=-0.015), Term(4, 1e-3))
    with Perturber(a, distribution, 2, segments) as fused, Perturber(b, distribution, 1, segments) as apart:
        fused.apply(*terms)
        for t in terms:
            apart.apply(t)
    assert a.tobytes() == b.tobytes()


def test_scaled_rademacher_is_exactly_plus_minus_coef():
    buf = np.zeros(N, np.float32)
    with Perturber(buf, "rademacher") as p:
        p.add(11, 0.37)
        np.testing.assert_array_equal(buf, np.float32(0.37) * p.noise(11))


def test_gaussian_tails_and_moments():
    """Box-Muller on 23-bit uniforms: unit variance, no kurtosis bias, finite and bounded by 5.65."""
    z = Perturber(np.zeros(4 * CHUNK_ELEMENTS + 1, np.float32), "gaussian").noise(8).astype(np.float64)
    assert np.isfinite(z).all() and np.abs(z).max() <= 5.66
    assert abs(z.var() - 1) < 0.01 and abs((z**4).mean() - 3) < 0.05
    assert abs((np.abs(z) > 2).mean() - 0.0455) < 0.002  # the two-sided tail of N(0, 1) beyond 2
