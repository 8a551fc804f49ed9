"""Numerical guards of a run: notes for the summary when a recorded quantity cannot be trusted.

- float32 runs whose gap columns are below float32 resolution, or whose particles are so close
  that the k-NN entropy measures quantisation (:func:`precision_notes`);
- the k-NN entropy in particle dimension above :data:`mfld.entropy.RELIABLE_MAX_DIM`
  (:func:`entropy_notes`);
- Monte Carlo certificates whose importance weights degenerated (:func:`mfld.duality.mc_warnings`).

:func:`run_notes` gathers them for the runner. NumPy/SciPy only; no JAX.
"""

from __future__ import annotations

import math

import numpy as np

from mfld.entropy import RELIABLE_MAX_SAMPLES, subsample

__all__ = ["GAP_COLUMNS", "entropy_notes", "precision_notes", "quantised_fraction", "run_notes"]



#: Gap-like columns: differences of O(|F|) quantities, meaningless below float32 resolution.
GAP_COLUMNS = ("gap", "F_minus_Fstar_upper", "kl_gap_est")
_F32_EPS = float(np.finfo(np.float32).eps)


def precision_notes(precision: str, metrics: dict, a, w) -> list[str]:
    """Warnings for float32 runs whose certificate or entropy quantities lose precision.

    - a gap column (:data:`GAP_COLUMNS`) whose final value is below 100 float32 ulps of the
      objective's scale: the float32 drift perturbs the particles' law by about that much, so
      the gap cannot be resolved further;
    - the k-NN entropy (``free_energy_est``, ``kl_gap_est``) when more than 1% of the
      particles' nearest-neighbour distances are below 100 float32 spacings at the cloud's
      scale: the estimator's log-distances are then quantisation, not geometry.
    """
    if precision != "float32" or not metrics:
        return []
    out = []
    # the objective's own scale (not clamped at 1: the default problem has |F| ~ 0.07, and its
    # float64 and float32 runs reach the same O(1/N) gap plateau ~1e-5, which must not be flagged)
    values = [abs(v) for k in ("primal_upper", "dual_lower", "reg_risk", "free_energy_est")
              if (v := _last_finite(metrics.get(k))) is not None]
    scale = max(values) if values and max(values) > 0 else 1.0
    floor = 100 * _F32_EPS * scale
    for k in GAP_COLUMNS:
        v = _last_finite(metrics.get(k))
        if v is not None and abs(v) < floor:
            out.append(f"float32: {k} = {v:.3g} is below the float32 resolution of the objective "
                       f"(~{floor:.1g}); rerun with --x64 to resolve smaller gaps")
    if any(k in metrics for k in ("free_energy_est", "kl_gap_est")) and a is not None:
        # in the particles' own precision: quantised_fraction upcasts only its subsample
        theta = np.column_stack([np.asarray(a).reshape(len(a), -1)[:, :1], np.asarray(w)])
        frac = quantised_fraction(theta, np.float32)
        if frac > 0.01:
            out.append(f"float32: {100 * frac:.1f}% of the particles' nearest-neighbour distances are within "
                       f"100 float32 spacings; the k-NN entropy (free_energy_est, kl_gap_est) is unreliable; "
                       f"rerun with --x64")
    return out


def quantised_fraction(theta, dtype=np.float32, max_samples: int | None = RELIABLE_MAX_SAMPLES) -> float:
    """Fraction of points whose nearest-neighbour distance is below 100 spacings of ``dtype``
    at the cloud's scale (max |coordinate| over all points).

    The distances are those within an evenly strided subsample of at most ``max_samples``
    points (:func:`mfld.entropy.subsample`; None: all), the one the k-NN entropy uses in
    reliable dimensions: a k-d tree over all 10^7 particles of a large run took 85 s and
    0.8 GB. Only the subsample is upcast to float64."""
    from scipy.spatial import cKDTree

    theta = np.asarray(theta)
    if len(theta) < 2 or not np.all(np.isfinite(theta)):
        return 0.0
    top = max(abs(float(np.max(theta))), abs(float(np.min(theta))))  # max |coordinate|, no |theta| copy
    spacing = float(np.spacing(dtype(top)))
    sub = np.asarray(subsample(theta, max_samples), dtype=np.float64)
    d, _ = cKDTree(sub).query(sub, k=2)
    return float(np.mean(d[:, 1] < 100 * spacing))


def _last_finite(col):
    if col is None:
        return None
    vals = [float(v) for v in col if math.isfinite(float(v))]
    return vals[-1] if vals else None


def entropy_notes(problem) -> list[str]:
    """A note when the k-NN entropy of the certificates is unreliable: particle dimension D above
    :data:`mfld.entropy.RELIABLE_MAX_DIM` (the ``entropy_reliable`` column is then 0)."""
    from mfld.entropy import RELIABLE_MAX_DIM

    dim = problem.particle_dim
    if dim <= RELIABLE_MAX_DIM:
        return []
    return [f"the particles have dimension {dim} > {RELIABLE_MAX_DIM}: the k-NN entropy is strongly biased there, "
            "so free_energy_est and kl_gap_est are rough estimates (entropy_reliable = 0); the certificate "
            "bounds dual_lower/primal_upper do not use it"]


def run_notes(precision: str, metrics: dict, a, w, *, problem=None, certified: bool = False) -> list[str]:
    """All the guards' notes for a finished run: :func:`precision_notes`, and when certificates
    were recorded the Monte Carlo weight warnings and :func:`entropy_notes` (each at most once)."""
    out = precision_notes(precision, metrics, a, w)
    if certified:  # Monte Carlo certificates whose importance weights degenerated (THEORY 6)
        from mfld.duality import mc_warnings

        out.extend(mc_warnings(metrics))
        out.extend(entropy_notes(problem))
    return out
