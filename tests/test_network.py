"""The analytic particle drift against autodiff and finite differences (THEORY 3, 8), float64.

Mean field: grad V_rho(theta_i) = N dL/dtheta_i, L = network.finite_loss. NTK: the drift is
dL/dtheta_i itself. Checked for every activation (incl. a user callable), both losses, all
three output layers and both scalings.

Tolerances. Autodiff and the analytic formula compute the same quantity by different
float64 roundings: 1e-10 relative (a few hundred ulps of accumulated rounding over n = 7 and
p = 3 terms). Central differences with step h: truncation h^2 |L'''|/6 and rounding
eps |L| / h; with h = 1e-5, |L'''| <= ~10 and |L| <= ~10 both are <= ~1e-9, so the tolerance
is 1e-7 relative to the gradient's scale (for mean field the N dL/dtheta_i scaling multiplies
the absolute error by N = 5, still well under it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import network
from mfld.activations import ACTIVATIONS, from_callable
from mfld.errors import ConfigError
from mfld.problem import Problem

pytestmark = pytest.mark.usefixtures("x64")

N_PART, N_DATA, D_IN = 5, 7, 2


def _user_activation():
    return from_callable(lambda z: jnp.sin(z) + 0.1 * z * z, name="sinq")


ACT_SPECS = [*ACTIVATIONS] + ["user"]


def _problem(activation, loss, output, scaling, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, (N_DATA, D_IN))
    y = np.sign(rng.standard_normal(N_DATA)) if loss == "logistic" else rng.standard_normal(N_DATA)
    act = _user_activation() if activation == "user" else activation
    return Problem.create(x, y, activation=act, loss=loss, lam=0.3, tau=0.01, output=output, r_out=1.7,
                          scaling=scaling, bias=True, dtype=jnp.float64)


def _particles(problem, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(N_PART)
    if problem.output == "fixed":
        a = np.where(np.arange(N_PART) < 3, 1.0, -1.0)
    w = rng.standard_normal((N_PART, problem.p))
    # relu: keep every pre-activation away from the kink (FD moves w.x by <= h |x| ~ 3e-5)
    pre = w @ np.asarray(problem.x).T
    assert np.abs(pre).min() > 1e-3, "choose another seed: a pre-activation is near the relu kink"
    return jnp.asarray(a), jnp.asarray(w)


def _central_fd(fun, a, w, h=1e-5):
    a = np.asarray(a)
    w = np.asarray(w)
    ga = np.zeros_like(a)
    gw = np.zeros_like(w)
    for i in range(a.size):
        e = np.zeros_like(a)
        e[i] = h
        ga[i] = (fun(a + e, w) - fun(a - e, w)) / (2 * h)
    for idx in np.ndindex(w.shape):
        e = np.zeros_like(w)
        e[idx] = h
        gw[idx] = (fun(a, w + e) - fun(a, w - e)) / (2 * h)
    return ga, gw


@pytest.mark.parametrize("scaling", ["mean_field", "ntk"])
@pytest.mark.parametrize("output", ["trained", "fixed", "bounded"])
@pytest.mark.parametrize("loss", ["squared", "logistic"])
@pytest.mark.parametrize("activation", ACT_SPECS)
def test_drift_equals_autodiff_and_finite_differences(activation, loss, output, scaling):
    problem = _problem(activation, loss, output, scaling)
    a, w = _particles(problem)
    assert a.dtype == jnp.float64 and problem.x.dtype == jnp.float64
    ga, gw, it = network.potential_gradient(problem, a, w)
    scale = N_PART if scaling == "mean_field" else 1.0

    loss_fn = lambda aa, ww: network.finite_loss(problem, aa, ww)  # noqa: E731
    ad_a, ad_w = jax.grad(loss_fn, argnums=(0, 1))(a, w)
    ref_w = scale * np.asarray(ad_w)
    mag = max(np.abs(ref_w).max(), np.abs(np.asarray(ga)).max(), 1e-3)
    np.testing.assert_allclose(gw, ref_w, rtol=1e-10, atol=1e-10 * mag)
    if output == "fixed":
        # a is not trained: its drift is exactly zero (autodiff's dL/da is not a drift)
        assert np.all(np.asarray(ga) == 0.0)
    else:
        np.testing.assert_allclose(ga, scale * np.asarray(ad_a), rtol=1e-10, atol=1e-10 * mag)

    fd_a, fd_w = _central_fd(lambda aa, ww: float(loss_fn(jnp.asarray(aa), jnp.asarray(ww))), a, w)
    np.testing.assert_allclose(gw, scale * fd_w, rtol=0, atol=1e-7 * mag)
    if output != "fixed":
        np.testing.assert_allclose(ga, scale * fd_a, rtol=0, atol=1e-7 * mag)

    # the interaction record is consistent with predict/risk
    f = network.predict(problem, a, w)
    np.testing.assert_allclose(it.f, f, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(it.u, problem.loss.derivative(f, problem.y), rtol=1e-13, atol=1e-15)


def test_drift_scales_with_n_particles_only_through_the_measure():
    """Mean field: duplicating every particle leaves f and each particle's drift unchanged
    (the drift is a function of the measure); the finite-N gradient halves."""
    problem = _problem("tanh", "squared", "trained", "mean_field")
    a, w = _particles(problem)
    ga, gw, _ = network.potential_gradient(problem, a, w)
    a2, w2 = jnp.concatenate([a, a]), jnp.concatenate([w, w])
    ga2, gw2, _ = network.potential_gradient(problem, a2, w2)
    np.testing.assert_allclose(ga2[:N_PART], ga, rtol=1e-13)
    np.testing.assert_allclose(gw2[N_PART:], gw, rtol=1e-13)
    np.testing.assert_allclose(network.predict(problem, a2, w2), network.predict(problem, a, w), rtol=1e-13)


def test_gelu_is_exact_erf_form_and_linear_closed_form():
    from scipy.special import erf

    z = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(ACTIVATIONS["gelu"].fn(jnp.asarray(z)), 0.5 * z * (1 + erf(z / np.sqrt(2))),
                               rtol=1e-14, atol=1e-16)
    # linear activation, squared loss: f(x) = (1/N) sum a_i w_i . x
    problem = _problem("linear", "squared", "trained", "mean_field")
    a, w = _particles(problem)
    m = np.asarray(a) @ np.asarray(w) / N_PART
    np.testing.assert_allclose(network.predict(problem, a, w), np.asarray(problem.x) @ m, rtol=1e-13)


# ------------------------------------------------------------------ Problem.create validation
def _xy():
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 2)), rng.standard_normal(6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(activation="swish"), "model.activation"),
    (dict(loss="hinge"), "objective.loss"),
    (dict(output="frozen"), "model.output"),
    (dict(scaling="lazy"), "model.scaling"),
    (dict(lam=0.0), "objective.lam"),
    (dict(lam=float("nan")), "objective.lam"),
    (dict(lam="big"), "objective.lam"),
    (dict(tau=-0.1), "objective.tau"),
    (dict(r_out=0.0), "model.r_out"),
])
def test_problem_create_rejects_bad_settings(kwargs, field):
    x, y = _xy()
    with pytest.raises(ConfigError) as err:
        Problem.create(x, y, **kwargs)
    assert err.value.field == field and field in str(err.value)


def test_problem_create_rejects_bad_data():
    x, y = _xy()
    cases = [
        (lambda: Problem.create(x, y[:5]), "y"),
        (lambda: Problem.create(x[None], y), "x"),
        (lambda: Problem.create(np.where(np.eye(6, 2) > 0, np.nan, x), y), "x"),
        (lambda: Problem.create(x, np.r_[y[:5], np.inf]), "y"),
        (lambda: Problem.create(x[:0], y[:0]), "x"),
        (lambda: Problem.create(x, y, loss="logistic"), "y"),
        (lambda: Problem.create(x, y, x_test=x), "x_test, y_test"),
        (lambda: Problem.create(x, y, x_test=x[:, :1], y_test=y), "x_test"),
    ]
    for make, field in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert err.value.field == field, (field, str(err.value))


def test_problem_create_features_and_dims():
    x, y = _xy()
    pr = Problem.create(x, y, bias=True, dtype=jnp.float64)
    assert (pr.n, pr.p, pr.d, pr.particle_dim) == (6, 3, 2, 4)
    np.testing.assert_array_equal(np.asarray(pr.x)[:, -1], 1.0)
    np.testing.assert_array_equal(np.asarray(pr.x)[:, :2], x)
    pf = Problem.create(x, y, bias=False, output="fixed")
    assert (pf.p, pf.particle_dim) == (2, 2)
    np.testing.assert_array_equal(np.asarray(pr.features(x[:2])), np.asarray(pr.x)[:2])
    ok = Problem.create(x, np.sign(y) + (y == 0), loss="logistic")  # labels in {-1, +1}
    assert ok.loss.classification


@pytest.mark.parametrize("scaling", ["mean_field", "ntk"])
@pytest.mark.parametrize("output", ["trained", "fixed", "bounded"])
def test_network_and_step_against_an_independent_numpy_formula(output, scaling, x64):
    """The autodiff checks above share `predict`/`output_scale` with the code; this one does not.

    Written out by hand from THEORY sections 1, 3, 8 in NumPy: f = s(N) sum_i out(a_i) tanh(w_i.x),
    s = 1/N (mean field) or 1/sqrt(N) (NTK), out(a) = a or r_out tanh(a); one noiseless step
    theta <- theta - eta * drift with drift = c * (1/n) sum_j u_j grad phi + k * theta, where
    c = 1, k = lam (mean field) and c = 1/sqrt(N), k = lam/N (NTK). Agreement to 1e-12 (float64
    rounding of O(1) quantities)."""
    from mfld import dynamics

    rng = np.random.default_rng(3)
    n, N, r_out, lam, eta = 9, 7, 1.7, 0.3, 0.1
    x, y = rng.standard_normal((n, 2)), rng.standard_normal(n)
    prob = Problem.create(x, y, activation="tanh", lam=lam, tau=0.0, output=output, scaling=scaling, r_out=r_out)
    a = rng.standard_normal(N) if output != "fixed" else np.where(np.arange(N) < 4, 1.0, -1.0)
    w = rng.standard_normal((N, 3))
    X = np.concatenate([x, np.ones((n, 1))], axis=1)  # bias feature
    s = 1.0 / N if scaling == "mean_field" else 1.0 / np.sqrt(N)
    out = r_out * np.tanh(a) if output == "bounded" else a
    dout = r_out * (1 - np.tanh(a) ** 2) if output == "bounded" else (np.zeros(N) if output == "fixed" else np.ones(N))
    act = np.tanh(w @ X.T)
    f = s * out @ act
    np.testing.assert_allclose(np.asarray(network.predict(prob, jnp.asarray(a), jnp.asarray(w))), f, rtol=0, atol=1e-12)

    u = f - y
    c, k = (1.0, lam) if scaling == "mean_field" else (s, lam / N)
    ga = c * dout * (act @ u) / n + (0.0 if output == "fixed" else k * a)
    gw = c * (out[:, None] * ((1 - act**2) * u[None, :]) @ X) / n + k * w
    state = dynamics.ParticleState(jnp.asarray(a), jnp.asarray(w), jnp.asarray(0, jnp.int32), jax.random.key(0))
    new, _ = dynamics.step(prob, state, dynamics.Langevin(eta=eta))  # tau = 0: no noise
    np.testing.assert_allclose(np.asarray(new.a), a - eta * ga, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new.w), w - eta * gw, rtol=0, atol=1e-12)
