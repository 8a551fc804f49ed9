"""Every metrics.csv column, recomputed independently in float64 NumPy from the run's own
particles (a snapshot at every record) and its data.

The runs are float64 (``--x64``), so the recorded numbers and the NumPy ones are the same
mathematical quantity evaluated twice in double precision: they agree to ~1e-12 relative
(sums of at most a few thousand terms), and the tests allow 1e-9. A constant factor anywhere
(``lam/4`` for ``lam/2`` in reg_risk, a scaled test_risk, grad_norm or accuracy) is off by
far more and fails. The formulas are written here from docs/theory.md, not imported from mfld:

- f(x) = (1/N) sum_i a_i sigma(w_i . x~) (x~: the input with a 1 appended when model.bias);
- risk = mean_j l(f(x_j), y_j), l = (f - y)^2 / 2 or log(1 + exp(-y f)); test_risk alike;
- reg_risk = risk + (lam/2) (E a^2 + E|w|^2) (a excluded for the fixed output layer);
- m2_a = E a^2, m2_w = E|w|^2, mean_abs_a = E|a|;
- grad_norm = sqrt(E(|grad_a V|^2 + |grad_w V|^2)), the drift of the mean-field dynamics
  grad V(theta_i) = (1/n) sum_j l'(f_j, y_j) grad_theta [a_i sigma(w_i . x_j)] + lam theta_i
  (a-component 0 for the fixed output layer);
- accuracy = mean(sign f(x_j) == y_j), test_accuracy alike; t = step * eta;
- the certificate columns (linear activation: the Gibbs measure is Gaussian, everything in
  closed form): dual_lower = D(u), primal_upper = F(rho_hat_u), gap, F_star (the maximum of D,
  found here with SciPy), F_minus_Fstar_upper, free_energy_est (with a brute-force
  Kozachenko-Leonenko entropy) and kl_gap_est.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import digamma, expit, gammaln

from mfld import config as cfgmod
from mfld.app import rundir
from mfld.cli import main

RTOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _restore_x64():
    """``mfld run --x64`` in-process switches x64 on for the process (as the CLI does at its
    entry point): switch it back for the tests that follow."""
    import jax

    old = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", old)


def _run(tmp_path: Path, name: str, extra: list[str]) -> Path:
    out = tmp_path / name
    main(["run", "--x64", "--quiet", "--set", "dynamics.steps=40", "--set", "record.every=10",
          "--set", "record.snapshot_every=10", "--set", "record.checkpoint_every=20", *extra, "--out", str(out)])
    return out


def _data(cfg):
    from mfld import data

    seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    return data.make_dataset(cfg.data.kind, seed=seed, **cfg.data.params)


def _sigma(name):
    return {"tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
            "sigmoid": (expit, lambda z: expit(z) * (1.0 - expit(z))),
            "linear": (lambda z: z, lambda z: np.ones_like(z))}[name]


def _features(x, bias):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias else x


def _loss(name):
    if name == "squared":
        return (lambda f, y: 0.5 * (f - y) ** 2), (lambda f, y: f - y)
    return (lambda f, y: np.logaddexp(0.0, -y * f)), (lambda f, y: -y * expit(-y * f))


def expected_columns(cfg, ds, a, w, step) -> dict:
    """The standard record of one state, float64 NumPy (see the module docstring)."""
    sig, dsig = _sigma(cfg.model.activation)
    val, der = _loss(cfg.objective.loss)
    lam = cfg.objective.lam
    fixed = cfg.model.output == "fixed"
    x = _features(ds.x, cfg.model.bias)
    n, N = x.shape[0], a.shape[0]
    z = w @ x.T  # (N, n)
    f = a @ sig(z) / N
    u = der(f, ds.y)
    m2_a, m2_w = np.mean(a * a), np.mean(np.sum(w * w, axis=1))
    ga = np.zeros(N) if fixed else sig(z) @ u / n + lam * a
    gw = (a[:, None] * (dsig(z) * u[None, :]) @ x) / n + lam * w
    out = {
        "step": step, "t": step * cfg.dynamics.eta,
        "risk": np.mean(val(f, ds.y)),
        "reg_risk": np.mean(val(f, ds.y)) + 0.5 * lam * (m2_w + (0.0 if fixed else m2_a)),
        "m2_a": m2_a, "m2_w": m2_w, "mean_abs_a": np.mean(np.abs(a)),
        "grad_norm": np.sqrt(np.mean(ga * ga + np.sum(gw * gw, axis=1))),
    }
    if ds.x_test is not None:
        ft = a @ sig(w @ _features(ds.x_test, cfg.model.bias).T) / N
        out["test_risk"] = np.mean(val(ft, ds.y_test))
        if cfg.objective.loss == "logistic":
            out["test_accuracy"] = np.mean(np.sign(ft) == ds.y_test)
    if cfg.objective.loss == "logistic":
        out["accuracy"] = np.mean(np.sign(f) == ds.y)
    return out


def _snapshots(run_dir: Path) -> dict:
    out = {}
    for p in sorted((run_dir / "snapshots").glob("step_*.npz")):
        with np.load(p) as z:
            out[int(z["step"])] = (np.asarray(z["a"], np.float64), np.asarray(z["w"], np.float64))
    return out


def check_standard_columns(run_dir: Path, extra_columns=()) -> tuple:
    cfg = cfgmod.validate(rundir.read_config(run_dir / rundir.CONFIG))
    ds = _data(cfg)
    m = rundir.read_metrics(run_dir / rundir.METRICS)
    snaps = _snapshots(run_dir)
    ck = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    assert ck["a"].dtype == np.float64  # a float64 run: the recorded numbers are float64 computations
    steps = list(m["step"])
    assert steps == list(range(0, cfg.dynamics.steps + 1, cfg.record.every)) and set(steps) == set(snaps)
    # the checkpoint is the last snapshot's state
    np.testing.assert_array_equal(ck["a"], snaps[steps[-1]][0])
    np.testing.assert_array_equal(ck["w"], snaps[steps[-1]][1])
    want_cols = None
    for i, s in enumerate(steps):
        want = expected_columns(cfg, ds, *snaps[s], s)
        want_cols = set(want) | {"wall_time"} | set(extra_columns)
        assert set(m) == want_cols, f"columns {sorted(set(m) ^ want_cols)}: recompute every column here"
        for k, v in want.items():
            np.testing.assert_allclose(m[k][i], v, rtol=RTOL, atol=1e-14, err_msg=f"{k} at step {s}")
    assert np.all(m["wall_time"] >= 0) and np.all(np.diff(m["wall_time"]) >= 0)
    return cfg, ds, m, snaps


def test_regression_columns_squared_loss_trained_tanh(tmp_path):
    """Squared loss, trained output layer, tanh with bias, a test split: step, t, risk,
    test_risk, reg_risk, m2_a, m2_w, mean_abs_a, grad_norm."""
    out = _run(tmp_path, "sq", ["--set", "model.n_particles=48", "--set", "record.certify_every=0",
                                "--set", "record.optimum=false", "--set", "data.params.d=2",
                                "--set", "data.params.n_test=40", "--set", "objective.lam=0.3"])
    check_standard_columns(out)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    """Logistic loss on a Gaussian mixture, fixed output layer (a excluded from the
    regulariser and the drift), sigmoid: adds accuracy and test_accuracy."""
    return _run(tmp_path_factory.mktemp("cls"), "cls", [
        "--set", "model.n_particles=40", "--set", "record.certify_every=0", "--set", "record.optimum=false",
        "--set", "data.kind=gaussian_mixture", "--set", "data.params.n=60", "--set", "data.params.n_test=50",
        "--set", "objective.loss=logistic", "--set", "model.output=fixed", "--set", "model.activation=sigmoid",
        "--set", "dynamics.eta=0.2"])


def test_classification_columns_logistic_fixed_sigmoid(classification_run):
    cfg, ds, m, _ = check_standard_columns(classification_run)
    # the accuracies are not trivially 0 or 1 somewhere along the run: a scaled column is seen
    assert 0 < np.min(m["accuracy"]) < 1 and 0 < np.min(m["test_accuracy"]) < 1


@pytest.mark.parametrize("name, change", [
    ("reg_risk", lambda m: m["risk"] + 0.5 * (m["reg_risk"] - m["risk"])),  # lam/4 instead of lam/2
    ("test_risk", lambda m: 1.01 * m["test_risk"]),
    ("grad_norm", lambda m: 0.99 * m["grad_norm"]),
    ("accuracy", lambda m: 1.5 * m["accuracy"]),
    ("test_accuracy", lambda m: 0.5 * m["test_accuracy"]),
    ("risk", lambda m: m["risk"] + 1e-6),
    ("m2_w", lambda m: 2 * m["m2_w"]),
    ("t", lambda m: 0.5 * m["t"]),
])
def test_a_constant_factor_in_a_recorded_column_is_detected(classification_run, tmp_path, name, change):
    """The guard itself: the same run with one column changed (reg_risk with lam/4 for lam/2,
    test_risk, grad_norm or accuracy by a constant factor, ...) fails the recomputation."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(classification_run, bad)
    m = rundir.read_metrics(bad / rundir.METRICS)
    m[name] = change(m)
    rundir.write_metrics(bad / rundir.METRICS, m)
    with pytest.raises(AssertionError, match=name):
        check_standard_columns(bad)


# ------------------------------------------------------------------------------ certificates
def _gauss_dual(x, y, u, lam, tau):
    """D(u), F(rho_hat_u), f_hat for the linear activation, trained output layer: the Gibbs
    measure rho_hat_u ~ exp(-(a c.w + lam (a^2 + |w|^2)/2) / tau), c = X^T u / n, is Gaussian."""
    n, p = x.shape
    c = x.T @ u / n
    M = lam * np.eye(p) - np.outer(c, c) / lam  # precision of w, times tau
    sign, logdet = np.linalg.slogdet(M)
    assert sign > 0, "Z(u) diverges"
    log_z = 0.5 * math.log(2 * math.pi * tau / lam) + 0.5 * p * math.log(2 * math.pi * tau) - 0.5 * logdet
    cov_w = tau * np.linalg.inv(M)
    f_hat = x @ (-cov_w @ c / lam)  # E[a w] = -E[w w^T] c / lam
    D = -np.mean(0.5 * u * u + u * y) - tau * log_z
    F = np.mean(0.5 * (f_hat - y) ** 2) - u @ f_hat / n - tau * log_z
    return D, F, f_hat


def _knn_entropy_bruteforce(theta, k=3):
    """Kozachenko-Leonenko: psi(N) - psi(k) + log V_D + (D/N) sum log eps_k (all pairs)."""
    n, dim = theta.shape
    d2 = np.sum((theta[:, None, :] - theta[None, :, :]) ** 2, axis=-1)
    eps = np.sqrt(np.sort(d2, axis=1)[:, k])  # column 0 is the point itself
    log_vd = 0.5 * dim * math.log(math.pi) - gammaln(0.5 * dim + 1.0)
    return digamma(n) - digamma(k) + log_vd + dim * np.mean(np.log(eps))


def test_certificate_columns_linear_activation_closed_form(tmp_path):
    out = _run(tmp_path, "cert", [
        "--set", "model.n_particles=64", "--set", "model.activation=linear", "--set", "model.bias=false",
        "--set", "data.params.d=2", "--set", "data.params.input_scale=1.0", "--set", "data.params.n=30",
        "--set", "objective.lam=1.0", "--set", "objective.tau=0.05", "--set", "record.certify_every=10",
        "--set", "record.optimum=true"])
    cert_cols = ("dual_lower", "primal_upper", "gap", "certified", "withheld", "ess", "ess_low", "pareto_k",
                 "dual_value",
                 "primal_value", "bound_err", "free_energy_est", "entropy_reliable", "kl_gap_est", "F_star",
                 "F_minus_Fstar_upper")
    cfg, ds, m, snaps = check_standard_columns(out, extra_columns=cert_cols)
    lam, tau = cfg.objective.lam, cfg.objective.tau
    x, y = _features(ds.x, False), ds.y
    n = x.shape[0]

    # F* = max_u D(u), solved here independently (BFGS on -D with its gradient (f_hat - u - y)/n)
    def neg(u):
        D, _, f_hat = _gauss_dual(x, y, u, lam, tau)
        return -D, -(f_hat - u - y) / n

    res = minimize(neg, np.zeros(n), jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
    f_star = -res.fun
    stored = rundir.read_json(out / rundir.OPTIMUM)
    assert stored["F_star"] == pytest.approx(f_star, rel=1e-8, abs=1e-10)
    for i, s in enumerate(m["step"]):
        a, w = snaps[int(s)]
        f = a @ (w @ x.T) / a.shape[0]
        D, F, _ = _gauss_dual(x, y, f - y, lam, tau)  # u_j = l'(f_j, y_j) at the particles
        theta = np.concatenate([a[:, None], w], axis=1)
        fe = m["reg_risk"][i] - tau * _knn_entropy_bruteforce(theta)
        want = {"dual_lower": D, "primal_upper": F, "gap": F - D, "dual_value": D, "primal_value": F,
                "bound_err": 0.0, "certified": 1.0, "withheld": 0.0, "ess_low": 0.0, "entropy_reliable": 1.0,
                "free_energy_est": fe, "kl_gap_est": fe - D, "F_star": stored["F_star"],
                "F_minus_Fstar_upper": F - stored["F_star"]}
        for k, v in want.items():
            np.testing.assert_allclose(m[k][i], v, rtol=RTOL, atol=1e-12, err_msg=f"{k} at step {s}")
        assert math.isnan(m["ess"][i]) and math.isnan(m["pareto_k"][i])  # Monte Carlo only
        assert D <= f_star + 1e-10 <= F + 2e-10  # the bounds bracket F*
