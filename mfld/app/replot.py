"""Redraw a run directory's figures from its files (``mfld plot RUN_DIR``).

Every file is read through the checked readers of :mod:`mfld.app.rundir`: damaged content
ends in one line naming the file and the place, never a traceback."""

from __future__ import annotations

from pathlib import Path

from mfld.app import rundir
from mfld.errors import ConfigError

#: The metrics.csv columns the figures need.
PLOT_COLUMNS = ("step", "t", "risk", "reg_risk")


def replot(run_dir) -> list[str]:
    """Rebuild the problem from the saved config and data and redraw every figure."""
    from mfld import config as cfgmod
    from mfld.app import certificates, inputs, run_figures

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
    with inputs.precision_context(cfg.precision):
        dataset = inputs.load_dataset(run_dir, cfg)
        inputs.check_data(cfg, dataset)
        problem = inputs.build_problem(cfg, dataset)
        if rec.w.shape[1] != problem.p:
            raise rundir.RunFileError(path / rundir.CHECKPOINT, f"w has {rec.w.shape[1]} columns but the data "
                                                                f"give dim(w) = {problem.p}",
                                      "the checkpoint of this run")
        optimum = certificates.read_optimum(path, problem) if rec.optimum is not None else None
        return run_figures.make_figures(run_dir, problem=problem, dataset=dataset, a=rec.a, w=rec.w,
                                  metrics=rec.metrics, optimum=optimum)
