"""Redraw a run directory's figures from its files (``mfld plot RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path

from mfld.app import rundir
from mfld.errors import ConfigError


def replot(run_dir) -> list[str]:
    """Rebuild the problem from the saved config (data are seeded) and redraw every figure."""
    from mfld import config as cfgmod
    from mfld.app import plots, runner

    rec = rundir.load_run(run_dir)
    if rec.a is None:
        raise ConfigError("run directory has no checkpoint to plot", field="run_dir", value=str(run_dir))
    cfg = cfgmod.validate(rec.config)
    if cfg.data.kind == "file" or (rec.summary.get("data") == "arrays"):
        pass
    with runner.precision_context(cfg.precision):
        dataset = runner.make_dataset(cfg)
        problem = runner.build_problem(cfg, dataset)
        optimum = None
        if rec.optimum is not None:
            from mfld.optimum import Optimum

            optimum = Optimum.from_json(Path(run_dir, rundir.OPTIMUM).read_text())
        return plots.make_figures(run_dir, problem=problem, dataset=dataset, a=rec.a, w=rec.w,
                                  metrics=rec.metrics, optimum=optimum)
