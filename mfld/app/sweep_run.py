"""The execution of ``mfld sweep`` (:mod:`mfld.app.sweep_cmd` checks its inputs, without JAX,
then runs a :class:`Sweep`): every member of the grid in one vmapped call
(:func:`mfld.sweep.run`), each member written as a run directory, then ``sweep.csv``, the
figures and ``sweep.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from mfld import config as cfgmod
from mfld import dynamics, loop, sweep
from mfld.app import certificates, inputs, rundir
from mfld.app.records import RunStatus, is_finite_row, merge_metrics, run_summary
from mfld.errors import ConfigError


def _bar(show: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not show, dynamic_ncols=True, leave=False, **kw)


def member_config(cfg, m):
    """Member ``m``'s config: the sweep's, with its lam, tau, eta and seed; the data seed is
    pinned to the sweep's (the data are shared; default data.seed = the run seed)."""
    data_seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    return cfgmod.validate(cfgmod.apply_overrides(cfg.to_dict(), [f"data.seed={data_seed}",
        f"objective.lam={m.lam!r}", f"objective.tau={m.tau!r}", f"dynamics.eta={m.eta!r}", f"seed={m.seed}",
        f"name={cfg.name}-{m.label()}"]))


@dataclass(frozen=True)
class SweepRequest:
    """What :func:`mfld.app.sweep_cmd.run_sweep` resolved for :class:`Sweep`: the grid, the number of seeds, the
    sweep directory, the plan stored in sweep.json, resume, whether to show progress bars, and
    the time the sweep started."""

    grid: dict
    seeds: int
    out: Path
    plan: dict
    resume: bool
    show: bool
    t_start: float


class Sweep:
    """One sweep: its members and their run directories, the optimum and certify function of
    each member, the stacked states' checkpoint and the members' records, in the steps of
    :meth:`execute` (set up, certificates, resume, simulate, write the members, the table)."""

    def __init__(self, cfg, dataset, req: SweepRequest):
        self.cfg, self.dataset, self.req = cfg, dataset, req
        self.ck_path = req.out / rundir.SWEEP_CHECKPOINT
        self.bar = None

    def execute(self) -> dict:
        """Run the sweep and write it; returns each member's status ({label: completed / diverged})."""
        self._setup()
        self._certificates()
        state = self._resume_state()
        final = self._simulate(state)
        statuses, rows = self._write_members(final)
        self._write_table_and_plan(statuses, rows)
        return statuses

    def _setup(self):
        """The shared problem and stepper, the members, and each member's run directory with its
        config.yaml and env.json (sweep.json first, for a new sweep)."""
        cfg, req = self.cfg, self.req
        self.problem = inputs.build_problem(cfg, self.dataset)
        self.stepper = dynamics.Langevin(cfg.dynamics.eta, scheme=cfg.dynamics.scheme,
                                         batch_size=cfg.dynamics.batch_size, tau_schedule=cfg.dynamics.tau_schedule)
        self.members = sweep.grid(self.problem, self.stepper, lam=req.grid.get("lam"), tau=req.grid.get("tau"),
                                  eta=req.grid.get("eta"), seeds=req.seeds, seed0=cfg.seed)
        self.init = dict(a_scale=cfg.model.init.a_scale, w_scale=cfg.model.init.w_scale,
                         plus_fraction=cfg.model.init.plus_fraction)
        self.env = env = rundir.environment(cfg.seed, cfg.precision)
        if not req.resume:
            rundir.write_json(req.out / rundir.SWEEP_JSON, {"plan": req.plan, "status": "running",
                                                     "members": [m.label() for m in self.members], "environment": env})
        env["data_sha256"] = inputs.data_fingerprint(self.dataset)
        self.dirs = [req.out / m.label() for m in self.members]
        self.mcfgs = [member_config(cfg, m) for m in self.members]
        self.problems = [inputs.build_problem(c, self.dataset) for c in self.mcfgs]
        for m, d, c in zip(self.members, self.dirs, self.mcfgs, strict=True):  # each member: a run directory
            if not (d / rundir.CONFIG).exists():
                rundir.atomic_write_text(d / rundir.CONFIG, c.to_yaml())
            if not (d / rundir.ENV).exists():
                rundir.write_json(d / rundir.ENV, env | {"seed": m.seed, "sweep": str(req.out)})
        self.notes = [[] for _ in self.members]

    def _certificates(self):
        """The optimum once per (lam, tau) (the group's first member solves it, the others copy
        its optimum.json; a stored one is read), and the certify function of each member."""
        members, dirs, n_mem = self.members, self.dirs, len(self.members)
        self.optima, self.certifiers, first_of = [None] * n_mem, [None] * n_mem, {}
        for i, m in enumerate(members):
            first_of.setdefault((m.lam, m.tau), i)
        with _bar(self.req.show, total=n_mem, desc="optimum and certificates", unit="member") as bar:
            for i, m in enumerate(members):
                j = first_of[(m.lam, m.tau)]
                if i != j and (dirs[j] / rundir.OPTIMUM).exists() and not (dirs[i] / rundir.OPTIMUM).exists():
                    rundir.atomic_write_bytes(dirs[i] / rundir.OPTIMUM, (dirs[j] / rundir.OPTIMUM).read_bytes())
                s0 = dynamics.init_particles(self.problems[i], self.cfg.model.n_particles, m.seed, **self.init)
                # a stored optimum.json is read, else the group's first member solves it
                stored = (certificates.read_optimum(dirs[i], self.problems[i]) if self.mcfgs[i].record.optimum
                          else None)
                certs = certificates.optimum_and_certify(self.mcfgs[i], self.problems[i], s0, self.notes[i], stored)
                if i == j and certs.solved:
                    rundir.atomic_write_text(dirs[i] / rundir.OPTIMUM, certs.optimum.to_json())
                self.optima[i], self.certifiers[i] = certs.optimum, certs.certify
                bar.update(1)

    def _resume_state(self):
        """The stacked states of the last checkpoint (None: start from step 0) and, in
        ``priors``, each member's metrics up to it; a damaged file is a ConfigError."""
        n_mem = len(self.members)
        self.tracker = _Tracker(n_mem)
        self.priors = [None] * n_mem
        state = None
        if self.req.resume and self.ck_path.exists():
            try:
                ck = rundir.load_checkpoint(self.ck_path, stacked=True)
                step = int(ck["step"])
                state = dynamics.ParticleState(jnp.asarray(ck["a"]), jnp.asarray(ck["w"]),
                                               jnp.full((n_mem,), step, jnp.int32),
                                               jax.random.wrap_key_data(jnp.asarray(ck["key_data"])))
                self.tracker.restore(ck)
                for i, d in enumerate(self.dirs):
                    prior = rundir.read_metrics(d / rundir.METRICS)
                    keep = prior["step"] <= step  # rows after the checkpoint are recomputed
                    self.priors[i] = {k: v[keep] for k, v in prior.items()}
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001 - a damaged checkpoint is a user-facing problem
                raise ConfigError(f"cannot read the sweep checkpoint or a member's metrics ({type(err).__name__})",
                                  field="--resume", value=str(self.req.out),
                                  allowed="a sweep directory mfld sweep wrote") from None
        self.hists = [loop.History() for _ in self.members]
        self.offsets = [float(p["wall_time"][-1]) if p and "wall_time" in p and len(p["step"]) else 0.0
                        for p in self.priors]
        return state

    def _simulate(self, state):
        """All members to ``dynamics.steps`` in one vmapped run (:func:`mfld.sweep.run`), then the
        final checkpoint."""
        cfg, stop, n_mem = self.cfg, self.cfg.dynamics.steps, len(self.members)
        start = 0 if state is None else int(state.step[0])
        with _bar(self.req.show, total=stop, initial=start, desc=f"sweep of {n_mem} members", unit="step") as bar:
            self.bar = bar
            final, _ = sweep.run(self.problem, self.stepper, self.members, cfg.model.n_particles, stop,
                                 record_every=cfg.record.every, chunk=cfg.dynamics.chunk, init_kwargs=self.init,
                                 callback=self._on_record, state=state, progress=bar, histories=self.hists,
                                 record_initial=state is None)
        if start < stop or state is None:
            self._save(final, stop)
        return final

    def _save(self, states, step, rows=None):
        """Members' metrics (with ``rows``, the record being taken) first, then the stacked
        states (a kill in between: the resume drops the metrics rows after the checkpoint)."""
        for i, d in enumerate(self.dirs):
            h = loop.History({k: list(v) for k, v in self.hists[i].columns.items()})
            if rows is not None:
                h.append(rows[i])
            rundir.write_metrics(d / rundir.METRICS, merge_metrics(self.priors[i], h.columns))
        rundir.save_checkpoint(self.ck_path, states.a, states.w, step, jax.random.key_data(states.key),
                               extra=self.tracker.arrays())

    def _on_record(self, states, rows):
        """At each record: wall time across resumes, divergence, certificates, checkpoints."""
        rec, tracker, stop = self.cfg.record, self.tracker, self.cfg.dynamics.steps
        step = rows[0]["step"]
        a_all, w_all = np.asarray(states.a), np.asarray(states.w)
        key_all = np.asarray(jax.random.key_data(states.key))
        for i, row in enumerate(rows):
            row["wall_time"] += self.offsets[i]
            ok = is_finite_row(row) and bool(np.all(np.isfinite(a_all[i])) and np.all(np.isfinite(w_all[i])))
            tracker.see(i, ok, step, a_all[i], w_all[i], key_all[i])
            if ok and not tracker.diverged(i) and self.certifiers[i] is not None and step % rec.certify_every == 0:
                row.update(self.certifiers[i](SimpleNamespace(a=a_all[i], w=w_all[i])))
        self.bar.set_postfix(diverged=int(np.sum(tracker.diverged_at >= 0)), refresh=False)
        if rec.checkpoint_every and step % rec.checkpoint_every == 0 and 0 < step < stop:
            self._save(states, step, rows)

    def _write_members(self, final):
        """Finish each member: metrics, checkpoint, summary (last: the member is complete).
        Returns ({label: status}, the sweep.csv rows)."""
        statuses, rows = {}, []
        fin = (np.asarray(final.a), np.asarray(final.w), np.asarray(jax.random.key_data(final.key)))
        with _bar(self.req.show, total=len(self.members), desc="writing members", unit="member") as bar:
            for i, m in enumerate(self.members):
                status, metrics = self._write_member(i, fin)
                statuses[m.label()] = status.value
                last = {k: (int(v[-1]) if k == "step" else float(v[-1])) for k, v in metrics.items()
                        if len(v) and k != "wall_time"}
                rows.append({**m.__dict__, "status": status.value, **last})
                bar.update(1)
        return statuses, rows

    def _write_member(self, i: int, fin: tuple):
        """Member ``i``'s metrics.csv, checkpoint and summary.json (a diverged member: its last
        finite state and the rows up to it). ``fin``: the final (a, w, key data) of all members."""
        m, d, tracker, notes = self.members[i], self.dirs[i], self.tracker, self.notes[i]
        metrics = merge_metrics(self.priors[i], self.hists[i].columns)
        status = RunStatus()
        a, w, step, key = fin[0][i], fin[1][i], self.cfg.dynamics.steps, fin[2][i]
        if tracker.diverged(i):
            good = int(tracker.good_step[i])
            status = RunStatus("diverged", f"non-finite particles or risk at step {int(tracker.diverged_at[i])}",
                               diverged_at_step=int(tracker.diverged_at[i]))
            metrics = {k: [v for v, st in zip(col, metrics["step"], strict=True) if st <= good]
                       for k, col in metrics.items()}
            if tracker.good_a is not None:  # (None: not finite even at the start)
                a, w, step, key = tracker.good_a[i], tracker.good_w[i], good, tracker.good_key[i]
        rundir.write_metrics(d / rundir.METRICS, metrics)
        rundir.save_checkpoint(d / rundir.CHECKPOINT, a, w, step, key)
        summary = run_summary(self.mcfgs[i], metrics, status, time.perf_counter() - self.req.t_start,
                              self.optima[i])
        summary["checkpoint_step"] = int(step)
        summary["member"] = dict(m.__dict__)
        summary["sweep"] = str(self.req.out)
        if tracker.diverged(i):
            summary["last_good_step"] = int(step)
            notes.append(f"the member diverged ({status.reason}); the last finite state (step {step}) "
                         f"is checkpointed; rerun it alone with a smaller dynamics.eta")
        summary["notes"] = notes
        rundir.write_json(d / rundir.SUMMARY, summary)
        return status, metrics

    def _write_table_and_plan(self, statuses: dict, rows: list):
        """sweep.csv, the figures, and sweep.json with the status of the sweep."""
        out, members = self.req.out, self.members
        keys = list(dict.fromkeys(k for r in rows for k in r))
        rundir.atomic_write_text(out / rundir.SWEEP_CSV, ",".join(keys) + "\n" + "".join(
            ",".join(r[k] if k == "status" else rundir.format_float(r.get(k, float("nan"))) for k in keys) + "\n"
            for r in rows))
        _figures(out, members, self.hists, self.priors, self.tracker)
        n_div = sum(v == "diverged" for v in statuses.values())
        env = self.env
        env.pop("data_sha256", None)
        rundir.write_json(out / rundir.SWEEP_JSON, {"plan": self.req.plan, "status": "completed",
                                             "members": [m.label() for m in members],
                                             "diverged": [k for k, v in statuses.items() if v == "diverged"],
                                             "n_diverged": n_div, "run_time_s": time.perf_counter() - self.req.t_start,
                                             "environment": env})


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
    from mfld.app import plots

    plt = plots.pyplot()
    (out / "figures").mkdir(exist_ok=True)
    groups = {}
    for i, m in enumerate(members):
        cols = {k: np.asarray(v, dtype=float) for k, v in merge_metrics(priors[i], hists[i].columns).items()}
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
