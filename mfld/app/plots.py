"""Figures of a run (matplotlib, Agg backend): risk curves, the neuron cloud, the learned
function, and -- when certificates were recorded -- the optimality gap.

Each function takes plain arrays and writes one PNG; :func:`make_figures` draws all that apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, *, dpi: int = 120, tight_layout: bool = False, bbox_inches: str | None = "tight",
                close: bool = True) -> Path:
    """Render ``fig`` (format from the suffix, PNG by default) and write it atomically
    (:func:`mfld.app.rundir.atomic_write_bytes`: unique temp file, fsync, rename); close it
    unless ``close=False``. Every figure of the package is written through here."""
    import io

    from mfld.app.rundir import atomic_write_bytes

    path = Path(path)
    if tight_layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches=bbox_inches)
    atomic_write_bytes(path, buf.getvalue())
    if close:
        pyplot().close(fig)
    return path


def plot_risk(metrics: dict, path, title: str | None = None):
    """Train/test risk and regularised risk against t on a log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    t = np.asarray(metrics["t"])
    for key, label, style in [("risk", "train risk R", "-"), ("test_risk", "test risk", "--"),
                              ("reg_risk", "regularised risk R + (λ/2)E|θ|²", ":")]:
        if key in metrics:
            v = np.asarray(metrics[key], dtype=float)
            ok = np.isfinite(v) & (v > 0)
            if ok.any():
                ax.plot(t[ok], v[ok], style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("time t = step × η")
    ax.set_ylabel("value (log scale)")
    ax.set_title(title or "Risk along the run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_neurons(a, w, path, *, bias: bool, output: str = "trained", r_out: float = 1.0):
    """The neuron cloud: (w, a) plane for a 1-D input without bias, else a_i against |w_i|."""
    plt = pyplot()
    a = np.asarray(a, dtype=float)
    w = np.asarray(w, dtype=float)
    a_eff = r_out * np.tanh(a) if output == "bounded" else a
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    alpha = float(np.clip(300.0 / max(len(a), 1), 0.05, 0.8))
    if w.shape[1] == 1:
        ax.scatter(w[:, 0], a_eff, s=4, alpha=alpha)
        ax.set_xlabel("first-layer weight w_i")
    elif w.shape[1] == 2 and bias:
        sc = ax.scatter(w[:, 0], a_eff, c=w[:, 1], s=4, alpha=alpha, cmap="coolwarm")
        fig.colorbar(sc, ax=ax, label="bias weight b_i")
        ax.set_xlabel("input weight w_i")
    else:
        ax.scatter(np.linalg.norm(w, axis=1), a_eff, s=4, alpha=alpha)
        ax.set_xlabel("|w_i|")
    ax.set_ylabel("output weight" + (" r_out·tanh(a_i)" if output == "bounded" else " a_i"))
    ax.set_title(f"Neurons (N = {len(a)})")
    ax.grid(True, alpha=0.3)
    save_figure(fig, path)


def plot_function(x_grid, f_grid, path, *, x=None, y=None, target=None, f_star=None, x_star=None):
    """The learned function on a 1-D input against the data and (if known) the target."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if x is not None:
        ax.scatter(np.ravel(x), y, s=10, color="k", alpha=0.6, label="training data")
    if target is not None:
        ax.plot(x_grid, target, "g--", label="target (teacher)")
    if f_star is not None:
        ax.plot(x_star, f_star, "o", ms=3, color="tab:orange", label="global optimum f* (data points)")
    ax.plot(x_grid, f_grid, "b-", label="learned f_ρ")
    ax.set_xlabel("input x")
    ax.set_ylabel("output")
    ax.set_title("Learned function")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def make_figures(run_dir, *, problem, dataset, a, w, metrics, optimum=None) -> list[str]:
    """Draw every figure that applies to a run into ``run_dir/figures``; return their names."""
    from mfld import network

    figdir = Path(run_dir) / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    done = []
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    if metrics.get("t") is not None and len(metrics["t"]):
        plot_risk(metrics, figdir / "risk.png")
        done.append("risk.png")
    plot_neurons(a, w, figdir / "neurons.png", bias=problem.bias, output=problem.output,
                 r_out=float(problem.r_out))
    done.append("neurons.png")
    if problem.d == 1:
        xr = np.asarray(dataset.x, dtype=float).ravel()
        lo, hi = xr.min(), xr.max()
        pad = 0.1 * (hi - lo + 1e-12)
        grid = np.linspace(lo - pad, hi + pad, 300)
        import jax.numpy as jnp

        f_grid = np.asarray(network.predict(problem, jnp.asarray(a, problem.x.dtype),
                                            jnp.asarray(w, problem.x.dtype), problem.features(grid[:, None])))
        target = dataset.target(grid[:, None]) if getattr(dataset, "target", None) is not None else None
        f_star = None if optimum is None else np.asarray(optimum.f)
        plot_function(grid, f_grid, figdir / "function.png", x=xr, y=np.asarray(dataset.y), target=target,
                      f_star=f_star, x_star=xr if f_star is not None else None)
        done.append("function.png")
    if "dual_lower" in metrics:
        try:
            from mfld.app.certificate_plots import plot_gap
        except ImportError:
            plot_gap = None
        if plot_gap is not None:
            plot_gap(metrics, figdir / "gap.png", F_star=None if optimum is None else float(optimum.F_star))
            done.append("gap.png")
    return done
