"""Redraw a run directory's figures from its files (``mfld plot RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path

from mfld.app import rundir
from mfld.errors import ConfigError


def load_dataset(run_dir, cfg):
    """The run's data: ``data.npz`` when the run was given arrays, else rebuilt from the config
    (generators are seeded; a file is read again). Refuses data whose SHA-256 differs from the
    one recorded in ``env.json`` (a data file changed since the run)."""
    import json

    import numpy as np

    from mfld import data
    from mfld.app import inputs

    p = Path(run_dir)
    if (p / rundir.DATA).exists():
        with np.load(p / rundir.DATA) as z:
            arr = {k: z[k] for k in z.files}
        dataset = data.Dataset(arr["x"], arr["y"], arr.get("x_test"), arr.get("y_test"), {"kind": "arrays"})
    else:
        dataset = inputs.make_dataset(cfg)
    try:
        recorded = json.loads((p / rundir.ENV).read_text()).get("data_sha256")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded != inputs.data_fingerprint(dataset):
        raise ConfigError("the data differ from those the run was trained on (SHA-256 mismatch)",
                          field="data", value=str(run_dir), allowed="the run's original data file")
    return dataset


def replot(run_dir) -> list[str]:
    """Rebuild the problem from the saved config and data and redraw every figure."""
    from mfld import config as cfgmod
    from mfld.app import inputs, plots, runner

    rec = rundir.load_run(run_dir)
    if rec.a is None:
        raise ConfigError("run directory has no checkpoint to plot", field="run_dir", value=str(run_dir))
    cfg = cfgmod.validate(rec.config)
    with runner.precision_context(cfg.precision):
        dataset = load_dataset(run_dir, cfg)
        problem = inputs.build_problem(cfg, dataset)
        optimum = None
        if rec.optimum is not None:
            from mfld.optimum import Optimum

            optimum = Optimum.from_json(Path(run_dir, rundir.OPTIMUM).read_text())
        return plots.make_figures(run_dir, problem=problem, dataset=dataset, a=rec.a, w=rec.w,
                                  metrics=rec.metrics, optimum=optimum)
