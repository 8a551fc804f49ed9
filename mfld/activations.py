"""Activation registry: sigma, sigma', and the bounds the theory needs.

Each activation provides a fused ``value_and_derivative(z) -> (sigma(z), sigma'(z))`` that
reuses shared work (e.g. ``tanh``: sigma' = 1 - sigma^2), and the constants
``sup |sigma|`` and ``sup |sigma'|`` used by the LSI bounds of THEORY section 5
(``None`` when unbounded). A user callable gets its derivative from autodiff.

Float64 NumPy forms (for the dual, the references and the data generators, which compute
in float64 whatever the particles' precision): :meth:`Activation.np_fn` and
:meth:`Activation.np_value_and_derivative`. The registry's activations have NumPy/SciPy
implementations (:mod:`mfld.activations_numpy`, importable without JAX); a user callable is
evaluated by JAX in a scoped ``jax.enable_x64`` context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf as _erf

from mfld.activations_numpy import NUMPY_FORMS
from mfld.errors import ConfigError

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """An activation function and its properties.

    Attributes:
        name: registry name (or the callable's ``__name__``).
        fn: sigma, elementwise.
        value_and_derivative: ``z -> (sigma(z), sigma'(z))``, fused.
        sup: ``sup_z |sigma(z)|`` or ``None`` if unbounded.
        dsup: ``sup_z |sigma'(z)|`` or ``None`` if unbounded.
        odd: whether sigma(-z) = -sigma(z) (then the two sign groups of a fixed output
            layer have equal partition functions, THEORY section 8).
        analytic: False for user callables (derivative by autodiff).
        numpy_fn, numpy_vd: float64 NumPy sigma and ``z -> (sigma(z), sigma'(z))``, or
            ``None`` (then :meth:`np_fn` / :meth:`np_value_and_derivative` evaluate the JAX
            forms in a scoped x64 context).
    """

    name: str
    fn: Callable
    value_and_derivative: Callable
    sup: float | None
    dsup: float | None
    odd: bool = False
    analytic: bool = True
    numpy_fn: Callable | None = None
    numpy_vd: Callable | None = None

    def derivative(self, z):
        return self.value_and_derivative(z)[1]

    def np_value_and_derivative(self, z) -> tuple[np.ndarray, np.ndarray]:
        """(sigma(z), sigma'(z)) as float64 NumPy arrays."""
        z = np.asarray(z, dtype=np.float64)
        if self.numpy_vd is not None:
            return self.numpy_vd(z)
        with jax.enable_x64(True):
            v, d = self.value_and_derivative(jnp.asarray(z, dtype=jnp.float64))
            return np.asarray(v, dtype=np.float64), np.asarray(d, dtype=np.float64)

    def np_fn(self, z) -> np.ndarray:
        """sigma(z) as a float64 NumPy array."""
        z = np.asarray(z, dtype=np.float64)
        if self.numpy_fn is not None:
            return self.numpy_fn(z)
        if self.numpy_vd is not None:
            return self.numpy_vd(z)[0]
        with jax.enable_x64(True):
            return np.asarray(self.fn(jnp.asarray(z, dtype=jnp.float64)), dtype=np.float64)

    def __call__(self, z):
        return self.fn(z)


def _tanh_vd(z):
    s = jnp.tanh(z)
    return s, 1.0 - s * s


def _sigmoid_vd(z):
    s = jax.nn.sigmoid(z)
    return s, s * (1.0 - s)


def _erf_vd(z):
    return _erf(z), (2.0 / math.sqrt(math.pi)) * jnp.exp(-z * z)


def _relu_vd(z):
    return jnp.maximum(z, 0.0), (z > 0).astype(z.dtype)


def _softplus_vd(z):
    return jax.nn.softplus(z), jax.nn.sigmoid(z)


def _gelu(z):
    return 0.5 * z * (1.0 + _erf(z / _SQRT2))


def _gelu_vd(z):
    cdf = 0.5 * (1.0 + _erf(z / _SQRT2))
    pdf = _INV_SQRT2PI * jnp.exp(-0.5 * z * z)
    return z * cdf, cdf + z * pdf


def _linear_vd(z):
    return z, jnp.ones_like(z)


def _quadratic_vd(z):
    return z * z, 2.0 * z


# sup |gelu'(z)| = 1 + sqrt(2) * phi(sqrt(2)) ... attained at z = sqrt(2): cdf(sqrt2) + sqrt2 pdf(sqrt2)
_GELU_DSUP = 0.5 * (1.0 + math.erf(1.0)) + _SQRT2 * _INV_SQRT2PI * math.exp(-1.0)

ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", jnp.tanh, _tanh_vd, 1.0, 1.0, odd=True,
        numpy_fn=NUMPY_FORMS["tanh"][0], numpy_vd=NUMPY_FORMS["tanh"][1]),
    "sigmoid": Activation("sigmoid", jax.nn.sigmoid, _sigmoid_vd, 1.0, 0.25,
        numpy_fn=NUMPY_FORMS["sigmoid"][0], numpy_vd=NUMPY_FORMS["sigmoid"][1]),
    "erf": Activation("erf", _erf, _erf_vd, 1.0, 2.0 / math.sqrt(math.pi), odd=True,
        numpy_fn=NUMPY_FORMS["erf"][0], numpy_vd=NUMPY_FORMS["erf"][1]),
    "relu": Activation("relu", lambda z: jnp.maximum(z, 0.0), _relu_vd, None, 1.0,
        numpy_fn=NUMPY_FORMS["relu"][0], numpy_vd=NUMPY_FORMS["relu"][1]),
    "softplus": Activation("softplus", jax.nn.softplus, _softplus_vd, None, 1.0,
        numpy_fn=NUMPY_FORMS["softplus"][0], numpy_vd=NUMPY_FORMS["softplus"][1]),
    "gelu": Activation("gelu", _gelu, _gelu_vd, None, _GELU_DSUP,
        numpy_fn=NUMPY_FORMS["gelu"][0], numpy_vd=NUMPY_FORMS["gelu"][1]),
    "linear": Activation("linear", lambda z: z, _linear_vd, None, 1.0, odd=True,
        numpy_fn=NUMPY_FORMS["linear"][0], numpy_vd=NUMPY_FORMS["linear"][1]),
    # sigma(z) = z^2 (Ghorbani et al. 2019's quadratic networks; the lazy-vs-mean-field experiment).
    # Unbounded with an unbounded derivative: no LSI bound, and with a trained output layer the
    # Gibbs partition function diverges (quadrature certificates return the trivial bounds; a
    # Monte Carlo one is finite but meaningless, and its effective sample size collapses).
    "quadratic": Activation("quadratic", lambda z: z * z, _quadratic_vd, None, None,
        numpy_fn=NUMPY_FORMS["quadratic"][0], numpy_vd=NUMPY_FORMS["quadratic"][1]),
}


def from_callable(fn: Callable, *, name: str | None = None, sup: float | None = None,
                  dsup: float | None = None, odd: bool = False) -> Activation:
    """Wrap a user-supplied elementwise activation; its derivative comes from autodiff.

    ``sup``/``dsup`` are the bounds the theory module may use; leave them ``None`` unless
    you know them (the LSI bound then refuses rather than guesses).
    """

    def vd(z):
        flat = z.reshape(-1)
        val, der = jax.vmap(jax.value_and_grad(fn))(flat)
        return val.reshape(z.shape), der.reshape(z.shape)

    return Activation(name or getattr(fn, "__name__", "custom"), fn, vd, sup, dsup, odd, analytic=False)


def get_activation(spec) -> Activation:
    """Look up an activation by name, or wrap a callable / pass through an Activation."""
    if isinstance(spec, Activation):
        return spec
    if callable(spec):
        return from_callable(spec)
    if isinstance(spec, str) and spec in ACTIVATIONS:
        return ACTIVATIONS[spec]
    raise ConfigError("unknown activation", field="model.activation", value=spec,
                      allowed=", ".join(ACTIVATIONS) + " or a callable")
