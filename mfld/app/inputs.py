"""A run's inputs, without JAX: the config (fresh or resumed), the data, and every check of
them that can be made before anything is written or JAX is imported.

:func:`prepare` is the one entry: the CLI calls it before JAX starts and hands the result to
:func:`mfld.app.runner.run`, which then resolves and checks nothing a second time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfld import choices
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
            y_test=None, dataset=None, overwrite: bool = False, check_dir: bool = True) -> Prepared:
    """Resolve the config (a resume: checked against the stored one and its integrity record),
    build the data (a resume: the run's own stored arrays or data file, which must have the
    SHA-256 the run recorded) and check both (:func:`check_data`, :func:`check_run_setup`,
    :func:`check_resources`), and the run directory (:func:`check_out_dir`). No JAX, nothing
    written. ``check_dir=False``: leave the run directory to the runner (a process of a
    multi-process run that does not write it)."""
    if out is not None and check_dir:
        check_out_dir(out, overwrite=overwrite, resume=resume)
    cfg = resolve_resume_config(out, config, overrides) if resume else resolve_config(config, overrides)
    if dataset is None:
        if resume and x is None and y is None:
            dataset = load_dataset(out, cfg)  # the stored arrays (data.npz) or the config's data
        else:
            dataset = make_dataset(cfg, x, y, x_test, y_test)
    check_data(cfg, dataset)
    check_run_setup(cfg, dataset)
    check_resources(cfg, dataset)
    if resume:
        check_resume_data(out, dataset)
    return Prepared(cfg, dataset, None if out is None else Path(out), bool(resume))


# ---------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------

def out_path(out) -> Path:
    """``out`` as a Path; an empty path (which would mean the current directory) is refused."""
    if out is None or (isinstance(out, str) and not out.strip()):
        raise ConfigError("empty run directory path", field="--out", value="" if out is None else out,
                          allowed="a directory name, e.g. --out runs/first")
    text = str(out)
    if "\0" in text:
        raise ConfigError("invalid run directory path", field="--out", value=text, allowed="a directory name")
    return Path(text)


def default_out_dir(cfg: cfgmod.Config) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (the name :func:`mfld.app.runner.reserve_default_dir`
    starts from)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def dir_entries(d: Path) -> list[os.DirEntry]:
    """A directory's entries other than a regular-file lock (a symlink named .lock counts)."""
    from mfld.app.lock import LOCK

    try:
        entries = list(os.scandir(d))
    except OSError as err:
        raise ConfigError(f"cannot list the run directory ({err.strerror or err})", field="--out",
                          value=str(d)) from None
    return [e for e in entries if not (e.name == LOCK and e.is_file(follow_symlinks=False))]


def check_out_dir(out, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse a run directory that would be clobbered or cannot be one; writes nothing.

    - an empty path is refused; so is the current directory (or one above it) for a new run
      or ``--overwrite`` (``mfld run --resume .`` is fine);
    - a path that is a file, or a directory that cannot be listed, is refused;
    - a new run needs a missing or empty directory (a lone regular ``.lock`` counts as empty,
      anything else -- a symbolic link included -- does not);
    - ``--overwrite`` clears only a directory that holds an mfld run
      (:func:`mfld.app.rundir.is_run_dir`: its marker file), never anything else.

    The runner calls it again holding the directory's lock (the directory may have changed).
    """
    from mfld.app import rundir

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other", field="--overwrite",
                          allowed="one of --resume (continue) or --overwrite (start again)")
    d = out_path(out)
    if not resume:
        try:
            here = Path.cwd().resolve()
            target = d.resolve()
        except (OSError, RuntimeError):
            here = target = None
        if target is not None and (target == here or target in here.parents):
            raise ConfigError("the run directory is the current directory (or contains it)", field="--out",
                              value=str(out), allowed="a new subdirectory, e.g. --out runs/first")
    try:
        is_dir, exists = d.is_dir(), d.exists() or d.is_symlink()
    except (OSError, ValueError):
        raise ConfigError("invalid run directory path", field="--out", value=str(out),
                          allowed="a directory name") from None
    if exists and not is_dir:
        raise ConfigError("run directory path is a file" if d.exists() else "run directory path is a broken link",
                          field="--out", value=str(d), allowed="a new or existing directory")
    if resume or not exists:
        return d  # resolve_resume_config checks that a run is there
    if not dir_entries(d):
        return d
    if not overwrite:
        raise ConfigError("run directory already exists and is not empty", field="--out", value=str(d),
                          allowed="a new directory, or --resume / --overwrite")
    if not rundir.is_run_dir(d):
        raise ConfigError("--overwrite refused: the directory does not hold an mfld run (no run marker), "
                          "so nothing in it is deleted", field="--out", value=str(d),
                          allowed="a run directory, or a new or empty directory")
    return d


def check_resume_data(out, dataset) -> None:
    """A resume's data must have the SHA-256 recorded in ``env.json`` (which must be intact:
    :func:`mfld.app.rundir.check_integrity`). Checked before JAX starts; the runner checks
    again holding the lock."""
    env = read_run_env(out)
    recorded = env.get("data_sha256")
    if recorded is not None and recorded != data_fingerprint(dataset):
        raise ConfigError("the data differ from the stored run's (SHA-256 mismatch)", field="--resume",
                          value=str(out), allowed="the same data as the interrupted run")


def read_run_env(out) -> dict:
    """``env.json`` of the run in ``out``, checked against the run's integrity record ({} for a
    run without env.json: killed before writing it)."""
    from mfld.app import rundir

    p = Path(out) / rundir.ENV
    if not p.exists():
        return {}
    env = rundir.read_json(p)
    rundir.check_integrity(out, rundir.ENV, env, rundir.read_marker(out))
    if "data_sha256" in env and not (isinstance(env["data_sha256"], str) and len(env["data_sha256"]) == 64):
        raise rundir.RunFileError(p, f"data_sha256 is {env['data_sha256']!r:.40}", "a SHA-256 hex digest")
    return env


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
    out = out_path(out)
    path = out / rundir.CONFIG
    if not path.is_file():
        raise ConfigError("nothing to resume: no run in this directory", field="--resume", value=str(out),
                          allowed="a run directory holding config.yaml")
    stored_dict = rundir.read_config(path)
    rundir.check_integrity(out, rundir.CONFIG, stored_dict, rundir.read_marker(out))
    stored = cfgmod.validate(stored_dict)
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
        for name, arr in (("x", x), ("y", y), ("x_test", x_test), ("y_test", y_test)):
            kind = getattr(np.asarray(arr) if arr is not None else None, "dtype", np.dtype(float)).kind
            if kind not in "biuf":
                raise ConfigError(f"{name} holds non-real values (dtype kind {kind!r})", field=f"data.{name}",
                                  allowed="an array of real numbers")
        return data.Dataset(np.asarray(x), np.asarray(y),
                            None if x_test is None else np.asarray(x_test),
                            None if y_test is None else np.asarray(y_test), {"kind": "arrays"})
    check_resources(cfg)  # before the generator allocates n x d (a data file checks its own size)
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
    """Everything ``mfld validate`` checks, without JAX: the config, its resources, its data."""
    cfg = resolve_config(config, overrides)
    dataset = make_dataset(cfg)
    check_data(cfg, dataset)
    check_run_setup(cfg, dataset)
    check_resources(cfg, dataset)
    return cfg


# ---------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------

def _count(v) -> int | None:
    """A size parameter as an int, if it is a plain non-negative number (else the generator's
    own check reports it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    if not np.isfinite(v) or v < 0:
        return None
    return int(min(v, 2 ** 62))


def planned_sizes(cfg: cfgmod.Config, dataset=None) -> dict:
    """(n, n_test, n_inputs) of the run's data: from the dataset, or before it exists from the
    generator's parameters (a data file: unknown, 0)."""
    import inspect

    from mfld import data

    if dataset is not None:
        x = np.asarray(dataset.x)
        d = 1 if x.ndim == 1 else int(x.shape[-1])
        nt = 0 if dataset.x_test is None else int(np.asarray(dataset.x_test).shape[0])
        return {"n": int(x.shape[0]), "n_test": nt, "d": d}
    kind = cfg.data.kind
    if kind in ("file", "sklearn") or kind not in data.GENERATORS:
        return {"n": 0, "n_test": 0, "d": 1 if kind == "file" else 30}
    sig = inspect.signature(data.GENERATORS[kind]).parameters
    out = {}
    for k in ("n", "n_test", "d"):
        default = sig[k].default if k in sig else 0
        v = _count(cfg.data.params.get(k, default))
        out[k] = 0 if v is None else v
    return out


def check_resources(cfg: cfgmod.Config, dataset=None) -> None:
    """Refuse a run whose memory estimate (:func:`mfld.resources.run_memory`: particles x
    dimension x dtype, the drift's temporaries up to its memory budget, train and test data,
    Monte Carlo samples of the certificates) exceeds the memory available to this process
    (:func:`mfld.resources.available_memory`). Before anything is written or allocated
    (``dataset=None``: from the generator's parameters, before the data are made)."""
    from mfld import resources

    avail = resources.available_memory()
    if avail is None:
        return
    s = planned_sizes(cfg, dataset)
    p = s["d"] + (1 if cfg.model.bias else 0)
    certs = certificates_on(cfg) and (cfg.record.certify_method == "mc" or p > 2)
    need = resources.run_memory(n_particles=int(cfg.model.n_particles), dim_w=p,
                                itemsize=8 if cfg.precision == "float64" else 4, n_data=s["n"],
                                n_test=s["n_test"], n_inputs=s["d"],
                                certify_samples=int(cfg.record.certify_samples) if certs else 0)
    total = sum(need.values())
    if total <= avail:
        return
    field, biggest = max(need.items(), key=lambda kv: kv[1])
    if field == "data":
        big = max(("n", "n_test"), key=lambda k: s[k])
        field = f"data.params.{big}" if dataset is None else "data"
        value = cfg.data.params.get(big, s[big]) if dataset is None else \
            f"{s['n']} + {s['n_test']} points x {s['d']} inputs"
        what = "the data"
    elif field == "model.n_particles":
        value = int(cfg.model.n_particles)
        what = f"{value} particles x dimension {p + 1} ({cfg.precision})"
    else:
        value = int(cfg.record.certify_samples)
        what = f"{value} Monte Carlo samples"
    raise ConfigError(f"{what} need ~{resources.human(biggest)} (the run ~{resources.human(total)}), more than "
                      f"the {resources.human(avail)} of memory available", field=field, value=value,
                      allowed=f"a run that fits in {resources.human(avail)} (see docs/runs.md, Resources)")


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

    - ``record.certify_method: quadrature`` needs dim(w) <= :data:`mfld.gibbs.QUAD_MAX_DIM`
      (dim(w) = inputs + bias);
    - the k-NN entropy needs more than :data:`KNN_K` particles in each group it is estimated
      on: all particles, or for the fixed output layer each sign group of round(pf N) / the rest.
    """
    if not certificates_on(cfg):
        return
    p = int(n_inputs) + (1 if cfg.model.bias else 0)
    from mfld.gibbs import QUAD_MAX_DIM  # NumPy only, no JAX

    if cfg.record.certify_method == "quadrature" and p > QUAD_MAX_DIM:
        raise ConfigError(f"tensor quadrature is offered for dim(w) <= {QUAD_MAX_DIM}, this problem has "
                          f"dim(w) = {p}",
                          field="record.certify_method", value="quadrature", allowed="auto, mc")
    n = int(cfg.model.n_particles)
    if cfg.model.output == "fixed":
        n_plus = choices.plus_count(cfg.model.init.plus_fraction, n)  # as mfld.dynamics.init_particles
        groups = [g for g in (n_plus, n - n_plus) if g > 0]
        where = " in each sign group of the fixed output layer"
    else:
        groups, where = [n], ""
    if min(groups) <= KNN_K:
        raise ConfigError(f"the k-NN entropy of the certificates needs more than k = {KNN_K} particles{where}",
                          field="model.n_particles", value=n,
                          allowed=(f"more particles (> {KNN_K}{where}), or record.certify_every: 0"))


# ---------------------------------------------------------------------------------------
# Shared by the commands: precision, certificates, a stored run's data
# ---------------------------------------------------------------------------------------

def precision_context(precision: str):
    """A scoped x64 context when float64 is asked for and not already on (never global)."""
    import jax

    if precision == "float64" and not jax.config.jax_enable_x64:
        return jax.enable_x64(True)
    if precision == "float32" and jax.config.jax_enable_x64:
        return jax.enable_x64(False)
    return contextlib.nullcontext()


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


def _stored_arrays(path: Path):
    """The arrays of a run's ``data.npz`` (x, y and optionally x_test, y_test), checked."""
    from mfld import data

    allowed = "the data.npz the run wrote (x, y and optionally x_test, y_test)"
    try:
        with np.load(path, allow_pickle=False) as z:
            arr = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a damaged zip, a bad header, an object array ...
        raise rundir.RunFileError(path, f"not a readable .npz ({type(e).__name__})", allowed) from None
    if "x" not in arr or "y" not in arr or (("x_test" in arr) != ("y_test" in arr)):
        raise rundir.RunFileError(path, f"arrays {sorted(arr)[:6]} instead of x, y (, x_test, y_test)", allowed)
    for k, v in arr.items():
        if v.dtype.kind not in "biuf":
            raise rundir.RunFileError(path, f"array {k!r} has dtype {v.dtype}", "real numbers")
    return data.Dataset(arr["x"], arr["y"], arr.get("x_test"), arr.get("y_test"), {"kind": "arrays"})


def load_dataset(run_dir, cfg):
    """A stored run's data: ``data.npz`` when the run was given arrays, else rebuilt from the
    config (generators are seeded; a file is read again, from the absolute path the config
    records). Refuses data whose SHA-256 differs from the one recorded in ``env.json`` (a data
    file changed since the run), and an env.json that is damaged or edited."""
    p = Path(run_dir)
    if (p / rundir.DATA).exists():
        dataset = _stored_arrays(p / rundir.DATA)
    else:
        dataset = make_dataset(cfg)
    recorded = read_run_env(p).get("data_sha256")
    if recorded is not None and recorded != data_fingerprint(dataset):
        raise ConfigError("the data differ from those the run was trained on (SHA-256 mismatch)",
                          field="data", value=str(run_dir), allowed="the run's original data file")
    return dataset
