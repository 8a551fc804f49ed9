"""``mfld sweep CONFIG --grid tau=0.01,0.02 --grid lam=0.1 --seeds K``.

Runs every member of the grid (lam, tau, eta and seeds; shapes are shared) in one compiled,
vmapped call (:func:`mfld.sweep.run`) and writes::

    OUT/<member label>/{config.yaml, metrics.csv, summary.json}   one run directory per member
    OUT/sweep.csv                                                 one row per member: final records
    OUT/figures/risk_<lam,tau,eta>.png                            mean and min-max band over seeds
    OUT/sweep.json                                                the grid and the environment

Certificates, checkpoints and snapshots of a single run are not computed in a sweep (run
a member with ``mfld run`` for those).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfld import config as cfgmod
from mfld.errors import ConfigError

GRID_KEYS = {"tau": "objective.tau", "lam": "objective.lam", "eta": "dynamics.eta"}


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
        try:
            out[name] = [float(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise ConfigError("values must be numbers", field=f"--grid {name}", value=vals) from None
        if not out[name]:
            raise ConfigError("no values", field=f"--grid {name}", value=vals)
    return out


def run_sweep(config, overrides, grid_items, seeds: int, out) -> Path:
    from mfld.app import inputs, plots, rundir, runner

    cfg = cfgmod.load(config, list(overrides))
    grid = parse_grid(grid_items)
    if int(seeds) < 1:
        raise ConfigError("must be a positive integer", field="--seeds", value=seeds)
    dataset = inputs.make_dataset(cfg)
    inputs.check_data(cfg, dataset)
    out = Path(out) if out else runner.default_out_dir(cfg).with_name(runner.default_out_dir(cfg).name + "-sweep")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("output directory exists and is not empty", field="--out", value=str(out),
                          allowed="a new or empty directory")
    with runner.precision_context(cfg.precision):
        from mfld import dynamics, sweep

        problem = inputs.build_problem(cfg, dataset)
        stepper = dynamics.Langevin(cfg.dynamics.eta, scheme=cfg.dynamics.scheme,
                                    batch_size=cfg.dynamics.batch_size, tau_schedule=cfg.dynamics.tau_schedule)
        members = sweep.grid(problem, stepper, lam=grid.get("lam"), tau=grid.get("tau"), eta=grid.get("eta"),
                             seeds=int(seeds), seed0=cfg.seed)
        init = dict(a_scale=cfg.model.init.a_scale, w_scale=cfg.model.init.w_scale,
                    plus_fraction=cfg.model.init.plus_fraction)
        final, hists = sweep.run(problem, stepper, members, cfg.model.n_particles, cfg.dynamics.steps,
                                 record_every=cfg.record.every, chunk=cfg.dynamics.chunk, init_kwargs=init)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for m, h in zip(members, hists, strict=True):
        d = out / m.label()
        d.mkdir()
        mcfg = cfgmod.validate(cfgmod.apply_overrides(cfg.to_dict(), [
            f"objective.lam={m.lam!r}", f"objective.tau={m.tau!r}", f"dynamics.eta={m.eta!r}", f"seed={m.seed}",
            f"name={cfg.name}-{m.label()}"]))
        rundir.atomic_write_text(d / rundir.CONFIG, mcfg.to_yaml())
        cols = h.as_arrays()
        rundir.write_metrics(d / rundir.METRICS, cols)
        last = {k: float(v[-1]) for k, v in cols.items()}
        finite = all(np.isfinite(v) for k, v in last.items())
        rundir.write_json(d / rundir.SUMMARY, {"status": "completed" if finite else "diverged",
                                              "final": last, "member": m.__dict__})
        table.append({**m.__dict__, **{k: v for k, v in last.items() if k not in ("wall_time",)}})
    keys = list(table[0])
    rundir.atomic_write_text(out / "sweep.csv", ",".join(keys) + "\n" + "".join(
        ",".join(rundir.format_float(r.get(k, float("nan"))) for k in keys) + "\n" for r in table))
    rundir.write_json(out / "sweep.json", {"grid": grid, "seeds": int(seeds), "members": len(members),
                                           "environment": rundir.environment(cfg.seed, cfg.precision)})
    _figures(out, members, hists, plots)
    return out


def _figures(out: Path, members, hists, plots):
    plt = plots.pyplot()
    (out / "figures").mkdir(exist_ok=True)
    groups = {}
    for m, h in zip(members, hists, strict=True):
        groups.setdefault((m.lam, m.tau, m.eta), []).append(h)
    for (lam, tau, eta), hs in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        t = hs[0]["t"]
        for key, label in [("risk", "train risk R"), ("test_risk", "test risk"), ("reg_risk", "regularised risk")]:
            if key not in hs[0].columns:
                continue
            v = np.stack([h[key] for h in hs])
            line, = ax.plot(t, v.mean(axis=0), label=f"{label} (mean of {len(hs)} seeds)")
            ax.fill_between(t, v.min(axis=0), v.max(axis=0), color=line.get_color(), alpha=0.25)
        ax.set_yscale("log")
        ax.set_xlabel("time t = step × η")
        ax.set_title(f"λ={lam:g}, τ={tau:g}, η={eta:g}: mean and min-max band over seeds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        plots.save_figure(fig, out / "figures" / f"risk_lam={lam:g}_tau={tau:g}_eta={eta:g}.png")
        plt.close(fig)
