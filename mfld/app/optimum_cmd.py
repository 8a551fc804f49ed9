"""``mfld optimum [CONFIG] [--set k=v] [--out DIR]``: solve for the global optimum of a
config's problem (THEORY 6: maximise the dual) and write ``DIR/optimum.json``.

The file holds F* (= D(u*)), its error bound, F(rho_hat_{u*}), u*, f* on the training data,
the mean and covariance of rho*, the integration method (``closed_form``/``quadrature`` are
certified, ``mc`` statistical) and the solver's details; ``mfld run`` writes the same file.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from mfld.errors import TheoryNotApplicable


def solve_for_config(config=None, overrides=None):
    """(config, problem, Optimum) for a config path / dict / None (the default problem)."""
    from mfld.app import inputs
    from mfld.optimum import solve_optimum

    cfg = inputs.resolve_config(config, overrides)
    dataset = inputs.make_dataset(cfg)
    inputs.check_data(cfg, dataset)
    with inputs.precision_context(cfg.precision):
        problem = inputs.build_problem(cfg, dataset)
        reason = inputs.certificates_available(problem)
        if reason is not None:
            raise TheoryNotApplicable(f"no optimum to solve for: {reason}")
        opt = solve_optimum(problem, plus_fraction=cfg.model.init.plus_fraction)
    return cfg, problem, opt


def main(config=None, overrides=(), out: str | Path = ".") -> Path:
    """Solve, write ``out/optimum.json`` atomically and print a one-line summary."""
    from mfld.app.rundir import OPTIMUM, atomic_write_text

    t0 = time.perf_counter()
    _, _, opt = solve_for_config(config, list(overrides))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / OPTIMUM
    atomic_write_text(path, opt.to_json())
    kind = "certified" if opt.method != "mc" else "statistical"
    click.echo(f"F*={opt.F_star:.10g} +- {opt.F_star_err:.2g} ({opt.method}, {kind})  "
               f"time={time.perf_counter() - t0:.1f}s")
    for key in ("fallback", "warning", "mc_warning"):
        if key in opt.info:
            click.echo(f"note: {opt.info[key]}")
    click.echo(f"wrote {path}")
    return path
