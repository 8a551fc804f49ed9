"""Redraw a run directory's figures from its files (``mfld plot RUN_DIR``).

Every file is read through the checked readers of :mod:`mfld.app.rundir`: damaged content
ends in one line naming the file and the place, never a traceback."""

from __future__ import annotations

from pathlib import Path

from mfld.app import rundir
from mfld.errors import ConfigError

#: The metrics.csv columns the figures need.
PLOT_COLUMNS = ("step", "t", "risk", "reg_risk")


def _stored_arrays(path: Path):
    """The arrays of a run's ``data.npz`` (x, y and optionally x_test, y_test), checked."""
    import numpy as np

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
    """The run's data: ``data.npz`` when the run was given arrays, else rebuilt from the config
    (generators are seeded; a file is read again, from the absolute path the config records).
    Refuses data whose SHA-256 differs from the one recorded in ``env.json`` (a data file
    changed since the run), and an env.json that is damaged or edited."""
    from mfld.app import inputs

    p = Path(run_dir)
    if (p / rundir.DATA).exists():
        dataset = _stored_arrays(p / rundir.DATA)
    else:
        dataset = inputs.make_dataset(cfg)
    recorded = inputs.read_run_env(p).get("data_sha256")
    if recorded is not None and recorded != inputs.data_fingerprint(dataset):
        raise ConfigError("the data differ from those the run was trained on (SHA-256 mismatch)",
                          field="data", value=str(run_dir), allowed="the run's original data file")
    return dataset


def replot(run_dir) -> list[str]:
    """Rebuild the problem from the saved config and data and redraw every figure."""
    from mfld import config as cfgmod
    from mfld.app import inputs, plots, runner

    rec = rundir.load_run(run_dir)  # every file checked: one line naming a damaged one
    if rec.a is None:
        raise ConfigError("run directory has no checkpoint to plot", field="run_dir", value=str(run_dir))
    cfg = cfgmod.validate(rec.config)
    path = Path(run_dir)
    if rec.metrics:
        missing = [k for k in PLOT_COLUMNS if k not in rec.metrics]
        if missing:
            raise rundir.RunFileError(path / rundir.METRICS, f"no column {missing[0]!r}",
                                      "the metrics.csv the run wrote")
    if rec.a.shape[0] != cfg.model.n_particles:
        raise rundir.RunFileError(path / rundir.CHECKPOINT, f"{rec.a.shape[0]} particles but config.yaml has "
                                                            f"model.n_particles={cfg.model.n_particles}",
                                  "the checkpoint of this run")
    with runner.precision_context(cfg.precision):
        dataset = load_dataset(run_dir, cfg)
        inputs.check_data(cfg, dataset)
        problem = inputs.build_problem(cfg, dataset)
        if rec.w.shape[1] != problem.p:
            raise rundir.RunFileError(path / rundir.CHECKPOINT, f"w has {rec.w.shape[1]} columns but the data "
                                                                f"give dim(w) = {problem.p}",
                                      "the checkpoint of this run")
        optimum = runner._read_optimum(path, problem) if rec.optimum is not None else None  # noqa: SLF001
        return plots.make_figures(run_dir, problem=problem, dataset=dataset, a=rec.a, w=rec.w,
                                  metrics=rec.metrics, optimum=optimum)
