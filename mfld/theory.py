"""Linear-convergence theory made computable (THEORY sections 4, 5, 8).

- :func:`lsi_lower_bound`: the section-5 lower bound on the log-Sobolev constant alpha of the
  proximal Gibbs measure rho_hat_rho, from the state's risk R(rho) and the constants
  sup|sigma|, sup|sigma'|, m_x, lam, tau. It returns an :class:`LSIBound` carrying the value
  *and* every input, and raises :class:`mfld.errors.TheoryNotApplicable` (never a number)
  when an assumption of the derivation fails.
- :func:`a_priori_risk_bound`: R(rho_t) <= F(rho_0) + tau (D/2) log(2 pi tau / lam).
- :func:`gaussian_init_free_energy`: F(rho_0) in closed form for the Gaussian initialisation.
- :func:`envelope`: the predicted envelope exp(-2 tau int_0^t alpha_s ds) (F(rho_0) - F*)
  along a recorded run (trapezoid rule over the records).
- :func:`fit_rate`: least-squares fit of log(gap) = b - r t over a window, with a t-based
  confidence interval, and an automatic choice of the straight part of the curve.

Normalisation (THEORY section 7): LSI, Ent_mu(h^2) <= (2/alpha) E_mu |grad h|^2; for
N(0, s^2 I), alpha = 1/s^2. The bound implies d/dt (F - F*) <= -2 tau alpha_t (F - F*).

Which bound is used (D = particle dimension):
- trained output layer (the paper's vanilla case): G = sup_w |g(w)|, L = sup_w |grad g(w)|,
  alpha_w = (lam/tau) exp(-G^2 / (2 lam tau)) (Holley-Stroock on the w-marginal), and
  alpha >= alpha_w / Lip^2 with Lip = (s + sqrt(s^2 + 4))/2, s = L / lam, the exact
  Lipschitz constant of (w, z) -> (w, z - g(w)/lam) (THEORY 5 also quotes the cruder
  1 + s; ``lipschitz="crude"`` selects it).
- fixed output layer (a = +-1): alpha >= (lam/tau) exp(-2 G / tau) (THEORY 8).
- bounded output layer (r_out tanh a): alpha >= (lam/tau) exp(-2 r_out G / tau) (THEORY 8).
Squared loss: G <= sup|sigma| sqrt(2 R), L <= sup|sigma'| m_x sqrt(2 R) (Cauchy-Schwarz,
u_j = f(x_j) - y_j). Logistic loss: |u_j| <= 1, so G <= sup|sigma|, L <= sup|sigma'| m_x.
m_x = sqrt((1/n) sum_j |x_j|^2) over the *features* (the bias coordinate included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mfld.errors import ConfigError, TheoryNotApplicable

__all__ = [
    "LSIBound",
    "RateFit",
    "lsi_lower_bound",
    "lsi_lower_bounds",
    "feature_rms",
    "a_priori_risk_bound",
    "gaussian_init_free_energy",
    "envelope",
    "envelope_along",
    "fit_rate",
    "choose_window",
]


@dataclass(frozen=True)
class LSIBound:
    """A lower bound on the LSI constant of rho_hat with every input it used.

    alpha: the bound (units 1/|theta|^2). rate: 2 tau alpha, the guaranteed decay rate of
    F - F*. G, L: the bounds on sup|g| and sup|grad g| (L is None when unused).
    """

    alpha: float
    rate: float
    risk: float | None
    sup_sigma: float
    sup_dsigma: float | None
    m_x: float
    lam: float
    tau: float
    r_out: float | None
    loss: str
    output: str
    activation: str
    G: float
    L: float | None
    alpha_w: float | None
    lipschitz: float | None
    formula: str

    def as_dict(self) -> dict:
        return asdict(self)


def feature_rms(problem) -> float:
    """m_x = sqrt((1/n) sum_j |x_j|^2) over the features the neurons see (bias included)."""
    x = np.asarray(problem.x, dtype=np.float64)
    return float(np.sqrt(np.mean(np.sum(x * x, axis=1))))


def _check_applicable(problem, *, need_dsup: bool):
    if problem.scaling != "mean_field":
        raise TheoryNotApplicable(
            f"the LSI bound is a mean-field statement; scaling={problem.scaling!r} has no "
            "mean-field measure, free energy or proximal Gibbs measure (THEORY section 8)")
    tau = float(problem.tau)
    if not tau > 0:
        raise TheoryNotApplicable(
            f"tau = {tau}: without entropy (tau = 0) rho_hat and its LSI constant are undefined")
    act = problem.activation
    if act.sup is None:
        raise TheoryNotApplicable(
            f"activation {act.name!r} is unbounded: sup_w |g(w)| has no bound of the section-5 "
            "form, so the derivation gives no LSI constant (use tanh, sigmoid, erf, or a "
            "user activation with a declared sup)")
    if need_dsup and act.dsup is None:
        raise TheoryNotApplicable(
            f"activation {act.name!r} has no declared bound on sup|sigma'|, which the "
            "trained-output-layer bound needs")
    if problem.loss.name not in ("squared", "logistic"):
        raise TheoryNotApplicable(f"no section-5 bound for the loss {problem.loss.name!r}")


def lsi_lower_bound(problem, risk: float | None = None, *, lipschitz: str = "exact") -> LSIBound:
    """The section-5/8 lower bound on the LSI constant of rho_hat_rho.

    ``risk`` is R(rho) of the state whose rho_hat is considered (squared loss; ignored for the
    logistic loss, whose bound is uniform in time). Raises TheoryNotApplicable for tau = 0,
    NTK scaling, or an activation without a finite sup|sigma| (relu, softplus, gelu, linear).
    """
    if lipschitz not in ("exact", "crude"):
        raise ConfigError("unknown Lipschitz variant", field="lipschitz", value=lipschitz,
                          allowed="exact, crude")
    output = problem.output
    _check_applicable(problem, need_dsup=(output == "trained"))
    lam, tau = float(problem.lam), float(problem.tau)
    act = problem.activation
    m_x = feature_rms(problem)
    if problem.loss.name == "squared":
        if risk is None:
            raise ConfigError("the squared-loss bound needs the risk R(rho)", field="risk",
                              allowed="a finite number >= 0")
        risk = float(risk)
        if not (np.isfinite(risk) and risk >= 0):
            raise ConfigError("must be a finite non-negative risk", field="risk", value=risk)
        u_rms = math.sqrt(2.0 * risk)  # sqrt((1/n) sum u_j^2) with u_j = f_j - y_j
    else:
        risk = None if risk is None else float(risk)
        u_rms = 1.0  # |u_j| <= 1
    G = act.sup * u_rms
    r_out = None
    L = alpha_w = lip = None
    if output == "trained":
        L = act.dsup * m_x * u_rms
        alpha_w = (lam / tau) * math.exp(-G * G / (2.0 * lam * tau))
        s = L / lam
        lip = (s + math.sqrt(s * s + 4.0)) / 2.0 if lipschitz == "exact" else 1.0 + s
        alpha = alpha_w / (lip * lip)
        formula = "(lam/tau) exp(-G^2/(2 lam tau)) / Lip^2, Lip = " + (
            "(s + sqrt(s^2+4))/2" if lipschitz == "exact" else "1 + s") + ", s = L/lam"
    elif output == "fixed":
        alpha = (lam / tau) * math.exp(-2.0 * G / tau)
        formula = "(lam/tau) exp(-2 G/tau)"
    elif output == "bounded":
        r_out = float(problem.r_out)
        alpha = (lam / tau) * math.exp(-2.0 * r_out * G / tau)
        formula = "(lam/tau) exp(-2 r_out G/tau)"
    else:  # pragma: no cover - Problem validates outputs
        raise TheoryNotApplicable(f"no LSI bound for output layer {output!r}")
    if problem.loss.name == "squared":
        formula += ", G = sup|sigma| sqrt(2R)" + (", L = sup|sigma'| m_x sqrt(2R)" if L is not None else "")
    else:
        formula += ", G = sup|sigma|" + (", L = sup|sigma'| m_x" if L is not None else "")
    return LSIBound(alpha=alpha, rate=2.0 * tau * alpha, risk=risk, sup_sigma=float(act.sup),
                    sup_dsigma=None if act.dsup is None else float(act.dsup), m_x=m_x, lam=lam,
                    tau=tau, r_out=r_out, loss=problem.loss.name, output=output,
                    activation=act.name, G=G, L=L, alpha_w=alpha_w, lipschitz=lip, formula=formula)


def lsi_lower_bounds(problem, risks, **kw) -> np.ndarray:
    """:func:`lsi_lower_bound` ``.alpha`` for each risk of a recorded run (an array)."""
    risks = np.asarray(risks, dtype=np.float64).reshape(-1)
    return np.array([lsi_lower_bound(problem, r, **kw).alpha for r in risks])


def a_priori_risk_bound(problem, free_energy_0: float) -> float:
    """R(rho_t) <= F(rho_0) + tau (D/2) log(2 pi tau / lam) for all t >= 0.

    F decreases along MFLD and F(rho) >= R(rho) - tau (D/2) log(2 pi tau/lam) (the
    minimum of (lam/2) E|theta|^2 + tau E log rho over densities, attained at
    N(0, tau/lam I)). D is the particle dimension.
    """
    tau, lam = float(problem.tau), float(problem.lam)
    if not tau > 0:
        raise TheoryNotApplicable("tau = 0: the free energy has no entropy term")
    D = problem.particle_dim
    return float(free_energy_0) + tau * 0.5 * D * math.log(2.0 * math.pi * tau / lam)


def gaussian_init_free_energy(problem, a_scale: float = 1.0, w_scale: float = 1.0) -> float:
    """F(rho_0) for rho_0 = N(0, a_scale^2) x N(0, w_scale^2 I_p), trained output layer.

    a and w are independent and E[a] = 0, so f_{rho_0} = 0 and R(rho_0) = (1/n) sum l(0, y_j);
    the entropy of a Gaussian is closed form. Refuses other output layers (f_{rho_0} != 0
    or a different entropy convention).
    """
    if problem.output != "trained":
        raise TheoryNotApplicable("closed-form F(rho_0) is implemented for the trained output layer")
    if problem.scaling != "mean_field" or not float(problem.tau) > 0:
        raise TheoryNotApplicable("F(rho_0) needs mean-field scaling and tau > 0")
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        y = jnp.asarray(np.asarray(problem.y, dtype=np.float64))
        r0 = float(jnp.mean(problem.loss.value(jnp.zeros_like(y), y)))
    p = problem.p
    lam, tau = float(problem.lam), float(problem.tau)
    second = a_scale**2 + p * w_scale**2
    neg_entropy = -0.5 * (math.log(2 * math.pi * math.e * a_scale**2)
                          + p * math.log(2 * math.pi * math.e * w_scale**2))
    return r0 + 0.5 * lam * second + tau * neg_entropy


def envelope(t, alpha, gap0: float, tau: float) -> np.ndarray:
    """gap0 * exp(-2 tau int_0^t alpha_s ds), the integral by the trapezoid rule over ``t``.

    ``t`` must start at the time where ``gap0`` is measured and be non-decreasing.
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), t.shape)
    if t.size and np.any(np.diff(t) < 0):
        raise ConfigError("times must be non-decreasing", field="t")
    integral = np.concatenate([[0.0], np.cumsum(0.5 * (alpha[1:] + alpha[:-1]) * np.diff(t))])
    return float(gap0) * np.exp(-2.0 * float(tau) * integral)


def envelope_along(problem, t, risk, gap0: float, **kw):
    """The envelope along a recorded run: alpha_s from the recorded risk R(rho_s).

    Returns ``(envelope, alpha)``; the first record is the start (t_0, gap0).
    """
    alpha = lsi_lower_bounds(problem, risk, **kw)
    return envelope(t, alpha, gap0, float(problem.tau)), alpha


# ---- rate fitting -----------------------------------------------------------------------


@dataclass(frozen=True)
class RateFit:
    """log(gap) ~ intercept - rate * t over [t_start, t_end]; CI is two-sided at ``confidence``."""

    rate: float
    ci_low: float
    ci_high: float
    stderr: float
    intercept: float
    t_start: float
    t_end: float
    n_points: int
    confidence: float
    floor: float

    def as_dict(self) -> dict:
        return asdict(self)


def choose_window(t, gap, *, start_fraction: float = 0.5, floor: float | None = None,
                  floor_factor: float = 3.0) -> tuple[float, float, float]:
    """The straight part of a log-gap curve: from the first time gap < start_fraction * gap_0
    to the first later time the gap reaches the noise floor.

    The floor, unless given, is ``floor_factor`` times the median of the positive gaps over
    the last fifth of the records (a plateau's level; for a curve still decaying it only
    trims the tail). Returns ``(t_start, t_end, floor)``.
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    gap = np.asarray(gap, dtype=np.float64).reshape(-1)
    ok = np.isfinite(gap) & (gap > 0)
    if ok.sum() < 3:
        raise ConfigError("need at least 3 positive finite gaps to fit a rate", field="gap")
    g0 = gap[np.argmax(ok)]
    if floor is None:
        tail = gap[-max(3, len(gap) // 5):]
        tail = tail[np.isfinite(tail) & (tail > 0)]
        floor = floor_factor * float(np.median(tail)) if tail.size else 0.0
    below = np.nonzero(ok & (gap < start_fraction * g0))[0]
    i0 = int(below[0]) if below.size else int(np.argmax(ok))
    later = np.nonzero((np.arange(len(gap)) > i0) & (~ok | (gap <= floor)))[0]
    i1 = int(later[0]) if later.size else len(gap)
    # keep at least 3 points (then the window extends to the floor crossing inclusive)
    if i1 - i0 < 3:
        i1 = min(len(gap), i0 + 3)
    return float(t[i0]), float(t[i1 - 1]), float(floor)


def fit_rate(t, gap, *, window: tuple[float, float] | None = None, confidence: float = 0.95,
             floor: float | None = None, start_fraction: float = 0.5) -> RateFit:
    """Fit log(gap) = b - rate * t by least squares over a window; t-based CI on the rate.

    ``window=(t_start, t_end)`` fixes the window; otherwise :func:`choose_window` picks the
    straight part. Non-positive gaps in the window are dropped (log undefined) -- at least 3
    points must remain.
    """
    from scipy import special  # stdtrit = t quantile; scipy.stats costs ~1-7 s to import

    t = np.asarray(t, dtype=np.float64).reshape(-1)
    gap = np.asarray(gap, dtype=np.float64).reshape(-1)
    if t.shape != gap.shape:
        raise ConfigError(f"t and gap differ in length ({t.size} vs {gap.size})", field="gap")
    if not 0 < confidence < 1:
        raise ConfigError("must be in (0, 1)", field="confidence", value=confidence)
    if window is None:
        t0, t1, floor = choose_window(t, gap, floor=floor, start_fraction=start_fraction)
    else:
        t0, t1 = map(float, window)
        floor = 0.0 if floor is None else float(floor)
    sel = (t >= t0) & (t <= t1) & np.isfinite(gap) & (gap > 0)
    k = int(sel.sum())
    if k < 3:
        raise ConfigError(f"only {k} positive gaps in the window [{t0}, {t1}]; need 3",
                          field="window", value=(t0, t1))
    ts, ls = t[sel], np.log(gap[sel])
    tm = ts.mean()
    sxx = float(np.sum((ts - tm) ** 2))
    if sxx == 0:
        raise ConfigError("the window holds a single time", field="window", value=(t0, t1))
    slope = float(np.sum((ts - tm) * (ls - ls.mean())) / sxx)
    intercept = float(ls.mean() - slope * tm)
    resid = ls - (intercept + slope * ts)
    dof = k - 2
    s2 = float(np.sum(resid**2) / dof) if dof > 0 else 0.0
    se = math.sqrt(s2 / sxx)
    q = float(special.stdtrit(dof, 0.5 + confidence / 2)) if dof > 0 else float("inf")
    rate = -slope
    return RateFit(rate=rate, ci_low=rate - q * se, ci_high=rate + q * se, stderr=se,
                   intercept=intercept, t_start=float(ts[0]), t_end=float(ts[-1]), n_points=k,
                   confidence=confidence, floor=float(floor))
