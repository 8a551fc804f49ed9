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
that member (:func:`mfld.app.certificates.optimum_and_certify`: seed = the member's seed). The
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

from mfld import config as cfgmod
from mfld.app import inputs, rundir
from mfld.errors import ConfigError
from mfld.serialize import jsonable

GRID_KEYS = {"tau": "objective.tau", "lam": "objective.lam", "eta": "dynamics.eta"}


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


def run_sweep(config, overrides, grid_items, seeds: int, out, *, resume: bool = False,
              progress: bool = True) -> SweepResult:
    """The sweep of ``mfld sweep`` (see the module docstring). ``progress``: tqdm bars per
    stage on stderr, shown only when stderr is a terminal and ``record.progress`` is on."""
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
    out = Path(out) if out else inputs.default_out_dir(cfg).with_name(inputs.default_out_dir(cfg).name + "-sweep")
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
        with inputs.precision_context(cfg.precision):
            from mfld.app.sweep_run import Sweep, SweepRequest  # JAX: after every check

            return SweepResult(out, Sweep(cfg, dataset, SweepRequest(grid, int(seeds), out, plan, resume, show,
                                                                     t_start)).execute())
    finally:
        lock.release()


def _plan(cfg, grid, seeds) -> dict:
    c = cfg.to_dict()
    c.get("record", {}).pop("progress", None)  # may change on resume
    return json.loads(json.dumps(jsonable({"config": c, "grid": grid, "seeds": int(seeds)})))


def _check_resumable(out: Path, plan: dict):
    try:
        stored = json.loads((out / rundir.SWEEP_JSON).read_text())
    except (OSError, ValueError):
        raise ConfigError("no sweep to resume there (no readable sweep.json)", field="--resume",
                          value=str(out), allowed="the --out directory of an interrupted mfld sweep") from None
    if not isinstance(stored, dict) or stored.get("plan") != plan:
        raise ConfigError("the config, grid or seeds differ from those of the stored sweep", field="--resume",
                          value=str(out), allowed="the same config, --set, --grid and --seeds as before")


