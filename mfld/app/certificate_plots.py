"""Figures of the optimality certificates (THEORY sections 4, 6): the gap between the dual
lower bound and the primal upper bound on F*, and F(rho_hat) - F*, on a log scale against
time, with the fitted linear (exponential) rate.

Input: a table as a dict of equal-length 1-D arrays (``metrics.csv`` read as columns) with
``t``, ``dual_lower``, ``primal_upper`` and optionally ``certified``; rows where the
certificate was not computed hold NaN and are skipped. matplotlib with the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_gap"]


def _fit(t, y):
    """(rate, t0, t1, intercept) of log y ~ b - rate t on the straight part, or None."""
    from mfld.errors import ConfigError
    from mfld.theory import fit_rate

    try:
        fit = fit_rate(t, y)
    except (ConfigError, ValueError):
        return None
    if not np.isfinite(fit.rate):
        return None
    return fit


def rise_after_minimum(t, gap):
    """(t_min, g_min, factor): where the gap is smallest and how many times larger its last
    record is (1 when the gap ends at its minimum)."""
    t = np.asarray(t, dtype=float)
    gap = np.asarray(gap, dtype=float)
    ok = np.isfinite(gap) & (gap > 0)
    if not ok.any():
        return None, None, 1.0
    tt, gg = t[ok], gap[ok]
    i = int(np.argmin(gg))
    return float(tt[i]), float(gg[i]), float(gg[-1] / gg[i])


def plot_gap(metrics, out_path, F_star=None, setting: str | None = None):
    """Draw the certificate figure to ``out_path``. Returns the fitted rate of the gap (per unit
    time t = step * eta) or None if no straight part could be fitted.

    Curves: the gap primal_upper - dual_lower (always >= F(rho_hat_u) - F* and >= F* - D(u));
    with ``F_star``: F(rho_hat_u) - F* (primal_upper - F*) and F* - dual_lower. Statistical
    (Monte Carlo) records are drawn with hollow markers and labelled so.

    The fitted rate is computed from the records drawn, on the decreasing part only (never past
    the gap's minimum), and its legend names that window; when the gap rises after its minimum
    by more than a factor 2 (the particle floor's fluctuations, or a run that goes astray) the
    legend says by how much, so the rate is never read as the behaviour of the whole run.
    ``setting``: the caption (activation, lam, tau, N, eta).
    """
    from mfld.app.plots import pyplot, save_figure

    plt = pyplot()
    t, lo, up, statistical = _gap_table(metrics)
    gap = up - lo
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pos = gap > 0
    ax.semilogy(t[pos], gap[pos], "o-", ms=3.5, color="C0",
                mfc="none" if statistical else "C0",
                label="gap: upper − lower bound on F*" + (" (Monte Carlo, ±2 SE)" if statistical else " (certified)"))
    t_min, g_min, rise = rise_after_minimum(t, gap)
    fit, rate = _draw_rate(ax, t, gap, t_min)
    if F_star is not None:
        F_star = float(F_star)
        _draw_distances(ax, t, lo, up, F_star)
    if fit is not None and rate is not None:
        _draw_unfitted_tail(ax, t, gap, fit)
    if rise > 2.0:
        ax.semilogy([t_min], [g_min], "v", color="C3", ms=7, zorder=6,
                    label=f"minimum {g_min:.2g} at t = {t_min:.3g}; the last record is ×{rise:.3g} above it")
    ax.set_xlabel("time t = step × η")
    ax.set_ylabel("free-energy gap (units of F)")
    title = "Distance to the global optimum of F"
    if F_star is not None:
        title += f"  (F* = {F_star:.6g})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if setting:
        from mfld.app import style

        style.caption(fig, setting)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return rate


def _gap_table(metrics):
    """(t, dual_lower, primal_upper, statistical) of the records with finite bounds;
    ``statistical``: some record is a Monte Carlo estimate (``certified`` < 0.5)."""
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in dict(metrics).items()
            if k in ("t", "dual_lower", "primal_upper", "certified")}
    t = cols["t"]
    lo, up = cols["dual_lower"], cols["primal_upper"]
    ok = np.isfinite(t) & np.isfinite(lo) & np.isfinite(up)
    t, lo, up = t[ok], lo[ok], up[ok]
    cert = cols.get("certified", np.ones_like(ok, dtype=float))[ok] if "certified" in cols else np.ones(t.size)
    return t, lo, up, bool(np.any(cert < 0.5))


def _draw_rate(ax, t, gap, t_min):
    """Draw the fitted rate of the gap up to its minimum (or, with too few records for a
    regression, the two-point average rate over its first decade). Returns (fit or None,
    fitted rate or None)."""
    pos = gap > 0
    # fit only up to the minimum: what comes after it is not the linear phase
    upto = t <= t_min if t_min is not None else np.ones(t.size, bool)
    fit = _fit(t[upto], gap[upto]) if (pos & upto).sum() >= 3 else None
    rate = None
    if fit is not None and fit.rate > 0 and fit.ci_low > 0:
        tt = np.linspace(fit.t_start, fit.t_end, 50)
        ax.semilogy(tt, np.exp(fit.intercept - fit.rate * tt), "--", color="k", lw=2.2, zorder=5,
                    label=f"fit on t∈[{fit.t_start:.3g}, {fit.t_end:.3g}]: gap ∝ exp(−{fit.rate:.3g} t)"
                          f"  (95% CI {fit.ci_low:.2g}–{fit.ci_high:.2g})")
        rate = float(fit.rate)
    elif pos.sum() >= 2:
        # too few records on the straight part for a regression: the average rate from the
        # first record to the first one a decade lower is still a (two-point) statement
        g0 = gap[pos][0]
        t0 = t[pos][0]
        later = np.nonzero(pos & (t > t0) & (gap <= g0 / 10))[0]
        if later.size:
            i = later[0]
            r2 = float(np.log(g0 / gap[i]) / (t[i] - t0))
            ax.semilogy([t0, t[i]], [g0, gap[i]], ":", color="k", lw=2.0, zorder=5,
                        label=f"average rate {r2:.3g} over t∈[{t0:.3g}, {t[i]:.3g}] (too few records "
                              "for a fit: lower record.certify_every)")
    return fit, rate


def _draw_distances(ax, t, lo, up, F_star: float):
    """F(rho_hat_u) - F* (primal upper bound - F*) and F* - D(u) (F* - dual lower bound)."""
    d_up = up - F_star
    d_lo = F_star - lo
    m1, m2 = d_up > 0, d_lo > 0
    ax.semilogy(t[m1], d_up[m1], "s-", ms=3, color="C1", alpha=0.85,
                label="F(ρ̂ᵤ) − F*  (primal upper bound − F*)")
    ax.semilogy(t[m2], d_lo[m2], "^-", ms=3, color="C2", alpha=0.85,
                label="F* − D(u)  (F* − dual lower bound)")


def _draw_unfitted_tail(ax, t, gap, fit):
    """Shade the records after the fitted window and say between which values the gap stays there."""
    after = (gap > 0) & (t > fit.t_end)
    if after.any():
        lo_a, hi_a = float(gap[after].min()), float(gap[after].max())
        ax.axvspan(fit.t_end, float(t[after].max()), color="0.9", zorder=0,
                   label=f"t > {fit.t_end:.3g}: not fitted; the gap stays between {lo_a:.2g} and {hi_a:.2g}")
