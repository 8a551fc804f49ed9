"""Particle state, the noisy-gradient-descent steppers and ``simulate`` (THEORY section 3).

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

Randomness: the run's key is ``ParticleState.key``. The noise of step k is row i of
``normal(fold_in(key, k), (N, D))``: with JAX's partitionable threefry (the default) row i
depends only on (key, k, i) -- not on N beyond i, the chunking or the device count.
Minibatch indices of step k derive from (key, k) too, so a resumed run replays exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mfld import network, xla
from mfld.errors import ConfigError
from mfld.problem import Problem

SCHEMES = ("euler", "ou")
TAU_SCHEDULES = ("constant", "log")


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
    :data:`mfld.network.DEFAULT_MEMORY_BUDGET`); see :func:`mfld.network.plan_chunks`.
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
                              field="dynamics.memory_budget", value=self.memory_budget,
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
    """tau at time t under the stepper's schedule."""
    if stepper.tau_schedule == "log":
        return problem.tau / jnp.log(math.e + t)
    return jnp.asarray(problem.tau, dtype=jnp.result_type(float)) + 0.0 * t


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
        n_plus = int(round(plus_fraction * n_particles))
        a = jnp.where(jnp.arange(n_particles) < n_plus, 1.0, -1.0).astype(dtype)
    else:
        a = a_scale * jax.random.normal(ka, (n_particles,), dtype)
    w = w_scale * jax.random.normal(kw, (n_particles, problem.p), dtype)
    return ParticleState(a, w, jnp.asarray(0, jnp.int32), dyn_key)


def _batch(problem: Problem, stepper: Langevin, key):
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


def step_noise(step_key, n_rows: int, dim: int, dtype):
    """The standard normal draws of one step: row i of ``normal(fold_in(step_key, 0), (rows, D))``
    with ``step_key = fold_in(key, step)``. One bulk threefry draw; with the partitionable
    threefry (JAX's default) row i depends only on (key, step, i) -- not on the number of
    rows beyond i, the chunking or the device count -- and a sharded draw generates each
    device's rows locally. Column 0 drives ``a``, columns 1.. drive ``w``.

    The values are bit-identical to ``jax.random.normal``; for threefry keys they are computed
    by :func:`threefry_normal` (the hash unrolled into one fused kernel: JAX lowers it on CPU
    as a 5-iteration loop over full-size arrays, 1.3-2.8x slower; ``tests/test_kernel.py``
    checks the equality)."""
    key = jax.random.fold_in(step_key, 0)
    if (str(jax.random.key_impl(key)) == "threefry2x32" and jax.config.jax_threefry_partitionable
            and n_rows * dim < 2 ** 32):
        return threefry_normal(key, (n_rows, dim), dtype)
    return jax.random.normal(key, (n_rows, dim), dtype)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x0, x1):
    """The Threefry-2x32 hash (20 rounds), unrolled: the same function as JAX's
    ``threefry2x32_p`` (Salmon et al. 2011), written out so that XLA fuses it."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = jax.lax.shift_left(x1, np.uint32(r)) | jax.lax.shift_right_logical(x1, np.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def threefry_normal(key, shape: tuple[int, int], dtype):
    """``jax.random.normal(key, shape, dtype)`` for a threefry key under
    ``jax_threefry_partitionable`` (2-D ``shape`` with fewer than 2^32 entries), bit for bit:
    element (i, j) hashes the counter ``i * shape[1] + j`` (generated flat, then reshaped), the
    two output words are combined (xor for 32-bit floats, concatenated for 64-bit), mapped to a
    uniform in (-1, 1) by the mantissa trick and to a normal by ``sqrt(2) erfinv``, as
    ``jax.random`` does."""
    rows, cols = shape
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):  # other floats: JAX's own path
        return jax.random.normal(key, shape, dtype)
    kd = jax.random.key_data(key)
    # Generated flat and reshaped (free, row-major): XLA CPU vectorises along the minor axis,
    # and erfinv on a (1024, 12) array ran 8x slower per element than on the flat array.
    counter = jax.lax.iota(jnp.uint32, rows * cols)
    b1, b2 = _threefry2x32(kd[0], kd[1], jnp.zeros_like(counter), counter)
    if dtype == jnp.float64:
        bits = (b1.astype(jnp.uint64) << np.uint64(32)) | b2.astype(jnp.uint64)
        utype, nbits, nmant = jnp.uint64, 64, 52
    else:
        bits, utype, nbits, nmant = b1 ^ b2, jnp.uint32, 32, 23
    one = np.array(1.0, dtype).view(np.dtype(utype))
    fbits = jax.lax.shift_right_logical(bits, utype(nbits - nmant)) | utype(one)
    floats = jax.lax.bitcast_convert_type(fbits, dtype) - np.array(1.0, dtype)
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    u = jax.lax.max(lo, floats * (np.array(1.0, dtype) - lo) + lo)
    return (np.array(np.sqrt(2), dtype) * jax.lax.erf_inv(u)).reshape(shape)


def run_steps(problem: Problem, state: ParticleState, stepper: Langevin, n_steps: int):
    """``n_steps`` steps in one ``lax.scan`` (not jitted here; see :func:`simulate`)."""

    def body(s, _):
        s, info = step(problem, s, stepper)
        return s, info

    return jax.lax.scan(body, state, None, length=n_steps)


def _fusion_pays(problem, state, stepper, n_steps=None):
    return network.dot_fusion_pays(problem, state.w.shape[0], stepper.batch_size, stepper.memory_budget)


_run_steps_jit = xla.jit(run_steps, static_argnames=("n_steps",), fuse_if=_fusion_pays)
# The same, donating the particle buffers of ``state`` (only for states nobody else holds).
_run_steps_donate = xla.jit(run_steps, static_argnames=("n_steps",), donate_argnames=("state",),
                            fuse_if=_fusion_pays)


def _advance(problem, state, stepper, n, donate):
    fn = _run_steps_donate if donate else _run_steps_jit
    return fn(problem, state, stepper, n_steps=n)[0]


def segment_ends(start: int, stop: int, *multiples: int) -> list[int]:
    """The absolute step numbers in (start, stop] at which a segment must end: every
    multiple of each of ``multiples`` and ``stop`` itself. Chunk boundaries therefore do not
    depend on where a run was started or resumed."""
    ends = {stop}
    for m in multiples:
        if m and m > 0:
            first = (start // m + 1) * m
            ends.update(range(first, stop, m))
    return sorted(e for e in ends if start < e <= stop)


@dataclass
class History:
    """Records taken during :func:`simulate`: a dict of 1-D NumPy arrays, one per column."""

    columns: dict = field(default_factory=dict)

    def append(self, row: dict):
        for k in row:
            if k not in self.columns:
                n_before = len(next(iter(self.columns.values()), []))
                self.columns[k] = [float("nan")] * n_before
        for k in self.columns:
            self.columns[k].append(row.get(k, float("nan")))

    def as_arrays(self) -> dict:
        return {k: np.asarray(v) for k, v in self.columns.items()}

    def __getitem__(self, k):
        return np.asarray(self.columns[k])

    def __len__(self):
        return len(next(iter(self.columns.values()), []))


def simulate(problem: Problem, state: ParticleState, stepper: Langevin, n_steps: int, *,
             record_every: int = 100, chunk: int | None = None,
             recorder: Callable | None = None, callback: Callable | None = None,
             progress: bool = False, record_initial: bool = True, history: History | None = None,
             advance: Callable | None = None):
    """Run the dynamics from ``state.step`` up to ``state.step + n_steps``.

    The host loop runs jitted ``lax.scan`` segments that end on absolute multiples of
    ``record_every`` and ``chunk`` (default: ``record_every``), records
    ``recorder(problem, state)`` (default :func:`mfld.observables.record`) at each multiple
    of ``record_every``, and calls ``callback(state, row)`` at each record before the row is
    stored (the callback may add columns to ``row``); a callback returning ``True`` stops the
    run early. Returns ``(final_state, History)``.
    Rows are appended to ``history`` if one is given (so a callback can see earlier rows).
    The trajectory does not depend on ``chunk`` or ``record_every``.

    Buffers: segments whose input state was never handed out (neither the caller's state
    nor one passed to ``callback``) donate their particle buffers to XLA, so the caller's
    arrays stay valid. ``advance(problem, state, stepper, n, donate) -> state`` replaces the
    jitted segment (used by :mod:`mfld.sharding`).
    """
    from mfld import observables  # local import: observables imports this module's types

    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("mfld needs jax_threefry_partitionable=True (JAX's default) so that "
                           "the noise of a particle does not depend on the device count")
    record_every = int(record_every)
    if record_every < 1:
        raise ConfigError("must be positive", field="record.every", value=record_every)
    recorder = recorder or observables.record
    rec_jit = xla.jit(recorder)
    start = int(state.step)
    stop = start + int(n_steps)
    hist = History() if history is None else history
    t0 = time.perf_counter()

    def take(s):
        row = {"step": int(s.step), "t": float(s.step) * float(stepper.eta)}
        row.update({k: float(v) for k, v in rec_jit(problem, s).items()})
        row["wall_time"] = time.perf_counter() - t0
        stop = callback(s, row) if callback is not None else False  # may add columns to row
        hist.append(row)
        return stop

    advance = advance or _advance
    if record_initial and start % record_every == 0:
        if take(state):
            return state, hist
    bar = _progress(stop - start, progress)
    step_now = start
    exposed = True  # the caller holds the input state
    try:
        for end in segment_ends(start, stop, record_every, chunk or record_every):
            n = end - step_now
            state = advance(problem, state, stepper, n, not exposed)
            step_now = end
            exposed = False
            if bar is not None:
                bar.update(n)
            if end % record_every == 0 or end == stop:
                exposed = True
                if take(state):
                    break
                if bar is not None and "risk" in hist.columns:
                    bar.set_postfix(risk=f"{hist.columns['risk'][-1]:.4g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return state, hist


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but keep the library usable without it
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
