"""Hyperparameter sweeps in one compiled, vmapped call.

All members of a grid over (lam, tau, eta, seed) that share shapes (data, particle count,
static choices) run together: ``jax.vmap`` over the Problem leaves ``lam``/``tau``, the
stepper leaf ``eta`` and the particle state (each member has its own particles and key,
from its seed exactly as :func:`mfld.dynamics.init_particles` makes them). The host loop
is that of :func:`mfld.loop.simulate` (segments ending on absolute multiples of
``record_every`` and ``chunk``), so member m's history equals what ``simulate`` gives for
that member alone, up to floating-point reassociation inside the batched GEMMs (measured
~1e-15 relative in float64, ~1e-6 in float32; the tests state the tolerance).

The memory budget of a drift evaluation is shared by the members (each gets
``budget / M``; see :func:`mfld.blocking.plan_chunks`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mfld import dynamics, observables, xla
from mfld.blocking import DEFAULT_MEMORY_BUDGET, dot_fusion_pays
from mfld.dynamics import Langevin, ParticleState
from mfld.errors import ConfigError
from mfld.loop import History, check_record_every, segment_ends
from mfld.problem import Problem

SWEPT = ("lam", "tau", "eta", "seed")


@dataclass(frozen=True)
class Member:
    """One point of a sweep grid."""

    lam: float
    tau: float
    eta: float
    seed: int

    def label(self) -> str:
        return f"lam={self.lam:g}_tau={self.tau:g}_eta={self.eta:g}_seed={self.seed}"


def grid(problem: Problem, stepper: Langevin, *, lam=None, tau=None, eta=None, seeds=1, seed0: int = 0):
    """The Cartesian product of the given values (defaults: the problem's/stepper's own) with
    ``seeds`` seeds ``seed0, seed0 + 1, ...`` (or an explicit list of seeds)."""
    lams = [float(problem.lam)] if lam is None else [float(v) for v in np.atleast_1d(lam)]
    taus = [float(problem.tau)] if tau is None else [float(v) for v in np.atleast_1d(tau)]
    etas = [float(stepper.eta)] if eta is None else [float(v) for v in np.atleast_1d(eta)]
    seed_list = list(range(seed0, seed0 + int(seeds))) if np.isscalar(seeds) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("need at least one seed", field="seeds", value=seeds)
    for name, vals, ok, allowed in [("objective.lam", lams, lambda v: v > 0, "lam > 0"),
                                    ("objective.tau", taus, lambda v: v >= 0, "tau >= 0"),
                                    ("dynamics.eta", etas, lambda v: v > 0, "eta > 0")]:
        bad = [v for v in vals if not (np.isfinite(v) and ok(v))]
        if bad:
            raise ConfigError("bad sweep value", field=name, value=bad[0], allowed=allowed)
    # every member has its own directory named by its label: duplicates (or values that the
    # label's 6 significant digits cannot tell apart) are refused before anything runs
    for name, vals in [("objective.lam", lams), ("objective.tau", taus), ("dynamics.eta", etas),
                       ("seeds", seed_list)]:
        labels = [f"{v:g}" for v in vals]
        dup = next((v for v, lab in zip(vals, labels, strict=True) if labels.count(lab) > 1), None)
        if dup is not None:
            raise ConfigError("duplicate sweep value (or equal to 6 significant digits)", field=name, value=dup,
                              allowed="distinct values")
    return [Member(lm, t, e, s) for lm, t, e, s in itertools.product(lams, taus, etas, seed_list)]


def stack_members(problem, stepper, members, n_particles, init_kwargs):
    """``(problem, states, stepper)`` of the members stacked along a leading axis: lam and tau
    per member in the problem, eta in the stepper (with the memory budget shared), each
    member's particles initialised from its seed."""
    dtype = problem.x.dtype
    lam = jnp.asarray([m.lam for m in members], dtype)
    tau = jnp.asarray([m.tau for m in members], dtype)
    eta = jnp.asarray([m.eta for m in members], dtype)
    states = [dynamics.init_particles(problem, n_particles, m.seed, **init_kwargs) for m in members]
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    budget = stepper.memory_budget or DEFAULT_MEMORY_BUDGET
    st = Langevin(eta, scheme=stepper.scheme, batch_size=stepper.batch_size, tau_schedule=stepper.tau_schedule,
                  memory_budget=max(1, budget // len(members)))
    return problem.replace(lam=lam, tau=tau), state, st


def _axes(problem, stepper):
    p_axes = problem.replace(x=None, y=None, lam=0, tau=0, r_out=None, x_test=None, y_test=None)
    s_axes = Langevin(0, scheme=stepper.scheme, batch_size=stepper.batch_size,
                      tau_schedule=stepper.tau_schedule, memory_budget=stepper.memory_budget)
    return p_axes, s_axes


def _runner(problem, stepper, donate):
    p_axes, s_axes = _axes(problem, stepper)

    def run(pb, state, st, n_steps):
        f = jax.vmap(lambda p, s, lv: dynamics.run_steps(p, s, lv, n_steps)[0], in_axes=(p_axes, 0, s_axes))
        return f(pb, state, st)

    def fuse_if(pb, state, st, n_steps=None):  # state leaves: (members, N, ...)
        return dot_fusion_pays(pb, state.w.shape[1], st.batch_size, st.memory_budget)

    return xla.jit(run, static_argnames=("n_steps",), donate_argnames=("state",) if donate else (),
                   fuse_if=fuse_if)


_RUNNERS: dict = {}


def compiled_runner(problem, stepper, donate):
    """The vmapped, jitted segment runner of a stacked problem and stepper (one per static
    structure; a second grid of the same shapes reuses it)."""
    key = (problem.activation, problem.loss, problem.output, problem.scaling, problem.bias,
           stepper.scheme, stepper.batch_size, stepper.tau_schedule, stepper.memory_budget, donate)
    if key not in _RUNNERS:
        _RUNNERS[key] = _runner(problem, stepper, donate)
    return _RUNNERS[key]


def run(problem: Problem, stepper: Langevin, members: list[Member], n_particles: int, n_steps: int, *,
        record_every: int = 100, chunk: int | None = None, recorder: Callable | None = None,
        init_kwargs: dict | None = None, record_initial: bool = True, callback: Callable | None = None,
        state: ParticleState | None = None, progress=None, histories: list[History] | None = None):
    """Run every member for ``n_steps`` steps from its own initialisation, all at once.

    Returns ``(final_states, histories)``: a ParticleState whose leaves have a leading
    member axis, and one :class:`mfld.loop.History` per member with the columns that
    :func:`mfld.loop.simulate` records (step, t, the recorder's, wall_time).

    ``callback(states, rows)`` is called at each record with the stacked states and the
    members' rows (one dict each, in member order) before they are stored; it may add
    columns to the rows (certificates). ``state``: stacked states to continue from (a resumed
    sweep: every member at the same ``step``; the run then goes up to ``n_steps`` in total,
    on the same absolute segment ends, so the trajectory is that of an uninterrupted sweep).
    ``progress``: an object with ``update(n)`` (a tqdm bar) told the steps done, or None.
    ``histories``: one History per member to append the rows to (so a callback sees them).
    """
    members = list(members)
    if not members:
        raise ConfigError("empty sweep", field="members", allowed="at least one member")
    record_every = check_record_every(record_every)
    recorder = recorder or observables.record
    pb, state0, st = stack_members(problem, stepper, members, n_particles, init_kwargs or {})
    given = state is not None
    if given:
        _check_resumed(state, state0)
        state0 = state
    state = state0
    hists = [History() for _ in members] if histories is None else list(histories)
    if len(hists) != len(members):
        raise ConfigError("one history per member", field="histories", value=len(hists), allowed=len(members))
    take = _record_taker(pb, _axes(problem, st), recorder, members, hists, callback)
    start, stop = int(np.asarray(state.step)[0]), int(n_steps)
    exposed = given  # a caller's state is not ours to donate
    if record_initial and start == 0:
        take(state)
        exposed = exposed or callback is not None
    now = start
    for end in segment_ends(start, stop, record_every, chunk or record_every):
        state = compiled_runner(problem, st, not exposed)(pb, state, st, n_steps=end - now)
        if progress is not None:
            progress.update(end - now)
        now = end
        exposed = False  # the segment's output is ours
        if end % record_every == 0 or end == stop:
            take(state)
            exposed = callback is not None  # the callback may keep the states it saw
    return state, hists


def _check_resumed(state: ParticleState, fresh: ParticleState):
    if state.w.shape != fresh.w.shape or state.w.dtype != fresh.w.dtype:
        raise ConfigError(f"stored sweep states have shape {state.w.shape} ({state.w.dtype}) but the sweep "
                          f"gives {fresh.w.shape} ({fresh.w.dtype})", field="--resume")


def _record_taker(pb: Problem, axes, recorder: Callable, members: list[Member], hists: list[History],
                  callback: Callable | None) -> Callable:
    """``take(states)``: the members' record rows (step, t, the recorder's values, wall_time),
    shown to ``callback``, then appended to ``hists``."""
    p_axes, _ = axes
    rec = xla.jit(jax.vmap(recorder, in_axes=(p_axes, 0)))
    etas = [float(m.eta) for m in members]
    t0 = time.perf_counter()

    def take(s):
        vals = {k: np.asarray(v) for k, v in rec(pb, s).items()}
        k_step = int(np.asarray(s.step)[0])
        wall = time.perf_counter() - t0
        rows = []
        for i in range(len(hists)):
            row = {"step": k_step, "t": float(k_step) * etas[i]}
            row.update({k: float(v[i]) for k, v in vals.items()})
            row["wall_time"] = wall
            rows.append(row)
        if callback is not None:
            callback(s, rows)
        for h, row in zip(hists, rows, strict=True):
            h.append(row)

    return take


def member_state(states: ParticleState, i: int) -> ParticleState:
    """Member ``i``'s particles from the stacked final states of :func:`run`."""
    return jax.tree.map(lambda v: v[i], states)
