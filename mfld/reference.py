"""Exact references for tests and diagnostics (THEORY sections 3 and 7), in float64 NumPy/SciPy.

Nothing here uses JAX: inputs are upcast to float64 NumPy copies, so the references are
exact to rounding whatever precision the particles run in.

Conventions (the same as :mod:`mfld.dynamics`): a particle is theta = (a, w), w in R^p,
where ``x_features`` (n, p) are the features the neurons see (the bias column included
when a bias is used, i.e. ``problem.x``) and D = p + 1. The plain (Euler-Maruyama) scheme is

    theta <- theta - eta * grad V_rho(theta) + sqrt(2 eta tau) xi,   t = k eta,

and the OU-splitting scheme is the explicit interaction step followed by the exact
Ornstein-Uhlenbeck step for the weight decay,
``theta <- e^{-lam eta} theta + sqrt(tau (1 - e^{-2 lam eta}) / lam) xi``.

Contents
- No signal (y = 0): the per-coordinate second-moment laws of both schemes and the
  closed-form F* of rho* = N(0, (tau/lam) I).
- Linear activation + squared loss: the optimum rho* (a centred Gaussian) by the scalar
  reduction of the self-consistency equation, log Z(u) and the LSI/Poincare constant of
  rho_hat_u in closed form, the exact N = infinity covariance recursion of both schemes,
  and their stationary laws (the time-step bias with no particle noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from mfld import choices
from mfld.errors import ConfigError

SCHEMES = choices.SCHEMES

# --------------------------------------------------------------------------------------------
# No signal (y = 0)
# --------------------------------------------------------------------------------------------


def no_signal_second_moment(v0: float, lam: float, tau: float, eta: float, n_steps: int,
                            scheme: str = "euler", tau_schedule=None) -> np.ndarray:
    """Per-coordinate second moment E[theta_k^2] after 0..n_steps steps with no interaction.

    With no signal the drift is lam * theta, so each coordinate of a centred Gaussian start
    with variance ``v0`` stays a centred Gaussian whose variance follows

    - ``euler``: v <- (1 - eta lam)^2 v + 2 eta tau  (the Euler-Maruyama recursion),
    - ``ou``:    v <- e^{-2 lam eta} v + tau (1 - e^{-2 lam eta}) / lam  (the exact OU law;
      equal to the continuous-time law at t = k eta).

    ``tau_schedule``: optional callable t -> tau_t (e.g. ``lambda t: tau / log(e + t)``)
    giving the temperature used by step k at t = k eta. Returns an array of length
    ``n_steps + 1`` (index k = after k steps). Valid for mean-field scaling; for NTK
    scaling pass lam / N and tau / N.
    """
    _check_scheme(scheme)
    out = np.empty(int(n_steps) + 1)
    v = float(v0)
    out[0] = v
    for k in range(int(n_steps)):
        tk = float(tau_schedule(k * eta)) if tau_schedule is not None else float(tau)
        if scheme == "euler":
            v = (1.0 - eta * lam) ** 2 * v + 2.0 * eta * tk
        else:
            e2 = math.exp(-2.0 * lam * eta)
            v = e2 * v + tk * (-math.expm1(-2.0 * lam * eta)) / lam
        out[k + 1] = v
    return out


def no_signal_stationary_variance(lam: float, tau: float, eta: float, scheme: str = "euler") -> float:
    """Fixed point of :func:`no_signal_second_moment`: (tau/lam)/(1 - eta lam/2) for the plain
    scheme (needs 0 < eta < 2/lam), tau/lam for OU splitting (exact for any eta)."""
    _check_scheme(scheme)
    if scheme == "ou":
        return tau / lam
    if not 0 < eta * lam < 2:
        raise ConfigError("the plain scheme is unstable in the weight-decay part", field="dynamics.eta",
                          value=eta, allowed=f"0 < eta < 2/lam = {2 / lam}")
    return (tau / lam) / (1.0 - eta * lam / 2.0)


def no_signal_free_energy(dim: int, lam: float, tau: float, risk0: float = 0.0) -> float:
    """F* for no signal: rho* = nu = N(0, (tau/lam) I_dim), dim = number of trained coordinates.

    F(nu) = R(f_nu) + (lam/2) E|theta|^2 - tau H(nu) with E|theta|^2 = dim tau/lam and
    H(nu) = (dim/2) log(2 pi e tau/lam), so
        F* = risk0 + dim tau/2 - (dim tau/2)(1 + log(2 pi tau/lam)) = risk0 - (dim tau/2) log(2 pi tau/lam).
    f_nu = 0 (a is centred and independent of w), so risk0 = R(0) = (1/2n) sum y_j^2 = 0 for
    y = 0 and the squared loss.
    """
    return float(risk0) - 0.5 * dim * tau * math.log(2.0 * math.pi * tau / lam)


def gaussian_entropy(cov) -> float:
    """Differential entropy of N(mu, cov): (1/2) log det(2 pi e cov)."""
    cov = np.asarray(cov, dtype=np.float64)
    k = cov.shape[0]
    sign, logdet = np.linalg.slogdet(cov)
    if sign <= 0:
        raise ValueError("covariance is not positive definite")
    return 0.5 * (k * math.log(2.0 * math.pi * math.e) + logdet)


# --------------------------------------------------------------------------------------------
# Linear activation + squared loss: the optimum
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGaussianOptimum:
    """The minimiser rho* = N(0, sigma) of F for the linear activation and squared loss.

    m: E*[a w] (p,), so f*(x) = m . x; c: (1/n) sum_j u_j x_j (p,); u: residuals
    u_j = m . x_j - y_j (n,); q: lam^2 - |c|^2 in (0, lam^2]; sigma: covariance of rho* over
    (a, w) in that order ((p+1, p+1)); risk: R(f*) = |u|^2/(2n); free_energy: F* = R(f*) +
    (lam/2) tr sigma - tau H(N(0, sigma)); lsi_constant: (lam - |c|)/tau (LSI = Poincare
    constant of rho* = rho_hat_{u*}); log_z: log Z(u*); residual: max |c - (S m - b)| of the
    self-consistency equation at the solution.
    """

    m: np.ndarray
    c: np.ndarray
    u: np.ndarray
    q: float
    sigma: np.ndarray
    risk: float
    free_energy: float
    lsi_constant: float
    log_z: float
    residual: float
    lam: float
    tau: float


def _as_xy(x_features, y):
    x = np.asarray(x_features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"need x (n, p) and y (n,) with n >= 1, got {x.shape} and {y.shape}",
                          field="data")
    return x, y


def _check_lam_tau(lam, tau, need_tau=True):
    if not lam > 0:
        raise ConfigError("weight decay must be positive", field="objective.lam", value=lam, allowed="lam > 0")
    if need_tau and not tau > 0:
        raise ConfigError("the Gibbs measure needs a positive temperature", field="objective.tau",
                          value=tau, allowed="tau > 0")


def gram(x_features, y):
    """S = (1/n) sum_j x_j x_j^T and b = (1/n) sum_j y_j x_j, so that c = S m - b."""
    x, y = _as_xy(x_features, y)
    n = x.shape[0]
    return x.T @ x / n, x.T @ y / n


def linear_gibbs_covariance(c, lam: float, tau: float) -> np.ndarray:
    """Covariance of the Gibbs measure exp(-V/tau), V(a, w) = a c.w + (lam/2)(a^2 + |w|^2).

    V = (1/2) theta^T A theta with A = [[lam, c^T], [c, lam I]], so sigma = tau A^{-1};
    by the Schur complement (s = lam - |c|^2/lam = q/lam, q = lam^2 - |c|^2 > 0):
    sigma_aa = tau lam/q, sigma_aw = -tau c/q, sigma_ww = tau (I/lam + c c^T/(lam q)).
    """
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    p = c.shape[0]
    q = lam * lam - float(c @ c)
    if not q > 0:
        raise ValueError(f"the Gibbs measure is not normalisable: |c| = {math.sqrt(c @ c)} >= lam = {lam}")
    sig = np.empty((p + 1, p + 1))
    sig[0, 0] = tau * lam / q
    sig[0, 1:] = sig[1:, 0] = -tau * c / q
    sig[1:, 1:] = tau * (np.eye(p) / lam + np.outer(c, c) / (lam * q))
    return sig


def linear_c_of_u(x_features, u) -> np.ndarray:
    """c(u) = (1/n) sum_j u_j x_j: g_u(w) = c . w for the linear activation."""
    x = np.asarray(x_features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    return x.T @ u / x.shape[0]


def linear_log_partition(x_features, u, lam: float, tau: float) -> float:
    """Closed-form log Z(u) = log integral exp(-V_u/tau) for the linear activation (THEORY 7):

        log Z(u) = (D/2) log(2 pi tau) - ((p - 1)/2) log lam - (1/2) log(lam^2 - |c(u)|^2),

    D = p + 1 (det A = lam^{p-1} (lam^2 - |c|^2)). Returns +inf where |c(u)| >= lam (the
    integral diverges).
    """
    _check_lam_tau(lam, tau)
    c = linear_c_of_u(x_features, u)
    p = c.shape[0]
    q = lam * lam - float(c @ c)
    if not q > 0:
        return math.inf
    return 0.5 * (p + 1) * math.log(2.0 * math.pi * tau) - 0.5 * (p - 1) * math.log(lam) - 0.5 * math.log(q)


def linear_lsi_constant(x_features, u, lam: float, tau: float) -> float:
    """LSI (= Poincare) constant of rho_hat_u for the linear activation: (lam - |c(u)|)/tau.

    rho_hat_u = N(0, tau A^{-1}); the smallest eigenvalue of A is lam - |c| (eigenvalues
    lam +- |c| and lam), attained by linear test functions. 0 where |c| >= lam.
    """
    _check_lam_tau(lam, tau)
    c = linear_c_of_u(x_features, u)
    return max(lam - float(np.sqrt(c @ c)), 0.0) / tau


def linear_dual(x_features, y, u, lam: float, tau: float) -> float:
    """D(u) = -(1/n) sum_j (u_j^2/2 + u_j y_j) - tau log Z(u) for the squared loss and the
    linear activation (THEORY 6-7); its maximum is F*."""
    x, y = _as_xy(x_features, y)
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    return float(-np.mean(0.5 * u * u + u * y) - tau * linear_log_partition(x, u, lam, tau))


def linear_gaussian_optimum(x_features, y, lam: float, tau: float) -> LinearGaussianOptimum:
    """The exact optimum rho* for the linear activation sigma(z) = z and the squared loss.

    rho* = rho_hat_{u*} is Gaussian (V is quadratic): with c = (1/n) sum_j u_j x_j,
    E*[a w] = m = -tau c/q, q = lam^2 - |c|^2 > 0, and u_j = m . x_j - y_j, i.e. c = S m - b.
    Substituting m: (I + (tau/q) S) c = -b, so c(q) = -(I + (tau/q) S)^{-1} b and q solves
    the scalar equation h(q) = q - lam^2 + |c(q)|^2 = 0 on (0, lam^2]. In the eigenbasis
    S = U diag(s) U^T, |c(q)|^2 = sum_k q^2 bt_k^2 / (q + tau s_k)^2 (bt = U^T b) is
    non-decreasing in q, so h is strictly increasing, h(0) = -lam^2 (b lies in the range of
    S) and h(lam^2) = |c(lam^2)|^2 >= 0: the admissible root is unique and bracketed; it is
    found by ``brentq``. (A generic root finder in m can land on a spurious root with
    |c| > lam, where the Gibbs measure does not exist.)

    Args: ``x_features`` (n, p): the features the neurons see (bias column included if any,
    i.e. ``problem.x``); ``y`` (n,); ``lam`` > 0; ``tau`` > 0.
    """
    _check_lam_tau(lam, tau)
    x, y = _as_xy(x_features, y)
    lam = float(lam)
    tau = float(tau)
    S, b = gram(x, y)
    s, U = np.linalg.eigh(S)
    s = np.clip(s, 0.0, None)
    bt = U.T @ b
    pos = s > 1e-14 * max(float(s.max()), 1e-300)

    def c_tilde(qv):
        # c~_k = -q bt_k/(q + tau s_k); on the null space of S (s_k = 0) c~_k = -bt_k (~0)
        den = np.where(pos, qv + tau * s, 1.0)
        return np.where(pos, -qv * bt / den, -bt)

    def h(qv):
        ct = c_tilde(qv)
        return qv - lam * lam + float(ct @ ct)

    lam2 = lam * lam
    h_hi = h(lam2)
    if h_hi <= 0.0:  # b = 0 (no signal seen by the linear model): c = 0, q = lam^2
        q = lam2
    else:
        h_lo = h(0.0)
        if h_lo >= 0.0:  # only if b has a (numerically) large component outside range(S)
            raise ValueError("no admissible root: b is not in the range of S")
        q = brentq(h, 0.0, lam2, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    c = U @ c_tilde(q)
    q = lam2 - float(c @ c)  # consistent with the returned c to rounding
    m = -tau * c / q
    u = x @ m - y
    residual = float(np.max(np.abs(c - (S @ m - b))))
    sigma = linear_gibbs_covariance(c, lam, tau)
    risk = 0.5 * float(u @ u) / x.shape[0]
    free_energy = risk + 0.5 * lam * float(np.trace(sigma)) - tau * gaussian_entropy(sigma)
    return LinearGaussianOptimum(
        m=m, c=c, u=u, q=q, sigma=sigma, risk=risk, free_energy=free_energy,
        lsi_constant=(lam - math.sqrt(float(c @ c))) / tau,
        log_z=linear_log_partition(x, u, lam, tau), residual=residual, lam=lam, tau=tau)


def linear_free_energy(x_features, y, sigma, lam: float, tau: float) -> float:
    """F(N(0, sigma)) for the linear activation and squared loss:
    R(m . x) + (lam/2) tr sigma - tau H(N(0, sigma)), m = sigma[0, 1:] = E[a w]."""
    x, y = _as_xy(x_features, y)
    sigma = np.asarray(sigma, dtype=np.float64)
    r = x @ sigma[0, 1:] - y
    return 0.5 * float(r @ r) / x.shape[0] + 0.5 * lam * float(np.trace(sigma)) - tau * gaussian_entropy(sigma)


# --------------------------------------------------------------------------------------------
# Linear activation + squared loss: the N = infinity law of the time-discrete schemes
# --------------------------------------------------------------------------------------------


def _interaction_matrix(c):
    """K(c) = [[0, c^T], [c, 0]]: grad of a c.w is (c.w, a c) = K theta."""
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    p = c.shape[0]
    k = np.zeros((p + 1, p + 1))
    k[0, 1:] = k[1:, 0] = c
    return k


def linear_covariance_step(sigma, S, b, lam: float, tau: float, eta: float, scheme: str = "euler"):
    """One step of the exact N = infinity law of a scheme, linear activation, squared loss.

    Derivation. For a centred Gaussian law rho = N(0, sigma) over theta = (a, w),
    f_rho(x) = E[a w] . x = m . x with m = sigma[0, 1:], so u_j = m . x_j - y_j and
    g(w) = (1/n) sum_j u_j w . x_j = c . w with c = S m - b. The potential is
    V(a, w) = a c.w + (lam/2)(a^2 + |w|^2), whose gradient is
        grad V = (c.w + lam a,  a c + lam w) = M theta,  M = lam I + K,  K = [[0, c^T], [c, 0]].
    The drift is linear in theta, so a Gaussian stays Gaussian and centred, and
    - plain scheme: theta' = (I - eta M) theta + sqrt(2 eta tau) xi, hence
      sigma' = (I - eta M) sigma (I - eta M)^T + 2 eta tau I;
    - OU splitting: theta' = e^{-lam eta}(I - eta K) theta + sqrt(tau(1 - e^{-2 lam eta})/lam) xi,
      hence sigma' = e^{-2 lam eta} (I - eta K) sigma (I - eta K)^T + tau (1 - e^{-2 lam eta})/lam I,
    with c recomputed from the current sigma at every step (the explicit scheme).
    """
    _check_scheme(scheme)
    sigma = np.asarray(sigma, dtype=np.float64)
    c = S @ sigma[0, 1:] - b
    k = _interaction_matrix(c)
    eye = np.eye(sigma.shape[0])
    if scheme == "euler":
        B = eye - eta * (lam * eye + k)
        return B @ sigma @ B.T + 2.0 * eta * tau * eye
    e = math.exp(-lam * eta)
    B = e * (eye - eta * k)
    return B @ sigma @ B.T + tau * (-math.expm1(-2.0 * lam * eta)) / lam * eye


def linear_covariance_recursion(x_features, y, lam: float, tau: float, eta: float, n_steps: int, *,
                                sigma0=None, a_scale: float = 1.0, w_scale: float = 1.0,
                                scheme: str = "euler", return_path: bool = False):
    """Iterate :func:`linear_covariance_step` ``n_steps`` times from ``sigma0`` (default the
    Gaussian start of :func:`mfld.dynamics.init_particles`: diag(a_scale^2, w_scale^2 I)).

    Returns the final covariance, or ``(final, path)`` with ``path`` of shape
    (n_steps + 1, D, D) when ``return_path``. Valid for tau >= 0.
    """
    x, y = _as_xy(x_features, y)
    S, b = gram(x, y)
    p = x.shape[1]
    if sigma0 is None:
        sigma0 = np.diag([a_scale ** 2] + [w_scale ** 2] * p)
    sig = np.array(sigma0, dtype=np.float64)
    path = [sig] if return_path else None
    for _ in range(int(n_steps)):
        sig = linear_covariance_step(sig, S, b, lam, tau, eta, scheme)
        if return_path:
            path.append(sig)
    return (sig, np.stack(path)) if return_path else sig


@dataclass(frozen=True)
class LinearSchemeFixedPoint:
    """Stationary N = infinity law N(0, sigma) of a time-discrete scheme (linear, squared).

    sigma (D, D); m = sigma[0, 1:] = E[a w]; c = S m - b; eta, scheme; residual: max |T(sigma)
    - sigma| of one recursion step at the returned sigma; steps: recursion steps used
    (``method='iterate'``; 0 for the closed form).
    """

    sigma: np.ndarray
    m: np.ndarray
    c: np.ndarray
    eta: float
    scheme: str
    residual: float
    steps: int


def _scheme_kappa(r, lam, tau, eta, scheme):
    """kappa(r) with m = -kappa(|c|) c at stationarity (see linear_scheme_fixed_point)."""
    if scheme == "euler":
        zp, zm = lam + r, lam - r
        if zm <= 0.0 or eta * zp >= 2.0:  # at or beyond the stability limit
            return math.inf
        return 4.0 * tau * (1.0 - eta * lam) / (zp * zm * (2.0 - eta * zp) * (2.0 - eta * zm))
    E = math.exp(-2.0 * lam * eta)
    Q = tau * (-math.expm1(-2.0 * lam * eta)) / lam
    dp = 1.0 - E * (1.0 - eta * r) ** 2
    dm = 1.0 - E * (1.0 + eta * r) ** 2
    if dp * dm <= 0.0:  # at or beyond the stability limit
        return math.inf
    return 2.0 * Q * E * eta / (dp * dm)


def _scheme_h(k, lam, tau, eta, scheme):
    """Stationary variance along an eigenvector of K with eigenvalue k."""
    if scheme == "euler":
        z = lam + k
        return 2.0 * tau / (z * (2.0 - eta * z))
    E = math.exp(-2.0 * lam * eta)
    Q = tau * (-math.expm1(-2.0 * lam * eta)) / lam
    return Q / (1.0 - E * (1.0 - eta * k) ** 2)


def linear_scheme_fixed_point(x_features, y, lam: float, tau: float, eta: float, *, scheme: str = "euler",
                              method: str = "closed_form", tol: float = 1e-14,
                              max_steps: int = 2_000_000) -> LinearSchemeFixedPoint:
    """The fixed point of the N = infinity covariance recursion (:func:`linear_covariance_step`).

    Its distance to rho* (:func:`linear_gaussian_optimum`) is the time-step bias with no
    particle noise: for the plain scheme O(eta) in the variances and O(eta^2) in E[a w]; for
    OU splitting O(eta) in E[a w] and exact with no signal (THEORY section 3).

    ``method='iterate'`` iterates the recursion from N(0, (tau/lam) I) until a step changes
    sigma by less than ``tol * eta * max|sigma|`` (the change per step is about
    eta x rate x distance, so the distance left is ~ tol/rate relative).

    ``method='closed_form'`` (default, fast for any eta): for fixed c the recursion is linear
    with a B that is a function of K = [[0, c^T], [c, 0]], so its fixed point is
    sigma = Q (I - B^2)^{-1} = h(K), with, per eigenvalue k of K (+-|c| and 0),
    h(k) = 2 tau/(z (2 - eta z)), z = lam + k (plain) or
    h(k) = Q/(1 - e^{-2 lam eta} (1 - eta k)^2), Q = tau (1 - e^{-2 lam eta})/lam (OU).
    In the plane of (a, c.w/|c|) the off-diagonal of h(K) is (h(r) - h(-r))/2, r = |c|, so
    m = -kappa(r) c with kappa(r) = (h(-r) - h(r))/(2 r) (written without cancellation), and
    c = S m - b gives c = -(I + kappa(r) S)^{-1} b: a scalar equation
    phi(r) = |c(r)| - r = 0 on [0, r_max), r_max the stability limit (phi(0) >= 0, phi -> -r_max
    as kappa -> inf), solved by ``brentq``. At eta -> 0 it reduces to the optimum's equation
    (kappa = tau/q).
    """
    _check_scheme(scheme)
    _check_lam_tau(lam, tau)
    x, y = _as_xy(x_features, y)
    lam, tau, eta = float(lam), float(tau), float(eta)
    if not eta > 0:
        raise ConfigError("step size must be positive", field="dynamics.eta", value=eta, allowed="eta > 0")
    S, b = gram(x, y)
    if method == "iterate":
        sig, steps = _iterated_fixed_point(S, b, lam, tau, eta, scheme, tol, max_steps)
    elif method == "closed_form":
        sig, steps = _closed_form_fixed_point(S, b, lam, tau, eta, scheme), 0
    else:
        raise ConfigError("unknown method", field="method", value=method, allowed="closed_form, iterate")
    resid = float(np.max(np.abs(linear_covariance_step(sig, S, b, lam, tau, eta, scheme) - sig)))
    m = sig[0, 1:].copy()
    return LinearSchemeFixedPoint(sigma=sig, m=m, c=S @ m - b, eta=eta, scheme=scheme,
                                  residual=resid, steps=steps)


def _iterated_fixed_point(S, b, lam, tau, eta, scheme, tol, max_steps):
    """(sigma, steps): the recursion iterated from N(0, (tau/lam) I) until a step changes sigma
    by less than ``tol * eta * max|sigma|`` (``method='iterate'``)."""
    sig = np.eye(S.shape[0] + 1) * (tau / lam)
    steps = 0
    while True:
        new = linear_covariance_step(sig, S, b, lam, tau, eta, scheme)
        steps += 1
        change = float(np.max(np.abs(new - sig)))
        sig = new
        if not np.all(np.isfinite(sig)):
            raise ValueError(f"the recursion diverged at step {steps} (eta = {eta} too large?)")
        if change <= tol * eta * float(np.max(np.abs(sig))):
            return sig, steps
        if steps >= max_steps:
            raise RuntimeError(f"no convergence in {max_steps} steps (last change {change:.3g})")


def _stability_radius(lam, eta, scheme):
    """r_max: the largest |c| below which the scheme's recursion is stable."""
    if scheme == "euler":
        if not 0 < eta * lam < 2:
            raise ConfigError("the plain scheme is unstable", field="dynamics.eta", value=eta,
                              allowed=f"0 < eta < 2/lam = {2 / lam}")
        return min(lam, 2.0 / eta - lam)
    return math.expm1(lam * eta) / eta  # |e^{-lam eta}(1 + eta r)| < 1


def _closed_form_fixed_point(S, b, lam, tau, eta, scheme):
    """sigma = h(K) with c the root of the scalar equation phi(r) = |c(r)| - r
    (``method='closed_form'``; see :func:`linear_scheme_fixed_point`)."""
    r_max = _stability_radius(lam, eta, scheme)
    s, U = np.linalg.eigh(S)
    s = np.clip(s, 0.0, None)
    bt = U.T @ b

    def c_of_r(r):
        return -U @ (bt / (1.0 + _scheme_kappa(r, lam, tau, eta, scheme) * s))

    def phi(r):
        return float(np.linalg.norm(c_of_r(r))) - r

    if phi(0.0) <= 0.0:
        r = 0.0
    else:
        hi = r_max * (1.0 - 1e-13)
        if phi(hi) >= 0.0:
            raise ValueError("no stationary law: the scalar equation has no root below the "
                             "stability limit (eta too large?)")
        r = brentq(phi, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    c = c_of_r(r)
    kv, V = np.linalg.eigh(_interaction_matrix(c))
    hv = np.array([_scheme_h(k, lam, tau, eta, scheme) for k in kv])
    sig = (V * hv) @ V.T
    return 0.5 * (sig + sig.T)


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ConfigError("unknown scheme", field="dynamics.scheme", value=scheme, allowed=", ".join(SCHEMES))
