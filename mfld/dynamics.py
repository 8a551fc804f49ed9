"""Particle state and the noisy-gradient-descent steppers (THEORY section 3).

Noise/step convention (mean-field scaling), time ``t = step * eta``::

    theta_i <- theta_i - eta * grad V_rho(theta_i) + sqrt(2 * eta * tau) * xi_i,  xi_i ~ N(0, I)

where grad V_rho(theta_i) = N * dL/dtheta_i (the mean-field learning rate is N * eta on the
raw parameters). Under NTK scaling the step is plain noisy gradient descent on the raw
parameters, ``theta_i <- theta_i - eta * dL/dtheta_i + sqrt(2 * eta * tau / N) * xi_i``, with
an O(1) step size ``eta`` (the standard NTK parameterisation); t = step * eta there too.

Schemes:
- ``euler``: the plain Euler-Maruyama step above (default).
- ``ou``: Lie splitting -- the explicit interaction step, then the exact Ornstein-Uhlenbeck
  step for the weight-decay part, ``theta <- e^{-lam eta} theta + sqrt(tau (1 - e^{-2 lam eta}) / lam) xi``.
  Exact without signal and stable for any eta in the lambda part; its interaction bias is
  O(eta) (THEORY section 3), so it is not the default.

Steppers: :class:`Langevin` (:func:`step`) and :class:`SVRGLangevin` (:func:`svrg_step`: the
Euler step with a minibatch drift corrected by an SVRG control variate from an anchor).

Randomness: noise from (key, step, row). The run's key is ``ParticleState.key``; step k uses
``kk = fold_in(key, k)``. Its noise xi is row i of ``normal(fold_in(kk, 0), (N, D))``
(:func:`mfld.noise.step_noise`; column 0 drives a, columns 1.. drive w): with JAX's
partitionable threefry (the default) row i depends only on (key, k, i) -- not on N beyond i,
the chunking or the device count. The minibatch indices of step k are drawn from
``fold_in(kk, 1)``, so a resumed run replays exactly.

The host loop that runs these steps in compiled segments is :mod:`mfld.loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mfld import choices, network
from mfld.errors import ConfigError
from mfld.noise import step_noise
from mfld.problem import Problem

SCHEMES = choices.SCHEMES
TAU_SCHEDULES = choices.TAU_SCHEDULES


class ParticleState(NamedTuple):
    """The particles and the clock. The particle axis leads.

    a: (N,) second-layer weights (the +-1 signs for a fixed output layer);
    w: (N, p) first-layer weights; step: int32 scalar; key: typed PRNG key of the dynamics.
    """

    a: jax.Array
    w: jax.Array
    step: jax.Array
    key: jax.Array


class StepInfo(NamedTuple):
    """Per-step scalars: the (batch) risk before the step and the temperature used."""

    risk: jax.Array
    tau: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Langevin:
    """Noisy gradient descent with step size ``eta`` (a traced leaf).

    scheme: ``euler`` or ``ou`` (see module docstring). batch_size: ``None`` for full batch,
    else the minibatch size (sampled without replacement from (key, step)).
    tau_schedule: ``constant`` or ``log`` -- annealing tau_t = tau / log(e + t) (Chizat 2022).
    memory_budget: bytes for the temporaries of one drift evaluation (default
    :data:`mfld.blocking.DEFAULT_MEMORY_BUDGET`); see :func:`mfld.blocking.plan_chunks`.
    """

    eta: float | jax.Array
    scheme: str = field(default="euler", metadata=dict(static=True))
    batch_size: int | None = field(default=None, metadata=dict(static=True))
    tau_schedule: str = field(default="constant", metadata=dict(static=True))
    memory_budget: int | None = field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        if self.memory_budget is not None and (int(self.memory_budget) != self.memory_budget
                                               or self.memory_budget < 1):
            raise ConfigError("memory budget must be a positive number of bytes",
                              field="memory_budget", value=self.memory_budget,
                              allowed="a positive integer or null (default 1 GiB)")
        if self.scheme not in SCHEMES:
            raise ConfigError("unknown scheme", field="dynamics.scheme", value=self.scheme,
                              allowed=", ".join(SCHEMES))
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ConfigError("unknown temperature schedule", field="dynamics.tau_schedule",
                              value=self.tau_schedule, allowed=", ".join(TAU_SCHEDULES))
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError("batch size must be positive", field="dynamics.batch_size",
                              value=self.batch_size, allowed="a positive integer or null (full batch)")


def temperature(problem: Problem, stepper: Langevin, t):
    """tau at time t under the stepper's schedule, in the dtype of ``t`` (a float array or
    scalar; an integer or Python scalar ``t`` gives the default float)."""
    if stepper.tau_schedule == "log":
        return problem.tau / jnp.log(math.e + t)
    return jnp.asarray(problem.tau, dtype=jnp.result_type(t, float)) + 0.0 * t


def dynamics_keys(seed: int):
    """(init_key, dynamics_key) derived from one integer seed, as independent streams."""
    base = jax.random.key(int(seed))
    return jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)


def init_particles(problem: Problem, n_particles: int, seed: int = 0, *, a_scale: float = 1.0,
                   w_scale: float = 1.0, plus_fraction: float = 0.5) -> ParticleState:
    """Gaussian initialisation: a_i ~ N(0, a_scale^2), w_i ~ N(0, w_scale^2 I).

    For a fixed output layer a_i = +1 for the first round(plus_fraction * N) particles and
    -1 for the rest. The dtype follows the problem's data.
    """
    n_particles = int(n_particles)
    if n_particles < 1:
        raise ConfigError("need at least one particle", field="model.n_particles", value=n_particles,
                          allowed="a positive integer")
    init_key, dyn_key = dynamics_keys(seed)
    ka, kw = jax.random.split(init_key)
    dtype = problem.x.dtype
    if problem.output == "fixed":
        n_plus = choices.plus_count(plus_fraction, n_particles)
        a = jnp.where(jnp.arange(n_particles) < n_plus, 1.0, -1.0).astype(dtype)
    else:
        a = a_scale * jax.random.normal(ka, (n_particles,), dtype)
    w = w_scale * jax.random.normal(kw, (n_particles, problem.p), dtype)
    return ParticleState(a, w, jnp.asarray(0, jnp.int32), dyn_key)


def _batch(problem: Problem, stepper: Langevin | SVRGLangevin, key):
    if stepper.batch_size is None or stepper.batch_size >= problem.n:
        return problem.x, problem.y
    idx = jax.random.choice(key, problem.n, (stepper.batch_size,), replace=False)
    return problem.x[idx], problem.y[idx]


def step(problem: Problem, state: ParticleState, stepper: Langevin, *, n_particles=None, active=None,
         interaction_fn: Callable | None = None, noise_sharding=None):
    """One noisy gradient step. Returns ``(new_state, StepInfo)``. Pure and jittable.

    ``n_particles``: the true N (default ``state.a.shape[0]``); ``active``: optional (N,)
    mask of real particles -- rows beyond the true N are padding (see :mod:`mfld.sharding`):
    they contribute nothing to f, do not move, and the noise of real particle i is row i
    of the bulk draw whatever the padding. ``interaction_fn(problem, a, w, x, y,
    n_particles=, active=)`` replaces :func:`mfld.network.interaction` (used for sharding);
    ``noise_sharding`` constrains the bulk noise draw so each device draws its own rows.
    """
    a, w = state.a, state.w
    n_particles = a.shape[0] if n_particles is None else n_particles
    kk = jax.random.fold_in(state.key, state.step)
    xb, yb = _batch(problem, stepper, jax.random.fold_in(kk, 1))
    if interaction_fn is None:
        it = network.interaction(problem, a, w, xb, yb, n_particles=n_particles, active=active,
                                 memory_budget=stepper.memory_budget)
    else:
        it = interaction_fn(problem, a, w, xb, yb, n_particles=n_particles, active=active)
    eta = stepper.eta
    t = state.step.astype(w.dtype) * eta
    tau = temperature(problem, stepper, t)
    k = network.decay_rate(problem, n_particles)
    temp = tau if problem.scaling == "mean_field" else tau / n_particles
    xi = step_noise(kk, a.shape[0], w.shape[1] + 1, w.dtype)
    if noise_sharding is not None:
        xi = jax.lax.with_sharding_constraint(xi, noise_sharding)
    if stepper.scheme == "euler":
        sd = jnp.sqrt(2.0 * eta * temp)
        w_new = w - eta * (it.grad_w + k * w) + sd * xi[:, 1:]
        a_new = a - eta * (it.grad_a + k * a) + sd * xi[:, 0]
    else:  # exact OU step for the weight-decay part after the explicit interaction step
        decay = jnp.exp(-k * eta)
        sd = jnp.sqrt(temp * (1.0 - decay * decay) / k)
        w_new = decay * (w - eta * it.grad_w) + sd * xi[:, 1:]
        a_new = decay * (a - eta * it.grad_a) + sd * xi[:, 0]
    if problem.output == "fixed":
        a_new = a
    if active is not None:
        a_new = jnp.where(active, a_new, a)
        w_new = jnp.where(active[:, None], w_new, w)
    info = StepInfo(network.risk(problem, it.f, yb), tau)
    return ParticleState(a_new, w_new, state.step + 1, state.key), info


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SVRGLangevin:
    """Noisy gradient descent whose minibatch drift carries an SVRG control variate
    (Suzuki, Wu, Nitanda 2023): at a step with batch B and anchor (theta~, rho~),

        v_i = grad_B(theta_i; rho) - grad_B(theta~_i; rho~) + grad_full(theta~_i; rho~) + k theta_i,

    then ``theta_i <- theta_i - eta v_i + sqrt(2 eta tau) xi_i`` (the Euler step of
    :class:`Langevin` with a constant temperature; tau / N and k = lam / N under NTK scaling).
    The batch of ``batch_size`` rows and the noise come from (key, step) as in :func:`step`.
    The full-batch part is fixed per anchor (:func:`svrg_anchor`), so a step costs two batch
    passes; E_B[v_i] is the full-batch drift, and v_i is exactly it when theta = theta~.
    """

    eta: float | jax.Array
    batch_size: int = field(metadata=dict(static=True))

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ConfigError("batch size must be positive", field="batch_size", value=self.batch_size,
                              allowed="a positive integer")


class SVRGAnchor(NamedTuple):
    """The anchor of :class:`SVRGLangevin`: particles (a, w) and their full-batch interaction
    gradient (grad_a, grad_w)."""

    a: jax.Array
    w: jax.Array
    grad_a: jax.Array
    grad_w: jax.Array


def svrg_anchor(problem: Problem, a, w) -> SVRGAnchor:
    """The anchor of an SVRG epoch at the particles (a, w): one full-batch interaction."""
    full = network.interaction(problem, a, w)
    return SVRGAnchor(a, w, full.grad_a, full.grad_w)


def svrg_step(problem: Problem, state: ParticleState, stepper: SVRGLangevin, anchor: SVRGAnchor):
    """One step of :class:`SVRGLangevin` from ``state`` with ``anchor``. Returns
    ``(new_state, StepInfo)`` (the risk of the batch before the step). Pure and jittable."""
    a, w = state.a, state.w
    n_particles = a.shape[0]
    kk = jax.random.fold_in(state.key, state.step)
    xb, yb = _batch(problem, stepper, jax.random.fold_in(kk, 1))
    ic = network.interaction(problem, a, w, xb, yb, n_particles=n_particles)
    isn = network.interaction(problem, anchor.a, anchor.w, xb, yb, n_particles=n_particles)
    k = network.decay_rate(problem, n_particles)
    tau = problem.tau if problem.scaling == "mean_field" else problem.tau / n_particles
    ga = ic.grad_a - isn.grad_a + anchor.grad_a + k * a
    gw = ic.grad_w - isn.grad_w + anchor.grad_w + k * w
    xi = step_noise(kk, n_particles, w.shape[1] + 1, w.dtype)
    sd = jnp.sqrt(2.0 * stepper.eta * tau)
    a_new = a - stepper.eta * ga + sd * xi[:, 0]
    w_new = w - stepper.eta * gw + sd * xi[:, 1:]
    if problem.output == "fixed":
        a_new = a
    info = StepInfo(network.risk(problem, ic.f, yb), jnp.asarray(tau, w.dtype))
    return ParticleState(a_new, w_new, state.step + 1, state.key), info


def run_steps(problem: Problem, state: ParticleState, stepper: Langevin, n_steps: int):
    """``n_steps`` steps in one ``lax.scan`` (not jitted here; see :func:`mfld.loop.simulate`)."""

    def body(s, _):
        s, info = step(problem, s, stepper)
        return s, info

    return jax.lax.scan(body, state, None, length=n_steps)
