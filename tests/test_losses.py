"""Float64 NumPy forms of the losses and activations against the JAX forms (under x64), the
conjugate against a numerical Fenchel supremum, and derivatives against finite differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from mfld.activations import ACTIVATIONS, from_callable
from mfld.losses import LOSSES


def _jax64(fn, *args):
    with jax.enable_x64(True):
        out = fn(*(jnp.asarray(a, dtype=jnp.float64) for a in args))
        return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def _points(name):
    rng = np.random.default_rng(0)
    z = rng.uniform(-4, 4, 50)
    y = np.sign(rng.standard_normal(50)) if name == "logistic" else rng.standard_normal(50)
    # dual points inside the domain (logistic: -u y in (0, 1))
    u = -y * rng.uniform(0.02, 0.98, 50) if name == "logistic" else rng.uniform(-3, 3, 50)
    return z, y, u


@pytest.mark.parametrize("name", list(LOSSES))
def test_numpy_loss_matches_jax(name):
    # same formulas in the same precision: agreement to a few ulps
    loss = LOSSES[name]
    z, y, u = _points(name)
    np.testing.assert_allclose(loss.np_value(z, y), _jax64(loss.value, z, y), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(loss.np_derivative(z, y), _jax64(loss.derivative, z, y), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(loss.np_conjugate(u, y), _jax64(loss.conjugate, u, y), rtol=1e-13, atol=1e-15)
    assert isinstance(loss.np_value(z, y), np.ndarray) and loss.np_value(z, y).dtype == np.float64


@pytest.mark.parametrize("name", list(LOSSES))
def test_conjugate_is_the_fenchel_supremum(name):
    # l*(u) = sup_z (u z - l(z, y)) by Brent's method on a bracket holding the maximiser
    # z* = (l*)'(u): the objective is smooth and concave, Brent locates z* to ~1e-8 and the
    # value error is quadratic in it (~1e-16 times the curvature), so 1e-10 is a margin.
    loss = LOSSES[name]
    _, y, u = _points(name)
    for uj, yj in zip(u[:12], y[:12], strict=True):
        zstar = float(loss.np_conjugate_derivative(np.array([uj]), np.array([yj]))[0])
        def neg(z, uj=uj, yj=yj):
            return -(uj * z - float(loss.np_value(np.array([z]), np.array([yj]))[0]))

        res = minimize_scalar(neg, bounds=(zstar - 5.0, zstar + 5.0), method="bounded", options={"xatol": 1e-10})
        sup = -res.fun
        conj = float(loss.np_conjugate(np.array([uj]), np.array([yj]))[0])
        assert conj == pytest.approx(sup, abs=1e-10)
        assert res.x == pytest.approx(zstar, abs=1e-4)  # the maximiser is (l*)'(u)
        # Fenchel-Young with equality at z* = (l*)'(u): l(z*) + l*(u) = u z*
        lz = float(loss.np_value(np.array([zstar]), np.array([yj]))[0])
        assert lz + conj == pytest.approx(uj * zstar, abs=1e-12 * max(1.0, abs(uj * zstar)))


def test_logistic_conjugate_domain():
    # l*(u) = +inf outside -u y in [0, 1]: sup_z (u z - log(1 + e^{-y z})) grows linearly in |z|
    loss = LOSSES["logistic"]
    y = np.array([1.0, -1.0, 1.0, 1.0, -1.0])
    u = np.array([0.3, -0.2, -1.2, 0.0, 1.0])  # q = -u y = -0.3, -0.2, 1.2 (outside), 0, 1 (edges)
    c = loss.np_conjugate(u, y)
    assert np.all(np.isinf(c[:3])) and c[3] == 0.0 and c[4] == 0.0
    # the numerical sup over |z| <= 200 confirms the growth: u z - l(z) >= 0.2 * 200 - l
    for uj, yj in zip(u[:3], y[:3], strict=True):
        zz = np.linspace(-200, 200, 4001)
        assert np.max(uj * zz - loss.np_value(zz, yj)) > 30.0
    # the edges: the sup is approached as z -> -/+ inf and equals 0 (0 log 0 = 0)
    zz = np.linspace(-60, 60, 2001)
    assert np.max(0.0 * zz - loss.np_value(zz, 1.0)) == pytest.approx(0.0, abs=1e-25)


@pytest.mark.parametrize("name", list(LOSSES))
def test_numpy_derivatives_match_finite_differences(name):
    # central differences: O(e^2) truncation (e = 1e-5: ~1e-10 * l''') and O(1e-16/e) rounding
    loss = LOSSES[name]
    z, y, u = _points(name)
    e = 1e-5
    num = (loss.np_value(z + e, y) - loss.np_value(z - e, y)) / (2 * e)
    np.testing.assert_allclose(loss.np_derivative(z, y), num, rtol=1e-8, atol=1e-9)
    numc = (loss.np_conjugate(u + e * 1e-2, y) - loss.np_conjugate(u - e * 1e-2, y)) / (2 * e * 1e-2)
    # conjugate: smaller step (the logistic dual's curvature 1/(q(1-q)) reaches ~50 here)
    np.testing.assert_allclose(loss.np_conjugate_derivative(u, y), numc, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_numpy_activation_matches_jax(name):
    act = ACTIVATIONS[name]
    z = np.linspace(-6, 6, 241) + 1e-3  # avoid relu's kink at a node
    v, d = act.np_value_and_derivative(z)
    jv, jd = (np.asarray(t, np.float64) for t in _jax64_pair(act.value_and_derivative, z))
    np.testing.assert_allclose(act.np_fn(z), _jax64(act.fn, z), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(v, jv, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(d, jd, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(act.np_fn(z), v)
    assert act.np_fn(z).dtype == np.float64 and act.numpy_fn is not None


def _jax64_pair(fn, z):
    with jax.enable_x64(True):
        v, d = fn(jnp.asarray(z, dtype=jnp.float64))
        return np.asarray(v), np.asarray(d)


def test_user_callable_numpy_form_is_float64():
    # a user callable has no NumPy form: it is evaluated by JAX under a scoped x64 context,
    # so the result is float64 (float32 would lose ~1e-8 on log1p(z^2) and its derivative)
    act = from_callable(lambda z: jnp.log1p(z * z), name="log1p_sq")
    z = np.linspace(-3, 3, 61) + 1e-3
    assert act.numpy_fn is None and act.numpy_vd is None
    v = act.np_fn(z)
    assert v.dtype == np.float64
    np.testing.assert_allclose(v, np.log1p(z * z), rtol=1e-15, atol=1e-16)
    val, der = act.np_value_and_derivative(z)
    np.testing.assert_allclose(val, np.log1p(z * z), rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(der, 2 * z / (1 + z * z), rtol=1e-14, atol=1e-16)
    assert not jax.config.jax_enable_x64  # the x64 context was scoped
