"""Error bars with teeth: cases where the certificate's own error is *not* zero.

Everything else in the suite evaluates smooth integrands on which the quadrature is exact to
rounding, so a wrong error estimate would pass. Here:

- ReLU (a kink at w = 0) makes the trapezoid rule converge only at O(h^2): at the finest
  grid the reported error |Q(h) - Q(2h)| ~ 3 |Q(h) - I| is a real, non-zero error, checked
  against an independent SciPy ``quad`` reference (shares no code with mfld.duality);
- an optimum solve stopped after a few iterations must report F_star_err >= |F_star - F*|;
- the bounded and fixed output layers' certificates are checked against a network output
  written here in NumPy and against independent references (the grid module, SciPy quad).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy import integrate

from mfld import duality, grid
from mfld.data import teacher_student
from mfld.optimum import solve_optimum
from mfld.problem import Problem


def _problem(activation="tanh", *, output="trained", r_out=1.0, lam=0.2, tau=0.1, n=24, seed=3):
    ds = teacher_student(n=n, d=1, teacher_scale=0.6, bias=True, n_test=0, seed=seed)
    with jax.enable_x64(True):
        return Problem.create(ds.x, ds.y, activation=activation, lam=lam, tau=tau, bias=False, output=output,
                              r_out=r_out)


def _relu(z):
    return np.maximum(z, 0.0)


def _reference_fixed_p1(x, y, u, lam, tau, sigma, pf):
    """D(u) and F(rho_hat_u), squared loss, fixed output layer (a = +-1, masses pf, 1 - pf),
    w in R (d = 1, no bias), by adaptive SciPy quadrature on each side of w = 0 (THEORY 8)."""
    x, y, u = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y, u))
    lim = 12 * math.sqrt(tau / lam) + 10
    opts = dict(epsabs=0, epsrel=1e-13, limit=400)

    def integral(fun):
        return sum(integrate.quad(fun, lo, hi, **opts)[0] for lo, hi in ((-lim, 0.0), (0.0, lim)))

    tlz, f_hat = 0.0, np.zeros_like(x)
    for s, mass in ((1.0, pf), (-1.0, 1.0 - pf)):
        def weight(w, s=s):
            return math.exp(-(s * float(np.mean(u * sigma(w * x))) + lam * w * w / 2) / tau)

        z = integral(weight)
        tlz += tau * mass * math.log(z)
        f_hat += mass * s * np.array([integral(lambda w, j=j: weight(w) * sigma(w * x[j])) / z
                                      for j in range(x.size)])
    D = -np.mean(0.5 * u * u + u * y) - tlz
    F = np.mean(0.5 * (f_hat - y) ** 2) - np.mean(u * f_hat) - tlz
    return D, F


@pytest.fixture(scope="module")
def relu_case():
    # fixed layer: the log weight -s g(w)/tau is piecewise linear in w with a kink at the node
    # w = 0 whose first derivative jumps, so the trapezoid rule is O(h^2) there (not spectral)
    pr = _problem("relu", output="fixed", lam=0.5, tau=0.1, n=12)
    u = -0.5 * np.asarray(pr.y, dtype=np.float64)
    ev = duality.evaluate(pr, u, method="quadrature", plus_fraction=0.5)
    D_ref, F_ref = _reference_fixed_p1(pr.x, pr.y, u, 0.5, 0.1, _relu, 0.5)
    return ev, D_ref, F_ref


def test_quadrature_error_is_real_and_covered(relu_case):
    ev, D_ref, F_ref = relu_case
    err_true_D, err_true_F = abs(ev.D - D_ref), abs(ev.F - F_ref)
    # a genuinely non-zero error (O(h^2) for the kink), far above the reference's 1e-13
    assert err_true_D > 1e-9 and err_true_F > 1e-9
    # the reported error covers it ...
    assert err_true_D <= ev.err_D and err_true_F <= ev.err_F
    # ... and is not vacuous: at O(h^2), |Q(h) - Q(2h)| is about 3x the error of Q(h); an error
    # bar under-reported by 10x (or one that leaves out the h-vs-2h term) fails here
    assert ev.err_D <= 10 * err_true_D and ev.err_F <= 10 * err_true_F
    # the bounds move the right way: lower = D - err, upper = F + err
    assert ev.lower <= D_ref <= ev.upper and ev.lower <= F_ref <= ev.upper
    assert D_ref - ev.lower >= 0.5 * err_true_D  # D + err instead of D - err would overshoot D_ref
    assert ev.upper - F_ref >= 0.5 * err_true_F


def test_stopped_optimum_reports_an_honest_error():
    pr = _problem("tanh", lam=0.2, tau=0.1)
    full = solve_optimum(pr)
    stopped = solve_optimum(pr, maxiter=2)
    miss = abs(stopped.F_star - full.F_star)
    assert miss > 1e-7  # two L-BFGS steps per round stop short of the maximiser (measured 1.8e-6)
    # F_star_err = duality gap at u + quadrature error >= |F_star - F*| (F* within full's error)
    assert stopped.F_star_err >= miss + full.F_star_err
    assert stopped.F_star_err <= 1e3 * miss  # and not vacuous


def _numpy_output(a, w, x, output, r_out):
    """f(x_j) = (1/N) sum_i psi(a_i) tanh(w_i . x_j), written independently of mfld."""
    psi = r_out * np.tanh(a) if output == "bounded" else a
    return psi @ np.tanh(w @ x.T) / a.shape[0]


def test_bounded_layer_certificate_against_numpy_output_and_grid():
    r_out = 2.5  # with r_out = 1 a certificate that drops r_out could not be told apart
    pr = _problem("tanh", output="bounded", r_out=r_out, lam=0.2, tau=0.1)
    rng = np.random.default_rng(0)
    a, w = 0.7 * rng.standard_normal(3000), 0.8 * rng.standard_normal((3000, 1))
    x, y = np.asarray(pr.x, dtype=np.float64), np.asarray(pr.y, dtype=np.float64)
    u = _numpy_output(a, w, x, "bounded", r_out) - y
    row = duality.certify(pr, a, w)
    assert row["certified"] == 1.0 and row["withheld"] == 0.0
    # independent reference: the grid module's D(u) at the NumPy u (O(h^2) error; two grids
    # give the extrapolation error, the tolerance is 4x their difference)
    g1 = grid.make_grid(pr, n_a=401, n_w=401)
    g2 = grid.make_grid(pr, n_a=801, n_w=801)
    d1, d2 = grid.dual(g1, u), grid.dual(g2, u)
    d_ref = d2 + (d2 - d1) / 3  # Richardson: O(h^2)
    assert abs(row["dual_value"] - d_ref) <= 4 * abs(d2 - d1) + 1e-10
    assert row["dual_lower"] <= d_ref + 4 * abs(d2 - d1)


def test_fixed_layer_certificate_against_numpy_output_and_quad():
    pr = _problem("sigmoid", output="fixed", lam=0.2, tau=0.1)
    rng = np.random.default_rng(1)
    n_part = 3001
    a = np.where(np.arange(n_part) < 1700, 1.0, -1.0)
    w = 0.9 * rng.standard_normal((n_part, 1))
    x, y = np.asarray(pr.x, dtype=np.float64), np.asarray(pr.y, dtype=np.float64)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    u = (a @ sig(w @ x.T) / n_part) - y
    pf = 1700 / n_part
    row = duality.certify(pr, a, w, plus_fraction=pf)
    d_ref, _ = _reference_fixed_p1(x, y, u, 0.2, 0.1, sig, pf)
    assert row["certified"] == 1.0
    assert row["dual_value"] == pytest.approx(d_ref, abs=1e-9)
    assert row["dual_lower"] <= d_ref


def test_bounded_layer_run_certified_gap_falls_100x():
    import mfld

    pr = _problem("tanh", output="bounded", r_out=2.0, lam=0.2, tau=0.1)
    rows = []

    def cb(state, row):
        rows.append(duality.certify(pr, state.a, state.w)["gap"])

    with jax.enable_x64(True):
        state = mfld.init_particles(pr, n_particles=2000, seed=0)
        mfld.simulate(pr, state, mfld.Langevin(eta=0.05), n_steps=600, record_every=600, callback=cb)
    assert len(rows) == 2 and np.all(np.isfinite(rows))
    assert rows[-1] <= rows[0] / 100


def _gauss_hermite_reference(x, y, u, lam, tau, order):
    """D(u), F(rho_hat_u) for tanh, trained layer, squared loss, dim(w) = 3, by a tensor
    Gauss-Hermite rule of ``order`` nodes per axis under N(0, tau/lam I) (independent code)."""
    from scipy.special import logsumexp

    z, wt = np.polynomial.hermite_e.hermegauss(order)
    wt = wt / math.sqrt(2 * math.pi)
    s = math.sqrt(tau / lam)
    w = np.stack(np.meshgrid(z, z, z, indexing="ij"), -1).reshape(-1, 3) * s
    log_wt = np.log((wt[:, None, None] * wt[None, :, None] * wt[None, None, :]).ravel())
    S = np.tanh(w @ x.T)
    g = S @ u / x.shape[0]
    lw = log_wt + g * g / (2 * lam * tau)
    log_z = 0.5 * 4 * math.log(2 * math.pi * tau / lam) + logsumexp(lw)  # (a, w) in R^4
    om = np.exp(lw - logsumexp(lw))
    f_hat = (om * (-g / lam)) @ S
    D = -np.mean(0.5 * u * u + u * y) - tau * log_z
    F = np.mean(0.5 * (f_hat - y) ** 2) - np.mean(u * f_hat) - tau * log_z
    return D, F


def test_three_dimensional_quadrature_is_certified_and_accurate():
    # d = 2 inputs with a bias: dim(w) = 3, now certified by quadrature (a ball of lattice points)
    ds = teacher_student(n=24, d=2, teacher_scale=0.6, bias=True, n_test=0, seed=3)
    with jax.enable_x64(True):
        pr = Problem.create(0.5 * np.asarray(ds.x), ds.y, activation="tanh", lam=0.2, tau=0.1, bias=True)
    x, y = np.asarray(pr.x, dtype=np.float64), np.asarray(pr.y, dtype=np.float64)
    u = -0.5 * y
    ev = duality.evaluate(pr, u)
    assert ev.method == "quadrature" and ev.certified and ev.withheld == 0
    assert ev.err_D < 1e-8 and ev.err_F < 1e-8  # a smooth case: the rule is spectrally accurate
    d80, f80 = _gauss_hermite_reference(x, y, u, 0.2, 0.1, 80)
    d60, f60 = _gauss_hermite_reference(x, y, u, 0.2, 0.1, 60)
    ref_err_d, ref_err_f = abs(d80 - d60), abs(f80 - f60)
    assert ref_err_d < 1e-10 and ref_err_f < 1e-10  # two orders below the errors checked
    assert abs(ev.D - d80) <= ev.err_D + ref_err_d
    assert abs(ev.F - f80) <= ev.err_F + ref_err_f
    # particles at the zero network (u = -y: a 4x stronger tilt): an explicit quadrature still
    # certifies; `auto`, which certifies at every record, keeps to the cacheable grid budget
    # (QUAD_AUTO_WORK) and uses Monte Carlo here, saying why
    rng = np.random.default_rng(0)
    a, w = 1e-3 * rng.standard_normal(500), rng.standard_normal((500, 3))
    row = duality.certify(pr, a, w, method="quadrature")
    assert row["certified"] == 1.0 and row["withheld"] == 0.0
    ev_auto = duality.evaluate(pr, -y)
    assert ev_auto.method == "mc" and "budget" in ev_auto.info["fallback"]
    assert ev_auto.lower <= row["dual_value"] <= ev_auto.upper
