"""The run driver: config -> Problem -> particles -> simulate -> run directory.

``run`` is what ``mfld run`` calls and what a notebook calls (``mfld.run``); it takes the same
fields as the YAML config, and also plain arrays ``x, y`` for a user's own data. A run is a
:class:`_Run`: the resolved inputs and :class:`RunOptions`, the run directory, the particles
and the records, named fields passed between its steps (check and build, claim the directory,
read a resume, write the config, simulate and record, finish).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mfld import config as cfgmod
from mfld import dynamics, loop, resources
from mfld.app import certificates, guards, inputs, run_figures, rundir
from mfld.app.lock import LOCK, RunLock
from mfld.app.records import RunStatus, is_finite_row, merge_metrics, run_summary
from mfld.errors import ConfigError
from mfld.stability import drift_curvature, suggest_step_size


@dataclass
class RunResult:
    """The outcome of :func:`run`: resolved config, problem, final state, metrics, run dir."""

    config: cfgmod.Config
    problem: object
    state: object
    metrics: dict
    summary: dict
    run_dir: Path | None
    dataset: object = None
    optimum: object = None
    notes: list = field(default_factory=list)


@dataclass(frozen=True)
class RunOptions:
    """How :func:`run` runs a resolved config and its data (the arguments of :func:`run` of the
    same names): the run directory (``out``, None: the default name), ``overwrite``, ``resume``,
    ``progress`` (None: ``record.progress``), ``write``, ``handle_signals`` and ``devices``."""

    out: Path | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool | None = None
    write: bool = True
    handle_signals: bool = True
    devices: int | None = None


def reserve_default_dir(cfg: cfgmod.Config, created: list) -> Path:
    """Create the default run directory atomically: ``runs/<name>-<stamp>``, or with ``-2``,
    ``-3``, ... appended when a run started in the same second has it (``os.mkdir`` fails on
    an existing name, so two runs started together get two directories). Appends the
    directories it created to ``created`` (removed again if the run fails before writing).
    The name starts from :func:`mfld.app.inputs.default_out_dir`."""
    base = inputs.default_out_dir(cfg)
    if not base.parent.exists():
        try:
            base.parent.mkdir(parents=True)
            created.append(base.parent)
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError(f"cannot create {base.parent} ({err.strerror or err})", field="--out",
                              value=str(base.parent)) from None
    for i in range(1, 1000):
        d = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigError(f"cannot create the run directory ({err.strerror or err})", field="--out",
                              value=str(d)) from None
        created.append(d)
        return d
    raise ConfigError("no free default run directory name", field="--out", value=str(base),
                      allowed="--out DIR")


def run(config=None, *, overrides=None, x=None, y=None, x_test=None, y_test=None, out=None,
        overwrite: bool = False, resume: bool = False, progress: bool | None = None,
        write: bool = True, handle_signals: bool = True, dataset=None, devices: int | None = None,
        follower: bool = False) -> RunResult:
    """Train a mean-field two-layer network by noisy gradient descent and record everything.

    Args:
        config: a :class:`mfld.config.Config`, a dict of config sections, a YAML path, or None
            (with ``resume``: None means the run directory's stored config); or a
            :class:`mfld.app.inputs.Prepared` from :func:`mfld.app.inputs.prepare` (config and
            data already resolved and checked, for the same ``out`` and ``resume``: nothing is
            resolved again; then no ``overrides``, ``x, y`` or ``dataset``).
        overrides: dotted overrides, e.g. ``{"objective.tau": 0.01}`` or ``["objective.tau=0.01"]``.
        x, y (, x_test, y_test): a user's own data as arrays (replaces the ``data`` section).
        out: run directory (default ``runs/<name>-<timestamp>``); ``write=False`` writes nothing.
        overwrite: replace an existing run in ``out``. resume: continue the run in ``out`` from
            its checkpoint (bit-identical to an uninterrupted run; see docs/runs.md); it writes
            the run, so ``write=False`` with ``resume`` is refused.
        handle_signals: while writing a run (main thread only), SIGINT/SIGTERM stop it at the
            next record with a checkpoint and summary status ``interrupted``.
        dataset: an already built :class:`mfld.data.Dataset` for this config (the CLI builds and
            checks it before importing JAX); default: built from the config (or ``x, y``).
        devices: shard the particles over this many devices (:func:`mfld.sharding.simulate_local`;
            CPU devices must be configured before JAX starts, see ``mfld run --devices``); with
            several processes (``jax.distributed``) the mesh spans all their devices. The same
            seed gives the same run for any device count up to float reassociation.
        follower: a non-writing process of a multi-process run (``write=False``): with
            ``resume`` it reads the run directory's checkpoint, which process 0 writes.

    Every user mistake (config, data, run directory) raises :class:`ConfigError` before
    anything is written. ``summary["status"]`` is ``completed``, ``diverged`` (non-finite
    particles or risk: the last finite state is checkpointed and ``suggested_eta`` given),
    ``interrupted`` or ``failed`` (an unexpected error, re-raised after the summary is written).
    """
    if resume and not write and not follower:
        raise ConfigError("a resume continues the run in its directory, so it must write it", field="write",
                          value=False, allowed="write=True with resume=True, or resume=False")
    opts = RunOptions(None if out is None else inputs.out_path(out),  # "" is refused (the current directory)
                      overwrite, resume, progress, write, handle_signals, devices)
    prep = _prepared(config, opts, dict(overrides=overrides, x=x, y=y, x_test=x_test, y_test=y_test,
                                        dataset=dataset))
    with inputs.precision_context(prep.config.precision):
        return _Run(prep.config, prep.dataset, opts).execute()


def _prepared(config, opts: RunOptions, given: dict) -> inputs.Prepared:
    """``config`` if it is a :class:`mfld.app.inputs.Prepared` for ``opts`` (and nothing in
    ``given``: overrides, arrays, dataset), else :func:`mfld.app.inputs.prepare` of it."""
    if not isinstance(config, inputs.Prepared):
        given = dict(given)
        return inputs.prepare(config, given.pop("overrides"), out=opts.out, resume=opts.resume,
                              overwrite=opts.overwrite, check_dir=opts.write, **given)
    if given["overrides"] or any(given[k] is not None for k in ("x", "y", "dataset")):
        raise ConfigError("a prepared config already holds its overrides and data", field="config",
                          allowed="overrides, x, y and dataset given to mfld.app.inputs.prepare")
    if config.resume != bool(opts.resume) or config.out != (None if opts.out is None else Path(opts.out)):
        raise ConfigError("the config was prepared for another run directory or resume mode", field="config",
                          value=f"out={config.out}, resume={config.resume}",
                          allowed=f"prepare(..., out={opts.out!r}, resume={bool(opts.resume)})")
    return config


class _Run:
    """One run of a resolved config and its data: the steps of :func:`run`, in order.

    Fields, set as the steps go: ``problem``, ``stepper``, ``state`` (the particles),
    ``fingerprint`` (the data's SHA-256), ``out_dir``, the directory's ``lock``, the
    ``signals`` flag, ``wrote`` (the run directory holds this run's files), ``created`` (the
    directories this run made, removed if it fails before writing), a resume's ``prior``
    metrics, ``resumed_from`` step and ``stored_optimum``; then the records: ``certs``
    (:class:`mfld.app.certificates.RunCertificates`), ``hook`` (:class:`_RecordHook`, which holds
    the :class:`mfld.app.records.RunStatus`) and ``notes``.
    """

    def __init__(self, cfg: cfgmod.Config, dataset, opts: RunOptions):
        self.cfg, self.dataset, self.opts = cfg, dataset, opts
        self.t_start = time.perf_counter()
        self.notes: list[str] = []
        self.created: list[Path] = []
        self.out_dir = Path(opts.out) if opts.out is not None else None
        self.lock = self.signals = None
        self.wrote = False
        self.prior = self.resumed_from = self.stored_optimum = None
        self.problem = self.stepper = self.state = self.fingerprint = None
        self.certs = self.hook = None

    def execute(self) -> RunResult:
        """Check and build, then (holding the lock) read a resume, write, simulate and record;
        a Ctrl-C carries the run directory for the CLI's "resume with" line."""
        self._check_and_build()
        try:
            self._open()
            return self._simulate_and_record()
        except KeyboardInterrupt as err:
            err.run_dir = self.out_dir if self.wrote else None  # for the CLI's "resume with" line
            raise
        finally:
            self._close()

    def _check_and_build(self):
        """Everything that can be a user mistake is checked before anything is written (the
        config and the data were checked by :func:`mfld.app.inputs.prepare`); then the problem,
        the stepper and the initial particles."""
        cfg, opts = self.cfg, self.opts
        if opts.write and opts.out is not None:
            inputs.check_out_dir(opts.out, overwrite=opts.overwrite, resume=opts.resume)
        self.problem = inputs.build_problem(cfg, self.dataset)
        self.stepper = dynamics.Langevin(eta=cfg.dynamics.eta, scheme=cfg.dynamics.scheme,
                                         batch_size=cfg.dynamics.batch_size, tau_schedule=cfg.dynamics.tau_schedule)
        self.state = self._initial_state()
        self.fingerprint = inputs.data_fingerprint(self.dataset)

    def _initial_state(self):
        """The particles of step 0 (a function of the config and the seed)."""
        cfg = self.cfg
        init = cfg.model.init
        return dynamics.init_particles(self.problem, cfg.model.n_particles, cfg.seed, a_scale=init.a_scale,
                                       w_scale=init.w_scale, plus_fraction=init.plus_fraction)

    def _open(self):
        """Claim the directory (the lock first: every check of the directory and every read of a
        resume under it), read a resume (a non-writing process of a multi-process run reads
        too), clear it for ``overwrite``, write the config and environment, catch signals."""
        opts = self.opts
        if opts.write:
            self._claim_dir()
        if opts.resume and self.out_dir is not None:
            self._read_resume()
        if opts.write:
            if opts.overwrite and not opts.resume:
                _clear_dir(self.out_dir)
            self.wrote = True
            self._write_config_and_env()
            self.signals = _Signals(opts.handle_signals)

    def _claim_dir(self):
        """Create (or reserve the default) run directory, take its lock, and check it again
        under the lock: another run may have written the directory since the first check."""
        if self.out_dir is None:
            self.out_dir = reserve_default_dir(self.cfg, self.created)
        else:
            self.created.extend(_missing_dirs(self.out_dir))
        self.lock = RunLock(self.out_dir)
        try:
            self.lock.acquire()
        except OSError as err:  # the directory cannot be made (a name too long, permissions ...)
            raise ConfigError(f"cannot create the run directory ({err.strerror or err})", field="--out",
                              value=str(self.out_dir)) from None
        if self.lock.took_over:
            self.notes.append("took over a stale lock left by a process that is gone")
        inputs.check_out_dir(self.out_dir, overwrite=self.opts.overwrite, resume=self.opts.resume)

    def _close(self):
        """Restore the signal handlers, release the lock; a run that failed before writing
        anything removes the directories it made."""
        if self.signals is not None:
            self.signals.restore()
        if self.lock is not None:
            self.lock.release()
        if not self.wrote:
            for d in reversed(self.created):
                try:
                    d.rmdir()
                except OSError:
                    pass

    def _read_resume(self):
        """The state, prior metrics, resumed-from step and stored optimum of the run in
        ``out_dir``, every file checked before anything is written (under the run's lock when
        writing): the marker's integrity record of config.yaml and env.json, the data's SHA-256,
        the checkpoint (shapes, dtype, key, a step that metrics.csv has a row for), metrics.csv
        and optimum.json. A writing run then removes the temporary files of interrupted writes."""
        out_dir, notes = self.out_dir, self.notes
        marker = rundir.read_marker(out_dir)
        if marker is None:
            notes.append("the run directory has no integrity record (written by an older mfld): config.yaml and "
                         "env.json were not verified")
        rundir.check_integrity(out_dir, rundir.CONFIG, rundir.read_config(out_dir / rundir.CONFIG), marker)
        if inputs.read_run_env(out_dir).get("data_sha256") not in (None, self.fingerprint):
            raise ConfigError("the data differ from the stored run's (SHA-256 mismatch)", field="--resume",
                              value=str(out_dir), allowed="the same data as the interrupted run")
        if self.cfg.record.optimum:
            self.stored_optimum = certificates.read_optimum(out_dir, self.problem)
        if (out_dir / rundir.CHECKPOINT).exists():
            self.state, self.prior, self.resumed_from = _read_checkpoint_and_metrics(out_dir, self.cfg, self.state)
        else:  # killed before the first checkpoint: start again from step 0
            notes.append("no checkpoint in the run directory: restarted from step 0")
            self.prior, self.resumed_from = None, 0
        if self.opts.write:  # every file checked: now the leftovers of interrupted writes can go
            removed = rundir.remove_temporaries(out_dir)
            if removed:
                notes.append(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                             + ", ".join(removed[:3]) + (" ..." if len(removed) > 3 else ""))

    def _write_config_and_env(self):
        """The run's marker, config.yaml, env.json (and data.npz): the marker (with the integrity
        record of the new config and env, the old ones still accepted) first, then the files,
        then the marker again without the old ones -- a crash anywhere in between leaves a run
        that resumes."""
        out_dir, cfg = self.out_dir, self.cfg
        config_text = cfg.to_yaml()
        env = rundir.environment(cfg.seed, cfg.precision)
        env["data_sha256"] = self.fingerprint
        env["particle_devices"] = _mesh_size(self.opts.devices)
        previous = {}  # the digests of the files as they are now: accepted until the new ones are written
        if self.opts.resume:
            env = self._resumed_env(env, previous)
        env_text = rundir.json_text(env)
        records = {rundir.CONFIG: rundir.digest(cfgmod.validate(cfgmod.safe_load(config_text)).to_dict()),
                   rundir.ENV: rundir.digest(json.loads(env_text))}
        rundir.write_marker(out_dir, records, previous=previous)
        rundir.atomic_write_text(out_dir / rundir.CONFIG, config_text)
        rundir.atomic_write_text(out_dir / rundir.ENV, env_text)
        if previous:
            rundir.write_marker(out_dir, records)
        if self.dataset.meta.get("kind") == "arrays" and not (out_dir / rundir.DATA).exists():
            _save_arrays(out_dir / rundir.DATA, self.dataset)  # so that `mfld plot` can redraw

    def _resumed_env(self, env: dict, previous: dict) -> dict:
        """A resume's env.json: the stored one with this resume appended to ``resumes`` (``env``
        if there is none); the digests of the stored config.yaml and env.json go to ``previous``."""
        out_dir = self.out_dir
        if (out_dir / rundir.CONFIG).exists():
            previous[rundir.CONFIG] = rundir.digest(rundir.read_config(out_dir / rundir.CONFIG))
        env_old = inputs.read_run_env(out_dir)
        if not env_old:
            return env
        previous[rundir.ENV] = rundir.digest(env_old)
        env_old = dict(env_old)
        env_old["resumes"] = list(env_old.get("resumes") or [])
        env_old["resumes"].append(
            {k: env[k] for k in ("argv", "jax", "jaxlib", "devices", "git", "x64")}
            | {"from_step": self.resumed_from, "time": _dt.datetime.now().isoformat(timespec="seconds")})
        return env_old

    # ---- simulate and record ------------------------------------------------------------

    def _simulate_and_record(self) -> RunResult:
        """Certificates and the optimum, the simulation with the record hook, then the run's
        outcome (:meth:`_finish`) and its files (:meth:`_write_outputs`)."""
        cfg = self.cfg
        self.certs = certificates.optimum_and_certify(cfg, self.problem, self.state, self.notes,
                                                      self.stored_optimum)
        if self.opts.write and self.certs.solved:
            rundir.atomic_write_text(self.out_dir / rundir.OPTIMUM, self.certs.optimum.to_json())
        # the divergence and convergence diagnostics need a subsample of the starting state only:
        # the full one is released after the first record (one state less resident all run long)
        initial_sub = curvature_subsample(self.state)
        # a fresh single-device run that writes can recompute its last finite state (replay from
        # its checkpoint or its initial particles), so its record hook holds no state and each
        # segment donates its input; otherwise the hook keeps the last finite state
        self.replay = bool(self.opts.write and self.resumed_from is None and _mesh_size(self.opts.devices) == 1)
        self.hook = _RecordHook(self, loop.History(), self.certs.certify, keep_last_good=not self.replay)
        remaining = max(cfg.dynamics.steps - int(self.state.step), 0)
        if self.resumed_from is not None and remaining == 0:
            self.notes.append(f"nothing to do: the run is already at step {int(self.state.step)} of "
                              f"{cfg.dynamics.steps}")
        state, hist = self._simulate(remaining)
        state, metrics, summary = self._finish(initial_sub, state, hist)
        if self.opts.write:
            self._write_outputs(state, metrics, summary)
        return RunResult(cfg, self.problem, state, rundir.Metrics({k: np.asarray(v) for k, v in metrics.items()}),
                         summary, self.out_dir, self.dataset, self.certs.optimum, self.notes)

    def _simulate(self, n_steps: int):
        """(final state, History) of ``n_steps`` more steps; on any exception a writing run's
        summary says what happened (``interrupted`` or ``failed``) before it is re-raised."""
        cfg, rec, opts = self.cfg, self.cfg.record, self.opts
        try:
            simulate = loop.simulate
            if _mesh_size(opts.devices) > 1:  # particles sharded; callbacks and the result see gathered copies
                from mfld import sharding

                simulate = partial(sharding.simulate_local,
                                   n_devices=None if jax.process_count() > 1 else opts.devices)
            return simulate(self.problem, self._hand_over_state(), self.stepper, n_steps, record_every=rec.every,
                            chunk=cfg.dynamics.chunk, callback=self.hook,
                            progress=rec.progress if opts.progress is None else opts.progress,
                            record_initial=self.prior is None, history=self.hook.hist,
                            callback_keeps_state=not self.replay, caller_keeps_state=not self.replay)
        except BaseException as err:  # keep the run directory consistent: say what happened, then re-raise
            if opts.write:
                self._write_failure(err)
            raise

    def _replay(self, to_step: int):
        """The state at ``to_step``, recomputed from this run's checkpoint (written at a finite
        record, so at most ``to_step``) or its initial particles: bit for bit the state the run
        had there, since a trajectory does not depend on where its segments end."""
        start = self._initial_state()
        path = self.out_dir / rundir.CHECKPOINT
        if path.exists():
            ckpt = _restore(path, start)
            start = ckpt if int(ckpt.step) <= to_step else start
        n = to_step - int(start.step)
        if n == 0:
            return start
        state, _ = loop.simulate(self.problem, start, self.stepper, n, record_every=self.cfg.record.every,
                                 chunk=self.cfg.dynamics.chunk, record_initial=False, progress=False)
        return state

    def _hand_over_state(self):
        """The starting state, no longer held by the run (no frame keeps it: the loop and the
        record hook drop it after the first segment and record)."""
        state, self.state = self.state, None
        return state

    def _write_failure(self, err: BaseException):
        """summary.json of a run stopped by an exception: ``interrupted`` (a second signal) or
        ``failed``, with the rows recorded before the run started and the checkpoint's step."""
        status = self.hook.status
        interrupted = isinstance(err, KeyboardInterrupt)
        status.value = "interrupted" if interrupted else "failed"
        status.reason = ("second signal: stopped without a new checkpoint" if interrupted
                         else f"{type(err).__name__}: {err}")
        summary = run_summary(self.cfg, merge_metrics(self.prior, {}), status, time.perf_counter() - self.t_start,
                              self.certs.optimum)
        summary["checkpoint_step"] = _checkpoint_step(self.out_dir)
        summary["notes"] = self.notes
        rundir.write_json(self.out_dir / rundir.SUMMARY, summary)

    def _finish(self, initial_sub, state, hist):
        """(state, metrics, summary) of the run as it ended: a diverged run keeps its last finite
        state and the rows up to it and is given a stable step; a completed one that is not
        converging is told so; then the guards' notes (precision, quantised signs ...).
        ``initial_sub``: :func:`curvature_subsample` of the starting state."""
        cfg, hook, notes = self.cfg, self.hook, self.notes
        status = hook.status
        metrics = merge_metrics(self.prior, hist.columns)
        if status.value == "diverged":
            state = hook.last_good if hook.last_good is not None else self._replay(hook.last_good_step)
            keep = [i for i, st in enumerate(metrics.get("step", [])) if st <= hook.last_good_step]
            metrics = {k: [v[i] for i in keep] for k, v in metrics.items()}
        summary = run_summary(cfg, metrics, status, time.perf_counter() - self.t_start, self.certs.optimum)
        if self.resumed_from is not None:
            summary["resumed_from_step"] = self.resumed_from
        if status.value == "diverged":
            summary["last_good_step"] = hook.last_good_step
            # the curvature where the run started and where it was last finite (often already blowing up)
            suggestion = suggest_step_size(self.problem, cfg.dynamics.eta,
                                           [initial_sub, curvature_subsample(state)])
            summary["suggested_eta"] = suggestion["eta"]
            summary["curvature"] = suggestion["curvature"]
            notes.append(f"the run diverged ({status.reason}); the last finite state (step {hook.last_good_step}) "
                         f"is checkpointed; {suggestion['why']}: rerun with --set "
                         f"dynamics.eta={suggestion['eta']:.3g} --overwrite")
        if status.value == "completed":
            note = _convergence_note(cfg, self.problem, metrics, initial_sub, state)
            if note:
                summary["not_converging"] = True
                notes.append(note)
        notes.extend(guards.run_notes(cfg.precision, metrics, np.asarray(state.a), np.asarray(state.w),
                                      problem=self.problem, certified=self.certs.certify is not None))
        return state, metrics, summary

    def _write_outputs(self, state, metrics: dict, summary: dict):
        """metrics.csv, the checkpoint and summary.json (the numbers first), then the figures
        (a figure that fails is a note, never a lost run) and summary.json again."""
        out_dir = self.out_dir
        if metrics:
            rundir.write_metrics(out_dir / rundir.METRICS, metrics)
        _checkpoint(out_dir, state)
        summary["checkpoint_step"] = int(state.step)
        summary["notes"] = self.notes
        rundir.write_json(out_dir / rundir.SUMMARY, summary)  # the numbers first, the figures after
        try:
            figs = run_figures.make_figures(out_dir, problem=self.problem, dataset=self.dataset,
                                            a=np.asarray(state.a), w=np.asarray(state.w), metrics=metrics,
                                            optimum=self.certs.optimum)
            summary["figures"] = figs
        except Exception as err:  # a figure must never lose a run's numbers
            self.notes.append(f"figures failed: {type(err).__name__}: {err}")
        summary["notes"] = self.notes
        summary["run_time_s"] = time.perf_counter() - self.t_start
        rundir.write_json(out_dir / rundir.SUMMARY, summary)


class _RecordHook:
    """The callback of :func:`mfld.loop.simulate` at each record: divergence check,
    certificates, snapshots, periodic checkpoints and the signal flag.

    ``status`` (:class:`mfld.app.records.RunStatus`) says how the run ended;
    ``last_good``/``last_good_step`` are the last finite state and its step (``last_good`` is
    ``None`` with ``keep_last_good=False``: the run replays it if needed). ``hist`` is the
    History the simulation appends the rows to (a checkpoint writes it with ``prior``).
    """

    def __init__(self, run: _Run, hist, certify=None, keep_last_good: bool = True):
        self.rec = run.cfg.record
        self.out_dir, self.write, self.signals, self.prior = run.out_dir, run.opts.write, run.signals, run.prior
        self.hist, self.certify = hist, certify
        self.status = RunStatus()
        self.keep_last_good = keep_last_good
        self.last_good, self.last_good_step = (run.state if keep_last_good else None), int(run.state.step)
        prior = run.prior
        # wall_time continues across resumes (it is not part of the bit-for-bit contract)
        self.wall_offset = (float(prior["wall_time"][-1]) if prior and "wall_time" in prior and len(prior["step"])
                            else 0.0)

    def __call__(self, s, row) -> bool:
        rec, status = self.rec, self.status
        if "wall_time" in row:
            row["wall_time"] += self.wall_offset
        if not (is_finite_row(row) and bool(jnp.all(jnp.isfinite(s.w))) and bool(jnp.all(jnp.isfinite(s.a)))):
            status.value = "diverged"
            status.reason = f"non-finite particles or risk at step {row['step']}"
            status.diverged_at_step = row["step"]
            return True
        self.last_good, self.last_good_step = (s if self.keep_last_good else None), row["step"]
        step = row["step"]
        if self.certify is not None and step % rec.certify_every == 0:
            row.update(self.certify(s))
            # the certificate's freed float64 blocks back to the kernel before the next segment
            resources.release_freed_memory()
        if self.write and rec.snapshot_every and step % rec.snapshot_every == 0:
            rundir.save_checkpoint(self.out_dir / "snapshots" / f"step_{step:09d}.npz", s.a, s.w, step,
                                   jax.random.key_data(s.key))
        stop = self.signals is not None and self.signals.signum is not None
        if self.write and not stop and rec.checkpoint_every and step % rec.checkpoint_every == 0 and step > 0:
            self._checkpoint(s, row)
        if stop:
            status.value = "interrupted"
            status.reason = f"signal {self.signals.signum} at step {step}"
            status.signal = self.signals.signum
        return stop

    def _checkpoint(self, s, row):
        rows = loop.History({k: list(v) for k, v in self.hist.columns.items()})
        rows.append(row)
        # metrics first, then the checkpoint: a kill in between leaves metrics rows beyond the
        # checkpoint, which a resume truncates; the other order would lose rows.
        rundir.write_metrics(self.out_dir / rundir.METRICS, merge_metrics(self.prior, rows.columns))
        _checkpoint(self.out_dir, s)


class _Signals:
    """SIGINT/SIGTERM -> a flag checked at each record (a second signal aborts at once)."""

    def __init__(self, enabled: bool):
        self.signum = None
        self._old = {}
        if not enabled or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now (files on disk stay consistent)
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _missing_dirs(d: Path) -> list[Path]:
    """``d`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    for q in [d, *d.parents]:
        if q.exists() or q.is_symlink() or str(q) in ("", "."):
            break
        missing.append(q)
    return list(reversed(missing))


def _read_checkpoint_and_metrics(out_dir, cfg, state):
    """(state, metrics rows to keep, step) of a run's checkpoint and metrics.csv, checked
    against each other (metrics.csv is written before every checkpoint, so it has a row at the
    checkpoint's step)."""
    has_metrics = (out_dir / rundir.METRICS).exists()
    state = _restore(out_dir / rundir.CHECKPOINT, state)
    resumed_from = int(state.step)
    if not has_metrics:
        raise rundir.RunFileError(out_dir / rundir.METRICS, f"missing, but the checkpoint is at step {resumed_from}",
                                  "the metrics.csv the run wrote (it is written before every checkpoint)")
    prior = rundir.read_metrics(out_dir / rundir.METRICS)
    steps = prior["step"]
    if resumed_from not in set(steps.tolist()):
        raise rundir.RunFileError(out_dir / rundir.CHECKPOINT,
                                  f"step {resumed_from} has no row in metrics.csv (which ends at step "
                                  f"{int(steps[-1]) if steps.size else 'none'})",
                                  "the checkpoint the run wrote (metrics.csv reaches every checkpoint)")
    # rows after the checkpoint are replayed; the closing record of a run whose
    # length is not a multiple of record.every is not one an uninterrupted longer
    # run would have, so it goes when the run is extended
    keep = (steps <= resumed_from) & ((steps % cfg.record.every == 0) | (steps >= cfg.dynamics.steps))
    prior = {k: v[keep] for k, v in prior.items()}
    return state, prior, resumed_from


def _mesh_size(devices) -> int:
    """The number of devices the particles are sharded over (1: not sharded)."""
    if jax.process_count() > 1:
        return len(jax.devices())
    return int(devices or 1)


def _save_arrays(path, dataset):
    arrays = {k: np.asarray(getattr(dataset, k)) for k in ("x", "y", "x_test", "y_test")
              if getattr(dataset, k) is not None}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rundir.atomic_write_bytes(path, buf.getvalue())


def _restore(path, template):
    """The ParticleState of a checkpoint, checked against the config's particle shapes and dtype."""
    ck = rundir.load_checkpoint(path)  # a RunFileError naming the problem if it is damaged
    a, w, step, key_data = ck["a"], ck["w"], int(ck["step"]), ck["key_data"]
    if a.shape != template.a.shape or w.shape != template.w.shape:
        raise rundir.RunFileError(path, f"particles of shapes {a.shape}, {w.shape} but the config gives "
                                        f"{template.a.shape}, {template.w.shape}", "the checkpoint of this run")
    if a.dtype != template.a.dtype:
        raise rundir.RunFileError(path, f"particles are {a.dtype} but the run's precision gives "
                                        f"{template.a.dtype}", "the stored precision (--x64 as before)")
    want = np.asarray(jax.random.key_data(template.key))
    if key_data.shape != want.shape or key_data.dtype != want.dtype:
        raise rundir.RunFileError(path, f"'key_data' is {key_data.dtype} {key_data.shape}, the run's key is "
                                        f"{want.dtype} {want.shape}", "the checkpoint of this run")
    return dynamics.ParticleState(jnp.asarray(a), jnp.asarray(w), jnp.asarray(step, jnp.int32),
                                  jax.random.wrap_key_data(jnp.asarray(key_data)))


def _checkpoint_step(out_dir):
    try:
        return int(rundir.load_checkpoint(out_dir / rundir.CHECKPOINT)["step"])
    except Exception:  # noqa: BLE001
        return None


def _checkpoint(out_dir, s):
    rundir.save_checkpoint(out_dir / rundir.CHECKPOINT, s.a, s.w, int(s.step), jax.random.key_data(s.key))


def _clear_dir(out_dir: Path):
    """Empty a run directory for --overwrite, keeping our own lock file. Only ever called on a
    directory that holds an mfld run (:func:`mfld.app.inputs.check_out_dir`, under the lock);
    symbolic links are removed, never followed."""
    if not inputs.dir_entries(out_dir):
        return  # a new or empty directory: nothing to clear
    if not rundir.is_run_dir(out_dir):  # the check ran under the lock; never clear anything else
        raise ConfigError("--overwrite refused: the directory does not hold an mfld run", field="--out",
                          value=str(out_dir))
    for p in out_dir.iterdir():
        if p.name == LOCK and p.is_file() and not p.is_symlink():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


#: Particles the divergence and non-convergence diagnostics estimate the curvature on (a
#: mean-field curvature does not depend on N; a subsample keeps them cheap for large runs).
CURVATURE_SUBSAMPLE = 4096


def curvature_subsample(state):
    """Every k-th particle of ``state``, at most :data:`CURVATURE_SUBSAMPLE` of them (a stride,
    so both sign groups of a fixed output layer are kept)."""
    stride = -(-int(state.a.shape[0]) // CURVATURE_SUBSAMPLE)
    # a copy even at stride 1: the run donates the state's own buffers to its first segment
    return state._replace(a=jnp.array(state.a[::stride], copy=True), w=jnp.array(state.w[::stride], copy=True))


def _convergence_note(cfg, problem, metrics, initial_sub, final) -> str | None:
    """A note for a completed run that is not converging: its duality gap did not fall over
    the last half of the run (the median of the last quarter of the records is not below 0.7
    times that of the quarter before) and the step exceeds the linear stability limit 2/mu at
    the final state (:func:`mfld.stability.drift_curvature`): the particles oscillate. The note
    names a stable step (:func:`mfld.stability.suggest_step_size`). None otherwise, and when
    fewer than 8 records have a gap. ``initial_sub``: :func:`curvature_subsample` of the
    starting state; ``final``: the final state (subsampled here, once a note is possible)."""
    steps = np.asarray(metrics.get("step", []), dtype=np.float64)
    gap = np.asarray(metrics.get("gap", []), dtype=np.float64)
    ok = np.isfinite(gap)
    steps, gap = steps[ok], gap[ok]
    if gap.size < 8 or steps[-1] - steps[0] <= 0:
        return None
    half = gap[steps >= steps[0] + 0.5 * (steps[-1] - steps[0])]
    if half.size < 4:
        return None
    q = half.size // 2
    earlier, later = float(np.median(half[:q])), float(np.median(half[q:]))
    if later < 0.7 * earlier:
        return None  # still falling
    sub = [initial_sub, curvature_subsample(final)]
    try:
        mu = drift_curvature(problem, sub[-1].a, sub[-1].w)
    except Exception:  # noqa: BLE001 - a diagnostic must not break the run's writing
        return None
    eta = float(cfg.dynamics.eta)
    if not (np.isfinite(mu) and mu > 0 and eta >= 2.0 / mu):
        return None  # a plateau (or a slow run) with a stable step: nothing to say
    suggestion = suggest_step_size(problem, eta, sub)
    return (f"the run is not converging: the duality gap did not fall over the last half of the run (median "
            f"{earlier:.3g}, then {later:.3g}) and dynamics.eta={eta:g} exceeds the stability limit 2/mu = "
            f"{2.0 / mu:.3g} of the final state; a stable step is dynamics.eta={suggestion['eta']:.3g} "
            f"(rerun with --set dynamics.eta={suggestion['eta']:.3g} --overwrite)")
