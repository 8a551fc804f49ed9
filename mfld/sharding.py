"""Particles sharded over a device mesh; multi-host start-up; CPU thread and device settings.

The particle axis is split over a 1-D mesh with axis name ``'p'``
(``jax.sharding.Mesh(np.array(devices), ('p',))``). Each device runs the blocked analytic
drift of :func:`mfld.network.interaction` on its own particles; the per-device partial sums
of the network output are ``psum``-ed (the only collective of a step, n floats). The noise
is the bulk draw of :func:`mfld.noise.step_noise` constrained to the same sharding:
with the partitionable threefry each device draws its own rows and row i depends only on
(seed, step, i), so **the same seed gives the same run for any device count**, equal up to
the floating-point reassociation of the sum over particles (measured ~1e-6 relative in
float32 and ~1e-14 in float64 after tens of steps; the tests use these tolerances).

Particle counts that the device count does not divide are padded with inactive particles
(a = 0, w = 0, masked): they change neither f, the 1/N scale (the true N is used), the
recorded moments (records see the first N rows only), nor the noise of the real particles.

Multi-host: call :func:`initialize` (``jax.distributed.initialize``) in every process
before any other JAX call, then build the mesh over ``jax.devices()`` (all processes'
devices). Every process computes the same initial state from the seed and contributes
its own rows (``jax.make_array_from_callback``); only process 0 should write files
(:func:`is_writer`). :func:`simulate_local` is the variant for drivers (``mfld run --devices K``):
callbacks and the final state are gathered single-device copies.

Threads and simulated devices (CPU) must be set before JAX initialises its backend, see
:func:`configure_cpu`.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache, partial

from mfld import xla
from mfld.errors import ConfigError

# NumPy is imported inside the functions: configure_cpu must be able to run before NumPy
# (and its BLAS thread pool) starts.

AXIS = "p"


# ------------------------------------------------------------------ process-level set-up
def configure_cpu(threads: int | None = None, devices: int | None = None):
    """Set the CPU thread count and/or the number of (simulated) CPU devices.

    Must run before JAX creates its CPU backend (before the first computation); the CLI
    calls it first thing for ``--threads``/``--devices``. Threads: XLA's CPU client has no
    reliable intra-op thread-count flag (NOTES-JAX: the flags that look like it do not make
    it single-threaded), so the process is pinned to ``threads`` cores with
    ``os.sched_setaffinity`` (Linux) -- XLA's Eigen pool and the BLAS pools then share those
    cores -- and ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` are set for
    NumPy. Devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` plus
    ``jax_num_cpu_devices`` (for testing sharded code; no speed-up on a few cores).
    The BLAS variables only take effect if NumPy has not been imported yet (this module
    imports it lazily for that reason); the pinning applies regardless.
    """
    if threads is not None:
        threads = int(threads)
        if threads < 1:
            raise ConfigError("must be a positive integer", field="threads", value=threads)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        if hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, cpus[:threads])
    if devices is not None:
        devices = int(devices)
        if devices < 1:
            raise ConfigError("must be a positive integer", field="devices", value=devices)
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        os.environ["XLA_FLAGS"] = " ".join(flags)
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", devices)
        except Exception:  # noqa: BLE001 -- backend already up: the XLA flag above is what counts
            pass


def _check_address(address: str, field: str) -> str:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) with a port in 1..65535, or a ConfigError."""
    text = str(address).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in text):
        raise ConfigError("not a HOST:PORT address", field=field, value=address,
                          allowed="HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:1234 or [::1]:1234")
    return text


def bind_address(coordinator: str, bind: str | None = None) -> str:
    """The address process 0's coordinator service listens on: ``bind`` if given (e.g.
    ``0.0.0.0:PORT`` or ``[::]:PORT`` for all interfaces), else ``JAX_COORDINATOR_BIND_ADDRESS``
    if set, else the coordinator address itself -- ``127.0.0.1:PORT`` stays on the loopback
    interface, ``HOST:PORT`` listens on the interface(s) HOST resolves to. (JAX's own default
    is every interface, ``[::]:PORT``.)"""
    if bind is not None:
        return _check_address(bind, "--coordinator-bind")
    env = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
    if env:
        return env
    return _check_address(coordinator, "--coordinator")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300, bind: str | None = None):
    """Join a multi-process run (``jax.distributed.initialize``).

    Give all three of ``coordinator`` ('host:port' of process 0), ``num_processes`` and
    ``process_id``, or none of them to let JAX auto-detect a cluster (SLURM, MPI, TPU pods).
    A process that cannot reach the others aborts after ``timeout_s`` seconds. Process 0
    listens on :func:`bind_address` (the coordinator's own address unless ``bind`` says
    otherwise; with auto-detection JAX's default, every interface, unless ``bind`` is given).
    """
    import jax

    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("give coordinator, num_processes and process_id together (or none for "
                          "auto-detection)", field="coordinator, num_processes, process_id",
                          value=dict(coordinator=coordinator, num_processes=num_processes, process_id=process_id))
    if all(given):
        if int(num_processes) < 1:
            raise ConfigError("must be a positive integer", field="num_processes", value=num_processes)
        if not 0 <= int(process_id) < int(num_processes):
            raise ConfigError("process id out of range", field="process_id", value=process_id,
                              allowed=f"0..{int(num_processes) - 1}")
        address = _check_address(coordinator, "--coordinator")
        jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                                   process_id=int(process_id), initialization_timeout=int(timeout_s),
                                   coordinator_bind_address=bind_address(address, bind))
    else:
        kw = {} if bind is None else {"coordinator_bind_address": _check_address(bind, "--coordinator-bind")}
        jax.distributed.initialize(initialization_timeout=int(timeout_s), **kw)


def is_writer() -> bool:
    """True in the process that writes outputs (process 0)."""
    import jax

    return jax.process_index() == 0


# ------------------------------------------------------------------------------- the mesh
def make_mesh(n_devices: int | None = None):
    """A 1-D mesh ``('p',)`` over the first ``n_devices`` devices (default: all, all processes)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devs = jax.devices()
    k = len(devs) if n_devices is None else int(n_devices)
    if not 1 <= k <= len(devs):
        raise ConfigError("not that many devices", field="devices", value=n_devices,
                          allowed=f"1..{len(devs)} (CPU: set --devices before JAX starts)")
    return Mesh(np.array(devs[:k]), (AXIS,))


def padded_count(n_particles: int, n_devices: int) -> int:
    """The smallest multiple of ``n_devices`` that holds ``n_particles``."""
    return int(math.ceil(n_particles / n_devices) * n_devices)


def _put(host, sharding):
    import jax
    import numpy as np

    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh):
    """Place every array leaf of ``tree`` (e.g. a Problem) on all devices of the mesh."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep = NamedSharding(mesh, P())

    def put(v):
        if isinstance(v, (jax.Array, np.ndarray)) and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            return _put(v, rep)
        return v

    return jax.tree.map(put, tree)


class ShardedState:
    """A padded, sharded :class:`mfld.dynamics.ParticleState` plus the true particle count."""

    def __init__(self, state, n_particles: int, mesh):
        self.state, self.n_particles, self.mesh = state, int(n_particles), mesh

    @property
    def n_padded(self) -> int:
        return int(self.state.a.shape[0])


def shard_state(state, mesh) -> ShardedState:
    """Pad ``state`` to a multiple of the mesh size and split its particles over the mesh.

    Every process must pass the same (full) ``state``; each contributes its own rows.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mfld.dynamics import ParticleState

    n = int(state.a.shape[0])
    n_pad = padded_count(n, mesh.size)
    a = np.asarray(state.a)
    w = np.asarray(state.w)
    a = np.concatenate([a, np.zeros(n_pad - n, a.dtype)])
    w = np.concatenate([w, np.zeros((n_pad - n, w.shape[1]), w.dtype)])
    rows = NamedSharding(mesh, P(AXIS))
    rep = NamedSharding(mesh, P())
    key_data = _put(np.asarray(jax.random.key_data(state.key)), rep)
    impl = jax.random.key_impl(state.key)
    sharded = ParticleState(_put(a, rows), _put(w, NamedSharding(mesh, P(AXIS, None))),
                            _put(np.asarray(state.step, np.int32), rep),
                            jax.random.wrap_key_data(key_data, impl=impl))
    return ShardedState(sharded, n, mesh)


def unpad(state, n_particles: int):
    """The first ``n_particles`` rows (the real particles) of a padded state."""
    return state._replace(a=state.a[:n_particles], w=state.w[:n_particles])


def gather(state, n_particles: int | None = None):
    """Host NumPy copies ``(a, w)`` of the (real) particles, on every process."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    n = state.a.shape[0] if n_particles is None else n_particles
    if jax.process_count() > 1:
        a = np.asarray(multihost_utils.process_allgather(state.a, tiled=True))
        w = np.asarray(multihost_utils.process_allgather(state.w, tiled=True))
    else:
        a, w = np.asarray(state.a), np.asarray(state.w)
    return a[:n], w[:n]


# ------------------------------------------------------------------------ sharded stepping
def _interaction_fn(mesh, memory_budget):
    import jax
    from jax.sharding import PartitionSpec as P

    from mfld import network

    def fn(problem, a, w, x, y, *, n_particles, active):
        def local(problem, a, w, x, y, active):
            return network.interaction(problem, a, w, x, y, n_particles=n_particles, active=active,
                                       memory_budget=memory_budget, axis_name=AXIS)

        out = network.Interaction(P(), P(), P(AXIS), P(AXIS), P(AXIS, None))
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS, None), P(), P(), P(AXIS)),
                             out_specs=out)(problem, a, w, x, y, active)

    return fn


def sharded_step(problem, state, stepper, *, mesh, n_particles: int):
    """One step of a padded, sharded state (jittable; ``mesh`` and ``n_particles`` static)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mfld import dynamics

    n_pad = state.a.shape[0]
    active = jnp.arange(n_pad) < n_particles
    active = jax_constrain(active, NamedSharding(mesh, P(AXIS)))
    return dynamics.step(problem, state, stepper, n_particles=n_particles, active=active,
                         interaction_fn=_interaction_fn(mesh, stepper.memory_budget),
                         noise_sharding=NamedSharding(mesh, P(AXIS, None)))


def jax_constrain(x, sharding):
    import jax

    return jax.lax.with_sharding_constraint(x, sharding)


@lru_cache(maxsize=32)
def compiled_runner(mesh, n_particles: int, donate: bool):
    """The jitted sharded scan of steps over ``mesh`` (cached per mesh, N and donation)."""
    import jax

    def run(problem, state, stepper, n_steps):
        def body(s, _):
            return sharded_step(problem, s, stepper, mesh=mesh, n_particles=n_particles)

        return jax.lax.scan(body, state, None, length=n_steps)

    def fuse_if(problem, state, stepper, n_steps=None):
        from mfld.blocking import dot_fusion_pays

        return dot_fusion_pays(problem, state.w.shape[0] // mesh.size, stepper.batch_size,
                               stepper.memory_budget)

    return xla.jit(run, static_argnames=("n_steps",), donate_argnames=("state",) if donate else (),
                   fuse_if=fuse_if)


def run_steps(problem, sharded: ShardedState, stepper, n_steps: int):
    """``n_steps`` sharded steps; returns ``(ShardedState, StepInfo per step)``."""
    prob = replicate(problem, sharded.mesh)
    new, info = compiled_runner(sharded.mesh, sharded.n_particles, False)(prob, sharded.state, stepper,
                                                                          n_steps=int(n_steps))
    return ShardedState(new, sharded.n_particles, sharded.mesh), info


def simulate(problem, state, stepper, n_steps: int, *, mesh=None, n_devices: int | None = None,
             recorder=None, callback=None, **kwargs):
    """:func:`mfld.loop.simulate` with the particles sharded over ``mesh`` (default:
    :func:`make_mesh` of ``n_devices``). ``state`` is a full (unsharded) ParticleState, the
    same in every process. Records and callbacks see the real particles only; returns
    ``(final state of the real particles (sharded arrays), History)``.
    """
    import jax

    from mfld import loop, observables

    mesh = make_mesh(n_devices) if mesh is None else mesh
    sh = shard_state(state, mesh)
    n = sh.n_particles
    prob = replicate(problem, mesh)
    recorder = recorder or observables.record

    def rec(p, s):
        return recorder(p, unpad(s, n))

    cb = None if callback is None else (lambda s, row: callback(unpad(s, n), row))

    def advance(p, s, st, k, donate):
        return compiled_runner(mesh, n, bool(donate))(p, s, st, n_steps=int(k))[0]

    final, hist = loop.simulate(prob, sh.state, stepper, n_steps, recorder=rec, callback=cb,
                                advance=advance, **kwargs)
    return jax.jit(partial(unpad, n_particles=n))(final), hist


def local_state(state, n_particles: int | None = None):
    """An ordinary single-device :class:`mfld.dynamics.ParticleState` holding the (real)
    particles of a sharded state, gathered from every device and process (the same on every
    process). Drivers use it to checkpoint, certify or plot."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mfld.dynamics import ParticleState

    a, w = gather(state, n_particles)
    key_data = np.asarray(jax.random.key_data(state.key))  # replicated
    key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=jax.random.key_impl(state.key))
    return ParticleState(jnp.asarray(a), jnp.asarray(w), jnp.asarray(int(state.step), jnp.int32), key)


def simulate_local(problem, state, stepper, n_steps: int, *, n_devices: int | None = None, mesh=None,
                   callback=None, **kwargs):
    """:func:`simulate` for drivers: the particles are sharded while stepping and recording,
    but ``callback`` and the returned state see :func:`local_state` copies (gathered at each
    record only). ``n_devices=None`` with several processes: all devices of all processes."""
    cb = None if callback is None else (lambda s, row: callback(local_state(s), row))
    final, hist = simulate(problem, state, stepper, n_steps, mesh=mesh, n_devices=n_devices, callback=cb,
                           **kwargs)
    return local_state(final), hist
