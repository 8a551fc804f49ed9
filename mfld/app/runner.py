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
from mfld.app import rundir
from mfld.errors import ConfigError


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


def resolve_config(config=None, overrides=None) -> cfgmod.Config:
    """Accept a Config, a dict, a YAML path or None (defaults), then apply overrides."""
    if isinstance(config, cfgmod.Config):
        return cfgmod.validate(cfgmod.apply_overrides(config.to_dict(), overrides))
    if config is None or isinstance(config, dict):
        return cfgmod.validate(cfgmod.apply_overrides(config or {}, overrides))
    return cfgmod.load(config, overrides)


def make_dataset(cfg: cfgmod.Config, x=None, y=None, x_test=None, y_test=None):
    from mfld import data

    if x is not None or y is not None:
        if x is None or y is None:
            raise ConfigError("give both x and y", field="data")
        return data.Dataset(np.asarray(x), np.asarray(y),
                            None if x_test is None else np.asarray(x_test),
                            None if y_test is None else np.asarray(y_test), {"kind": "arrays"})
    seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    if hasattr(data, "make_dataset"):
        return data.make_dataset(cfg.data.kind, seed=seed, **cfg.data.params)
    if cfg.data.kind != "teacher_student":  # pragma: no cover - transitional
        raise ConfigError("data kind not available", field="data.kind", value=cfg.data.kind)
    return data.teacher_student(seed=seed, **cfg.data.params)


def build_problem(cfg: cfgmod.Config, dataset):
    from mfld.problem import Problem

    return Problem.create(dataset.x, dataset.y, activation=cfg.model.activation, loss=cfg.objective.loss,
                          lam=cfg.objective.lam, tau=cfg.objective.tau, bias=cfg.model.bias,
                          output=cfg.model.output, r_out=cfg.model.r_out, scaling=cfg.model.scaling,
                          x_test=dataset.x_test, y_test=dataset.y_test)


def precision_context(precision: str):
    """A scoped x64 context when float64 is asked for and not already on (never global)."""
    import jax

    if precision == "float64" and not jax.config.jax_enable_x64:
        return jax.enable_x64(True)
    if precision == "float32" and jax.config.jax_enable_x64:
        return jax.enable_x64(False)
    return contextlib.nullcontext()


def default_out_dir(cfg: cfgmod.Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def certificates_available(problem) -> str | None:
    """None if the certificates are defined for this problem, else the reason they are not."""
    if problem.tau <= 0:
        return "certificates need tau > 0 (the entropy term, rho_hat and the dual are undefined at tau = 0)"
    if problem.scaling != "mean_field":
        return "certificates are defined for the mean-field scaling only (no free energy under NTK scaling)"
    try:
        import mfld.duality  # noqa: F401
    except ImportError:
        return "the duality module is not available"
    return None


def run(config=None, *, overrides=None, x=None, y=None, x_test=None, y_test=None, out=None,
        overwrite: bool = False, resume: bool = False, progress: bool | None = None,
        write: bool = True) -> RunResult:
    """Train a mean-field two-layer network by noisy gradient descent and record everything.

    Args:
        config: a :class:`mfld.config.Config`, a dict of config sections, a YAML path, or None.
        overrides: dotted overrides, e.g. ``{"objective.tau": 0.01}`` or ``["objective.tau=0.01"]``.
        x, y (, x_test, y_test): a user's own data as arrays (replaces the ``data`` section).
        out: run directory (default ``runs/<name>-<timestamp>``); ``write=False`` writes nothing.
        overwrite / resume: what to do when ``out`` already holds a run.
    """
    cfg = resolve_config(config, overrides)
    with precision_context(cfg.precision):
        return _run(cfg, x, y, x_test, y_test, out, overwrite, resume, progress, write)


def _run(cfg, x, y, x_test, y_test, out, overwrite, resume, progress, write):
    import jax
    import jax.numpy as jnp

    from mfld import dynamics

    t_start = time.perf_counter()
    notes: list[str] = []
    out_dir = Path(out) if out is not None else (default_out_dir(cfg) if write else None)
    if write:
        _prepare_dir(out_dir, overwrite, resume)
    dataset = make_dataset(cfg, x, y, x_test, y_test)
    problem = build_problem(cfg, dataset)
    stepper = dynamics.Langevin(eta=cfg.dynamics.eta, scheme=cfg.dynamics.scheme,
                                batch_size=cfg.dynamics.batch_size, tau_schedule=cfg.dynamics.tau_schedule)
    state = dynamics.init_particles(problem, cfg.model.n_particles, cfg.seed, a_scale=cfg.model.init.a_scale,
                                    w_scale=cfg.model.init.w_scale, plus_fraction=cfg.model.init.plus_fraction)
    prior = None
    if write and resume and (out_dir / rundir.CHECKPOINT).exists():
        ck = rundir.load_checkpoint(out_dir / rundir.CHECKPOINT)
        state = dynamics.ParticleState(jnp.asarray(ck["a"], state.a.dtype), jnp.asarray(ck["w"], state.w.dtype),
                                       jnp.asarray(int(ck["step"]), jnp.int32),
                                       jax.random.wrap_key_data(jnp.asarray(ck["key_data"])))
        if (out_dir / rundir.METRICS).exists():
            prior = rundir.read_metrics(out_dir / rundir.METRICS)
            keep = prior["step"] <= int(ck["step"])
            prior = {k: v[keep] for k, v in prior.items()}
    if write:
        rundir.atomic_write_text(out_dir / rundir.CONFIG, cfg.to_yaml())
        rundir.write_json(out_dir / rundir.ENV, rundir.environment(cfg.seed, cfg.precision))

    # ---- certificates and the optimum (issue: certified global optimality) ------------
    rec = cfg.record
    cert_reason = certificates_available(problem) if rec.certify_every or rec.optimum else None
    if cert_reason and (rec.certify_every or rec.optimum):
        notes.append(cert_reason)
    optimum = None
    if rec.optimum and cert_reason is None:
        from mfld.optimum import solve_optimum

        optimum = solve_optimum(problem)
        if write:
            rundir.atomic_write_text(out_dir / rundir.OPTIMUM, optimum.to_json())
    certify = None
    if rec.certify_every and cert_reason is None:
        from mfld.duality import certify as _certify

        def certify(s):
            return _certify(problem, s.a, s.w, method=rec.certify_method, n_samples=rec.certify_samples,
                            seed=cfg.seed, optimum=optimum, plus_fraction=cfg.model.init.plus_fraction)

    status = {"value": "completed", "reason": None}
    last_good = {"state": state}
    hist = dynamics.History()

    def callback(s, row):
        if not (math.isfinite(row["risk"]) and bool(jnp.all(jnp.isfinite(s.w))) and
                bool(jnp.all(jnp.isfinite(s.a)))):
            status["value"] = "diverged"
            status["reason"] = f"non-finite particles or risk at step {row['step']}"
            return True
        last_good["state"] = s
        step = row["step"]
        if certify is not None and step % rec.certify_every == 0:
            row.update(certify(s))
        if write and rec.snapshot_every and step % rec.snapshot_every == 0:
            rundir.save_checkpoint(out_dir / "snapshots" / f"step_{step:09d}.npz", s.a, s.w, step,
                                   jax.random.key_data(s.key))
        if write and rec.checkpoint_every and step % rec.checkpoint_every == 0 and step > 0:
            _checkpoint(out_dir, s)
            rows = dynamics.History({k: list(v) for k, v in hist.columns.items()})
            rows.append(row)
            rundir.write_metrics(out_dir / rundir.METRICS, _merge(prior, rows.columns))
        return False

    show = rec.progress if progress is None else progress
    remaining = max(cfg.dynamics.steps - int(state.step), 0)
    state, hist = dynamics.simulate(problem, state, stepper, remaining, record_every=rec.every,
                                    chunk=cfg.dynamics.chunk, callback=callback, progress=show,
                                    record_initial=prior is None, history=hist)
    if status["value"] == "diverged":
        state = last_good["state"]
    metrics = _merge(prior, hist.columns)
    summary = _summary(cfg, metrics, status, time.perf_counter() - t_start, notes, optimum)
    if status["value"] == "diverged":
        summary["suggested_eta"] = cfg.dynamics.eta / 2
        notes.append(f"the run diverged ({status['reason']}); try dynamics.eta={cfg.dynamics.eta / 2:g} "
                     f"(half the step; the weight-decay part alone needs eta < 2/lam = {2 / cfg.objective.lam:g})")
    if write:
        _checkpoint(out_dir, state)
        if metrics:
            rundir.write_metrics(out_dir / rundir.METRICS, metrics)
        from mfld.app import plots

        try:
            figs = plots.make_figures(out_dir, problem=problem, dataset=dataset, a=np.asarray(state.a),
                                      w=np.asarray(state.w), metrics=metrics, optimum=optimum)
            summary["figures"] = figs
        except Exception as err:  # a figure must never lose a run's numbers
            notes.append(f"figures failed: {type(err).__name__}: {err}")
        summary["notes"] = notes
        rundir.write_json(out_dir / rundir.SUMMARY, summary)
    return RunResult(cfg, problem, state, rundir.Metrics({k: np.asarray(v) for k, v in metrics.items()}),
                     summary, out_dir, dataset, optimum, notes)


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
    s = {"status": status["value"], "reason": status["reason"], "run_time_s": wall, "name": cfg.name}
    if metrics and metrics.get("step"):
        s["final"] = {k: (v[-1] if k == "step" else float(v[-1])) for k, v in metrics.items()}
    if optimum is not None:
        s["F_star"] = float(optimum.F_star)
        s["F_star_err"] = float(optimum.F_star_err)
    return s


def _prepare_dir(out_dir: Path, overwrite: bool, resume: bool):
    import shutil

    if out_dir.exists() and any(out_dir.iterdir()):
        if resume:
            return
        if not overwrite:
            raise ConfigError("run directory already exists and is not empty", field="--out", value=str(out_dir),
                              allowed="a new directory, or --resume / --overwrite")
        shutil.rmtree(out_dir)
    elif resume:
        raise ConfigError("nothing to resume: no run in this directory", field="--resume", value=str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)

