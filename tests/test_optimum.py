"""The global optimum from the dual (THEORY 4, 6, 7, 8) against independent references.

- Linear activation: the closed form of THEORY 7 (``mfld.reference.linear_gaussian_optimum``,
  a scalar root find, independent of the dual maximisation).
- d = 1 without bias: a damped fixed-point iteration rho <- normalised exp(-V_rho/tau) on a
  2-D (a, w) grid (1-D per sign group for the fixed output layer), written below and sharing
  no code with the library; beta is halved whenever the residual grows (THEORY 6).
- Weak duality and the decay of the gap along a particle run.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy.special import expit

from mfld import duality, dynamics, gibbs, loop, reference
from mfld.data import teacher_student
from mfld.optimum import Optimum, solve_optimum
from mfld.problem import Problem


def _data(n=16, seed=2, scale=0.6, bias=True):
    ds = teacher_student(n=n, d=1, teacher_scale=scale, bias=bias, n_test=0, seed=seed)
    return ds.x, ds.y


def _problem(x, y, **kw):
    with jax.enable_x64(True):
        return Problem.create(x, y, **kw)


# ---------------------------------------------------------------------------------------
# Linear activation: closed form
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,lam,tau", [(1, 1.0, 0.1), (3, 0.5, 0.2)])
def test_linear_optimum_matches_closed_form(d, lam, tau):
    ds = teacher_student(n=40, d=d, activation="linear", teacher_scale=1.0, n_test=0, seed=d)
    pr = _problem(ds.x, ds.y, activation="linear", lam=lam, tau=tau)
    ref = reference.linear_gaussian_optimum(pr.x, pr.y, lam, tau)
    assert np.linalg.norm(ref.c) > 0.2 * lam  # a real signal, not the trivial optimum
    opt = solve_optimum(pr)
    assert opt.method == "closed_form"
    assert opt.F_star == pytest.approx(ref.free_energy, rel=1e-6)
    assert opt.F_star_err < 1e-12
    np.testing.assert_allclose(opt.cov[0, 1:], ref.m, rtol=1e-6)  # E*[a w]
    np.testing.assert_allclose(opt.cov, ref.sigma, rtol=1e-6, atol=1e-6 * np.max(np.abs(ref.sigma)))
    np.testing.assert_allclose(opt.u, ref.u, rtol=1e-6, atol=1e-9)
    if d == 1:  # p = 2: the quadrature path must agree as well
        q = solve_optimum(pr, method="quadrature")
        assert q.F_star == pytest.approx(ref.free_energy, rel=1e-6)
        np.testing.assert_allclose(q.cov[0, 1:], ref.m, rtol=1e-6)
        np.testing.assert_allclose(q.cov, ref.sigma, rtol=1e-6, atol=1e-6 * np.max(np.abs(ref.sigma)))


def test_linear_optimum_by_monte_carlo_within_its_error():
    # p = 3: the MC path (fixed sample, doubled until stable, fresh evaluation at the maximiser).
    # Weak signal so that |c*|^2 < lam^2/2 and the importance weights have finite variance.
    ds = teacher_student(n=30, d=2, activation="linear", teacher_scale=0.3, n_test=0, seed=1)
    pr = _problem(ds.x, ds.y, activation="linear", lam=1.0, tau=0.1)
    ref = reference.linear_gaussian_optimum(pr.x, pr.y, 1.0, 0.1)
    assert np.linalg.norm(ref.c) ** 2 < 0.5
    opt = solve_optimum(pr, method="mc", n_samples=2 ** 14, max_samples=2 ** 16)
    assert opt.method == "mc"
    # F_star_err = gap + 2 SE of the fresh evaluation: a 2-sigma statistical statement; 2x it
    assert abs(opt.F_star - ref.free_energy) < 2 * opt.F_star_err
    np.testing.assert_allclose(opt.cov[0, 1:], ref.m, atol=0.05 * np.max(np.abs(ref.m)) + 1e-3)
    # finite-variance weights (k = |c*|^2/lam^2 < 1/2): healthy diagnostics, no warning
    assert opt.info["pareto_k"] < 0.5 and not opt.info["ess_low"] and "mc_warning" not in opt.info


def test_monte_carlo_optimum_with_adapted_proposal_where_prior_weights_have_infinite_variance():
    # strong linear signal: |c*|^2 = 0.90 lam^2 > lam^2/2, the weights' tail index is ~0.9 (THEORY 6)
    ds = teacher_student(n=30, d=2, activation="linear", teacher_scale=10.0, n_test=0, seed=1)
    pr = _problem(ds.x, ds.y, activation="linear", lam=1.0, tau=0.1)
    ref = reference.linear_gaussian_optimum(pr.x, pr.y, 1.0, 0.1)
    assert np.linalg.norm(ref.c) ** 2 > 0.8
    # under the prior proposal the weights have infinite variance (tail index ~0.9)
    prior = duality.evaluate(pr, ref.u, method="mc", n_samples=2 ** 14, proposal="prior")
    assert prior.pareto_k > 0.7 and prior.withheld
    # the adapted proposal (fitted to the tilted Gaussian) gives healthy weights and an
    # optimum within its stated error of the closed form (a 2-SE + gap statement)
    opt = solve_optimum(pr, method="mc", n_samples=2 ** 14, max_samples=2 ** 16)
    assert opt.info["pareto_k"] < 0.5 and not opt.info["ess_low"] and "mc_warning" not in opt.info
    assert opt.info["ess"] > 0.5 * opt.info["samples"]
    assert abs(opt.F_star - ref.free_energy) <= opt.F_star_err


def test_logistic_linear_optimum_from_an_infeasible_default_start():
    # Separable two-class data, linear activation, small lam: u = l'(0, y) = -y/2 has
    # |c(u)| > lam (Z(u) diverges), so the solver must start from a feasible (halved) point.
    from mfld.data import gaussian_mixture

    ds = gaussian_mixture(n=256, d=1, separation=4.0, n_test=0, seed=0)
    pr = _problem(ds.x, ds.y, activation="linear", loss="logistic", lam=0.05, tau=0.05)
    y = np.asarray(pr.y, dtype=np.float64)
    assert duality.evaluate(pr, -0.5 * y).D == -math.inf
    opt = solve_optimum(pr)
    assert opt.method == "closed_form" and opt.info["status"] == "converged"
    assert np.isfinite(opt.F_star) and opt.F_star_err < 1e-12
    c = np.asarray(pr.x, np.float64).T @ opt.u / pr.n
    assert np.linalg.norm(c) < float(pr.lam)  # u* is feasible
    # fixed point u* = l'(f*, y) (THEORY 6): grad_u D_j = (f_j - (l*)'(u_j))/n and l' is
    # 1/4-Lipschitz, so |u_j - l'(f_j)| <= n max|grad D| / 4 at the returned point
    resid = np.max(np.abs(opt.u - (-y * expit(-y * opt.f))))
    assert resid <= pr.n * opt.info["grad_max"] / 4 + 1e-15


def test_infeasible_start_raises_theory_not_applicable():
    from mfld.errors import TheoryNotApplicable
    from mfld.optimum import maximise_dual

    x, y = _data(n=8)
    pr = _problem(x, y, activation="linear", lam=1.0, tau=0.2)
    spec = gibbs.make_spec(pr)
    u_bad = np.asarray(pr.x, np.float64)[:, 0] * 50.0  # |c(u)| >> lam: D = -inf
    assert duality.evaluate(pr, u_bad).D == -math.inf
    with pytest.raises(TheoryNotApplicable, match="starting point"):
        maximise_dual(spec, lambda v: gibbs.closed_form(spec, v), u_bad)


def test_linear_sampler_and_json_roundtrip():
    x, y = _data(n=20)
    pr = _problem(x, y, activation="linear", lam=1.0, tau=0.2)
    opt = solve_optimum(pr)
    back = Optimum.from_json(opt.to_json(), problem=pr)
    assert back.F_star == opt.F_star and back.method == opt.method
    np.testing.assert_array_equal(back.u, opt.u)
    # the sampler against the closed form of THEORY 7 (mfld.reference, independent of the
    # dual maximisation): rho* = N(0, Sigma). Error model: the sample mean has SE
    # sqrt(Sigma_ii / n); a sample covariance entry of a Gaussian has variance
    # (Sigma_ii Sigma_jj + Sigma_ij^2) / n; 5 SE per entry (n = 4e4: relative SE ~0.7%).
    ref = reference.linear_gaussian_optimum(pr.x, pr.y, 1.0, 0.2)
    n = 40000
    a, w = back.sample(3, n)
    th = np.concatenate([a[:, None], w], axis=1)
    sd = np.sqrt(np.diag(ref.sigma))
    assert np.all(np.abs(th.mean(axis=0)) < 5 * sd / math.sqrt(n))
    se_cov = np.sqrt((np.outer(sd ** 2, sd ** 2) + ref.sigma ** 2) / n)
    assert np.all(np.abs(np.cov(th.T) - ref.sigma) < 5 * se_cov), (np.cov(th.T), ref.sigma)
    assert abs(ref.sigma[0, 1]) > 20 * se_cov[0, 1]  # the coupling E[a w] is resolved, not ~0


# ---------------------------------------------------------------------------------------
# An independent reference: damped fixed point on a grid (d = 1, no bias)
# ---------------------------------------------------------------------------------------


def _sig(name, z):
    return np.tanh(z) if name == "tanh" else expit(z)


def _loss(name, f, y):
    return 0.5 * (f - y) ** 2 if name == "squared" else np.logaddexp(0.0, -y * f)


def _dloss(name, f, y):
    return f - y if name == "squared" else -y * expit(-y * f)


def _fixed_point_trained(x, y, act, loss, lam, tau, L=9.0, m=301, tol=1e-12, moments=False):
    """rho on an m x m midpoint grid of [-L, L]^2 over (a, w); returns F(rho*) (``moments``:
    a dict of moments of rho* instead, for the sampler)."""
    t = np.linspace(-L, L, m + 1)
    c = 0.5 * (t[1:] + t[:-1])
    h = t[1] - t[0]
    A, W = np.meshgrid(c, c, indexing="ij")
    S = _sig(act, np.outer(c, x))  # (m_w, n)

    def gibbs(u):
        g = S @ u / len(x)
        V = A * g[None, :] + 0.5 * lam * (A ** 2 + W ** 2)
        e = np.exp(-(V - V.min()) / tau)
        return e / (e.sum() * h * h)

    def pred(rho):
        return (rho * A).sum(axis=0) * h * h @ S  # f_j = sum_{a,w} rho a sigma(w x_j)

    rho = gibbs(np.zeros(len(x)))
    beta, res_prev = 1.0, np.inf
    for _ in range(5000):
        new = gibbs(_dloss(loss, pred(rho), y))
        res = np.abs(new - rho).sum() * h * h
        if res < tol:
            break
        if res > res_prev:
            beta = max(beta / 2, 1e-3)
        rho = (1 - beta) * rho + beta * new
        res_prev = res
    assert res < tol, res
    if moments:
        def E(v):
            return float(np.sum(rho * v) * h * h)
        return {"a": E(A), "w": E(W), "a^2": E(A * A), "w^2": E(W * W), "a w": E(A * W),
                "a tanh(w x_0)": E(A * np.tanh(W * x[0]))}
    f = pred(rho)
    ent = np.sum(np.where(rho > 0, rho * np.log(np.where(rho > 0, rho, 1.0)), 0.0)) * h * h
    return np.mean(_loss(loss, f, y)) + 0.5 * lam * np.sum(rho * (A ** 2 + W ** 2)) * h * h + tau * ent


def _fixed_point_fixed_layer(x, y, act, lam, tau, pi_plus, L=9.0, m=2001, tol=1e-13):
    """Two densities rho_s(w) on a 1-D grid, masses pi_s, output weights s = +-1."""
    t = np.linspace(-L, L, m + 1)
    c = 0.5 * (t[1:] + t[:-1])
    h = t[1] - t[0]
    S = _sig(act, np.outer(c, x))
    pis = {1.0: pi_plus, -1.0: 1 - pi_plus}

    def gibbs(u):
        g = S @ u / len(x)
        out = {}
        for s in pis:
            V = s * g + 0.5 * lam * c ** 2
            e = np.exp(-(V - V.min()) / tau)
            out[s] = e / (e.sum() * h)
        return out

    def pred(r):
        return sum(pis[s] * s * (r[s] * h) @ S for s in pis)

    r = gibbs(np.zeros(len(x)))
    beta, res_prev = 1.0, np.inf
    for _ in range(5000):
        new = gibbs(_dloss("squared", pred(r), y))
        res = sum(np.abs(new[s] - r[s]).sum() * h for s in pis)
        if res < tol:
            break
        if res > res_prev:
            beta = max(beta / 2, 1e-3)
        r = {s: (1 - beta) * r[s] + beta * new[s] for s in pis}
        res_prev = res
    assert res < tol, res
    f = pred(r)
    F = np.mean(_loss("squared", f, y))
    for s in pis:
        F += pis[s] * (0.5 * lam * np.sum(r[s] * c ** 2) * h + tau * np.sum(r[s] * np.log(r[s])) * h)
    return F


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_tanh_d1_optimum_matches_grid_fixed_point(loss):
    x, y = _data(n=16, bias=False)
    if loss == "logistic":
        y = np.where(y >= 0, 1.0, -1.0)
    lam, tau = 0.2, 0.1
    pr = _problem(x, y, activation="tanh", loss=loss, lam=lam, tau=tau, bias=False)
    opt = solve_optimum(pr)
    assert opt.method == "quadrature" and opt.F_star_err < 1e-9
    ref = _fixed_point_trained(x[:, 0], y, "tanh", loss, lam, tau)
    # both are spectrally accurate quadratures of the same smooth, Gaussian-decaying integrals;
    # the fixed point is converged to an L1 residual of 1e-12, so they agree to ~1e-10
    assert opt.F_star == pytest.approx(ref, abs=1e-8)
    # Monte Carlo log Z at u* agrees with the quadrature within its error
    mc = duality.evaluate(pr, opt.u, method="mc", n_samples=2 ** 16, seed=1)
    assert abs(mc.D - opt.F_star) < 4 * mc.se_D + opt.F_star_err


def test_fixed_sigmoid_optimum_matches_grid_fixed_point():
    x, y = _data(n=16, bias=False)
    lam, tau, pi_plus = 0.2, 0.1, 0.7
    pr = _problem(x, y, activation="sigmoid", output="fixed", lam=lam, tau=tau, bias=False)
    opt = solve_optimum(pr, plus_fraction=pi_plus)
    ref = _fixed_point_fixed_layer(x[:, 0], y, "sigmoid", lam, tau, pi_plus)
    assert opt.F_star == pytest.approx(ref, abs=1e-8)
    # the two sign groups really differ here (sigmoid is not odd)
    lp = duality.log_partition(pr, opt.u, plus_fraction=1.0)[0]
    lm = duality.log_partition(pr, opt.u, plus_fraction=0.0)[0]
    assert abs(lp - lm) > 1e-2
    a, w = opt.sample(0, 2000)
    assert np.sum(a > 0) == 1400 and w.shape == (2000, 1)


def test_quadrature_sampler_moments():
    # The sampler of rho* (tanh, d = 1) against the moments of the grid fixed point written
    # out above (no library code). Error model: each sample moment E[m(a, w)] has the Monte
    # Carlo SE sd(m)/sqrt(n) (5 SE); the sampler jitters w uniformly within its quadrature cell
    # (width h <= 0.1), which adds at most h^2/12 < 1e-3 to E[w^2] and nothing to odd moments
    # beyond O(h^2); the grid reference is spectrally accurate (F* to 1e-8 above).
    x, y = _data(n=16, bias=False)
    lam, tau = 0.2, 0.1
    pr = _problem(x, y, activation="tanh", lam=lam, tau=tau, bias=False)
    opt = solve_optimum(pr)
    ref = _fixed_point_trained(x[:, 0], y, "tanh", "squared", lam, tau, moments=True)
    n = 50000
    a, w = opt.sample(jax.random.key(1), n)
    w = w[:, 0]
    for name, m in (("a", a), ("w", w), ("a^2", a * a), ("w^2", w * w), ("a w", a * w),
                    ("a tanh(w x_0)", a * np.tanh(w * x[0, 0]))):
        se = m.std() / math.sqrt(n)
        assert abs(m.mean() - ref[name]) < 5 * se + 1e-3 * (name == "w^2"), (name, m.mean(), ref[name], se)
    # the moments are not trivially those of the prior N(0, tau/lam): the tilt shows
    assert abs(ref["a tanh(w x_0)"]) > 20 * np.std(a * np.tanh(w * x[0, 0])) / math.sqrt(n)


# ---------------------------------------------------------------------------------------
# Along a run: weak duality and the decay of the gap
# ---------------------------------------------------------------------------------------


def test_weak_duality_and_gap_decay_along_a_run():
    # small 1-D teacher with bias; lam, tau such that G^2/(2 lam tau) is a few units
    ds = teacher_student(n=32, d=1, teacher_scale=0.5, seed=1, n_test=0)
    pr = Problem.create(ds.x, ds.y, lam=0.2, tau=0.1)  # float32 particles
    opt = solve_optimum(pr)
    assert opt.F_star_err < 1e-9
    st = dynamics.init_particles(pr, 4000, seed=0)
    rows = []

    def cb(s, row):
        rows.append(duality.certify(pr, s.a, s.w, optimum=opt))

    loop.simulate(pr, st, dynamics.Langevin(eta=0.05), 600, record_every=50, callback=cb)
    lo = np.array([r["dual_lower"] for r in rows])
    up = np.array([r["primal_upper"] for r in rows])
    gap = np.array([r["gap"] for r in rows])
    assert all(r["certified"] == 1.0 for r in rows)
    # certified bounds: D(u(rho_t)) <= F* <= F(rho_hat_u) at every record (F* to within its error)
    assert np.all(lo <= opt.F_star + opt.F_star_err)
    assert np.all(up >= opt.F_star - opt.F_star_err)
    assert np.all(np.array([r["F_minus_Fstar_upper"] for r in rows]) >= -opt.F_star_err)
    # the gap falls by two orders of magnitude; at the end it sits at its O(1/N) particle floor,
    # which fluctuates from record to record, hence the median of the last half
    assert np.median(gap[len(gap) // 2:]) < gap[0] / 100


# ---------------------------------------------------------------------------------------
# CLI and figure
# ---------------------------------------------------------------------------------------


def test_cli_optimum_default_problem_under_a_minute(tmp_path):
    import json
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "mfld.cli", "optimum", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert wall < 60  # acceptance: under a minute on 2 cores (about 2 s idle)
    d = json.loads((tmp_path / "optimum.json").read_text())
    assert d["certified"] and d["method"] == "quadrature" and d["F_star_err"] < 1e-8
    assert d["F_star"] <= d["F_star_upper"] <= d["F_star"] + d["F_star_err"] + 1e-15
    bad = subprocess.run([sys.executable, "-m", "mfld.cli", "optimum", "--set", "objective.tau=0",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tau" in bad.stderr and "Traceback" not in bad.stderr


def test_plot_gap_writes_figure_and_fits_the_rate(tmp_path):
    from mfld.app.certificate_plots import plot_gap

    t = np.arange(0.0, 20.0, 0.5)
    rng = np.random.default_rng(0)
    gap = np.exp(-0.8 * t) * np.exp(0.05 * rng.standard_normal(t.size)) + 1e-6
    lower = -1.0 - 0.5 * gap
    metrics = {"t": t, "dual_lower": lower, "primal_upper": lower + gap, "certified": np.ones_like(t),
               "risk": np.zeros_like(t)}
    metrics["dual_lower"][3] = np.nan  # a record without a certificate is skipped
    rate = plot_gap(metrics, tmp_path / "figures" / "gap.png", F_star=-1.0)
    assert (tmp_path / "figures" / "gap.png").stat().st_size > 10_000
    assert rate == pytest.approx(0.8, rel=0.05)  # the straight part, before the 1e-6 floor


def test_optimum_json_is_strict_json_with_nonfinite_info():
    # info values that are nan/inf (also nested, also NumPy) are written as strings: strict JSON
    import json

    x, y = _data(n=8)
    pr = _problem(x, y, activation="linear", lam=1.0, tau=0.2)
    opt = solve_optimum(pr)
    opt.info.update(k=np.float64(np.nan), arr=np.array([1.0, np.inf]), hist=[[2, -np.inf]], flag=np.bool_(True))

    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    d = json.loads(opt.to_json(), parse_constant=refuse)
    assert d["info"]["k"] == "nan" and d["info"]["arr"] == [1.0, "inf"] and d["info"]["hist"] == [[2, "-inf"]]
    assert d["info"]["flag"] is True and d["info"]["status"] == "converged"
