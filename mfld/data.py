"""Datasets: seeded synthetic generators, a shipped real dataset, and user files.

Every generator returns a :class:`Dataset` of NumPy float64 arrays (raw inputs, without the
bias feature; :class:`mfld.problem.Problem` appends it) and is a pure function of its
arguments and ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mfld.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    """x (n, d), y (n,), optional test split, and ``meta`` (e.g. the teacher's function)."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    target: object = None  # callable x -> noiseless target, when known (for plots)


def _np_activation(name: str):
    from scipy.special import erf, expit

    table = {
        "tanh": np.tanh,
        "sigmoid": expit,
        "erf": erf,
        "relu": lambda z: np.maximum(z, 0.0),
        "softplus": lambda z: np.logaddexp(0.0, z),
        "gelu": lambda z: 0.5 * z * (1.0 + erf(z / np.sqrt(2.0))),
        "linear": lambda z: z,
    }
    if name not in table:
        raise ConfigError("unknown teacher activation", field="data.teacher_activation", value=name,
                          allowed=", ".join(table))
    return table[name]


def teacher_student(n: int = 64, d: int = 1, *, teacher_width: int = 3, noise: float = 0.05,
                    n_test: int = 256, activation: str = "tanh", teacher_scale: float = 1.0,
                    input_scale: float = 2.0, bias: bool = True, seed: int = 0) -> Dataset:
    """Teacher-student regression: y = f_T(x) + noise * N(0, 1).

    The teacher is a mean-field network of ``teacher_width`` neurons,
    f_T(x) = (1/m) sum_k a_k sigma(w_k . x + b_k), with a_k ~ teacher_scale * sqrt(m) * N(0, 1)
    (so f_T is O(teacher_scale) whatever m), w_k ~ N(0, I), b_k ~ N(0, 1) if ``bias``.
    Inputs are uniform on [-input_scale, input_scale]^d.
    """
    _positive_int(n, "data.n")
    _positive_int(d, "data.d")
    _positive_int(teacher_width, "data.teacher_width")
    _nonneg(noise, "data.noise")
    rng = np.random.default_rng(seed)
    m = teacher_width
    a = teacher_scale * np.sqrt(m) * rng.standard_normal(m)
    w = rng.standard_normal((m, d)) * 1.5
    b = rng.standard_normal(m) if bias else np.zeros(m)
    sigma = _np_activation(activation)

    def target(x):
        x = np.asarray(x, dtype=np.float64).reshape(-1, d)
        return sigma(x @ w.T + b) @ a / m

    x = rng.uniform(-input_scale, input_scale, (n, d))
    y = target(x) + noise * rng.standard_normal(n)
    xt = yt = None
    if n_test:
        xt = rng.uniform(-input_scale, input_scale, (n_test, d))
        yt = target(xt) + noise * rng.standard_normal(n_test)
    meta = dict(kind="teacher_student", teacher_a=a.tolist(), teacher_w=w.tolist(), teacher_b=b.tolist(),
                activation=activation)
    return Dataset(x, y, xt, yt, meta, target)


def _positive_int(v, name):
    if int(v) != v or v < 1:
        raise ConfigError("must be a positive integer", field=name, value=v)


def _nonneg(v, name):
    if not np.isfinite(v) or v < 0:
        raise ConfigError("must be a finite non-negative number", field=name, value=v)
