"""The Gibbs partition function, the Fenchel dual and the computable certificates
(THEORY sections 4, 6, 7, 8).

Conventions (mean-field scaling, tau > 0; everything in float64 NumPy on upcast copies,
whatever the particles' precision):

- ``u (n,)`` are dual variables on the data; g_u(w) = (1/n) sum_j u_j sigma(w . x_j) and
  V_u(theta) = (1/n) sum_j u_j phi(theta; x_j) + (lam/2)|theta|^2.
- Z(u) = integral exp(-V_u/tau). The a-integral is analytic for the trained output layer
  (THEORY 6): Z = sqrt(2 pi tau/lam) integral exp(g^2/(2 lam tau) - lam |w|^2/(2 tau)) dw;
  1-D quadrature over a for the ``bounded`` layer; for the ``fixed`` layer each sign group
  s has log Z_s = log integral exp(-(s g(w) + lam |w|^2/2)/tau) dw and the dual uses the
  mass-weighted sum sum_s pi_s log Z_s (THEORY 8).
- The dual: D(u) = -(1/n) sum_j l*(u_j, y_j) - tau log Z(u) <= F*, concave, with gradient
  dD/du_j = (f_hat(x_j) - (l*)'(u_j))/n, f_hat = f_{rho_hat_u}.
- The primal bound: F(rho_hat_u) = R(f_hat) - (1/n) u . f_hat - tau log Z(u) >= F*.
  Their difference is (1/n) sum_j [l(f_hat_j) + l*(u_j) - u_j f_hat_j] >= 0 (Fenchel-Young;
  for the squared loss (1/2n)|u - (f_hat - y)|^2).

The integrals over w (closed form, quadrature, Monte Carlo) are in :mod:`mfld.gibbs`;
the importance-weight diagnostics in :mod:`mfld.importance`.

Refused (:class:`mfld.errors.TheoryNotApplicable`): tau = 0 and NTK scaling.
"""

from __future__ import annotations

import math

import numpy as np

from mfld.entropy import particle_arrays
from mfld.entropy import upcast_particles as _upcast
from mfld.gibbs import (
    MEMORY_BUDGET,
    METHODS,
    PROPOSALS,
    QUAD_MAX_DIM,
    WITHHELD,
    Evaluation,
    Proposal,
    QuadratureOverBudget,
    adapt_proposal,
    check_applicable,
    evaluate_spec,
    make_spec,
    network_output,
)
from mfld.importance import ESS_MIN, ESS_MIN_FRACTION, PARETO_K_MAX, ess_threshold, pareto_k

__all__ = [
    "Evaluation",
    "check_applicable",
    "residual_weights",
    "log_partition",
    "dual",
    "evaluate",
    "primal_bound",
    "certify",
    "METHODS",
    "ESS_MIN",
    "ESS_MIN_FRACTION",
    "PARETO_K_MAX",
    "ess_threshold",
    "pareto_k",
    "mc_warnings",
    "withheld_reason",
    "WITHHELD",
    "Proposal",
    "adapt_proposal",
    "MEMORY_BUDGET",
    "QUAD_MAX_DIM",
    "QuadratureOverBudget",
    "PROPOSALS",
    "network_output",
]


def residual_weights(problem, a, w) -> np.ndarray:
    """u_j = l'(f_rho(x_j), y_j) of the particles (float64), the dual point of a run."""
    spec = make_spec(problem)
    a, w = _upcast(a, w)
    return spec.loss_deriv(network_output(spec, a, w), spec.y)


def mc_warnings(columns) -> list[str]:
    """Warnings for Monte Carlo certificates whose importance weights degenerated.

    ``columns``: a mapping with the certificate keys of :func:`certify` as sequences over the
    records (a run's metrics) -- ``ess_low``, ``ess``, ``pareto_k``, and optionally ``step``.
    Returns one line per problem found (empty when nothing to say): records whose effective
    sample size fell below :func:`ess_threshold`, and records whose Pareto k_hat exceeds
    :data:`PARETO_K_MAX` (weights with a tail too heavy for importance sampling: THEORY 6's
    infinite-variance case). Either way the "2 SE" of those records is not a confidence bound.
    """
    def col(k):
        v = columns.get(k) if hasattr(columns, "get") else None
        return None if v is None else np.asarray(v, dtype=np.float64).reshape(-1)

    out = []
    held = col("withheld")
    if held is not None and held.size:
        codes = held[np.isfinite(held) & (held > 0)]
        step_all = col("step")
        for code in sorted(set(int(c) for c in codes)):
            idx = np.nonzero(held == code)[0]
            where = (f", first at step {int(step_all[idx[0]])}" if step_all is not None and step_all.size == held.size
                     else "")
            out.append(f"certificate withheld in {idx.size} records (dual_lower = -inf, primal_upper = +inf"
                       f"{where}): {withheld_reason(code)} (withheld = {code})")
    low, ess, kk, step = col("ess_low"), col("ess"), col("pareto_k"), col("step")
    if low is not None and low.size:
        bad = np.nonzero(low == 1.0)[0]
        if bad.size:
            where = (f" (first at step {int(step[bad[0]])})" if step is not None and step.size == low.size
                     else "")
            min_ess = float(np.nanmin(ess[bad])) if ess is not None and ess.size == low.size else math.nan
            n_rec = int(np.sum(np.isfinite(low)))
            out.append(f"Monte Carlo certificate: the effective sample size collapsed in {bad.size} of "
                       f"{n_rec} certified records{where}, down to {min_ess:.3g} (threshold max({ESS_MIN:g}, "
                       f"{100 * ESS_MIN_FRACTION:g}% of the samples)); their dual_lower/primal_upper and 2 SE are "
                       "not reliable: raise record.certify_samples, or use quadrature (dim w <= 2) or the closed "
                       "form (linear activation)")
    if kk is not None and kk.size and np.any(kk > PARETO_K_MAX):
        nb = int(np.sum(kk > PARETO_K_MAX))
        out.append(f"Monte Carlo certificate: the importance weights are heavy-tailed (Pareto k_hat up to "
                   f"{float(np.nanmax(kk)):.2g} > {PARETO_K_MAX} in {nb} records; k > 0.5 means infinite "
                   "variance, THEORY 6): the standard errors understate the error of those records")
    return out


def evaluate(problem, u, *, method: str = "auto", n_samples: int = 65536, seed: int = 0,
             plus_fraction: float = 0.5, memory_budget: int | None = None, proposal: str = "adapted") -> Evaluation:
    """D(u), F(rho_hat_u), grad D(u), f_{rho_hat_u} with error estimates (see :class:`Evaluation`).

    Total: whatever u, the data scale or the tilt, it returns (never an allocation error);
    where no trustworthy value can be had, ``withheld`` is non-zero, ``lower``/``upper`` are the
    trivial bounds -inf/+inf and ``info["reason"]`` says why (codes in :data:`WITHHELD`).

    ``proposal`` (Monte Carlo): ``adapted`` (default; :func:`adapt_proposal`) or ``prior``
    (plain sampling from N(0, tau/lam I), whose weights can have infinite variance; kept for
    comparison and diagnostics)."""
    return evaluate_spec(make_spec(problem, plus_fraction), u, method, n_samples, seed, memory_budget, proposal)


def log_partition(problem, u, **kw) -> tuple[float, float]:
    """(tau-free) log Z(u) and its error (quadrature error, or MC standard error).

    For the fixed output layer this is the mass-weighted sum_s pi_s log Z_s."""
    ev = evaluate(problem, u, **kw)
    tau = float(problem.tau)
    err = ev.se_D if ev.method == "mc" else ev.err_D
    return ev.tau_log_z / tau, err / tau


def dual(problem, u, **kw) -> float:
    """D(u) = -(1/n) sum_j l*(u_j) - tau log Z(u) (an estimate if Monte Carlo)."""
    return evaluate(problem, u, **kw).D


def primal_bound(problem, u, **kw) -> float:
    """F(rho_hat_u) (an estimate if Monte Carlo); >= F* for every u."""
    return evaluate(problem, u, **kw).F


# ---------------------------------------------------------------------------------------
# The certificate along a run
# ---------------------------------------------------------------------------------------


def certify(problem, a, w, *, method="auto", n_samples=65536, seed=0, optimum=None,
            plus_fraction=0.5, memory_budget=None, proposal="adapted") -> dict[str, float]:
    """Bounds on F* at the particles' dual point u_j = l'(f_rho(x_j), y_j) (float64).

    Keys: ``dual_lower`` (D(u) minus its quadrature error, or D_hat - 2 SE: <= F*),
    ``primal_upper`` (F(rho_hat_u) plus error or + 2 SE: >= F*), ``gap`` (their difference),
    ``certified`` (1.0 for closed form / quadrature, 0.0 for Monte Carlo), ``withheld`` (0.0
    when the bounds are reported; else the code of :data:`WITHHELD` saying why
    ``dual_lower`` = -inf and ``primal_upper`` = +inf: a diverged state, a divergent Gibbs
    integral, or Monte Carlo diagnostics that say the estimate cannot be trusted -- the
    point values stay in ``dual_value``/``primal_value``; :func:`withheld_reason` gives the
    text), ``ess`` (nan unless Monte Carlo), ``ess_low`` (1.0 when a Monte Carlo effective
    sample size fell below :func:`ess_threshold`, else 0.0), ``pareto_k`` (the weights' tail
    index k_hat, nan unless Monte Carlo; above :data:`PARETO_K_MAX` the estimate is
    unreliable), ``dual_value``/``primal_value`` (the point values), ``bound_err``
    (quadrature error or 2 SE on the dual), ``free_energy_est`` (R + lam/2 E|theta|^2 -
    tau H_kNN of the particles: an *estimate*), ``entropy_reliable`` (0.0 if the particle
    dimension exceeds 5), ``kl_gap_est`` (free_energy_est - D(u), an estimate of
    tau KL(rho || rho_hat)) and, with ``optimum``, ``F_star`` and ``F_minus_Fstar_upper``
    (primal_upper - F*: how far the current Gibbs measure is from the optimum, at most).

    Total: a diverged or far-from-optimum state, a huge input scale or a strong tilt give a
    row with ``withheld`` set, never an exception or an allocation beyond the memory budget.
    """
    from mfld.entropy import free_energy_estimate

    spec = make_spec(problem, plus_fraction)
    a, w = particle_arrays(a, w)  # upcast to float64 block by block, never all at once
    with np.errstate(over="ignore", invalid="ignore"):
        f = network_output(spec, a, w)
        u = spec.loss_deriv(f, spec.y)
    ev = evaluate_spec(spec, u, method, n_samples, seed, memory_budget, proposal)
    lower, upper = ev.lower, ev.upper
    finite_state = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(w)) and np.all(np.isfinite(f)))
    fe = (free_energy_estimate(problem, a, w, f=f) if finite_state
          else {"free_energy_est": math.nan, "entropy_reliable": math.nan})
    out = {
        "dual_lower": float(lower),
        "primal_upper": float(upper),
        "gap": float(upper - lower) if math.isfinite(upper - lower) else math.inf,
        "certified": 1.0 if ev.certified and not ev.withheld else 0.0,
        "withheld": float(ev.withheld),
        "ess": float(ev.ess) if ev.method == "mc" else math.nan,
        "ess_low": 1.0 if ev.ess_low else 0.0,
        "pareto_k": float(ev.pareto_k) if ev.method == "mc" else math.nan,
        "dual_value": float(ev.D),
        "primal_value": float(ev.F),
        "bound_err": float(2 * ev.se_D if ev.method == "mc" else ev.err_D),
        "free_energy_est": fe["free_energy_est"],
        "entropy_reliable": fe["entropy_reliable"],
        "kl_gap_est": float(fe["free_energy_est"] - ev.D),
    }
    if optimum is not None:
        out["F_star"] = float(optimum.F_star)
        out["F_minus_Fstar_upper"] = float(upper - optimum.F_star)
    return out


def withheld_reason(code) -> str:
    """The text of a ``withheld`` code of :func:`certify` ('' for 0 or nan)."""
    try:
        return WITHHELD.get(int(code), f"unknown code {code}")
    except (TypeError, ValueError):
        return ""
