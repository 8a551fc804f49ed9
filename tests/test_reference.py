"""The exact references of mfld.reference against independent computations (THEORY 3, 7).

All float64 NumPy/SciPy. Tolerances: closed forms and root finding agree to rounding
(~1e-12 relative); grid quadrature to its discretisation error (see each test); fitted
orders to +-0.15 of the predicted slope over a range where higher-order terms are < 10%.
"""

import math

import numpy as np
import pytest
from scipy.optimize import brentq, minimize

from mfld import reference as ref
from mfld.errors import ConfigError


def _linear_data(n=16, bias=True, seed=0, slope=0.8, offset=0.3):
    rng = np.random.default_rng(seed)
    xr = rng.uniform(-2, 2, n)
    y = slope * xr + offset + 0.1 * rng.standard_normal(n)
    x = np.c_[xr, np.ones(n)] if bias else xr[:, None]
    return x, y


# ---------------------------------------------------------------- no signal
@pytest.mark.parametrize("eta", [0.05, 0.2, 1.0, 1.5])
def test_no_signal_euler_recursion_closed_form(eta):
    lam, tau, v0, k = 1.0, 0.3, 2.0, 40
    v = ref.no_signal_second_moment(v0, lam, tau, eta, k)
    vstar = ref.no_signal_stationary_variance(lam, tau, eta)
    # linear recursion v_k = r^k (v0 - v*) + v*, r = (1 - eta lam)^2
    r = (1 - eta * lam) ** 2
    expect = r ** np.arange(k + 1) * (v0 - vstar) + vstar
    np.testing.assert_allclose(v, expect, rtol=1e-13)
    assert vstar == pytest.approx((tau / lam) / (1 - eta * lam / 2), rel=1e-15)


@pytest.mark.parametrize("eta", [0.1, 1.0, 5.0])
def test_no_signal_ou_is_continuous_time_law(eta):
    lam, tau, v0, k = 0.7, 0.3, 2.0, 30
    v = ref.no_signal_second_moment(v0, lam, tau, eta, k, scheme="ou")
    t = eta * np.arange(k + 1)
    np.testing.assert_allclose(v, np.exp(-2 * lam * t) * v0 + tau / lam * (1 - np.exp(-2 * lam * t)),
                               rtol=1e-13)
    assert ref.no_signal_stationary_variance(lam, tau, eta, "ou") == tau / lam


def test_no_signal_unstable_eta_is_refused():
    with pytest.raises(ConfigError, match="dynamics.eta"):
        ref.no_signal_stationary_variance(1.0, 0.1, 2.5)


def test_no_signal_free_energy_matches_gaussian_terms_and_linear_optimum():
    lam, tau, dim = 0.5, 0.2, 3
    cov = np.eye(dim) * tau / lam
    direct = 0.5 * lam * np.trace(cov) - tau * ref.gaussian_entropy(cov)
    assert ref.no_signal_free_energy(dim, lam, tau) == pytest.approx(direct, rel=1e-14)
    # y = 0 in the linear model: c = 0, rho* = nu, the same F*
    x, _ = _linear_data()
    opt = ref.linear_gaussian_optimum(x, np.zeros(len(x)), lam, tau)
    assert opt.q == lam ** 2 and np.all(opt.c == 0)
    assert opt.free_energy == pytest.approx(ref.no_signal_free_energy(3, lam, tau), rel=1e-14)
    np.testing.assert_allclose(opt.sigma, cov, rtol=1e-15)


# ---------------------------------------------------------------- linear optimum
@pytest.mark.parametrize("lam,tau,seed", [(1.0, 0.2, 0), (0.5, 0.05, 1), (2.0, 1.0, 2), (0.3, 0.01, 3)])
def test_linear_optimum_self_consistency(lam, tau, seed):
    x, y = _linear_data(seed=seed)
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    n = len(y)
    # independent re-evaluation of the self-consistency equations
    c = x.T @ (x @ opt.m - y) / n
    np.testing.assert_allclose(c, opt.c, rtol=0, atol=1e-12 * max(1.0, np.abs(c).max()))
    np.testing.assert_allclose(opt.m, -tau * c / (lam ** 2 - c @ c), rtol=1e-11)
    assert 0 < opt.q <= lam ** 2 and np.linalg.norm(opt.c) < lam
    assert opt.residual < 1e-12
    # Sigma* = tau A^{-1} by a numerical inverse (independent of the Schur formulas)
    A = np.block([[np.array([[lam]]), c[None, :]], [c[:, None], lam * np.eye(len(c))]])
    np.testing.assert_allclose(opt.sigma, tau * np.linalg.inv(A), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(opt.sigma[0, 1:], opt.m, rtol=1e-12)
    # Poincare = LSI constant of a Gaussian: 1 / largest eigenvalue of its covariance
    assert opt.lsi_constant == pytest.approx(1.0 / np.linalg.eigvalsh(opt.sigma).max(), rel=1e-10)
    assert ref.linear_lsi_constant(x, opt.u, lam, tau) == pytest.approx(opt.lsi_constant, rel=1e-12)


@pytest.mark.parametrize("lam,tau,seed", [(1.0, 0.2, 0), (0.5, 0.05, 1)])
def test_linear_optimum_free_energy_strong_duality_and_minimality(lam, tau, seed):
    x, y = _linear_data(seed=seed)
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    # strong duality: D(u*) = F* (D uses the closed-form log Z, F uses the entropy of Sigma*)
    assert ref.linear_dual(x, y, opt.u, lam, tau) == pytest.approx(opt.free_energy, abs=1e-12)
    assert ref.linear_free_energy(x, y, opt.sigma, lam, tau) == pytest.approx(opt.free_energy, abs=1e-13)
    # weak duality at other u's, and F over centred Gaussians minimised numerically
    rng = np.random.default_rng(7)
    for _ in range(5):
        u = opt.u + 0.05 * rng.standard_normal(len(y))
        assert ref.linear_dual(x, y, u, lam, tau) < opt.free_energy
    D = x.shape[1] + 1
    il = np.tril_indices(D)

    def f_of(params):
        L = np.zeros((D, D))
        L[il] = params
        L[np.diag_indices(D)] = np.exp(L[np.diag_indices(D)])
        return ref.linear_free_energy(x, y, L @ L.T, lam, tau)

    p0 = np.zeros(len(il[0]))
    res = minimize(f_of, p0, method="BFGS", options=dict(gtol=1e-10))
    # BFGS stops at gradient ~1e-10, so F is within ~1e-12 of its minimum
    assert res.fun == pytest.approx(opt.free_energy, abs=1e-9)
    assert res.fun >= opt.free_energy - 1e-12


def test_linear_optimum_matches_grid_gibbs_moments_d1_no_bias():
    """d = 1, no bias: theta = (a, w) in R^2. Integrate exp(-V/tau) on a grid with the c of
    the solver, and check (i) the moments equal Sigma* and (ii) the grid's E[a w] solves the
    self-consistency equation (c = (1/n) sum (m x_j - y_j) x_j) on its own."""
    lam, tau = 1.0, 0.2
    x, y = _linear_data(bias=False)
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    c = opt.c[0]
    # the Gaussian has sd <= sqrt(tau/(lam - |c|)) ~ 1; +-12 sd, 1201 points: trapezoid error
    # on a smooth, rapidly decaying integrand is exponentially small (spectral accuracy).
    sd = math.sqrt(tau / (lam - abs(c)))
    g = np.linspace(-12 * sd, 12 * sd, 1201)
    A, W = np.meshgrid(g, g, indexing="ij")
    dens = np.exp(-(A * c * W + 0.5 * lam * (A ** 2 + W ** 2)) / tau)
    h = g[1] - g[0]
    Z = dens.sum() * h * h
    m_aa = (A * A * dens).sum() * h * h / Z
    m_aw = (A * W * dens).sum() * h * h / Z
    m_ww = (W * W * dens).sum() * h * h / Z
    np.testing.assert_allclose([m_aa, m_aw, m_ww], [opt.sigma[0, 0], opt.sigma[0, 1], opt.sigma[1, 1]],
                               rtol=1e-10)
    c_back = float(np.mean((m_aw * x[:, 0] - y) * x[:, 0]))
    assert c_back == pytest.approx(c, rel=1e-9)
    # closed-form log Z(u) against the same quadrature
    assert ref.linear_log_partition(x, opt.u, lam, tau) == pytest.approx(math.log(Z), abs=1e-10)


def test_linear_log_partition_with_bias_against_quadrature_and_divergence():
    """p = 2 (input + bias): integrate a analytically (THEORY 6), then w on a 2-D grid."""
    lam, tau = 1.0, 0.3
    x, y = _linear_data(seed=4)
    u = 0.3 * np.random.default_rng(0).standard_normal(len(y))
    c = x.T @ u / len(u)
    sd = math.sqrt(tau / (lam - np.linalg.norm(c)))
    g = np.linspace(-12 * sd, 12 * sd, 801)
    W1, W2 = np.meshgrid(g, g, indexing="ij")
    gw = c[0] * W1 + c[1] * W2
    expo = (gw ** 2 / (2 * lam) - 0.5 * lam * (W1 ** 2 + W2 ** 2)) / tau
    integrand = math.sqrt(2 * math.pi * tau / lam) * np.exp(expo)
    Z = integrand.sum() * (g[1] - g[0]) ** 2
    assert ref.linear_log_partition(x, u, lam, tau) == pytest.approx(math.log(Z), abs=1e-9)
    # |c| >= lam: the integral diverges
    big = u * (2 * lam / np.linalg.norm(c))
    assert ref.linear_log_partition(x, big, lam, tau) == math.inf
    assert ref.linear_lsi_constant(x, big, lam, tau) == 0.0


def test_linear_optimum_unique_admissible_root_vs_spurious():
    """The p-dimensional equation c = S m - b, m = -tau c/(lam^2 - |c|^2) has spurious roots
    with |c| > lam (q < 0) here; the scalar reduction returns the admissible one, and on
    (0, lam^2] h(q) is increasing with exactly one sign change."""
    lam, tau = 0.5, 0.5
    x, y = _linear_data(seed=5, slope=3.0, offset=1.0)
    S, b = ref.gram(x, y)

    def c_of(q):
        return -np.linalg.solve(np.eye(2) + tau / q * S, b)

    def h(q):
        c = c_of(q)
        return q - lam ** 2 + c @ c

    # a spurious root: scan q < 0 for a sign change and polish it
    qs = -np.logspace(-4, 2, 4000)
    hs = np.array([h(q) for q in qs])
    i = int(np.nonzero(np.diff(np.sign(hs)))[0][0])
    q_bad = brentq(h, qs[i + 1], qs[i], xtol=1e-300, rtol=1e-15)
    c_bad = c_of(q_bad)
    m_bad = -tau * c_bad / (lam ** 2 - c_bad @ c_bad)
    assert np.abs(S @ m_bad - b - c_bad).max() < 1e-12 and np.linalg.norm(c_bad) > lam
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    assert np.linalg.norm(opt.c) < lam and opt.residual < 1e-12
    assert np.abs(opt.m - m_bad).max() > 0.1
    qs = np.linspace(1e-6, lam ** 2, 2001)
    hs = np.array([h(q) for q in qs])
    assert np.all(np.diff(hs) > 0) and np.sum(np.diff(np.sign(hs)) != 0) == 1


def test_config_errors():
    x, y = _linear_data()
    with pytest.raises(ConfigError, match="objective.tau"):
        ref.linear_gaussian_optimum(x, y, 1.0, 0.0)
    with pytest.raises(ConfigError, match="objective.lam"):
        ref.linear_gaussian_optimum(x, y, -1.0, 0.1)
    with pytest.raises(ConfigError, match="dynamics.scheme"):
        ref.no_signal_second_moment(1.0, 1.0, 0.1, 0.1, 3, scheme="rk4")


# ---------------------------------------------------------------- scheme fixed points
@pytest.mark.parametrize("scheme", ["euler", "ou"])
@pytest.mark.parametrize("eta", [0.02, 0.2])
def test_scheme_fixed_point_closed_form_equals_iterated_recursion(scheme, eta):
    lam, tau = 1.0, 0.2
    x, y = _linear_data()
    fc = ref.linear_scheme_fixed_point(x, y, lam, tau, eta, scheme=scheme)
    it = ref.linear_scheme_fixed_point(x, y, lam, tau, eta, scheme=scheme, method="iterate")
    assert fc.residual < 1e-14 and it.residual < 1e-13
    np.testing.assert_allclose(fc.sigma, it.sigma, rtol=0, atol=1e-12)
    # and the recursion from the default Gaussian start lands there too
    far = ref.linear_covariance_recursion(x, y, lam, tau, eta, int(60 / eta), scheme=scheme)
    np.testing.assert_allclose(far, fc.sigma, rtol=0, atol=1e-10)


def test_covariance_recursion_no_signal_matches_scalar_law():
    x, _ = _linear_data()
    lam, tau, eta = 1.0, 0.3, 0.2
    for scheme in ("euler", "ou"):
        sig = ref.linear_covariance_recursion(x, np.zeros(len(x)), lam, tau, eta, 25, a_scale=1.5,
                                              w_scale=1.5, scheme=scheme)
        v = ref.no_signal_second_moment(2.25, lam, tau, eta, 25, scheme=scheme)[-1]
        np.testing.assert_allclose(sig, v * np.eye(3), rtol=1e-14, atol=1e-16)


def _slope(etas, errs):
    return np.polyfit(np.log(etas), np.log(errs), 1)[0]


def test_time_step_bias_orders_plain_scheme():
    """Plain scheme: stationary E[a w] error O(eta^2), variance error O(eta) (THEORY 3),
    for the recursion's fixed point (method='iterate') against Sigma*."""
    lam, tau = 1.0, 0.2
    x, y = _linear_data()
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    etas = np.array([0.01, 0.02, 0.04, 0.08])
    e_m, e_v, e_f = [], [], []
    for eta in etas:
        fp = ref.linear_scheme_fixed_point(x, y, lam, tau, eta, method="iterate")
        e_m.append(np.abs(fp.m - opt.m).max())
        e_v.append(np.abs(np.diag(fp.sigma) - np.diag(opt.sigma)).max())
        e_f.append(ref.linear_free_energy(x, y, fp.sigma, lam, tau) - opt.free_energy)
    assert _slope(etas, e_m) == pytest.approx(2.0, abs=0.15)
    assert _slope(etas, e_v) == pytest.approx(1.0, abs=0.15)
    # F is minimal at rho*: its error is positive and second order
    assert min(e_f) > 0 and _slope(etas, e_f) == pytest.approx(2.0, abs=0.15)
    # leading variance bias is eta tau/2 on every coordinate (h(k) = tau/z + eta tau/2 + O(eta^2))
    fp = ref.linear_scheme_fixed_point(x, y, lam, tau, 0.01)
    np.testing.assert_allclose(np.diag(fp.sigma) - np.diag(opt.sigma), 0.01 * tau / 2, rtol=0.05)


def test_time_step_bias_order_ou_scheme_is_first_order_in_m():
    lam, tau = 1.0, 0.2
    x, y = _linear_data()
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    etas = np.array([0.005, 0.01, 0.02, 0.04])
    e_m = [np.abs(ref.linear_scheme_fixed_point(x, y, lam, tau, e, scheme="ou").m - opt.m).max() for e in etas]
    e_plain = [np.abs(ref.linear_scheme_fixed_point(x, y, lam, tau, e).m - opt.m).max() for e in etas]
    assert _slope(etas, e_m) == pytest.approx(1.0, abs=0.1)
    # OU splitting's bias on E[a w] is orders of magnitude above the plain scheme's here
    assert e_m[-1] > 100 * e_plain[-1]


def test_scheme_fixed_point_tends_to_optimum_as_eta_to_zero():
    lam, tau = 0.5, 0.05
    x, y = _linear_data(seed=1)
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    fp = ref.linear_scheme_fixed_point(x, y, lam, tau, 1e-6)
    np.testing.assert_allclose(fp.sigma, opt.sigma, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(fp.c, opt.c, rtol=1e-8)
