"""The run driver: config -> Problem -> particles -> simulate -> run directory.

``run`` is what ``mfld run`` calls and what a notebook calls (``mfld.run``); it takes the same
fields as the YAML config, and also plain arrays ``x, y`` for a user's own data.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mfld import config as cfgmod
from mfld.app import guards, rundir
from mfld.app.guards import GAP_COLUMNS, precision_notes, quantised_fraction  # noqa: F401 - re-exported
from mfld.app.inputs import (  # noqa: F401 - re-exported: the run's inputs (no JAX)
    Prepared,
    build_problem,
    check_data,
    check_out_dir,
    data_fingerprint,
    make_dataset,
    out_path,
    prepare,
    read_run_env,
    resolve_config,
    resolve_resume_config,
    validate_inputs,
)
from mfld.app.lock import LOCK
from mfld.errors import ConfigError
from mfld.stability import drift_curvature, suggest_step_size  # noqa: F401 - drift_curvature re-exported


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


def precision_context(precision: str):
    """A scoped x64 context when float64 is asked for and not already on (never global)."""
    import jax

    if precision == "float64" and not jax.config.jax_enable_x64:
        return jax.enable_x64(True)
    if precision == "float32" and jax.config.jax_enable_x64:
        return jax.enable_x64(False)
    return contextlib.nullcontext()


def default_out_dir(cfg: cfgmod.Config) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (the name :func:`reserve_default_dir` starts from)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def reserve_default_dir(cfg: cfgmod.Config, created: list) -> Path:
    """Create the default run directory atomically: ``runs/<name>-<stamp>``, or with ``-2``,
    ``-3``, ... appended when a run started in the same second has it (``os.mkdir`` fails on
    an existing name, so two runs started together get two directories). Appends the
    directories it created to ``created`` (removed again if the run fails before writing)."""
    base = default_out_dir(cfg)
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


def certificates_available(problem) -> str | None:
    """None if the certificates are defined for this problem, else the reason they are not
    (:func:`mfld.duality.check_applicable`: tau > 0 and the mean-field scaling)."""
    from mfld.duality import check_applicable
    from mfld.errors import TheoryNotApplicable

    try:
        check_applicable(problem)
    except TheoryNotApplicable as err:
        return str(err)
    return None


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
    if out is not None:
        out = out_path(out)  # "" is refused (it would mean the current directory)
    if isinstance(config, Prepared):
        if overrides or x is not None or y is not None or dataset is not None:
            raise ConfigError("a prepared config already holds its overrides and data", field="config",
                              allowed="overrides, x, y and dataset given to mfld.app.inputs.prepare")
        if config.resume != bool(resume) or config.out != (None if out is None else Path(out)):
            raise ConfigError("the config was prepared for another run directory or resume mode", field="config",
                              value=f"out={config.out}, resume={config.resume}",
                              allowed=f"prepare(..., out={out!r}, resume={bool(resume)})")
        prep = config
    else:
        prep = prepare(config, overrides, out=out, resume=resume, x=x, y=y, x_test=x_test, y_test=y_test,
                       dataset=dataset, overwrite=overwrite, check_dir=write)
    with precision_context(prep.config.precision):
        return _run(prep.config, prep.dataset, out, overwrite, resume, progress, write, handle_signals, devices)


class _Signals:
    """SIGINT/SIGTERM -> a flag checked at each record (a second signal aborts at once)."""

    def __init__(self, enabled: bool):
        import signal
        import threading

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
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _is_finite_row(row) -> bool:
    return all(math.isfinite(row.get(k, 0.0)) for k in ("risk", "reg_risk", "grad_norm"))


def _run(cfg, dataset, out, overwrite, resume, progress, write, handle_signals, devices=None):
    from mfld import dynamics
    from mfld.app.lock import RunLock

    t_start = time.perf_counter()
    notes: list[str] = []
    created: list[Path] = []  # directories this run created (removed if it fails before writing)

    # ---- everything that can be a user mistake is checked before anything is written ----
    # (the config and the data were checked by mfld.app.inputs.prepare)
    if write and out is not None:
        check_out_dir(out, overwrite=overwrite, resume=resume)
    problem = build_problem(cfg, dataset)
    stepper = dynamics.Langevin(eta=cfg.dynamics.eta, scheme=cfg.dynamics.scheme,
                                batch_size=cfg.dynamics.batch_size, tau_schedule=cfg.dynamics.tau_schedule)
    state = dynamics.init_particles(problem, cfg.model.n_particles, cfg.seed, a_scale=cfg.model.init.a_scale,
                                    w_scale=cfg.model.init.w_scale, plus_fraction=cfg.model.init.plus_fraction)
    fingerprint = data_fingerprint(dataset)
    out_dir = Path(out) if out is not None else None
    lock = None
    signals = None
    wrote = False
    try:
        if write:  # the lock first: every check of the directory and every read of a resume under it
            if out_dir is None:
                out_dir = reserve_default_dir(cfg, created)
            else:
                created.extend(_missing_dirs(out_dir))
            lock = RunLock(out_dir)
            try:
                lock.acquire()
            except OSError as err:  # the directory cannot be made (a name too long, permissions ...)
                raise ConfigError(f"cannot create the run directory ({err.strerror or err})", field="--out",
                                  value=str(out_dir)) from None
            if lock.took_over:
                notes.append("took over a stale lock left by a process that is gone")
            # again under the lock: another run may have written the directory since the check
            check_out_dir(out_dir, overwrite=overwrite, resume=resume)
        prior = None
        resumed_from = None
        stored_optimum = None
        if resume and out_dir is not None:  # (write=False: another process of a multi-process run reads too)
            state, prior, resumed_from, stored_optimum = _read_resume(out_dir, cfg, problem, state, fingerprint,
                                                                      notes, clean=write)
        if write:
            if overwrite and not resume:
                _clear_dir(out_dir)
            wrote = True
            _write_config_and_env(out_dir, cfg, dataset, fingerprint, devices, resume, resumed_from)
            signals = _Signals(handle_signals)
        return _simulate_and_record(cfg, problem, dataset, stepper, state, prior, resumed_from, out_dir,
                                    write, progress, notes, signals, t_start, devices, resume, stored_optimum)
    except KeyboardInterrupt as err:
        err.run_dir = out_dir if wrote else None  # for the CLI's "resume with" line
        raise
    finally:
        if signals is not None:
            signals.restore()
        if lock is not None:
            lock.release()
        if not wrote:  # failed before writing anything: remove the directories this run made
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    pass


def _missing_dirs(d: Path) -> list[Path]:
    """``d`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    for q in [d, *d.parents]:
        if q.exists() or q.is_symlink() or str(q) in ("", "."):
            break
        missing.append(q)
    return list(reversed(missing))


def _write_config_and_env(out_dir, cfg, dataset, fingerprint, devices, resume, resumed_from):
    """The run's marker, config.yaml, env.json (and data.npz): the marker (with the integrity
    record of the new config and env, the old ones still accepted) first, then the files, then
    the marker again without the old ones -- a crash anywhere in between leaves a run that
    resumes."""
    import json

    config_text = cfg.to_yaml()
    env = rundir.environment(cfg.seed, cfg.precision)
    env["data_sha256"] = fingerprint
    env["particle_devices"] = _mesh_size(devices)
    previous = {}  # the digests of the files as they are now: accepted until the new ones are written
    if resume:
        if (out_dir / rundir.CONFIG).exists():
            previous[rundir.CONFIG] = rundir.digest(rundir.read_config(out_dir / rundir.CONFIG))
        env_old = read_run_env(out_dir)
        if env_old:
            previous[rundir.ENV] = rundir.digest(env_old)
            env_old = dict(env_old)
            env_old["resumes"] = list(env_old.get("resumes") or [])
            env_old["resumes"].append(
                {k: env[k] for k in ("argv", "jax", "jaxlib", "devices", "git", "x64")}
                | {"from_step": resumed_from, "time": _dt.datetime.now().isoformat(timespec="seconds")})
            env = env_old
    env_text = rundir.json_text(env)
    records = {rundir.CONFIG: rundir.digest(cfgmod.validate(cfgmod.safe_load(config_text)).to_dict()),
               rundir.ENV: rundir.digest(json.loads(env_text))}
    rundir.write_marker(out_dir, records, previous=previous)
    rundir.atomic_write_text(out_dir / rundir.CONFIG, config_text)
    rundir.atomic_write_text(out_dir / rundir.ENV, env_text)
    if previous:
        rundir.write_marker(out_dir, records)
    if dataset.meta.get("kind") == "arrays" and not (out_dir / rundir.DATA).exists():
        _save_arrays(out_dir / rundir.DATA, dataset)  # so that `mfld plot` can redraw


def _read_resume(out_dir, cfg, problem, state, fingerprint, notes, clean=True):
    """(state, prior metrics, resumed-from step, stored optimum or None) of the run in
    ``out_dir``, every file checked before anything is written (under the run's lock when
    writing): the marker's integrity record of config.yaml and env.json, the data's SHA-256,
    the checkpoint (shapes, dtype, key, a step that metrics.csv has a row for), metrics.csv and
    optimum.json. ``clean``: remove the temporary files of interrupted writes."""
    marker = rundir.read_marker(out_dir)
    if marker is None:
        notes.append("the run directory has no integrity record (written by an older mfld): config.yaml and "
                     "env.json were not verified")
    stored_cfg = rundir.read_config(out_dir / rundir.CONFIG)
    rundir.check_integrity(out_dir, rundir.CONFIG, stored_cfg, marker)
    env_old = read_run_env(out_dir)
    if env_old.get("data_sha256") not in (None, fingerprint):
        raise ConfigError("the data differ from the stored run's (SHA-256 mismatch)", field="--resume",
                          value=str(out_dir), allowed="the same data as the interrupted run")
    stored_optimum = _read_optimum(out_dir, problem) if cfg.record.optimum else None
    if (out_dir / rundir.CHECKPOINT).exists():
        state, prior, resumed_from = _read_checkpoint_and_metrics(out_dir, cfg, state)
    else:  # killed before the first checkpoint: start again from step 0
        notes.append("no checkpoint in the run directory: restarted from step 0")
        prior, resumed_from = None, 0
    if clean:  # every file checked: now the leftovers of interrupted writes can go
        removed = rundir.remove_temporaries(out_dir)
        if removed:
            notes.append(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                         + ", ".join(removed[:3]) + (" ..." if len(removed) > 3 else ""))
    return state, prior, resumed_from, stored_optimum


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


def _read_optimum(out_dir, problem):
    """The run's optimum.json (None if there is none), checked against the problem."""
    import json

    path = out_dir / rundir.OPTIMUM
    if not path.exists():
        return None
    d = rundir.read_json(path, required=("F_star", "F_star_err", "F_star_upper", "u", "f", "method", "mean", "cov"))
    allowed = "the optimum.json the run wrote"
    for k in ("F_star", "F_star_err", "F_star_upper"):
        if isinstance(d[k], bool) or not isinstance(d[k], (int, float)) or not math.isfinite(d[k]):
            raise rundir.RunFileError(path, f"key {k!r} is {d[k]!r:.40}, not a finite number", allowed)
    n = int(problem.n)
    for k in ("u", "f"):
        if not (isinstance(d[k], list) and len(d[k]) == n and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in d[k])):
            raise rundir.RunFileError(path, f"key {k!r} is not a list of {n} finite numbers (one per data point)",
                                      allowed)
    if d["method"] not in ("closed_form", "quadrature", "mc"):
        raise rundir.RunFileError(path, f"key 'method' is {d['method']!r:.40}", "closed_form, quadrature or mc")
    try:
        mean = np.asarray(d["mean"], dtype=np.float64)
        cov = np.asarray(d["cov"], dtype=np.float64)
        ok = mean.ndim == 1 and cov.shape == (mean.size, mean.size) and np.all(np.isfinite(cov))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise rundir.RunFileError(path, "keys 'mean' and 'cov' are not a vector and a matching square matrix",
                                  allowed)
    pf = d.get("plus_fraction", 0.5)
    if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 <= pf <= 1:
        raise rundir.RunFileError(path, f"key 'plus_fraction' is {pf!r:.40}", "a number in [0, 1]")
    if not isinstance(d.get("info", {}), dict):
        raise rundir.RunFileError(path, "key 'info' is not an object", allowed)
    from mfld.optimum import Optimum

    try:
        return Optimum.from_json(json.dumps(d), problem=problem)
    except Exception as err:  # noqa: BLE001 - whatever else is wrong with it: one line
        raise rundir.RunFileError(path, f"not usable ({type(err).__name__})", allowed) from None


def _mesh_size(devices) -> int:
    """The number of devices the particles are sharded over (1: not sharded)."""
    import jax

    if jax.process_count() > 1:
        return len(jax.devices())
    return int(devices or 1)


class _RecordHook:
    """The callback of :func:`mfld.loop.simulate` at each record: divergence check,
    certificates, snapshots, periodic checkpoints and the signal flag.

    ``status`` (``value``, ``reason``, and ``diverged_at_step`` or ``signal``) says how the run
    ended; ``last_good``/``last_good_step`` are the last finite state and its step. ``hist`` is
    the History the simulation appends the rows to (a checkpoint writes it with ``prior``).
    """

    def __init__(self, cfg, out_dir, write, signals, prior, state, hist, certify=None):
        self.rec = cfg.record
        self.out_dir, self.write, self.signals, self.prior, self.hist = out_dir, write, signals, prior, hist
        self.certify = certify
        self.status = {"value": "completed", "reason": None}
        self.last_good, self.last_good_step = state, int(state.step)
        # wall_time continues across resumes (it is not part of the bit-for-bit contract)
        self.wall_offset = (float(prior["wall_time"][-1]) if prior and "wall_time" in prior and len(prior["step"])
                            else 0.0)

    def __call__(self, s, row) -> bool:
        import jax
        import jax.numpy as jnp

        rec, status = self.rec, self.status
        if "wall_time" in row:
            row["wall_time"] += self.wall_offset
        if not (_is_finite_row(row) and bool(jnp.all(jnp.isfinite(s.w))) and bool(jnp.all(jnp.isfinite(s.a)))):
            status["value"] = "diverged"
            status["reason"] = f"non-finite particles or risk at step {row['step']}"
            status["diverged_at_step"] = row["step"]
            return True
        self.last_good, self.last_good_step = s, row["step"]
        step = row["step"]
        if self.certify is not None and step % rec.certify_every == 0:
            row.update(self.certify(s))
        if self.write and rec.snapshot_every and step % rec.snapshot_every == 0:
            rundir.save_checkpoint(self.out_dir / "snapshots" / f"step_{step:09d}.npz", s.a, s.w, step,
                                   jax.random.key_data(s.key))
        stop = self.signals is not None and self.signals.signum is not None
        if self.write and not stop and rec.checkpoint_every and step % rec.checkpoint_every == 0 and step > 0:
            self._checkpoint(s, row)
        if stop:
            status["value"] = "interrupted"
            status["reason"] = f"signal {self.signals.signum} at step {step}"
            status["signal"] = self.signals.signum
        return stop

    def _checkpoint(self, s, row):
        from mfld import loop

        rows = loop.History({k: list(v) for k, v in self.hist.columns.items()})
        rows.append(row)
        # metrics first, then the checkpoint: a kill in between leaves metrics rows beyond the
        # checkpoint, which a resume truncates; the other order would lose rows.
        rundir.write_metrics(self.out_dir / rundir.METRICS, _merge(self.prior, rows.columns))
        _checkpoint(self.out_dir, s)


def _optimum_and_certify(cfg, problem, state, out_dir, write, resume, notes, stored_optimum=None):
    """(optimum or None, certify(state) -> dict or None) as ``record`` asks and the theory allows
    (``stored_optimum``: a resumed run's optimum.json, read and checked before anything was written)."""
    rec = cfg.record
    cert_reason = certificates_available(problem) if rec.certify_every or rec.optimum else None
    if cert_reason:
        notes.append(cert_reason)
        return None, None
    # the fixed output layer's sign fraction as the particles have it: round(pf N) / N, not pf
    plus_fraction = (float(np.mean(np.asarray(state.a) > 0)) if problem.output == "fixed"
                     else cfg.model.init.plus_fraction)
    optimum = None
    if rec.optimum:
        if resume and stored_optimum is not None:  # a resume keeps the run's F* (no second solve)
            optimum = stored_optimum
        else:
            from mfld.optimum import solve_optimum

            optimum = solve_optimum(problem, seed=cfg.seed, plus_fraction=plus_fraction)
            if "fallback" in optimum.info:
                notes.append(f"optimum: {optimum.info['fallback']}")
            if write:
                rundir.atomic_write_text(out_dir / rundir.OPTIMUM, optimum.to_json())
    certify = None
    if rec.certify_every:
        from mfld.duality import certify as _certify

        def certify(s):
            return _certify(problem, s.a, s.w, method=rec.certify_method, n_samples=rec.certify_samples,
                            seed=cfg.seed, optimum=optimum, plus_fraction=plus_fraction)
    return optimum, certify


def _simulate_and_record(cfg, problem, dataset, stepper, state, prior, resumed_from, out_dir, write,
                         progress, notes, signals, t_start, devices=None, resume=False, stored_optimum=None):
    import jax

    from mfld import loop

    # ---- certificates and the optimum (issue: certified global optimality) ------------
    rec = cfg.record
    optimum, certify = _optimum_and_certify(cfg, problem, state, out_dir, write, resume, notes, stored_optimum)
    initial_state = state
    hist = loop.History()
    hook = _RecordHook(cfg, out_dir, write, signals, prior, state, hist, certify)
    status = hook.status

    show = rec.progress if progress is None else progress
    remaining = max(cfg.dynamics.steps - int(state.step), 0)
    if resumed_from is not None and remaining == 0:
        notes.append(f"nothing to do: the run is already at step {int(state.step)} of {cfg.dynamics.steps}")
    try:
        simulate = loop.simulate
        if _mesh_size(devices) > 1:  # particles sharded; callbacks and the result see gathered copies
            from functools import partial

            from mfld import sharding

            simulate = partial(sharding.simulate_local, n_devices=None if jax.process_count() > 1 else devices)
        state, hist = simulate(problem, state, stepper, remaining, record_every=rec.every,
                               chunk=cfg.dynamics.chunk, callback=hook, progress=show,
                               record_initial=prior is None, history=hist)
    except BaseException as err:  # keep the run directory consistent: say what happened, then re-raise
        if write:
            interrupted = isinstance(err, KeyboardInterrupt)
            status["value"] = "interrupted" if interrupted else "failed"
            status["reason"] = ("second signal: stopped without a new checkpoint" if interrupted
                                else f"{type(err).__name__}: {err}")
            summary = _summary(cfg, _merge(prior, {}), status, time.perf_counter() - t_start, notes, optimum)
            summary["checkpoint_step"] = _checkpoint_step(out_dir)
            summary["notes"] = notes
            rundir.write_json(out_dir / rundir.SUMMARY, summary)
        raise
    metrics = _merge(prior, hist.columns)
    if status["value"] == "diverged":
        state = hook.last_good
        keep = [i for i, st in enumerate(metrics.get("step", [])) if st <= hook.last_good_step]
        metrics = {k: [v[i] for i in keep] for k, v in metrics.items()}
    summary = _summary(cfg, metrics, status, time.perf_counter() - t_start, notes, optimum)
    if resumed_from is not None:
        summary["resumed_from_step"] = resumed_from
    if status["value"] == "diverged":
        summary["last_good_step"] = hook.last_good_step
        # the curvature where the run started and where it was last finite (often already blowing up)
        suggestion = suggest_step_size(problem, cfg.dynamics.eta, [initial_state, hook.last_good])
        summary["suggested_eta"] = suggestion["eta"]
        summary["curvature"] = suggestion["curvature"]
        notes.append(f"the run diverged ({status['reason']}); the last finite state (step {hook.last_good_step}) is "
                     f"checkpointed; {suggestion['why']}: rerun with --set dynamics.eta={suggestion['eta']:.3g} "
                     f"--overwrite")
    if status["value"] == "completed":
        note = _convergence_note(cfg, problem, metrics, [initial_state, state])
        if note:
            summary["not_converging"] = True
            notes.append(note)
    notes.extend(guards.run_notes(cfg.precision, metrics, np.asarray(state.a), np.asarray(state.w),
                                  problem=problem, certified=certify is not None))
    if write:
        if metrics:
            rundir.write_metrics(out_dir / rundir.METRICS, metrics)
        _checkpoint(out_dir, state)
        summary["checkpoint_step"] = int(state.step)
        summary["notes"] = notes
        rundir.write_json(out_dir / rundir.SUMMARY, summary)  # the numbers first, the figures after
        from mfld.app import plots

        try:
            figs = plots.make_figures(out_dir, problem=problem, dataset=dataset, a=np.asarray(state.a),
                                      w=np.asarray(state.w), metrics=metrics, optimum=optimum)
            summary["figures"] = figs
        except Exception as err:  # a figure must never lose a run's numbers
            notes.append(f"figures failed: {type(err).__name__}: {err}")
        summary["notes"] = notes
        summary["run_time_s"] = time.perf_counter() - t_start
        rundir.write_json(out_dir / rundir.SUMMARY, summary)
    return RunResult(cfg, problem, state, rundir.Metrics({k: np.asarray(v) for k, v in metrics.items()}),
                     summary, out_dir, dataset, optimum, notes)


def _save_arrays(path, dataset):
    import io

    arrays = {k: np.asarray(getattr(dataset, k)) for k in ("x", "y", "x_test", "y_test")
              if getattr(dataset, k) is not None}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rundir.atomic_write_bytes(path, buf.getvalue())


def _restore(path, template):
    """The ParticleState of a checkpoint, checked against the config's particle shapes and dtype."""
    import jax
    import jax.numpy as jnp

    from mfld import dynamics

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


def _read_json(path) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _checkpoint(out_dir, s):
    import jax

    rundir.save_checkpoint(out_dir / rundir.CHECKPOINT, s.a, s.w, int(s.step), jax.random.key_data(s.key))


def _merge(prior, cols) -> dict:
    cols = {k: list(v) for k, v in (cols or {}).items()}
    if not prior:
        return cols
    n_prior = len(prior["step"])
    n_new = len(next(iter(cols.values()), []))
    keys = list(prior) + [k for k in cols if k not in prior]
    return {k: list(prior.get(k, [float("nan")] * n_prior)) + list(cols.get(k, [float("nan")] * n_new))
            for k in keys}


def _summary(cfg, metrics, status, wall, notes, optimum) -> dict:
    s = {"status": status["value"], "reason": status["reason"], "run_time_s": wall, "name": cfg.name,
         "steps": cfg.dynamics.steps}
    for k in ("diverged_at_step", "signal"):
        if k in status:
            s[k] = status[k]
    if metrics and len(metrics.get("step", [])):
        s["final"] = {k: (int(v[-1]) if k == "step" else float(v[-1])) for k, v in metrics.items()}
    if optimum is not None:
        s["F_star"] = float(optimum.F_star)
        s["F_star_err"] = float(optimum.F_star_err)
        s["F_star_method"] = optimum.method
    return s


def _clear_dir(out_dir: Path):
    """Empty a run directory for --overwrite, keeping our own lock file. Only ever called on a
    directory that holds an mfld run (:func:`mfld.app.inputs.check_out_dir`, under the lock);
    symbolic links are removed, never followed."""
    import shutil

    from mfld.app.inputs import _entries

    if not _entries(out_dir):
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


#: Particles the non-convergence check's curvature is estimated on (a mean-field curvature does
#: not depend on N; a subsample keeps the check cheap for large runs).
CURVATURE_SUBSAMPLE = 4096


def _convergence_note(cfg, problem, metrics, states) -> str | None:
    """A note for a completed run that is not converging: its duality gap did not fall over
    the last half of the run (the median of the last quarter of the records is not below 0.7
    times that of the quarter before) and the step exceeds the linear stability limit 2/mu at
    the final state (:func:`mfld.stability.drift_curvature`): the particles oscillate. The note
    names a stable step (:func:`mfld.stability.suggest_step_size`). None otherwise, and when
    fewer than 8 records have a gap."""
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
    stride = -(-int(states[-1].a.shape[0]) // CURVATURE_SUBSAMPLE)  # every k-th particle: both sign groups
    sub = [s._replace(a=s.a[::stride], w=s.w[::stride]) for s in states]
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
