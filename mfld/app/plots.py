"""Figures of a run (matplotlib, Agg backend): risk curves, the neuron cloud, the learned
function, and -- when certificates were recorded -- the optimality gap.

Each function takes plain arrays and writes one figure (PNG unless
:func:`mfld.app.style.figure_format` says pdf or svg); :func:`mfld.app.run_figures.make_figures`
draws all that apply to a run.
Every figure uses the style of :mod:`mfld.app.style` and carries the run's setting (activation,
lam, tau, N, eta) as its caption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mfld.app import style

    style.apply()
    return plt


def save_figure(fig, path, *, dpi: int = 120, tight_layout: bool = False, bbox_inches: str | None = "tight",
                close: bool = True) -> Path:
    """Render ``fig`` and write it atomically (:func:`mfld.app.rundir.atomic_write_bytes`:
    unique temp file, fsync, rename); close it unless ``close=False``. The format is the current
    one of :func:`mfld.app.style.figure_format` (PNG by default): ``path``'s suffix is replaced
    by it. Returns the path written. Every figure of the package is written through here."""
    import io

    from mfld.app import style
    from mfld.app.rundir import atomic_write_bytes

    path = Path(style.figure_name(str(path)))
    if tight_layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches=bbox_inches)
    atomic_write_bytes(path, buf.getvalue())
    if close:
        pyplot().close(fig)
    return path


def plot_risk(metrics: dict, path, title: str | None = None, setting: str | None = None):
    """Train/test risk and regularised risk against t on a log scale (``setting``: the caption)."""
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
    if setting:
        _caption(fig, setting)
    return save_figure(fig, path)


def plot_neurons(a, w, path, *, bias: bool, output: str = "trained", r_out: float = 1.0,
                 setting: str | None = None, max_points: int | None = None) -> dict:
    """The neuron cloud: (w, a) plane for a 1-D input without bias, the (w, a) plane coloured by
    the bias weight for a 1-D input with bias, else a_i against |w_i|.

    At most ``max_points`` (default :data:`mfld.app.style.MAX_POINTS` = 2e5) particles are drawn,
    a uniform random subsample (the title says so), so a cloud of millions of particles draws in
    bounded time and memory. Markers are opaque enough to stay visible on white
    (:func:`mfld.app.style.point_alpha`) and the colormap (viridis) has no white middle.
    Returns ``{"path", "drawn", "total"}``."""
    from mfld.app import style

    plt = pyplot()
    n_total = int(np.shape(a)[0])
    idx = style.subsample(n_total, style.MAX_POINTS if max_points is None else max_points)
    a = np.asarray(a if idx is None else np.asarray(a)[idx], dtype=float)
    w = np.asarray(w if idx is None else np.asarray(w)[idx], dtype=float).reshape(len(a), -1)
    a_eff = r_out * np.tanh(a) if output == "bounded" else a
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    alpha = style.point_alpha(len(a))
    size = 6 if len(a) <= 20_000 else 2
    kw = dict(s=size, alpha=alpha, linewidths=0, rasterized=True)
    if w.shape[1] == 1:
        ax.scatter(w[:, 0], a_eff, color="C0", **kw)
        ax.set_xlabel("first-layer weight w_i")
    elif w.shape[1] == 2 and bias:
        sc = ax.scatter(w[:, 0], a_eff, c=w[:, 1], cmap=style.CMAP, **kw)
        cb = fig.colorbar(sc, ax=ax, label="bias weight b_i")
        cb.solids.set_alpha(1.0)
        ax.set_xlabel("input weight w_i")
    else:
        ax.scatter(np.linalg.norm(w, axis=1), a_eff, color="C0", **kw)
        ax.set_xlabel("|w_i|")
    ax.set_ylabel("output weight" + (" r_out·tanh(a_i)" if output == "bounded" else " a_i"))
    shown = f"N = {n_total}" if idx is None else f"N = {n_total}; {len(a)} drawn at random"
    ax.set_title(f"Neurons ({shown})")
    ax.grid(True, alpha=0.3)
    if setting:
        _caption(fig, setting)
    out = save_figure(fig, path)
    return {"path": out, "drawn": int(len(a)), "total": n_total}


def plot_function(x_grid, f_grid, path, *, x=None, y=None, target=None, f_star=None, x_star=None,
                  setting: str | None = None):
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
    if setting:
        _caption(fig, setting)
    return save_figure(fig, path)


def _caption(fig, text: str) -> None:
    from mfld.app import style

    style.caption(fig, text)


def run_setting(problem, metrics: dict | None = None, n_particles: int | None = None, eta=None) -> str:
    """The caption of a run's figures: activation, loss, lam, tau, N and eta. eta, unless
    given, is read from the records (t = step x eta); the scaling is named when it is not
    mean-field."""
    from mfld.app import style

    if eta is None and metrics is not None and "t" in metrics and "step" in metrics:
        t = np.asarray(metrics["t"], dtype=float)
        st = np.asarray(metrics["step"], dtype=float)
        ok = st > 0
        if ok.any():
            eta = float(t[ok][-1] / st[ok][-1])
    act = getattr(problem.activation, "name", None) or str(problem.activation)
    extra = [] if problem.scaling == "mean_field" else [f"{problem.scaling} scaling"]
    if problem.output != "trained":
        extra.append(f"{problem.output} output layer")
    return style.setting(activation=act, loss=getattr(problem.loss, "name", None), lam=float(problem.lam),
                         tau=float(problem.tau), N=n_particles, eta=eta, extra=", ".join(extra) or None)
