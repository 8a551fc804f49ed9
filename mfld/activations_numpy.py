"""Float64 NumPy forms of the registry's activations, without JAX (the data generators use
them before JAX is imported; :class:`mfld.activations.Activation` exposes them as
``np_fn``/``np_value_and_derivative``).

``NUMPY_FORMS[name] = (sigma, value_and_derivative)``, both on float64 arrays.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special as _sps

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _np_tanh_vd(z):
    s = np.tanh(z)
    return s, 1.0 - s * s


def _np_sigmoid_vd(z):
    s = _sps.expit(z)
    return s, s * (1.0 - s)


def _np_erf_vd(z):
    return _sps.erf(z), (2.0 / math.sqrt(math.pi)) * np.exp(-z * z)


def _np_relu_vd(z):
    return np.maximum(z, 0.0), (z > 0).astype(np.float64)


def _np_softplus_vd(z):
    return np.logaddexp(0.0, z), _sps.expit(z)


def _np_gelu(z):
    return 0.5 * z * (1.0 + _sps.erf(z / _SQRT2))


def _np_gelu_vd(z):
    cdf = 0.5 * (1.0 + _sps.erf(z / _SQRT2))
    return z * cdf, cdf + z * (_INV_SQRT2PI * np.exp(-0.5 * z * z))


def _np_linear_vd(z):
    return z, np.ones_like(z)


def _np_quadratic_vd(z):
    return z * z, 2.0 * z


def _np_quadratic(z):
    return z * z


def _np_relu(z):
    return np.maximum(z, 0.0)


def _np_softplus(z):
    return np.logaddexp(0.0, z)


def _np_linear(z):
    return z


NUMPY_FORMS = {
    "tanh": (np.tanh, _np_tanh_vd),
    "sigmoid": (_sps.expit, _np_sigmoid_vd),
    "erf": (_sps.erf, _np_erf_vd),
    "relu": (_np_relu, _np_relu_vd),
    "softplus": (_np_softplus, _np_softplus_vd),
    "gelu": (_np_gelu, _np_gelu_vd),
    "linear": (_np_linear, _np_linear_vd),
    "quadratic": (_np_quadratic, _np_quadratic_vd),
}
