"""Differential entropy of particles and the free-energy estimate (THEORY sections 2, 6).

The Kozachenko-Leonenko k-nearest-neighbour estimator of H(rho) = -E log rho from N samples
in R^D (Euclidean distances, KD-tree from :mod:`scipy.spatial`)::

    H_hat = psi(N) - psi(k) + log V_D + (D / N) sum_i log eps_i,

with eps_i the distance from sample i to its k-th nearest neighbour and
V_D = pi^{D/2} / Gamma(D/2 + 1) the volume of the unit ball. It is consistent but biased
at finite N, and the bias grows with D (for a Gaussian it is a few hundredths of a nat per
dimension at N = 10^4, D <= 5): everything built on it is an *estimate*, never a bound.
Above ``RELIABLE_MAX_DIM`` dimensions outputs say so explicitly.

Everything is computed in float64 on upcast copies, whatever the particles' precision.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

from mfld.errors import ConfigError

__all__ = ["RELIABLE_MAX_DIM", "knn_entropy", "free_energy_estimate", "particle_entropy", "upcast_particles"]

#: Largest particle dimension D for which the k-NN entropy is treated as reliable.
RELIABLE_MAX_DIM = 5


def knn_entropy(x, k: int = 3) -> float:
    """Kozachenko-Leonenko entropy estimate (nats) of samples ``x`` of shape (N,) or (N, D).

    ``k``: neighbour order (k = 3 trades a little bias for much less variance than k = 1).
    Coincident points (zero distances) are floored at the smallest positive float spacing
    of the data's scale, so the estimate stays finite.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ConfigError(f"samples must be (N,) or (N, D), got shape {x.shape}", field="particles")
    n, dim = x.shape
    k = int(k)
    if k < 1:
        raise ConfigError("neighbour order must be positive", field="entropy.k", value=k, allowed="k >= 1")
    if n <= k:
        raise ConfigError(f"need more than k = {k} samples for the k-NN entropy, got {n}",
                          field="particles", value=n)
    if not np.all(np.isfinite(x)):
        return math.nan
    tree = cKDTree(x)
    dist, _ = tree.query(x, k=k + 1)  # column 0 is the point itself
    eps = dist[:, -1]
    scale = max(float(np.max(np.abs(x))), 1e-300)
    eps = np.maximum(eps, np.finfo(np.float64).eps * scale)
    log_vd = 0.5 * dim * math.log(math.pi) - float(gammaln(0.5 * dim + 1.0))
    return float(digamma(n) - digamma(k) + log_vd + dim * np.mean(np.log(eps)))


def upcast_particles(a, w) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy copies: a (N,), w (N, p) (a 1-D w is one weight per particle)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    return a, w


def particle_entropy(problem, a, w, k: int = 3) -> float:
    """Entropy estimate of the particles' law in the trained coordinates.

    ``trained``/``bounded`` output layer: theta = (a, w) in R^{p+1}. ``fixed``: the
    mass-weighted sum over the sign groups, sum_s pi_s H(rho_s) with pi_s the groups'
    particle fractions (the entropy convention of THEORY section 8).
    """
    a, w = upcast_particles(a, w)
    if problem.output == "fixed":
        total = 0.0
        for s in (1.0, -1.0):
            grp = w[np.sign(a) == s]
            if grp.shape[0] == 0:
                continue
            total += grp.shape[0] / w.shape[0] * knn_entropy(grp, k)
        return total
    return knn_entropy(np.concatenate([a[:, None], w], axis=1), k)


def free_energy_estimate(problem, a, w, k: int = 3) -> dict:
    """F_KL(rho_N) = R + (lam/2) E|theta|^2 - tau H_kNN, with its parts (all float64).

    Keys: ``risk``, ``reg_risk`` (R + (lam/2) E|theta|^2), ``entropy`` (H_kNN),
    ``free_energy_est`` and ``entropy_reliable`` (1.0 if the particle dimension is at most
    :data:`RELIABLE_MAX_DIM`, else 0.0: the estimate is then strongly biased). Mean-field
    scaling only (the free energy is undefined under NTK scaling).
    """
    from mfld.duality import _network_output, _spec  # local import: duality imports this module

    spec = _spec(problem, need_tau=False)
    a64, w64 = upcast_particles(a, w)
    f = _network_output(spec, a64, w64)
    risk = float(np.mean(spec.loss_value(f, spec.y)))
    m2 = float(np.mean(np.sum(w64 * w64, axis=1)))
    if spec.output != "fixed":
        m2 += float(np.mean(a64 * a64))
    reg = risk + 0.5 * spec.lam * m2
    h = particle_entropy(problem, a64, w64, k)
    return {
        "risk": risk,
        "reg_risk": reg,
        "entropy": h,
        "free_energy_est": reg - spec.tau * h,
        "entropy_reliable": 1.0 if problem.particle_dim <= RELIABLE_MAX_DIM else 0.0,
    }
