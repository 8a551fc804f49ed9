"""All the figures of a run (``mfld run`` and ``mfld plot``): the risk curves, the neuron
cloud, the learned function on a 1-D input (:mod:`mfld.app.plots`) and, when certificates
were recorded, the optimality gap (:mod:`mfld.app.certificate_plots`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfld.app import plots, style
from mfld.app.certificate_plots import plot_gap


def make_figures(run_dir, *, problem, dataset, a, w, metrics, optimum=None) -> list[str]:
    """Draw every figure that applies to a run into ``run_dir/figures``; return their names."""
    figdir = Path(run_dir) / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    done = []
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    setting = plots.run_setting(problem, metrics, n_particles=int(np.shape(a)[0]))
    if metrics.get("t") is not None and len(metrics["t"]):
        done.append(plots.plot_risk(metrics, figdir / "risk.png", setting=setting).name)
    done.append(plots.plot_neurons(a, w, figdir / "neurons.png", bias=problem.bias, output=problem.output,
                                   r_out=float(problem.r_out), setting=setting)["path"].name)
    if problem.d == 1:
        xr = np.asarray(dataset.x, dtype=float).ravel()
        lo, hi = xr.min(), xr.max()
        pad = 0.1 * (hi - lo + 1e-12)
        grid = np.linspace(lo - pad, hi + pad, 300)
        import jax.numpy as jnp

        from mfld import network

        f_grid = np.asarray(network.predict(problem, jnp.asarray(a, problem.x.dtype),
                                            jnp.asarray(w, problem.x.dtype), problem.features(grid[:, None])))
        target = dataset.target(grid[:, None]) if getattr(dataset, "target", None) is not None else None
        f_star = None if optimum is None else np.asarray(optimum.f)
        done.append(plots.plot_function(grid, f_grid, figdir / "function.png", x=xr, y=np.asarray(dataset.y),
                                        target=target, f_star=f_star, x_star=xr if f_star is not None else None,
                                        setting=setting).name)
    if "dual_lower" in metrics:
        plot_gap(metrics, figdir / "gap.png", F_star=None if optimum is None else float(optimum.F_star),
                 setting=setting)
        done.append(style.figure_name("gap.png"))
    return done
