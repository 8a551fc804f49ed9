"""Diagnostics of importance weights: the effective sample size and the Pareto k_hat.

Used by the Monte Carlo evaluation of the Gibbs integrals (:mod:`mfld.gibbs`) to decide when an
estimate can be trusted (:mod:`mfld.duality` withholds the bounds otherwise).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ESS_MIN", "ESS_MIN_FRACTION", "PARETO_K_MAX", "ess_threshold", "pareto_k"]

#: The effective sample size below which a Monte Carlo certificate is flagged (``ess_low``):
#: ESS < max(ESS_MIN, ESS_MIN_FRACTION * samples). Why these numbers: the standard error is
#: itself estimated from the same weights, with a relative error of order ESS^-1/2 when the
#: weights have finite variance and none at all when they do not; below ~100 effective samples
#: the estimate rests on a handful of points and its "2 SE" is not a confidence statement.
#: With finite-variance weights ESS/M tends to 1/(1 + chi^2(rho_hat_w || N(0, tau/lam I))), a
#: constant; a fraction below 1% means chi^2 > 99, and with infinite-variance weights ESS/M
#: falls to 0 as M grows (like M^(1 - 2k) for tail index k), so more samples barely help.
ESS_MIN = 100.0
ESS_MIN_FRACTION = 0.1
#: Pareto k_hat above which importance-sampling estimates are unreliable (Vehtari, Simpson,
#: Gelman, Yao, Gabry, "Pareto smoothed importance sampling", JMLR 2024: min(1 - 1/log10 S,
#: 0.7), which is 0.7 for S >= 2200 samples).
PARETO_K_MAX = 0.7


def ess_threshold(n_samples: int) -> float:
    """The effective sample size below which a Monte Carlo estimate is flagged:
    max(:data:`ESS_MIN`, :data:`ESS_MIN_FRACTION` * n_samples) (reasons at the constants)."""
    return max(ESS_MIN, ESS_MIN_FRACTION * float(n_samples))


def _gpd_fit_k(x: np.ndarray) -> float:
    """Shape k of a generalised Pareto law fitted to sorted positive exceedances ``x``
    (Zhang & Stephens 2009 profile-posterior estimator, with the weak prior of Vehtari et al.
    that shrinks k towards 1/2 by 10 pseudo-observations)."""
    n = x.size
    m = 30 + int(math.sqrt(n))
    b = 1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    b /= 3.0 * x[int(n / 4 + 0.5) - 1]
    b += 1.0 / x[-1]
    k = np.log1p(-b[:, None] * x[None, :]).mean(axis=1)
    ll = n * (np.log(-b / k) - k - 1.0)
    with np.errstate(over="ignore"):  # exp overflow -> inf -> a weight of exactly 0, as intended
        wt = 1.0 / np.exp(ll[None, :] - ll[:, None]).sum(axis=1)
    keep = wt >= 10 * np.finfo(float).eps
    wt, b = wt[keep] / wt[keep].sum(), b[keep]
    k_post = float(np.log1p(-np.sum(b * wt) * x).mean())
    return (n * k_post + 10 * 0.5) / (n + 10)


def pareto_k(log_weights) -> float:
    """Pareto-smoothed importance-sampling diagnostic k_hat of a sample of log weights.

    The largest M = ceil(min(S/5, 3 sqrt(S))) weights, less the (M+1)-th largest, are fitted by
    a generalised Pareto law; its shape k estimates the tail index of the weights: the weights
    have finite variance iff k < 1/2 and the estimate is unreliable above 0.7 (Vehtari et al.,
    JMLR 2024). nan for fewer than 20 finite weights or a degenerate tail (all equal).
    """
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    lw = lw[np.isfinite(lw)]
    s = lw.size
    m = int(math.ceil(min(0.2 * s, 3.0 * math.sqrt(s))))
    if s < 20 or m < 5:
        return math.nan
    tail = np.sort(lw[np.argpartition(lw, s - m - 1)[s - m - 1:]])
    top = tail[-1]
    ex = np.exp(tail[1:] - top) - math.exp(tail[0] - top)
    if not ex[-1] > 0 or not np.all(np.isfinite(ex)):
        return math.nan
    ex = np.maximum(ex, 1e-300 * ex[-1])
    return float(_gpd_fit_k(ex))
