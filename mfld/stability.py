"""Step-size stability of the Euler-Maruyama particle step (docs/runs.md, "Divergence").

:func:`drift_curvature` is the largest eigenvalue of the Jacobian of the particle drift (power
iteration with Jacobian-vector products, float64); :func:`suggest_step_size` turns it into a
step size that keeps the linearised step stable. Used by the runner when a run diverges.
"""

from __future__ import annotations

import math

__all__ = ["drift_curvature", "suggest_step_size"]

#: A state whose curvature exceeds this multiple of the first state's is taken to be blowing up
#: already (:func:`suggest_step_size` ignores it).
BLOWUP = 10.0


def drift_curvature(problem, a, w, *, iters: int = 60, seed: int = 0) -> float:
    """The largest eigenvalue of the Jacobian of the particle drift (all particles at once).

    The Euler step is theta <- theta - eta * b(theta) + noise with b the drift of
    :func:`mfld.network.potential_gradient` (mean field: N times the gradient of the finite-N
    loss L, so db/dtheta = N Hess L, symmetric; NTK: Hess L). Linearised, a perturbation
    evolves by (I - eta J), which stays bounded iff eta < 2 / mu_max for the largest
    eigenvalue mu_max of J (lam is part of it). Power iteration with Jacobian-vector products
    (no N D x N D matrix): first the dominant |mu|, then J + |mu| I to get mu_max itself
    (Rayleigh quotients: a slight *under*-estimate, hence the margin in
    :func:`suggest_step_size`). Computed in float64 (a scoped x64 context, upcast copies), so
    that states far out on a diverging trajectory do not overflow.
    """
    import jax

    with jax.enable_x64(True):
        import jax.numpy as jnp

        # the data too (float32 data with float64 particles is an implicit promotion)
        return _drift_curvature(problem.astype(jnp.float64), jnp.asarray(a, jnp.float64), jnp.asarray(w, jnp.float64),
                                iters, seed)


def _drift_curvature(problem, a, w, iters, seed):
    import jax
    import jax.numpy as jnp

    from mfld import network, xla

    fixed = problem.output == "fixed"

    def drift(v):
        ga, gw, _ = network.potential_gradient(problem, v[0], v[1])
        return (jnp.zeros_like(ga) if fixed else ga, gw)

    def matvec(v, shift):
        if fixed:
            v = (jnp.zeros_like(v[0]), v[1])
        jv = jax.jvp(drift, ((a, w),), (v,))[1]
        return (jv[0] + shift * v[0], jv[1] + shift * v[1])

    def dot(u, v):
        return jnp.sum(u[0] * v[0]) + jnp.sum(u[1] * v[1])

    @xla.jit
    def power(shift, v0):
        def body(_, carry):
            v, _mu = carry
            jv = matvec(v, shift)
            mu = dot(v, jv)
            nrm = jnp.sqrt(dot(jv, jv))
            return (jv[0] / nrm, jv[1] / nrm), mu
        v, mu = jax.lax.fori_loop(0, iters, body, (v0, jnp.zeros((), w.dtype)))
        return dot(v, matvec(v, shift))

    ka, kw = jax.random.split(jax.random.key(seed))
    v0 = (jax.random.normal(ka, a.shape, w.dtype), jax.random.normal(kw, w.shape, w.dtype))
    if fixed:
        v0 = (jnp.zeros_like(v0[0]), v0[1])
    nrm = jnp.sqrt(dot(v0, v0))
    v0 = (v0[0] / nrm, v0[1] / nrm)
    dominant = float(power(jnp.asarray(0.0, w.dtype), v0))
    if dominant >= 0:
        return dominant
    shift = abs(dominant)
    return float(power(jnp.asarray(shift, w.dtype), v0)) - shift


def suggest_step_size(problem, eta: float, states) -> dict:
    """A step size that keeps the linearised Euler step stable at the given (finite) states.

    ``eta = min(eta / 2, 1 / mu_max)`` for the step ``eta`` that diverged, mu_max the largest
    drift-Jacobian eigenvalue over ``states`` (objects with ``a`` and ``w``;
    :func:`drift_curvature`): half the stability limit 2 / mu_max, a factor-2 margin for the
    power iteration's underestimate and for curvature growing along the run;
    and never more than half the step that diverged. The first state is the reference (the
    run's start): a later state whose curvature exceeds :data:`BLOWUP` times the first's is
    already blowing up and is not used. Falls back to halving if the curvature cannot be
    estimated (non-finite or non-positive).
    """
    eta = float(eta)
    mus = []
    for s in states:
        try:
            mu = drift_curvature(problem, s.a, s.w)
        except Exception:  # noqa: BLE001 - a diagnostic must not break the run's writing
            mu = float("nan")
        mus.append(mu)
    finite = [m for m in mus if math.isfinite(m)]
    # A later state whose curvature is more than BLOWUP times the first state's is already on
    # the diverging trajectory: its curvature measures the blow-up, not the problem (an NTK run
    # at eta = 20 reached 8.7e6 against 0.58 at the start, which would suggest eta ~ 1e-7).
    first = mus[0] if mus and math.isfinite(mus[0]) and mus[0] > 0 else None
    blown = [m for m in finite[1:] if first is not None and m > BLOWUP * first] if first else []
    usable = [m for m in finite if not (first is not None and m > BLOWUP * first)]
    mu = max(usable) if usable else float("nan")
    if math.isfinite(mu) and mu > 0:
        bound = 1.0 / mu
        if bound < eta / 2:
            extra = (f" (the last finite state's curvature {max(blown):.3g} is that of the blow-up itself, "
                     f"not used)" if blown else "")
            return {"eta": bound, "curvature": mu,
                    "why": f"the drift's curvature is {mu:.3g}, so the step must stay below 2/{mu:.3g} = "
                           f"{2 / mu:.3g}; with a factor-2 margin{extra}"}
    return {"eta": eta / 2, "curvature": mu if math.isfinite(mu) else None,
            "why": "halving the step" + (f" (curvature {mu:.3g} at the last finite state)" if math.isfinite(mu)
                                         else "")}
