"""Convex losses l(z, y) with derivative l' (in z) and convex conjugate l* (THEORY 2, 6, 8).

``conjugate(u, y)`` is the conjugate of z -> l(z, y) evaluated at u; it is +inf outside
its domain (the logistic dual is box-constrained).

``value``/``derivative``/``conjugate`` are JAX functions (the particle code); ``np_value``,
``np_derivative``, ``np_conjugate`` and ``np_conjugate_derivative`` ((l*)'(u), the u with
l'(z) = u solved for z) are the float64 NumPy forms used by the dual, the certificates and
the grid references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import expit

from mfld.errors import ConfigError


@dataclass(frozen=True)
class Loss:
    name: str
    value: Callable
    derivative: Callable
    conjugate: Callable
    classification: bool = False
    np_value: Callable | None = None
    np_derivative: Callable | None = None
    np_conjugate: Callable | None = None
    np_conjugate_derivative: Callable | None = None


def _sq_value(z, y):
    r = z - y
    return 0.5 * r * r


def _sq_deriv(z, y):
    return z - y


def _sq_conj(u, y):
    return 0.5 * u * u + u * y


def _log_value(z, y):
    return jax.nn.softplus(-y * z)


def _log_deriv(z, y):
    return -y * jax.nn.sigmoid(-y * z)


def _log_conj(u, y):
    p = -u * y
    inside = (p >= 0) & (p <= 1)
    pc = jnp.clip(p, 0.0, 1.0)
    xlogx = jnp.where(pc > 0, pc * jnp.log(jnp.where(pc > 0, pc, 1.0)), 0.0)
    q = 1.0 - pc
    ylogy = jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)
    return jnp.where(inside, xlogx + ylogy, jnp.inf)


# ---- float64 NumPy forms -----------------------------------------------------------------


def _np_sq_conj_deriv(u, y):
    return u + y


def _np_log_value(z, y):
    return np.logaddexp(0.0, -y * z)


def _np_log_deriv(z, y):
    return -y * expit(-y * z)


def _np_log_conj(u, y):
    """q log q + (1 - q) log(1 - q) at q = -u y (0 log 0 = 0); +inf where q is outside [0, 1]."""
    q = -np.asarray(u, dtype=np.float64) * y
    inside = (q >= 0) & (q <= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        xl = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        r = 1.0 - q
        yl = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
    return np.where(inside, xl + yl, np.inf)


def _np_log_conj_deriv(u, y):
    """(l*)'(u) = -y logit(-u y), with q = -u y clipped into (0, 1) (finite at the box's edges)."""
    q = np.clip(-u * y, 1e-300, 1.0 - 1e-16)
    return -y * (np.log(q) - np.log1p(-q))


LOSSES: dict[str, Loss] = {
    # the squared loss's formulas are plain arithmetic: the JAX forms serve NumPy as well
    "squared": Loss("squared", _sq_value, _sq_deriv, _sq_conj, np_value=_sq_value, np_derivative=_sq_deriv,
                    np_conjugate=_sq_conj, np_conjugate_derivative=_np_sq_conj_deriv),
    "logistic": Loss("logistic", _log_value, _log_deriv, _log_conj, classification=True,
                     np_value=_np_log_value, np_derivative=_np_log_deriv, np_conjugate=_np_log_conj,
                     np_conjugate_derivative=_np_log_conj_deriv),
}


def get_loss(name) -> Loss:
    if isinstance(name, Loss):
        return name
    if name in LOSSES:
        return LOSSES[name]
    raise ConfigError("unknown loss", field="objective.loss", value=name, allowed=", ".join(LOSSES))
