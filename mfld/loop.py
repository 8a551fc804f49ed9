"""The host loop of a run: compiled segments of steps, records, callbacks, progress.

:func:`simulate` runs the dynamics of :mod:`mfld.dynamics` as jitted ``lax.scan`` segments
(:func:`run_segment`) that end on absolute multiples of the record and chunk intervals
(:func:`segment_ends`), so the trajectory does not depend on where a run was started,
resumed or chunked. At each record it evaluates a recorder (default
:func:`mfld.observables.record`) and appends a row to a :class:`History`. The sweep's loop
(:func:`mfld.sweep.run`) uses the same segment ends for a vmapped grid of members.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np

from mfld import observables, xla
from mfld.blocking import dot_fusion_pays
from mfld.dynamics import Langevin, ParticleState, run_steps
from mfld.errors import ConfigError
from mfld.problem import Problem


def _fusion_pays(problem, state, stepper, n_steps=None):
    return dot_fusion_pays(problem, state.w.shape[0], stepper.batch_size, stepper.memory_budget)


#: :func:`mfld.dynamics.run_steps` compiled with mfld's XLA options (:func:`mfld.xla.jit`).
run_steps_jit = xla.jit(run_steps, static_argnames=("n_steps",), fuse_if=_fusion_pays)
#: The same, donating the particle buffers of ``state`` (only for states nobody else holds).
run_steps_donating = xla.jit(run_steps, static_argnames=("n_steps",), donate_argnames=("state",),
                             fuse_if=_fusion_pays)


def run_segment(problem: Problem, state: ParticleState, stepper: Langevin, n: int, donate: bool) -> ParticleState:
    """``n`` steps from ``state`` in one compiled segment; ``donate``: hand the particle
    buffers of ``state`` to XLA (only for a state nobody else holds)."""
    fn = run_steps_donating if donate else run_steps_jit
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


def check_record_every(record_every) -> int:
    """``record.every`` as a positive int, or a ConfigError naming it."""
    record_every = int(record_every)
    if record_every < 1:
        raise ConfigError("must be positive", field="record.every", value=record_every)
    return record_every


def _check_partitionable():
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("mfld needs jax_threefry_partitionable=True (JAX's default) so that "
                           "the noise of a particle does not depend on the device count")


def _record_taker(problem: Problem, stepper: Langevin, recorder: Callable, callback: Callable | None,
                  hist: History) -> Callable:
    """``take(state) -> stop``: one record row (step, t, the recorder's values, wall_time),
    shown to ``callback`` (which may add columns and ask to stop), then appended to ``hist``."""
    rec_jit = xla.jit(recorder)
    t0 = time.perf_counter()

    def take(s):
        row = {"step": int(s.step), "t": float(s.step) * float(stepper.eta)}
        row.update({k: float(v) for k, v in rec_jit(problem, s).items()})
        row["wall_time"] = time.perf_counter() - t0
        stop = callback(s, row) if callback is not None else False  # may add columns to row
        hist.append(row)
        return stop

    return take


def simulate(problem: Problem, state: ParticleState, stepper: Langevin, n_steps: int, *,
             record_every: int = 100, chunk: int | None = None,
             recorder: Callable | None = None, callback: Callable | None = None,
             progress: bool = False, record_initial: bool = True, history: History | None = None,
             advance: Callable | None = None, callback_keeps_state: bool = True,
             caller_keeps_state: bool = True):
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
    arrays stay valid. ``callback_keeps_state=False`` promises that ``callback`` keeps no
    reference to the state it is shown: the segment after a record then donates it too (one
    state less resident during the segment). ``caller_keeps_state=False``: the caller hands
    ``state`` over (holds no reference to it), so the first segment may donate it as well.
    ``advance(problem, state, stepper, n, donate) -> state`` replaces the jitted segment
    (default :func:`run_segment`; :mod:`mfld.sharding` passes its own).
    """
    _check_partitionable()
    record_every = check_record_every(record_every)
    start = int(state.step)
    stop = start + int(n_steps)
    hist = History() if history is None else history
    take = _record_taker(problem, stepper, recorder or observables.record, callback, hist)
    advance = advance or run_segment
    exposed = caller_keeps_state  # does anyone but this loop hold the input state?
    if record_initial and start % record_every == 0:
        if take(state):
            return state, hist
        exposed = exposed or (callback is not None and callback_keeps_state)
    bar = _progress(stop - start, progress)
    step_now = start
    try:
        for end in segment_ends(start, stop, record_every, chunk or record_every):
            n = end - step_now
            state = advance(problem, state, stepper, n, not exposed)
            step_now = end
            exposed = False
            if bar is not None:
                bar.update(n)
            if end % record_every == 0 or end == stop:
                exposed = callback is not None and callback_keeps_state
                if take(state):
                    break
                _show_risk(bar, hist)
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


def _show_risk(bar, hist: History):
    if bar is not None and "risk" in hist.columns:
        bar.set_postfix(risk=f"{hist.columns['risk'][-1]:.4g}", refresh=False)
