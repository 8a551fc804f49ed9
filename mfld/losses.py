"""Convex losses l(z, y) with derivative l' (in z) and convex conjugate l* (THEORY 2, 6, 8).

``conjugate(u, y)`` is the conjugate of z -> l(z, y) evaluated at u; it is +inf outside
its domain (the logistic dual is box-constrained).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mfld.errors import ConfigError


@dataclass(frozen=True)
class Loss:
    name: str
    value: Callable
    derivative: Callable
    conjugate: Callable
    classification: bool = False


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


LOSSES: dict[str, Loss] = {
    "squared": Loss("squared", _sq_value, _sq_deriv, _sq_conj),
    "logistic": Loss("logistic", _log_value, _log_deriv, _log_conj, classification=True),
}


def get_loss(name) -> Loss:
    if isinstance(name, Loss):
        return name
    if name in LOSSES:
        return LOSSES[name]
    raise ConfigError("unknown loss", field="objective.loss", value=name, allowed=", ".join(LOSSES))
