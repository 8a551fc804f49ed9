"""``certificate-coverage``: are the statistical (Monte Carlo) bounds right when they say so?

For dim(w) > 3 the certificate's bounds are Monte Carlo estimates with importance sampling
(:func:`mfld.duality.adapt_proposal`): ``dual_lower = D_hat - 2 SE`` and
``primal_upper = F_hat + 2 SE`` claim one-sided 2-sigma coverage (about 97.7 % for a normal
estimate; Jensen's bias of -tau log Z_hat pushes D_hat up by about tau/(2 ESS), which the SE
dwarfs once ESS is large). This study repeats the certificate over many seeds and counts
how often each bound really holds:

- **linear activation with bias**, d = 2, 5, 10, 20 (dim(w) = d + 1), lam = 0.5, tau = 0.1,
  n = 60, against the closed form (THEORY 7). The tilt of the Gibbs density is
  E_mu[g(w)^2]/(lam tau) = |c|^2/(lam^2 - |c|^2) with c = (1/n) x^T u: weak (|c| = 0.3 lam,
  tilt 0.1), medium (0.7 lam, 0.96) and strong (0.96 lam, 11.8). Two states per tilt: *near*
  the optimum (the data are built so that u is the optimum u*: y = x m - u with
  m = -tau c/(lam^2 - |c|^2)) and *far* from it (another u with the same |c|, where D(u) is
  far below F*).
- **tanh with bias**, d = 2, 5, 10, data from a random 3-neuron tanh teacher, lam = 0.1,
  tau = 0.05, at the zero network (far: u = -y) and at half its residual (nearer: u = -y/2),
  against a reference of 100x more samples (its own standard error is reported); the tilt
  is measured (``tilt_value``), from 0.1 to about 50.

A seed's bound counts as *reported* unless the diagnostics withheld it (``withheld`` code:
ESS below max(100, 10 %) or Pareto k_hat > 0.7); coverage is over the reported seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from mfld import duality
from mfld.experiments import _common as C
from mfld.problem import Problem

NAME = "certificate-coverage"

LAM_LIN, TAU_LIN = 0.5, 0.1
LAM_TANH, TAU_TANH = 0.1, 0.05
TILT_FRACS = {"weak": 0.3, "medium": 0.7, "strong": 0.96}


@dataclass(frozen=True)
class Case:
    """One row of the study: an activation, an input dimension, a tilt and a state."""

    activation: str
    d: int
    tilt: str
    state: str  # "near" or "far"
    n: int = 60

    @property
    def label(self) -> str:
        return f"{self.activation} d={self.d} {self.tilt} {self.state}"


def _inputs(n, d, seed):
    rng = np.random.default_rng([seed, d])
    return rng.standard_normal((n, d)) / math.sqrt(d)


def _direction_with_c(x_feat, frac, lam, rng):
    """A u with |c(u)| = frac * lam, c(u) = x^T u / n (x with the bias column)."""
    v = rng.standard_normal(x_feat.shape[0])
    c = x_feat.T @ v / x_feat.shape[0]
    return v * (frac * lam / np.linalg.norm(c))


def problem_and_u(case: Case, seed: int = 0):
    """(Problem in float64, dual point u, exact (D, F) or None) of ``case``."""
    x = _inputs(case.n, case.d, seed)
    with jax.enable_x64(True):
        if case.activation == "linear":
            feat = np.concatenate([x, np.ones((case.n, 1))], axis=1)
            rng = np.random.default_rng([seed, case.d, 17])
            frac = TILT_FRACS[case.tilt]
            u_star = _direction_with_c(feat, frac, LAM_LIN, rng)
            c = feat.T @ u_star / case.n
            m = -TAU_LIN * c / (LAM_LIN ** 2 - c @ c)
            y = feat @ m - u_star  # then u* = f*(x) - y = u_star: the optimum of this problem
            pr = Problem.create(x, y, activation="linear", lam=LAM_LIN, tau=TAU_LIN, bias=True)
            u = u_star if case.state == "near" else _direction_with_c(feat, frac, LAM_LIN, rng)
            ev = duality.evaluate(pr, u, method="closed_form")
            return pr, u, (ev.D, ev.F)
        rng = np.random.default_rng([seed, case.d, 23])
        w_t = rng.standard_normal((3, case.d + 1))
        a_t = rng.choice([-1.0, 1.0], 3)
        y = np.tanh(np.concatenate([x, np.ones((case.n, 1))], axis=1) @ w_t.T) @ a_t / 3
        pr = Problem.create(x, y, activation="tanh", lam=LAM_TANH, tau=TAU_TANH, bias=True)
        u = -y if case.state == "far" else -0.5 * y
        return pr, u, None


def tilt_of(pr, u, n_samples=2 ** 16) -> float:
    """E_mu[g(w)^2]/(lam tau) under the tilted density mu: closed form for the linear
    activation (|c|^2/(lam^2 - |c|^2)), else from an adapted Monte Carlo evaluation."""
    lam = float(pr.lam)
    if pr.activation.name == "linear":
        x = np.asarray(pr.x, dtype=np.float64)
        c = x.T @ u / x.shape[0]
        return float(c @ c / (lam * lam - c @ c))
    return float(duality.evaluate(pr, u, method="mc", n_samples=n_samples, seed=10 ** 6).info["tilt"])


def coverage(case: Case, seeds: int = 200, n_samples: int = 4096, ref_factor: int = 100,
             proposal: str = "adapted") -> dict:
    """Run the Monte Carlo certificate over ``seeds`` seeds; count the one-sided coverage
    (``proposal="prior"``: the plain prior sampler, for comparison)."""
    pr, u, exact = problem_and_u(case)
    if exact is None:  # reference: 100x the samples, another seed stream
        ref = duality.evaluate(pr, u, method="mc", n_samples=ref_factor * n_samples, seed=10 ** 7)
        D_ref, F_ref, ref_se = ref.D, ref.F, max(ref.se_D, ref.se_F)
    else:
        (D_ref, F_ref), ref_se = exact, 0.0
    lo, up, ess, k, held, width = [], [], [], [], [], []
    for s in range(seeds):
        ev = duality.evaluate(pr, u, method="mc", n_samples=n_samples, seed=s, proposal=proposal)
        lo.append(ev.lower)
        up.append(ev.upper)
        ess.append(ev.ess / n_samples)
        k.append(ev.pareto_k)
        held.append(ev.withheld)
        width.append(ev.upper - ev.lower)
    lo, up, held = np.array(lo), np.array(up), np.array(held)
    rep = held == 0
    n_rep = int(rep.sum())
    return {
        "case": case.label, "activation": case.activation, "d": case.d, "dim_w": case.d + 1, "tilt": case.tilt,
        "state": case.state, "tilt_value": tilt_of(pr, u), "seeds": seeds, "samples": n_samples,
        "reported": n_rep,
        "cover_lower": float(np.mean(lo[rep] <= D_ref)) if n_rep else math.nan,
        "cover_upper": float(np.mean(up[rep] >= F_ref)) if n_rep else math.nan,
        "ess_frac_median": float(np.median(ess)), "ess_frac_min": float(np.min(ess)),
        "pareto_k_max": float(np.nanmax(k)),
        "width_median": float(np.median(np.array(width)[rep])) if n_rep else math.nan,
        "gap_exact": float(F_ref - D_ref), "reference_se": float(ref_se),
        "reference": "closed form" if exact is not None else f"{ref_factor}x samples",
        "proposal": proposal,
    }


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("linear", 5, "strong", "far"), Case("linear", 20, "strong", "near"),
                Case("tanh", 2, "teacher", "far")]
    out = [Case("linear", d, t, s) for d in (2, 5, 10, 20) for t in TILT_FRACS for s in ("near", "far")]
    out += [Case("tanh", d, "teacher", s) for d in (2, 5, 10) for s in ("near", "far")]
    return out


def run(out_dir, quick: bool = False) -> dict:
    return C.run_stages(compute, plot, report, out_dir, quick)


def compute(quick: bool = False, seeds: int = 200) -> dict:
    """The coverage of every case (:func:`coverage`): ``rows``, one dict per case."""
    rows = [coverage(c, seeds=seeds) for c in C.stages(cases(quick), "coverage cases")]
    return dict(quick=quick, seeds=seeds, rows=rows)


def plot(res: dict, out) -> None:
    """``coverage.png``: coverage and effective sample size per case."""
    _figure(out, res["rows"])


def report(res: dict, out, *, wall: float) -> dict:
    """``coverage.csv``, ``report.md`` and ``summary.json``; returns the summary."""
    rows, seeds = res["rows"], res["seeds"]
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    C.write_csv(out / "coverage.csv", cols)
    ok = all(r["reported"] == 0 or (r["cover_lower"] >= 0.95 and r["cover_upper"] >= 0.95
                                    and r["ess_frac_min"] >= 0.1) for r in rows)
    table = C.md_table({k: cols[k] for k in ("case", "tilt_value", "reported", "cover_lower", "cover_upper",
                                             "ess_frac_median", "ess_frac_min", "pareto_k_max", "width_median",
                                             "gap_exact", "reference")}, fmt="{:.3g}")
    text = (f"{seeds} seeds per case, {rows[0]['samples']} importance samples each (adapted defensive proposal). "
            "`cover_lower`: fraction of reported seeds with dual_lower <= D(u); `cover_upper`: primal_upper >= "
            "F(rho_hat_u); `ess_frac_*`: ESS / samples; `width_median`: median primal_upper - dual_lower (the "
            "certified gap, against the exact `gap_exact`); `tilt_value`: E_mu[g^2]/(lam tau).\n\n" + table +
            f"\n\n**Verdict:** {'every case' if ok else 'NOT every case'} reaches >= 95% one-sided coverage for both "
            "bounds with ESS >= 10% of the samples.")
    return C.finish(out, NAME, "Coverage of the Monte Carlo certificate", [("Coverage", text)], quick=res["quick"],
                    wall=wall, files=["coverage.csv", "coverage.png"], all_ok=ok, rows=rows)


def _figure(out, rows):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    idx = np.arange(len(rows))
    axes[0].plot(idx, [r["cover_lower"] for r in rows], "o", label="dual_lower <= D")
    axes[0].plot(idx, [r["cover_upper"] for r in rows], "s", label="primal_upper >= F")
    axes[0].axhline(0.95, color="k", ls="--", lw=1, label="95%")
    axes[0].set_ylim(0.8, 1.01)
    axes[0].set_ylabel("one-sided coverage over seeds")
    axes[1].semilogy(idx, [r["ess_frac_median"] for r in rows], "o", label="median ESS / M")
    axes[1].semilogy(idx, [r["ess_frac_min"] for r in rows], "v", label="min ESS / M")
    axes[1].axhline(0.1, color="k", ls="--", lw=1, label="10%")
    for ax in axes:
        ax.set_xticks(idx)
        ax.set_xticklabels([r["case"] for r in rows], rotation=75, fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Monte Carlo certificate: coverage over {rows[0]['seeds']} seeds and effective sample size "
                 f"(M = {rows[0]['samples']})")
    fig.tight_layout()
    C.savefig(fig, out / "coverage.png")
    plt.close(fig)
