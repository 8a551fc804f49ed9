"""k-NN (Kozachenko-Leonenko) entropy and the free-energy estimate (THEORY 6)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mfld import reference
from mfld.entropy import MOMENT_BLOCK_ROWS, free_energy_estimate, knn_entropy, mean_square, particle_entropy
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
    dup = np.concatenate([x, x[:10]])
    assert np.isfinite(knn_entropy(dup, k=1))


def test_free_energy_estimate_of_float32_particles_is_computed_in_float64():
    # float32 data and JAX particles (the default precision of a run): the estimate must be
    # the float64 formula F_KL = R + (lam/2) E|theta|^2 - tau H evaluated by hand on the
    # float64 values of the same particles, to rounding (1e-12). Float32 arithmetic is off by
    # far more: the second moment summed in float32 alone moves reg_risk by > 1e-9 (shown).
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    x = rng.uniform(-2, 2, (40, 1))
    pr = Problem.create(x, np.sin(2 * x[:, 0]), lam=0.3, tau=0.05)  # bias: w in R^2, D = 3
    assert pr.x.dtype == jnp.float32
    key = jax.random.key(0)
    a = 1.3 * jax.random.normal(key, (3000,), jnp.float32)
    w = 0.8 * jax.random.normal(jax.random.fold_in(key, 1), (3000, 2), jnp.float32)
    out = free_energy_estimate(pr, a, w)
    a64, w64 = np.asarray(a, np.float64), np.asarray(w, np.float64)
    x64, y64 = np.asarray(pr.x, np.float64), np.asarray(pr.y, np.float64)
    f = a64 @ np.tanh(w64 @ x64.T) / a64.size
    risk = 0.5 * np.mean((f - y64) ** 2)
    m2 = np.mean(a64 ** 2) + np.mean(np.sum(w64 ** 2, axis=1))
    h = knn_entropy(np.column_stack([a64, w64]))
    lam, tau = float(pr.lam), float(pr.tau)
    assert out["risk"] == pytest.approx(risk, abs=1e-12)
    assert out["reg_risk"] == pytest.approx(risk + 0.5 * lam * m2, abs=1e-12)
    assert out["entropy"] == pytest.approx(h, abs=1e-12)
    assert out["free_energy_est"] == pytest.approx(risk + 0.5 * lam * m2 - tau * h, abs=1e-12)
    assert particle_entropy(pr, a, w) == pytest.approx(h, abs=1e-12)
    a32, w32 = np.asarray(a), np.asarray(w)
    m2_32 = float(np.mean(a32 * a32) + np.mean(np.sum(w32 * w32, axis=1)))
    assert abs(0.5 * lam * (m2_32 - m2)) > 1e-9


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


def test_unreliable_dimension_uses_a_strided_subsample():
    """Above RELIABLE_MAX_DIM the k-NN entropy (flagged unreliable) runs on an evenly strided,
    deterministic subsample of UNRELIABLE_MAX_SAMPLES particles (its cost grows like
    N^(2 - 1/D)); up to RELIABLE_MAX_DIM every particle is used. Exact equalities: the same
    float64 rows go into the same KD-tree query."""
    from mfld import entropy

    rng = np.random.default_rng(3)
    n, m = 5000, entropy.UNRELIABLE_MAX_SAMPLES
    for d_in, dim_ok in ((10, False), (2, True)):
        x = rng.uniform(-1, 1, (30, d_in))
        with jax.enable_x64(True):
            pr = Problem.create(x, np.sin(x[:, 0]), lam=0.1, tau=0.05)
        a, w = rng.standard_normal(n), rng.standard_normal((n, pr.p))
        theta = np.concatenate([a[:, None], w], axis=1)
        fe = free_energy_estimate(pr, a, w)
        assert fe["entropy_reliable"] == (1.0 if dim_ok else 0.0)
        if dim_ok:
            assert fe["entropy_samples"] == n
            assert fe["entropy"] == knn_entropy(theta)
        else:
            assert fe["entropy_samples"] == m
            idx = np.round(np.linspace(0, n - 1, m)).astype(int)
            assert len(np.unique(idx)) == m and idx[0] == 0 and idx[-1] == n - 1
            assert fe["entropy"] == knn_entropy(theta[idx])
            assert fe["entropy"] != knn_entropy(theta)  # really a subsample
            # all particles when asked (None), the same subsample when asked explicitly
            assert free_energy_estimate(pr, a, w, max_samples=None)["entropy"] == knn_entropy(theta)
            assert particle_entropy(pr, a, w, max_samples=m) == fe["entropy"]
    assert knn_entropy(theta, max_samples=10 * n) == knn_entropy(theta)
    with pytest.raises(ConfigError, match="max_samples"):
        knn_entropy(theta, max_samples=3)


def test_free_energy_estimate_takes_the_callers_network_output():
    """``f=`` (the output certify has already computed) gives the same numbers; a wrong f
    changes the risk, so it is really used."""
    from mfld.gibbs import make_spec, network_output

    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (30, 1))
    with jax.enable_x64(True):
        pr = Problem.create(x, np.sin(3 * x[:, 0]), lam=0.1, tau=0.05)
    a, w = rng.standard_normal(500), rng.standard_normal((500, 2))
    f = network_output(make_spec(pr), a, w)
    assert free_energy_estimate(pr, a, w, f=f) == free_energy_estimate(pr, a, w)
    assert free_energy_estimate(pr, a, w, f=f + 0.1)["risk"] != free_energy_estimate(pr, a, w)["risk"]


@pytest.mark.parametrize("output", ["trained", "fixed", "bounded"])
def test_free_energy_estimate_of_float32_particles_is_that_of_float64_copies_bit_for_bit(output):
    """The float64 estimate is formed block by block (mean_square, network_output) and upcasts
    only the entropy's subsample, yet equals, bit for bit, the computation on float64 copies of
    all the particles that it replaced (over several blocks of MOMENT_BLOCK_ROWS)."""
    from mfld.gibbs import make_spec, network_output

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 1))
    pr = Problem.create(x, np.sin(2 * x[:, 0]), lam=0.3, tau=0.05, output=output)
    n = 2 * MOMENT_BLOCK_ROWS + 1234
    a = rng.standard_normal(n).astype(np.float32)
    if output == "fixed":
        a = np.sign(a) + (a == 0)
    w = (0.8 * rng.standard_normal((n, pr.p))).astype(np.float32)
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    got = free_energy_estimate(pr, a, w, max_samples=2000)
    assert got == free_energy_estimate(pr, a64, w64, max_samples=2000)
    # the replaced float64 formulas, written out
    m2 = float(np.mean(np.sum(w64 * w64, axis=1))) + (0.0 if output == "fixed" else float(np.mean(a64 * a64)))
    spec = make_spec(pr, need_tau=False)
    f = network_output(spec, a64, w64)  # what certify passed it: float64 copies
    assert np.array_equal(network_output(spec, a, w), f)
    assert got["reg_risk"] == float(np.mean(spec.loss_value(f, spec.y))) + 0.5 * spec.lam * m2
    assert mean_square(w) == float(np.mean(np.sum(w64 * w64, axis=1)))
    assert mean_square(a) == float(np.mean(a64 * a64))
