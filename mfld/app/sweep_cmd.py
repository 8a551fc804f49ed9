"""``mfld sweep CONFIG --grid tau=0.01,0.02 --grid lam=0.1 --seeds K [--resume] [--quiet]``.

Runs every member of the grid (lam, tau, eta and seeds; shapes are shared) in one compiled,
vmapped call (:func:`mfld.sweep.run`) and writes::

    OUT/<member label>/      one run directory per member, the files of `mfld run`: config.yaml,
                             env.json, metrics.csv (with the certificate columns the config asks
                             for), optimum.json, checkpoint.npz, summary.json -- so `mfld plot`
                             works on a member (figures are drawn on demand, not per member)
    OUT/sweep.csv            one row per member: status and final records (gap, dual_lower, ...)
    OUT/figures/risk_<lam,tau,eta>.png   mean and min-max band over seeds of the risks and
                             (below) of the certified gap primal_upper - dual_lower
    OUT/sweep.json           the plan (config, grid, seeds), members, status and the environment
    OUT/.sweep_checkpoint.npz  the stacked states of the last checkpoint (for --resume)

Certificates: each member records those of its config (``record.certify_every``,
``certify_method``, ``certify_samples``), computed exactly as ``mfld run`` computes them for
that member (:func:`mfld.app.runner._optimum_and_certify`: seed = the member's seed). The
optimum F* is solved once per distinct (lam, tau) (the data are shared; seed = the sweep's
``seed``, i.e. that of the group's first member) and written to each member's optimum.json.

Resume: at every ``record.checkpoint_every`` steps the members' metrics.csv are written, then
the stacked states (one file, atomically): a killed sweep continues with
``mfld sweep ... --out OUT --resume`` (same config, grid and seeds) and ends with the same
numbers as an uninterrupted one. A member is complete when its summary.json is written
(atomically, last). Exit status: 0, or 3 (as ``mfld run``) when a member diverged.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mfld import config as cfgmod
from mfld.errors import ConfigError

GRID_KEYS = {"tau": "objective.tau", "lam": "objective.lam", "eta": "dynamics.eta"}
SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_CHECKPOINT = ".sweep_checkpoint.npz"


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the sweep directory and each member's status."""

    out: Path
    statuses: dict = field(default_factory=dict)  # member label -> completed / diverged

    @property
    def diverged(self) -> list[str]:
        return [k for k, v in self.statuses.items() if v == "diverged"]


def parse_grid(items) -> dict:
    """``["tau=0.01,0.02", "lam=0.1"]`` -> ``{"tau": [0.01, 0.02], "lam": [0.1]}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("expected NAME=V1,V2,...", field="--grid", value=item,
                              allowed=", ".join(GRID_KEYS))
        name, vals = item.split("=", 1)
        name = name.strip()
        if name not in GRID_KEYS:
            raise ConfigError("cannot sweep this setting", field="--grid", value=name, allowed=", ".join(GRID_KEYS))
        if name in out:
            raise ConfigError("given twice", field="--grid", value=name, allowed="one --grid per setting")
        try:
            out[name] = [float(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise ConfigError("values must be numbers", field=f"--grid {name}", value=vals) from None
        if not out[name]:
            raise ConfigError("no values", field=f"--grid {name}", value=vals)
        labels = [f"{v:g}" for v in out[name]]  # member directories are named with 6 digits
        dup = next((v for v, lab in zip(out[name], labels, strict=True) if labels.count(lab) > 1), None)
        if dup is not None:
            raise ConfigError("duplicate value (or equal to 6 significant digits)", field=f"--grid {name}",
                              value=dup, allowed="distinct values")
    return out


def _bar(show: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not show, dynamic_ncols=True, leave=False, **kw)


def run_sweep(config, overrides, grid_items, seeds: int, out, *, resume: bool = False,
              progress: bool = True) -> SweepResult:
    """The sweep of ``mfld sweep`` (see the module docstring). ``progress``: tqdm bars per
    stage on stderr, shown only when stderr is a terminal and ``record.progress`` is on."""
    from mfld.app import inputs, runner
    from mfld.app.lock import LOCK, RunLock

    t_start = time.perf_counter()
    cfg = cfgmod.load(config, list(overrides))
    grid = parse_grid(grid_items)
    if int(seeds) < 1:
        raise ConfigError("must be a positive integer", field="--seeds", value=seeds)
    dataset = inputs.make_dataset(cfg)
    inputs.check_data(cfg, dataset)
    if out is None and resume:
        raise ConfigError("--resume needs the sweep directory", field="--out", allowed="--out DIR of the sweep")
    out = Path(out) if out else runner.default_out_dir(cfg).with_name(runner.default_out_dir(cfg).name + "-sweep")
    plan = _plan(cfg, grid, seeds)
    if out.exists() and not out.is_dir():
        raise ConfigError("sweep directory path is a file", field="--out", value=str(out))
    if resume:
        _check_resumable(out, plan)
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise ConfigError("output directory exists and is not empty", field="--out", value=str(out),
                          allowed="a new or empty directory, or --resume to continue the sweep there")
    show = bool(progress) and cfg.record.progress and sys.stderr.isatty()
    lock = RunLock(out)
    lock.acquire()
    try:
        with runner.precision_context(cfg.precision):
            return _sweep(cfg, dataset, grid, int(seeds), out, plan, resume, show, t_start)
    finally:
        lock.release()


def _plan(cfg, grid, seeds) -> dict:
    from mfld.app import rundir

    c = cfg.to_dict()
    c.get("record", {}).pop("progress", None)  # may change on resume
    return json.loads(json.dumps(rundir.jsonable({"config": c, "grid": grid, "seeds": int(seeds)})))


def _check_resumable(out: Path, plan: dict):
    try:
        stored = json.loads((out / SWEEP_JSON).read_text())
    except (OSError, ValueError):
        raise ConfigError("no sweep to resume there (no readable sweep.json)", field="--resume",
                          value=str(out), allowed="the --out directory of an interrupted mfld sweep") from None
    if not isinstance(stored, dict) or stored.get("plan") != plan:
        raise ConfigError("the config, grid or seeds differ from those of the stored sweep", field="--resume",
                          value=str(out), allowed="the same config, --set, --grid and --seeds as before")


def _member_config(cfg, m):
    """Member ``m``'s config: the sweep's, with its lam, tau, eta and seed; the data seed is
    pinned to the sweep's (the data are shared; default data.seed = the run seed)."""
    data_seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    return cfgmod.validate(cfgmod.apply_overrides(cfg.to_dict(), [f"data.seed={data_seed}",
        f"objective.lam={m.lam!r}", f"objective.tau={m.tau!r}", f"dynamics.eta={m.eta!r}", f"seed={m.seed}",
        f"name={cfg.name}-{m.label()}"]))


def _sweep(cfg, dataset, grid, seeds, out, plan, resume, show, t_start) -> SweepResult:
    import jax
    import jax.numpy as jnp

    from mfld import dynamics, loop, sweep
    from mfld.app import inputs, rundir, runner

    problem = inputs.build_problem(cfg, dataset)
    stepper = dynamics.Langevin(cfg.dynamics.eta, scheme=cfg.dynamics.scheme,
                                batch_size=cfg.dynamics.batch_size, tau_schedule=cfg.dynamics.tau_schedule)
    members = sweep.grid(problem, stepper, lam=grid.get("lam"), tau=grid.get("tau"), eta=grid.get("eta"),
                         seeds=seeds, seed0=cfg.seed)
    n_mem, rec, stop = len(members), cfg.record, cfg.dynamics.steps
    init = dict(a_scale=cfg.model.init.a_scale, w_scale=cfg.model.init.w_scale,
                plus_fraction=cfg.model.init.plus_fraction)
    env = rundir.environment(cfg.seed, cfg.precision)
    if not resume:
        rundir.write_json(out / SWEEP_JSON, {"plan": plan, "status": "running", "members": [m.label() for m in members],
                                             "environment": env})
    env["data_sha256"] = inputs.data_fingerprint(dataset)
    dirs = [out / m.label() for m in members]
    mcfgs = [_member_config(cfg, m) for m in members]
    problems = [inputs.build_problem(c, dataset) for c in mcfgs]
    for m, d, c in zip(members, dirs, mcfgs, strict=True):  # each member: a run directory of its own
        if not (d / rundir.CONFIG).exists():
            rundir.atomic_write_text(d / rundir.CONFIG, c.to_yaml())
        if not (d / rundir.ENV).exists():
            rundir.write_json(d / rundir.ENV, env | {"seed": m.seed, "sweep": str(out)})

    # ---- the optimum once per (lam, tau), the certify function of each member --------
    notes = [[] for _ in members]
    optima, certifiers, first_of = [None] * n_mem, [None] * n_mem, {}
    for i, m in enumerate(members):
        first_of.setdefault((m.lam, m.tau), i)
    with _bar(show, total=n_mem, desc="optimum and certificates", unit="member") as bar:
        for i, m in enumerate(members):
            j = first_of[(m.lam, m.tau)]
            if i != j and (dirs[j] / rundir.OPTIMUM).exists() and not (dirs[i] / rundir.OPTIMUM).exists():
                rundir.atomic_write_bytes(dirs[i] / rundir.OPTIMUM, (dirs[j] / rundir.OPTIMUM).read_bytes())
            s0 = dynamics.init_particles(problems[i], cfg.model.n_particles, m.seed, **init)
            # a stored optimum.json is read (resume=True), else the group's first member solves it
            stored = runner._read_optimum(dirs[i], problems[i]) if mcfgs[i].record.optimum else None
            optima[i], certifiers[i] = runner._optimum_and_certify(mcfgs[i], problems[i], s0, dirs[i], i == j,
                                                                   True, notes[i], stored)
            bar.update(1)

    # ---- resume: the stacked states of the last checkpoint and the metrics up to it ---
    tracker = _Tracker(n_mem)
    state, priors = None, [None] * n_mem
    ck_path = out / SWEEP_CHECKPOINT
    if resume and ck_path.exists():
        try:
            ck = rundir.load_checkpoint(ck_path, stacked=True)
            step = int(ck["step"])
            state = dynamics.ParticleState(jnp.asarray(ck["a"]), jnp.asarray(ck["w"]),
                                           jnp.full((n_mem,), step, jnp.int32),
                                           jax.random.wrap_key_data(jnp.asarray(ck["key_data"])))
            tracker.restore(ck)
            for i, d in enumerate(dirs):
                prior = rundir.read_metrics(d / rundir.METRICS)
                keep = prior["step"] <= step  # rows after the checkpoint are recomputed
                priors[i] = {k: v[keep] for k, v in prior.items()}
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint is a user-facing problem
            raise ConfigError(f"cannot read the sweep checkpoint or a member's metrics ({type(err).__name__})",
                              field="--resume", value=str(out), allowed="a sweep directory mfld sweep wrote") from None
    hists = [loop.History() for _ in members]
    offsets = [float(p["wall_time"][-1]) if p and "wall_time" in p and len(p["step"]) else 0.0 for p in priors]

    def save(states, step, rows=None):
        """Members' metrics (with ``rows``, the record being taken) first, then the stacked
        states (a kill in between: the resume drops the metrics rows after the checkpoint)."""
        for i, d in enumerate(dirs):
            h = loop.History({k: list(v) for k, v in hists[i].columns.items()})
            if rows is not None:
                h.append(rows[i])
            rundir.write_metrics(d / rundir.METRICS, runner._merge(priors[i], h.columns))
        rundir.save_checkpoint(ck_path, states.a, states.w, step, jax.random.key_data(states.key),
                               extra=tracker.arrays())

    def on_record(states, rows):
        step = rows[0]["step"]
        a_all, w_all = np.asarray(states.a), np.asarray(states.w)
        key_all = np.asarray(jax.random.key_data(states.key))
        for i, row in enumerate(rows):
            row["wall_time"] += offsets[i]
            ok = runner._is_finite_row(row) and bool(np.all(np.isfinite(a_all[i])) and np.all(np.isfinite(w_all[i])))
            tracker.see(i, ok, step, a_all[i], w_all[i], key_all[i])
            if ok and not tracker.diverged(i) and certifiers[i] is not None and step % rec.certify_every == 0:
                row.update(certifiers[i](SimpleNamespace(a=a_all[i], w=w_all[i])))
        bar.set_postfix(diverged=int(np.sum(tracker.diverged_at >= 0)), refresh=False)
        if rec.checkpoint_every and step % rec.checkpoint_every == 0 and 0 < step < stop:
            save(states, step, rows)

    start = 0 if state is None else int(state.step[0])
    with _bar(show, total=stop, initial=start, desc=f"sweep of {n_mem} members", unit="step") as bar:
        final, _ = sweep.run(problem, stepper, members, cfg.model.n_particles, stop, record_every=rec.every,
                             chunk=cfg.dynamics.chunk, init_kwargs=init, callback=on_record, state=state,
                             progress=bar, histories=hists, record_initial=state is None)
    if start < stop or state is None:
        save(final, stop)

    # ---- finish each member: metrics, checkpoint, summary (last: the member is complete) ----
    statuses = {}
    rows = []
    a_fin, w_fin = np.asarray(final.a), np.asarray(final.w)
    key_fin = np.asarray(jax.random.key_data(final.key))
    with _bar(show, total=n_mem, desc="writing members", unit="member") as bar:
        for i, (m, d, c) in enumerate(zip(members, dirs, mcfgs, strict=True)):
            metrics = runner._merge(priors[i], hists[i].columns)
            status = {"value": "completed", "reason": None}
            a, w, step, key = a_fin[i], w_fin[i], stop, key_fin[i]
            if tracker.diverged(i):
                good = int(tracker.good_step[i])
                status = {"value": "diverged", "diverged_at_step": int(tracker.diverged_at[i]),
                          "reason": f"non-finite particles or risk at step {int(tracker.diverged_at[i])}"}
                metrics = {k: [v for v, st in zip(col, metrics["step"], strict=True) if st <= good]
                           for k, col in metrics.items()}
                if tracker.good_a is not None:  # (None: not finite even at the start)
                    a, w, step, key = tracker.good_a[i], tracker.good_w[i], good, tracker.good_key[i]
            rundir.write_metrics(d / rundir.METRICS, metrics)
            rundir.save_checkpoint(d / rundir.CHECKPOINT, a, w, step, key)
            summary = runner._summary(c, metrics, status, time.perf_counter() - t_start, notes[i], optima[i])
            summary["checkpoint_step"] = int(step)
            summary["member"] = dict(m.__dict__)
            summary["sweep"] = str(out)
            if tracker.diverged(i):
                summary["last_good_step"] = int(step)
                notes[i].append(f"the member diverged ({status['reason']}); the last finite state (step {step}) "
                                f"is checkpointed; rerun it alone with a smaller dynamics.eta")
            summary["notes"] = notes[i]
            rundir.write_json(d / rundir.SUMMARY, summary)
            statuses[m.label()] = status["value"]
            last = {k: (int(v[-1]) if k == "step" else float(v[-1])) for k, v in metrics.items()
                    if len(v) and k != "wall_time"}
            rows.append({**m.__dict__, "status": status["value"], **last})
            bar.update(1)

    keys = list(dict.fromkeys(k for r in rows for k in r))
    rundir.atomic_write_text(out / SWEEP_CSV, ",".join(keys) + "\n" + "".join(
        ",".join(r[k] if k == "status" else rundir.format_float(r.get(k, float("nan"))) for k in keys) + "\n"
        for r in rows))
    _figures(out, members, hists, priors, tracker)
    n_div = sum(v == "diverged" for v in statuses.values())
    env.pop("data_sha256", None)
    rundir.write_json(out / SWEEP_JSON, {"plan": plan, "status": "completed", "members": [m.label() for m in members],
                                         "diverged": [k for k, v in statuses.items() if v == "diverged"],
                                         "n_diverged": n_div, "run_time_s": time.perf_counter() - t_start,
                                         "environment": env})
    return SweepResult(out, statuses)


class _Tracker:
    """Per member: the step it diverged at (-1: not) and its last finite state."""

    def __init__(self, n):
        self.diverged_at = np.full(n, -1, np.int64)
        self.good_step = np.zeros(n, np.int64)
        self.good_a = self.good_w = self.good_key = None

    def diverged(self, i) -> bool:
        return bool(self.diverged_at[i] >= 0)

    def see(self, i, ok, step, a, w, key):
        if self.diverged(i):
            return
        if not ok:
            self.diverged_at[i] = step
            return
        if self.good_a is None:
            n = len(self.diverged_at)
            self.good_a = np.zeros((n,) + a.shape, a.dtype)
            self.good_w = np.zeros((n,) + w.shape, w.dtype)
            self.good_key = np.zeros((n,) + key.shape, key.dtype)
        self.good_step[i] = step
        self.good_a[i], self.good_w[i], self.good_key[i] = a, w, key

    def arrays(self) -> dict:
        out = {"diverged_at": self.diverged_at, "good_step": self.good_step}
        if self.good_a is not None:
            out.update(good_a=self.good_a, good_w=self.good_w, good_key=self.good_key)
        return out

    def restore(self, ck):
        self.diverged_at = np.asarray(ck["diverged_at"]).astype(np.int64)
        self.good_step = np.asarray(ck["good_step"]).astype(np.int64)
        if "good_a" in ck:
            self.good_a, self.good_w, self.good_key = (np.array(ck[k]) for k in ("good_a", "good_w", "good_key"))


def _figures(out: Path, members, hists, priors, tracker):
    """One figure per (lam, tau, eta): the risks (top) and, when certificates were recorded,
    the certified gap primal_upper - dual_lower (bottom), each as the mean and the min-max
    band over the seeds."""
    from mfld.app import plots, runner

    plt = plots.pyplot()
    (out / "figures").mkdir(exist_ok=True)
    groups = {}
    for i, m in enumerate(members):
        cols = {k: np.asarray(v, dtype=float) for k, v in runner._merge(priors[i], hists[i].columns).items()}
        groups.setdefault((m.lam, m.tau, m.eta), []).append(cols)
    for (lam, tau, eta), hs in groups.items():
        with_gap = "gap" in hs[0]
        fig, axes = plt.subplots(2 if with_gap else 1, 1, figsize=(6, 6.5 if with_gap else 4), sharex=True,
                                 squeeze=False)
        axes[0, 0].set_title(f"λ={lam:g}, τ={tau:g}, η={eta:g}: mean and min-max band over {len(hs)} seeds",
                             fontsize=9)
        _band(axes[0, 0], hs, [("risk", "train risk R"), ("test_risk", "test risk"),
                               ("reg_risk", "regularised risk")])
        if with_gap:
            _band(axes[1, 0], hs, [("gap", "certified gap: primal_upper − dual_lower")], certified_rows=True)
        axes[-1, 0].set_xlabel("time t = step × η")
        plots.save_figure(fig, out / "figures" / f"risk_lam={lam:g}_tau={tau:g}_eta={eta:g}.png")
        plt.close(fig)


def _band(ax, hs, keys, certified_rows=False):
    t = hs[0]["t"]
    drawn = []
    for key, label in keys:
        if key not in hs[0]:
            continue
        v = np.stack([h[key] for h in hs])  # (seeds, records); nan where not recorded
        rows = np.all(np.isfinite(v), axis=0) if certified_rows else np.ones(v.shape[1], bool)
        if not rows.any():
            continue
        with np.errstate(all="ignore"):
            line, = ax.plot(t[rows], v[:, rows].mean(axis=0), label=f"{label} (mean of {len(hs)} seeds)")
            ax.fill_between(t[rows], v[:, rows].min(axis=0), v[:, rows].max(axis=0), color=line.get_color(),
                            alpha=0.25)
        drawn.append(v[:, rows])
    vals = np.concatenate([x.ravel() for x in drawn]) if drawn else np.array([])
    if drawn and np.all(vals[np.isfinite(vals)] > 0):
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
