"""Differential entropy of particles and the free-energy estimate (THEORY sections 2, 6).

The Kozachenko-Leonenko k-nearest-neighbour estimator of H(rho) = -E log rho from N samples
in R^D (Euclidean distances, KD-tree from :mod:`scipy.spatial`)::

    H_hat = psi(N) - psi(k) + log V_D + (D / N) sum_i log eps_i,

with eps_i the distance from sample i to its k-th nearest neighbour and
V_D = pi^{D/2} / Gamma(D/2 + 1) the volume of the unit ball. It is consistent but biased
at finite N, and the bias grows with D (for a Gaussian it is a few hundredths of a nat per
dimension at N = 10^4, D <= 5): everything built on it is an *estimate*, never a bound.
Above ``RELIABLE_MAX_DIM`` dimensions outputs say so explicitly.

Cost. A KD-tree query grows much faster than N in high dimensions: cheap for D <= 5, but in
D = 12 (d = 10 inputs with a bias) it took 0.27 s at N = 4000 and 5 s at N = 20000 per call
on a quiet machine (0.8 / 0.19 / 0.03 s for N = 4000 / 2048 / 1024 on a loaded one): the
largest part of a certificate record (docs/certificates.md, "Cost"). Where the estimate is
flagged unreliable anyway (D > ``RELIABLE_MAX_DIM``),
:func:`particle_entropy` and :func:`free_energy_estimate` therefore use an evenly strided
subsample of at most :data:`UNRELIABLE_MAX_SAMPLES` particles (particles are exchangeable, so
this is a subsample of the same empirical law; deterministic, so runs stay bit-reproducible);
the estimator's finite-sample bias is then that of the subsample size (the ``entropy_samples``
output says how many were used).

Everything is computed in float64 on upcast copies, whatever the particles' precision.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

from mfld.errors import ConfigError
from mfld.gibbs import make_spec, network_output

__all__ = ["KNN_K", "RELIABLE_MAX_DIM", "UNRELIABLE_MAX_SAMPLES", "knn_entropy", "free_energy_estimate",
           "particle_entropy", "upcast_particles", "particle_arrays", "mean_square"]

#: The neighbour order of the Kozachenko-Leonenko estimator (k = 3 trades a little bias for
#: much less variance than k = 1); the one default of every function here.
KNN_K = 3

#: Largest particle dimension D for which the k-NN entropy is treated as reliable.
RELIABLE_MAX_DIM = 5

#: Particles used for the (unreliable) k-NN entropy above ``RELIABLE_MAX_DIM`` dimensions.
UNRELIABLE_MAX_SAMPLES = 1024


def subsample(x, max_samples: int | None) -> np.ndarray:
    """At most ``max_samples`` rows of ``x``, evenly strided over all of them (None: all)."""
    n = x.shape[0]
    if max_samples is None or n <= int(max_samples):
        return x
    idx = np.unique(np.round(np.linspace(0, n - 1, int(max_samples))).astype(np.int64))
    return x[idx]


#: Cap on the particles the k-NN entropy uses in reliable dimensions (a KD-tree over 1e7
#: particles took more than 35 min and GBs; at 2^20 the estimator's own bias is far below
#: its O(N^-1/2) spread at any N a run uses).
RELIABLE_MAX_SAMPLES = 2 ** 20


def default_max_samples(dim: int) -> int | None:
    """The subsample size :func:`particle_entropy` uses by default for particles in R^dim."""
    return RELIABLE_MAX_SAMPLES if dim <= RELIABLE_MAX_DIM else UNRELIABLE_MAX_SAMPLES


def knn_entropy(x, k: int = KNN_K, max_samples: int | None = None) -> float:
    """Kozachenko-Leonenko entropy estimate (nats) of samples ``x`` of shape (N,) or (N, D).

    ``k``: neighbour order (k = 3 trades a little bias for much less variance than k = 1).
    Coincident points (zero distances) are floored at the smallest positive float spacing
    of the data's scale, so the estimate stays finite. ``max_samples``: use at most this many
    rows, evenly strided (:func:`subsample`; None: all).
    """
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ConfigError(f"samples must be (N,) or (N, D), got shape {x.shape}", field="particles")
    if max_samples is not None and int(max_samples) <= k:
        raise ConfigError("the subsample must hold more than k samples", field="max_samples",
                          value=max_samples, allowed=f"> k = {k}")
    x = np.asarray(subsample(x, max_samples), dtype=np.float64)  # only the subsample is upcast
    n, dim = x.shape
    k = int(k)
    if k < 1:
        raise ConfigError("neighbour order must be positive", field="k", value=k, allowed="k >= 1")
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
    return particle_arrays(a, w, np.float64)


def particle_arrays(a, w, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """NumPy arrays a (N,), w (N, p) (a 1-D w is one weight per particle) in ``dtype`` (None:
    the particles' own precision, no copy where none is needed). The float64 functions here
    and :func:`mfld.gibbs.network_output` upcast such arrays block by block or after
    subsampling, never all of them at once (at N = 10^7 a float64 copy is 240 MB)."""
    a = np.asarray(a, dtype=dtype).reshape(-1)
    w = np.asarray(w, dtype=dtype)
    if w.ndim == 1:
        w = w[:, None]
    return a, w


#: Rows per block of the float64 second moments (:func:`mean_square`).
MOMENT_BLOCK_ROWS = 2 ** 18


def mean_square(v) -> float:
    """mean_i |v_i|^2 in float64 for v (N,) or (N, p) in any float precision: the float64
    squares (row sums) are formed block by block into one float64 vector of N, whose mean is
    then that of ``np.mean(np.sum(v64 * v64, axis=1))`` bit for bit, without a float64 copy of v."""
    v = np.asarray(v)
    if v.ndim == 1:
        v = v[:, None]
    rows = np.empty(v.shape[0])
    for i in range(0, v.shape[0], MOMENT_BLOCK_ROWS):
        b = np.asarray(v[i:i + MOMENT_BLOCK_ROWS], dtype=np.float64)
        rows[i:i + MOMENT_BLOCK_ROWS] = np.sum(b * b, axis=1)
    return float(np.mean(rows))


def particle_entropy(problem, a, w, k: int = KNN_K, max_samples: int | str | None = "auto") -> float:
    """Entropy estimate of the particles' law in the trained coordinates.

    ``trained``/``bounded`` output layer: theta = (a, w) in R^{p+1}. ``fixed``: the
    mass-weighted sum over the sign groups, sum_s pi_s H(rho_s) with pi_s the groups'
    particle fractions (the entropy convention of THEORY section 8).
    ``max_samples``: "auto" (:func:`default_max_samples`: all particles up to
    ``RELIABLE_MAX_DIM`` dimensions, else a subsample), an int (per sign group) or None (all).
    """
    if max_samples == "auto":
        max_samples = default_max_samples(problem.particle_dim)
    a, w = particle_arrays(a, w)  # upcast by knn_entropy after subsampling
    cap = _cap(max_samples, k)
    if problem.output == "fixed":
        total = 0.0
        for s in (1.0, -1.0):
            grp = w[np.sign(a) == s]
            if grp.shape[0] == 0:
                continue
            total += grp.shape[0] / w.shape[0] * knn_entropy(grp, k, cap)
        return total
    # the subsample of (a, w) is the pair of the subsamples (the same rows)
    return knn_entropy(np.concatenate([subsample(a[:, None], cap), subsample(w, cap)], axis=1), k, cap)


def _samples_used(problem, a, max_samples, k) -> int:
    groups = [int(np.sum(np.sign(a) == s)) for s in (1.0, -1.0)] if problem.output == "fixed" else [a.shape[0]]
    cap = _cap(max_samples, k)
    return sum(g if cap is None else min(g, cap) for g in groups)


def _cap(max_samples, k):
    return None if max_samples is None else max(int(max_samples), k + 1)


def free_energy_estimate(problem, a, w, k: int = KNN_K, max_samples: int | str | None = "auto", f=None) -> dict:
    """F_KL(rho_N) = R + (lam/2) E|theta|^2 - tau H_kNN, with its parts (all float64).

    Keys: ``risk``, ``reg_risk`` (R + (lam/2) E|theta|^2), ``entropy`` (H_kNN),
    ``free_energy_est`` and ``entropy_reliable`` (1.0 if the particle dimension is at most
    :data:`RELIABLE_MAX_DIM`, else 0.0: the estimate is then strongly biased) and
    ``entropy_samples`` (particles the k-NN entropy used: ``max_samples``, see
    :func:`particle_entropy`; a subsample only where ``entropy_reliable`` is 0 by default).
    ``f``: the network output f_rho(x_j) in float64 if the caller has it already (saves the
    N x n evaluation; :func:`mfld.duality.certify` computes it anyway). Mean-field
    scaling only (the free energy is undefined under NTK scaling).
    """
    spec = make_spec(problem, need_tau=False)
    a, w = particle_arrays(a, w)  # float64 block by block (mean_square, network_output, knn_entropy)
    f = network_output(spec, a, w) if f is None else np.asarray(f, dtype=np.float64)
    risk = float(np.mean(spec.loss_value(f, spec.y)))
    m2 = mean_square(w)
    if spec.output != "fixed":
        m2 += mean_square(a)
    reg = risk + 0.5 * spec.lam * m2
    h = particle_entropy(problem, a, w, k, max_samples)
    if max_samples == "auto":
        max_samples = default_max_samples(problem.particle_dim)
    return {
        "risk": risk,
        "reg_risk": reg,
        "entropy": h,
        "free_energy_est": reg - spec.tau * h,
        "entropy_reliable": 1.0 if problem.particle_dim <= RELIABLE_MAX_DIM else 0.0,
        "entropy_samples": float(_samples_used(problem, a, max_samples, k)),
    }
