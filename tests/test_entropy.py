"""k-NN (Kozachenko-Leonenko) entropy and the free-energy estimate (THEORY 6)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mfld import reference
from mfld.entropy import free_energy_estimate, knn_entropy, particle_entropy
from mfld.errors import ConfigError
from mfld.problem import Problem


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5])
def test_gaussian_entropy_dims_1_to_5(dim):
    # N = 1e4, anisotropic Gaussian; the estimator's bias at this N grows with D (about
    # -0.01 D nats for D = 5 with k = 3) and its SD is ~0.015 nats; over 3 seeds the mean
    # error must stay below 0.02 D nats (the acceptance criterion of the issue).
    scales = 0.5 + 0.4 * np.arange(dim)
    cov = np.diag(scales ** 2)
    exact = reference.gaussian_entropy(cov)
    errs = []
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((10_000, dim)) * scales
        errs.append(knn_entropy(x) - exact)
    assert abs(np.mean(errs)) < 0.02 * dim


def test_entropy_is_translation_invariant_and_scales_with_log_det():
    x = np.random.default_rng(0).standard_normal((3000, 3))
    h = knn_entropy(x)
    assert knn_entropy(x + np.array([5.0, -2.0, 1.0])) == pytest.approx(h, abs=1e-9)
    # H(c X) = H(X) + D log c holds exactly for the estimator (distances scale by c)
    assert knn_entropy(2.5 * x) == pytest.approx(h + 3 * math.log(2.5), abs=1e-9)


def test_entropy_input_checks_and_precision():
    with pytest.raises(ConfigError):
        knn_entropy(np.zeros((3, 2)), k=3)
    with pytest.raises(ConfigError):
        knn_entropy(np.zeros((10, 2)), k=0)
    x = np.random.default_rng(1).standard_normal((2000, 2))
    # float32 input is upcast: the same estimate as the float32 values in float64
    assert knn_entropy(x.astype(np.float32)) == pytest.approx(knn_entropy(x.astype(np.float32).astype(np.float64)))
    dup = np.concatenate([x, x[:10]])
    assert np.isfinite(knn_entropy(dup, k=1))


def test_free_energy_estimate_no_signal_gaussian():
    # y = 0: rho* = N(0, tau/lam I) in D = 3 and F* = -(D tau/2) log(2 pi tau/lam)
    # (mfld.reference.no_signal_free_energy); particles drawn from rho* give F_KL ~ F* up to the
    # k-NN bias (~0.03 nats in D = 3 at N = 2e4, times tau) and the sampling error.
    lam, tau = 0.5, 0.2
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (20, 1))
    with jax.enable_x64(True):
        pr = Problem.create(x, np.zeros(20), lam=lam, tau=tau)
    th = rng.standard_normal((20_000, 3)) * math.sqrt(tau / lam)
    fe = free_energy_estimate(pr, th[:, 0], th[:, 1:])
    exact = reference.no_signal_free_energy(3, lam, tau, risk0=0.0)
    assert fe["entropy_reliable"] == 1.0
    # the risk of N(0, .) particles is O(1/N) (f = mean of a sigma ~ N^-1/2): negligible here
    assert fe["free_energy_est"] == pytest.approx(exact, abs=tau * 0.06 + 1e-3)


def test_fixed_layer_entropy_is_mass_weighted():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        pr = Problem.create(rng.uniform(-1, 1, (10, 1)), rng.standard_normal(10), output="fixed", lam=0.3, tau=0.1)
    a = np.where(np.arange(4000) < 1000, 1.0, -1.0)
    w = np.concatenate([rng.standard_normal((1000, 2)), 3.0 * rng.standard_normal((3000, 2))])
    h = particle_entropy(pr, a, w)
    expect = 0.25 * knn_entropy(w[:1000]) + 0.75 * knn_entropy(w[1000:])
    assert h == pytest.approx(expect, rel=1e-12)
