"""Experiments that reproduce the paper's kind of evidence in one command.

``run_experiment(name, out_dir, quick=False)`` writes figures (PNG), ``report.md``, CSVs and
``summary.json`` into ``out_dir`` and returns its path. ``quick=True`` is a seconds-long CI
setting; the default is the full setting of the report (minutes).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mfld.errors import ConfigError

EXPERIMENTS = {
    "linear-convergence": "mfld.experiments.linear_convergence",
    "global-optimality": "mfld.experiments.global_optimality",
    "discretisation": "mfld.experiments.discretisation",
    "mf-vs-ntk": "mfld.experiments.mf_vs_ntk",
    "annealing": "mfld.experiments.annealing",
    "minibatch": "mfld.experiments.minibatch",
    "certificate-coverage": "mfld.experiments.certificate_coverage",
    "lazy-vs-mean-field": "mfld.experiments.lazy_vs_mean_field",
    "sparse-parity": "mfld.experiments.sparse_parity",
    "real-data": "mfld.experiments.real_data",
}

__all__ = ["EXPERIMENTS", "run_experiment", "get_experiment"]


def get_experiment(name: str):
    """The module implementing experiment ``name`` (it has ``run(out_dir, quick) -> summary``)."""
    if name not in EXPERIMENTS:
        raise ConfigError("unknown experiment", field="experiment", value=name, allowed=", ".join(EXPERIMENTS))
    return importlib.import_module(EXPERIMENTS[name])


def run_experiment(name: str, out_dir=None, quick: bool = False, *, progress: bool = True,
                   figure_format: str | None = None) -> Path:
    """Run experiment ``name`` into ``out_dir`` (default ``experiments/<name>``); return the path.

    ``progress``: a progress bar per stage on stderr (silent anyway when stderr is not a
    terminal). ``figure_format``: png (default), pdf or svg for the figures."""
    from mfld.app import style
    from mfld.experiments import _common

    mod = get_experiment(name)
    out = Path(out_dir) if out_dir is not None else Path("experiments") / name
    prev = _common.set_progress(progress)
    try:
        with style.figure_format(figure_format):
            mod.run(out, quick=quick)
    finally:
        _common.set_progress(prev)
    return out
