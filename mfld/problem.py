"""The Problem: data, network specification and objective (THEORY sections 1, 2, 8).

A ``Problem`` is an immutable pytree. Its array leaves (data) and scalar leaves (``lam``,
``tau``, ``r_out``) are traced under ``jit``/``vmap``, so one compiled step serves a sweep
over hyperparameters; the discrete choices (activation, loss, output layer, scaling, bias)
are static metadata.

Conventions:
- ``x`` holds the *features* the neurons see: the raw inputs with a constant 1 appended
  when ``bias=True``. ``p = x.shape[1]`` is therefore the dimension of w, and the particle
  dimension is ``D = p + 1`` (a, w) for a trained or bounded output layer, ``p`` for a fixed
  one (a_i = +-1 is not trained).
- Output layer: ``trained`` (phi = a sigma(w.x), the paper's vanilla case), ``fixed``
  (a_i in {+1, -1}, only w trained), ``bounded`` (phi = r_out tanh(a) sigma(w.x)).
- Scaling: ``mean_field`` f = (1/N) sum_i ..., ``ntk`` f = (1/sqrt N) sum_i ... .
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from mfld import choices
from mfld.activations import Activation, get_activation
from mfld.errors import ConfigError
from mfld.losses import Loss, get_loss

OUTPUTS = choices.OUTPUTS
SCALINGS = choices.SCALINGS


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Problem:
    """Data + network spec + objective. Build it with :meth:`Problem.create`."""

    x: jax.Array
    y: jax.Array
    lam: float | jax.Array
    tau: float | jax.Array
    r_out: float | jax.Array
    x_test: jax.Array | None
    y_test: jax.Array | None
    activation: Activation = field(metadata=dict(static=True))
    loss: Loss = field(metadata=dict(static=True))
    output: str = field(metadata=dict(static=True))
    scaling: str = field(metadata=dict(static=True))
    bias: bool = field(metadata=dict(static=True))

    @classmethod
    def create(cls, x, y, *, activation="tanh", loss="squared", lam=0.1, tau=0.05,
               bias=True, output="trained", r_out=1.0, scaling="mean_field",
               x_test=None, y_test=None, dtype=None) -> Problem:
        """Validate and build a Problem from raw inputs ``x (n, d)`` and targets ``y (n,)``.

        ``bias=True`` appends a constant-1 feature. ``dtype`` defaults to JAX's default
        float (float32 unless x64 is enabled). The defaults of ``lam`` and ``tau`` are the
        config's (``objective.lam`` = 0.1, ``objective.tau`` = 0.05), so Python and the CLI agree.
        """
        act = get_activation(activation)
        lss = get_loss(loss)
        if output not in OUTPUTS:
            raise ConfigError("unknown output layer", field="model.output", value=output,
                              allowed=", ".join(OUTPUTS))
        if scaling not in SCALINGS:
            raise ConfigError("unknown scaling", field="model.scaling", value=scaling,
                              allowed=", ".join(SCALINGS))
        lam_f = _finite_scalar(lam, "objective.lam")
        tau_f = _finite_scalar(tau, "objective.tau")
        if lam_f <= 0:
            raise ConfigError("weight decay must be positive", field="objective.lam", value=lam,
                              allowed="lam > 0")
        if tau_f < 0:
            raise ConfigError("temperature must be non-negative", field="objective.tau", value=tau,
                              allowed="tau >= 0 (0 is the noiseless gradient flow)")
        r_f = _finite_scalar(r_out, "model.r_out")
        if r_f <= 0:
            raise ConfigError("output bound must be positive", field="model.r_out", value=r_out,
                              allowed="r_out > 0")
        dtype = dtype or jnp.result_type(float)
        xf, yf = _check_xy(x, y, ("x", "y"), lss)
        xt = yt = None
        if (x_test is None) != (y_test is None):
            raise ConfigError("give both x_test and y_test or neither", field="x_test, y_test")
        if x_test is not None:
            xt, yt = _check_xy(x_test, y_test, ("x_test", "y_test"), lss)
            if xt.shape[1] != xf.shape[1]:
                raise ConfigError(f"test inputs have {xt.shape[1]} columns but training inputs "
                                  f"have {xf.shape[1]}", field="x_test")
        if bias:
            xf = _append_one(xf)
            xt = None if xt is None else _append_one(xt)
        as_j = lambda a: None if a is None else jnp.asarray(a, dtype=dtype)  # noqa: E731
        return cls(x=as_j(xf), y=as_j(yf), lam=lam_f, tau=tau_f, r_out=r_f,
                   x_test=as_j(xt), y_test=as_j(yt), activation=act, loss=lss,
                   output=output, scaling=scaling, bias=bool(bias))

    # ---- shapes -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def p(self) -> int:
        """Dimension of w (raw input dimension + 1 if bias)."""
        return self.x.shape[1]

    @property
    def d(self) -> int:
        """Raw input dimension (without the bias feature)."""
        return self.p - (1 if self.bias else 0)

    @property
    def particle_dim(self) -> int:
        """Dimension D of a trained particle: p + 1, or p for a fixed output layer."""
        return self.p + (0 if self.output == "fixed" else 1)

    def astype(self, dtype) -> Problem:
        """A copy with the data (x, y and the test set) in ``dtype`` (e.g. float64 for a check
        in a scoped x64 context on float32 data; float32 -> float64 is exact)."""
        cast = lambda a: None if a is None else jnp.asarray(a, dtype=dtype)  # noqa: E731
        return self.replace(x=cast(self.x), y=cast(self.y), x_test=cast(self.x_test), y_test=cast(self.y_test))

    def replace(self, **kw) -> Problem:
        """A copy with some fields changed (e.g. ``problem.replace(tau=0.05)``); not re-validated."""
        return dataclasses.replace(self, **kw)

    def features(self, x_raw):
        """Map raw inputs (m, d) to the features the neurons see (append the bias)."""
        x_raw = jnp.asarray(x_raw, dtype=self.x.dtype)
        if x_raw.ndim == 1:
            x_raw = x_raw[:, None]
        return _append_one(x_raw) if self.bias else x_raw


def _finite_scalar(v, name):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError("must be a number", field=name, value=v) from None
    if not np.isfinite(f):
        raise ConfigError("must be finite", field=name, value=v)
    return f


def _check_xy(x, y, names, loss: Loss):
    xname, yname = names  # the argument names, for the errors
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ConfigError(f"inputs must be a 2-D array (n, d), got shape {x.shape}", field=xname)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"targets must be a 1-D array (n,), got shape {y.shape}", field=yname)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"inputs have {x.shape[0]} rows but targets have {y.shape[0]}", field=yname)
    if x.shape[0] == 0:
        raise ConfigError("no data points", field=xname, allowed="at least one row")
    if x.shape[1] == 0:
        raise ConfigError("inputs have no columns", field=xname, allowed="at least one column")
    if not np.all(np.isfinite(x)):
        raise ConfigError("inputs contain NaN or inf", field=xname)
    if not np.all(np.isfinite(y)):
        raise ConfigError("targets contain NaN or inf", field=yname)
    if loss.classification and not np.all(np.isin(y, (-1.0, 1.0))):
        bad = np.unique(y[~np.isin(y, (-1.0, 1.0))])[:5]
        raise ConfigError(f"logistic loss needs labels in {{-1, +1}}, found {bad.tolist()}",
                          field=yname, allowed="-1 and +1")
    return x, y


def _append_one(x):
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.ones((x.shape[0], 1), dtype=x.dtype)], axis=1)
