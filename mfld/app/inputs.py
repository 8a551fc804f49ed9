"""A run's inputs, without JAX: the config (fresh or resumed), the data, and every check of
them that can be made before anything is written or JAX is imported.

:func:`prepare` is the one entry: the CLI calls it before JAX starts and hands the result to
:func:`mfld.app.runner.run`, which then resolves and checks nothing a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfld import config as cfgmod
from mfld.app import rundir
from mfld.errors import ConfigError

#: The neighbour order of the k-NN entropy of the certificates (``k`` of
#: :func:`mfld.entropy.free_energy_estimate`, whose default the runner uses): every particle
#: group whose entropy is estimated needs more than this many particles.
KNN_K = 3


@dataclass(frozen=True)
class Prepared:
    """A resolved, checked config and its data (from :func:`prepare`), for :func:`mfld.app.runner.run`."""

    config: cfgmod.Config
    dataset: object
    out: Path | None
    resume: bool


def prepare(config=None, overrides=None, *, out=None, resume: bool = False, x=None, y=None, x_test=None,
            y_test=None, dataset=None) -> Prepared:
    """Resolve the config (a resume: checked against the stored one), build the data (a resume:
    the run's own stored arrays or data file) and check both (:func:`check_data`,
    :func:`check_run_setup`). No JAX."""
    cfg = resolve_resume_config(out, config, overrides) if resume else resolve_config(config, overrides)
    if dataset is None:
        if resume and x is None and y is None:
            from mfld.app.replot import load_dataset  # the stored arrays (data.npz) or the config's data

            dataset = load_dataset(out, cfg)
        else:
            dataset = make_dataset(cfg, x, y, x_test, y_test)
    check_data(cfg, dataset)
    check_run_setup(cfg, dataset)
    return Prepared(cfg, dataset, None if out is None else Path(out), bool(resume))


def resolve_config(config=None, overrides=None) -> cfgmod.Config:
    """Accept a Config, a dict, a YAML path or None (defaults), then apply overrides."""
    if isinstance(config, cfgmod.Config):
        return cfgmod.validate(cfgmod.apply_overrides(config.to_dict(), overrides))
    if config is None or isinstance(config, dict):
        return cfgmod.validate(cfgmod.apply_overrides(config or {}, overrides))
    return cfgmod.load(config, overrides)


def resolve_resume_config(out, config=None, overrides=None) -> cfgmod.Config:
    """The config of a resumed run: the stored one (``config.yaml`` of ``out``) with ``overrides``,
    or ``config`` + ``overrides`` -- which must then equal the stored config except for the
    fields in :data:`mfld.config.RESUME_MAY_CHANGE` (``dynamics.steps`` extends a run)."""
    if out is None:
        raise ConfigError("--resume needs the run directory", field="--resume", allowed="--out RUN_DIR")
    path = Path(out) / rundir.CONFIG
    if not path.is_file():
        raise ConfigError("nothing to resume: no run in this directory", field="--resume", value=str(out),
                          allowed="a run directory holding config.yaml")
    try:
        stored = cfgmod.validate(cfgmod.read_yaml(path))
    except ConfigError as err:
        raise ConfigError(f"the stored config is not valid ({err})", field="--resume", value=str(path)) from None
    if config is None:
        given = cfgmod.validate(cfgmod.apply_overrides(stored.to_dict(), overrides))
    else:
        given = resolve_config(config, overrides)
    cfgmod.check_resumable(stored, given)
    return given


def make_dataset(cfg: cfgmod.Config, x=None, y=None, x_test=None, y_test=None):
    """The run's data: the user's arrays, or ``data.kind`` with ``data.params`` (NumPy only, no JAX)."""
    from mfld import data

    if x is not None or y is not None:
        if x is None or y is None:
            raise ConfigError("give both x and y", field="data")
        return data.Dataset(np.asarray(x), np.asarray(y),
                            None if x_test is None else np.asarray(x_test),
                            None if y_test is None else np.asarray(y_test), {"kind": "arrays"})
    seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    return data.make_dataset(cfg.data.kind, seed=seed, **cfg.data.params)


def check_data(cfg: cfgmod.Config, dataset) -> None:
    """Checks of the data against the config that need no JAX (the shapes, NaN/inf and labels
    are checked again by :meth:`mfld.problem.Problem.create`):

    - labels in {-1, +1} for the logistic loss (train and test);
    - for a user's data (a file or arrays): no constant input column and a non-constant target;
    - ``dynamics.batch_size`` at most the number of training points.

    A run checks its certificate settings too (:func:`check_run_setup`, in :func:`prepare` and
    :func:`validate_inputs`); a sweep or ``mfld optimum`` certifies nothing and does not.
    """
    where = "data.params.path" if cfg.data.kind == "file" and dataset.meta.get("kind") != "arrays" else "data"
    x = np.asarray(dataset.x, dtype=np.float64)
    y = np.asarray(dataset.y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"inputs of shape {x.shape} and targets of shape {y.shape} do not match", field=where,
                          allowed="x of shape (n, d) and y of shape (n,) with n >= 1")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ConfigError("the data contain NaN or inf", field=where, allowed="finite numbers")
    if cfg.objective.loss == "logistic":
        for name, lab in (("y", y), ("y_test", dataset.y_test)):
            if lab is None:
                continue
            lab = np.asarray(lab, dtype=np.float64)
            bad = np.unique(lab[~np.isin(lab, (-1.0, 1.0))])
            if bad.size:
                raise ConfigError(f"the logistic loss needs labels -1 and +1 but {name} has "
                                  f"{', '.join(f'{v:g}' for v in bad[:4])}{' ...' if bad.size > 4 else ''}",
                                  field=where if where != "data" else
                                  ("data.y" if dataset.meta.get("kind") == "arrays" else "objective.loss"),
                                  allowed="labels in {-1, +1} (map 0/1 labels to -1/+1), or loss: squared")
    user = cfg.data.kind == "file" or dataset.meta.get("kind") == "arrays"
    if user and x.shape[0] >= 2:
        const = [j for j in range(x.shape[1]) if np.all(x[:, j] == x[0, j])]
        if const:
            names = dataset.meta.get("x_columns") or _csv_input_names(cfg)
            which = ", ".join(repr(names[j]) if names and j < len(names) else f"column {j}" for j in const[:3])
            raise ConfigError(f"input {which} is constant (value {x[0, const[0]]:g})", field=where,
                              allowed="inputs that vary (drop constant columns; model.bias adds the constant)")
        if np.all(y == y[0]):
            raise ConfigError(f"the target is constant (value {y[0]:g})", field=where,
                              allowed="a target that varies")
    bs = cfg.dynamics.batch_size
    if bs is not None and bs > x.shape[0]:
        raise ConfigError(f"the minibatch is larger than the {x.shape[0]} training points", field="dynamics.batch_size",
                          value=bs, allowed=f"1..{x.shape[0]}, or null for full batch")


def _csv_input_names(cfg) -> list | None:
    """The input column names of a CSV data file (for messages), or None."""
    import csv

    p = cfg.data.params
    path = str(p.get("path", ""))
    if cfg.data.kind != "file" or not path.lower().endswith(".csv"):
        return None
    if p.get("x_columns") is not None:
        return [p["x_columns"]] if isinstance(p["x_columns"], str) else list(p["x_columns"])
    try:
        with open(Path(path).expanduser(), newline="") as f:
            header = [h.strip() for h in next(csv.reader(f))]
    except (OSError, StopIteration):
        return None
    return [h for h in header if h != p.get("y_column", "y")]


def validate_inputs(config=None, overrides=None):
    """Everything ``mfld validate`` checks, without JAX: the config, then its data."""
    cfg = resolve_config(config, overrides)
    dataset = make_dataset(cfg)
    check_data(cfg, dataset)
    check_run_setup(cfg, dataset)
    return cfg


def build_problem(cfg: cfgmod.Config, dataset):
    from mfld.problem import Problem

    return Problem.create(dataset.x, dataset.y, activation=cfg.model.activation, loss=cfg.objective.loss,
                          lam=cfg.objective.lam, tau=cfg.objective.tau, bias=cfg.model.bias,
                          output=cfg.model.output, r_out=cfg.model.r_out, scaling=cfg.model.scaling,
                          x_test=dataset.x_test, y_test=dataset.y_test)


def data_fingerprint(dataset) -> str:
    """SHA-256 of the data (x, y and the test split, as float64): a resume must see the same data."""
    import hashlib

    h = hashlib.sha256()
    for arr in (dataset.x, dataset.y, dataset.x_test, dataset.y_test):
        if arr is not None:
            a = np.ascontiguousarray(np.asarray(arr, dtype=np.float64))
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def certificates_on(cfg: cfgmod.Config) -> bool:
    """Whether the run computes certificates: ``record.certify_every`` > 0 and the theory
    applies (tau > 0 and the mean-field scaling; cf. :func:`mfld.duality.check_applicable`,
    which the runner asks again on the built problem)."""
    return bool(cfg.record.certify_every) and cfg.objective.tau > 0 and cfg.model.scaling == "mean_field"


def check_run_setup(cfg: cfgmod.Config, dataset) -> None:
    """The run's settings against its (checked) data: :func:`check_certificate_setup`."""
    x = np.asarray(dataset.x)
    check_certificate_setup(cfg, 1 if x.ndim == 1 else x.shape[1])


def check_certificate_setup(cfg: cfgmod.Config, n_inputs: int) -> None:
    """Certificate settings that would otherwise fail at the first record, after the run
    directory is written (``n_inputs``: the data's input columns, without the bias):

    - ``record.certify_method: quadrature`` needs dim(w) <= 2 (dim(w) = inputs + bias);
    - the k-NN entropy needs more than :data:`KNN_K` particles in each group it is estimated
      on: all particles, or for the fixed output layer each sign group of round(pf N) / the rest.
    """
    if not certificates_on(cfg):
        return
    p = int(n_inputs) + (1 if cfg.model.bias else 0)
    if cfg.record.certify_method == "quadrature" and p > 2:
        raise ConfigError(f"tensor quadrature is offered for dim(w) <= 2, this problem has dim(w) = {p}",
                          field="record.certify_method", value="quadrature", allowed="auto, mc")
    n = int(cfg.model.n_particles)
    if cfg.model.output == "fixed":
        n_plus = int(round(cfg.model.init.plus_fraction * n))  # as mfld.dynamics.init_particles
        groups = [g for g in (n_plus, n - n_plus) if g > 0]
        where = " in each sign group of the fixed output layer"
    else:
        groups, where = [n], ""
    if min(groups) <= KNN_K:
        raise ConfigError(f"the k-NN entropy of the certificates needs more than k = {KNN_K} particles{where}",
                          field="model.n_particles", value=n,
                          allowed=(f"more particles (> {KNN_K}{where}), or record.certify_every: 0"))
