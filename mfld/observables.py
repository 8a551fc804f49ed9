"""Functions of the state recorded along a run (DESIGN: record functions, not trajectories).

Naming: "regularised risk" is R + (lam/2) E|theta|^2; the "free energy" F adds the entropy
term and lives in the certificate/entropy modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from mfld import network
from mfld.problem import Problem

if TYPE_CHECKING:  # for the annotation only: a record needs no dynamics code
    from mfld.dynamics import ParticleState


def record(problem: Problem, state: ParticleState) -> dict:
    """The standard record: train (and test) risk, accuracy for classification, regularised
    risk, second moments, mean |a| and the RMS particle drift ("grad_norm")."""
    a, w = state.a, state.w
    ga, gw, it = network.potential_gradient(problem, a, w)
    r = network.risk(problem, it.f)
    out = {
        "risk": r,
        "reg_risk": r + problem.lam * network.regulariser(problem, a, w),
        "m2_a": jnp.mean(a * a),
        "m2_w": jnp.mean(jnp.sum(w * w, axis=1)),
        "mean_abs_a": jnp.mean(jnp.abs(a)),
        "grad_norm": jnp.sqrt(jnp.mean(ga * ga + jnp.sum(gw * gw, axis=1))),
    }
    # the mean of a boolean array is float32 even under x64: count in the run's precision
    if problem.loss.classification:
        out["accuracy"] = jnp.mean((jnp.sign(it.f) == problem.y).astype(it.f.dtype))
    if problem.x_test is not None:
        ft = network.predict(problem, a, w, problem.x_test)
        out["test_risk"] = network.risk(problem, ft, problem.y_test)
        if problem.loss.classification:
            out["test_accuracy"] = jnp.mean((jnp.sign(ft) == problem.y_test).astype(ft.dtype))
    return out
