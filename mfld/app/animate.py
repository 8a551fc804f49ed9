"""``mfld animate RUN_DIR``: a GIF of the neuron cloud moving towards rho*.

Reads the particle snapshots a run saved under ``RUN_DIR/snapshots/step_*.npz`` (keys ``a``,
``w``, ``step``; written when ``record.snapshot_every > 0``) and draws each as a scatter of
(w_1, a) -- the first input weight against the output weight. When the raw input dimension is
d = 1 (and tau > 0, mean-field scaling), the density of rho* is drawn behind: exactly on a grid
(:mod:`mfld.grid`) without bias, or as a histogram of samples from the optimum solver's rho*
(:func:`mfld.optimum.solve_optimum`) with bias (the (w_1, a) marginal).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfld.errors import ConfigError, TheoryNotApplicable


def _snapshots(run_dir: Path):
    files = sorted((run_dir / "snapshots").glob("step_*.npz"))
    if not files:
        raise ConfigError("no particle snapshots in the run directory (set record.snapshot_every > 0 and "
                          "run again)", field="run_dir", value=str(run_dir))
    out = []
    for f in files:
        with np.load(f) as z:
            out.append((int(z["step"]), np.asarray(z["a"], dtype=np.float64),
                        np.asarray(z["w"], dtype=np.float64).reshape(len(z["a"]), -1)))
    return out


def _problem_of(run_dir: Path):
    from mfld import config as cfgmod
    from mfld.app import inputs
    from mfld.app.rundir import load_run

    rec = load_run(run_dir)
    cfg = cfgmod.validate(rec.config)
    return cfg, inputs.build_problem(cfg, inputs.make_dataset(cfg))


def rho_star_density(problem, a_lim, w_lim, n: int = 120):
    """(A, W, density) of rho* on the (w_1, a) plane for a d = 1 problem, or None when rho*
    is not defined here (tau = 0, NTK, fixed output layer, d > 1)."""
    import jax

    if problem.d != 1 or problem.output == "fixed":
        return None
    try:
        with jax.enable_x64(True):
            if not problem.bias and problem.output == "trained" and problem.activation.sup is not None:
                from mfld import grid as G

                amax = max(abs(a_lim[0]), abs(a_lim[1]))
                wmax = max(abs(w_lim[0]), abs(w_lim[1]))
                gr = G.make_grid(problem, n, n, a_max=amax, w_max=wmax)
                opt = G.fixed_point(gr)
                return gr.a, gr.w, opt.rho
            from mfld.optimum import solve_optimum

            opt = solve_optimum(problem)
            a, w = opt.sample(0, 200_000)
    except (TheoryNotApplicable, RuntimeError):
        return None
    h, ae, we = np.histogram2d(a, w[:, 0], bins=n // 2, range=[a_lim, w_lim], density=True)
    from scipy.ndimage import gaussian_filter

    h = gaussian_filter(h, 1.0)  # a histogram of samples: smooth out the counting noise (one bin)
    return 0.5 * (ae[1:] + ae[:-1]), 0.5 * (we[1:] + we[:-1]), h


def _drawn(n):
    from mfld.app import style

    return style.subsample(n)


def draw_first_frame(snaps, problem, a_lim, w_lim):
    """The figure of the GIF: rho*'s density (when defined) as filled contours *and* contour
    lines drawn above the particles, and the particles as small translucent points, so that rho*
    stays visible under the cloud. Returns (fig, ax, scatter, density_lines or None)."""
    from mfld.app import style
    from mfld.app.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lines = None
    if problem is not None:
        dens = rho_star_density(problem, a_lim, w_lim)
        if dens is not None:
            A, W, D = dens
            D = np.asarray(D, dtype=float)
            top = float(D.max())
            if top > 0:
                # levels at fixed fractions of the peak: the outermost contour encloses the bulk
                # of rho* instead of tracing histogram noise in its tails
                ax.contourf(W, A, D, levels=np.linspace(0.05, 1.0, 11) * top, cmap="Blues", alpha=0.55,
                            zorder=1, extend="max")
                lines = ax.contour(W, A, D, levels=np.array([0.1, 0.3, 0.5, 0.7, 0.9]) * top, colors="navy",
                                   linewidths=1.1, zorder=4)
            ax.plot([], [], "-", color="navy", label="density of rho* (contours)")
    n = snaps[0][1].size
    idx = _drawn(n)
    a0, w0 = (snaps[0][1], snaps[0][2][:, 0]) if idx is None else (snaps[0][1][idx], snaps[0][2][idx, 0])
    sc = ax.scatter(w0, a0, s=5, c="C3", alpha=min(0.45, style.point_alpha(a0.size)),
                    linewidths=0, zorder=3, label="particles")
    ax.set_xlim(w_lim)
    ax.set_ylim(a_lim)
    ax.set_xlabel("first-layer weight w_1")
    ax.set_ylabel("output weight a")
    ax.legend(loc="upper right", fontsize=8)
    return fig, ax, sc, lines


def animate(run_dir, out_gif=None, *, fps: int = 8, with_density: bool = True) -> Path:
    """Write a GIF of the saved snapshots; returns its path (default RUN_DIR/figures/particles.gif)."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    from mfld.app.plots import pyplot

    plt = pyplot()

    run_dir = Path(run_dir)
    snaps = _snapshots(run_dir)
    out_gif = Path(out_gif) if out_gif is not None else run_dir / "figures" / "particles.gif"
    out_gif.parent.mkdir(parents=True, exist_ok=True)
    eta = None
    problem = None
    try:
        cfg, problem = _problem_of(run_dir)
        eta = float(cfg.dynamics.eta)
    except (ConfigError, FileNotFoundError, KeyError):
        pass
    all_a = np.concatenate([s[1] for s in snaps])
    all_w = np.concatenate([s[2][:, 0] for s in snaps])
    a_lim = tuple(np.quantile(all_a, [0.002, 0.998]) + np.array([-0.5, 0.5]))
    w_lim = tuple(np.quantile(all_w, [0.002, 0.998]) + np.array([-0.5, 0.5]))
    fig, ax, sc, dens_artist = draw_first_frame(snaps, problem if with_density else None, a_lim, w_lim)
    if problem is not None:
        from mfld.app import style
        from mfld.app.plots import run_setting

        style.caption(fig, run_setting(problem, n_particles=snaps[0][1].size, eta=eta))
    title = ax.set_title("")
    idx = _drawn(snaps[0][1].size)

    def frame(k):
        step, a, w = snaps[k]
        pa, pw = (a, w[:, 0]) if idx is None else (a[idx], w[idx, 0])
        sc.set_offsets(np.column_stack([pw, pa]))
        title.set_text(f"step {step}" + (f", t = {step * eta:.3g}" if eta else "") + f"  (N = {a.size})")
        return sc, title

    anim = FuncAnimation(fig, frame, frames=len(snaps), blit=False)
    tmp = out_gif.with_suffix(".tmp.gif")
    anim.save(tmp, writer=PillowWriter(fps=fps))
    plt.close(fig)
    tmp.replace(out_gif)
    return out_gif
