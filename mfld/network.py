"""The two-layer network of a particle system: predictions, residual weights and the
particle drift (THEORY sections 1-3, 8).

Shapes: ``a (N,)``, ``w (N, p)``, data ``x (m, p)`` (features, bias included), ``y (m,)``.
The layout is particle-major: pre-activations are ``w @ x.T`` of shape ``(N, m)``.

The drift is *analytic*: two GEMMs (forward ``w x^T`` and the w-gradient
``(sigma' * u) x``), the activation and its derivative computed together, no ``(m, N, p)``
intermediate. Autodiff of :func:`finite_loss` is the test oracle.

Mean-field scaling: f = (1/N) sum_i phi(theta_i; x) and the drift of particle i is
grad V_rho(theta_i) = N * dL/dtheta_i, with L the finite-N loss
L = R + (lam / 2N) sum_i |theta_i|^2 (for the trained coordinates).
NTK scaling: f = (1/sqrt N) sum_i phi(theta_i; x) and the drift is dL/dtheta_i itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mfld.problem import Problem


class Interaction(NamedTuple):
    """What one forward/backward pass over a batch produces.

    f: predictions on the batch (m,); u: residual weights l'(f, y) (m,);
    g: g(w_i) = (1/m) sum_j u_j sigma(w_i.x_j), per particle (N,);
    grad_a, grad_w: gradient of the interaction part of the potential,
    (1/m) sum_j u_j grad_theta phi(theta_i; x_j) -- scaled by 1/sqrt(N) under NTK scaling.
    """

    f: jax.Array
    u: jax.Array
    g: jax.Array
    grad_a: jax.Array
    grad_w: jax.Array


def output_weight(problem: Problem, a):
    """The effective second-layer weight: a (trained, fixed) or r_out tanh(a) (bounded)."""
    if problem.output == "bounded":
        return problem.r_out * jnp.tanh(a)
    return a


def output_weight_derivative(problem: Problem, a):
    """d(output_weight)/da: 1 (trained), 0 (fixed: a is not trained), r_out (1 - tanh^2 a)."""
    if problem.output == "bounded":
        t = jnp.tanh(a)
        return problem.r_out * (1.0 - t * t)
    if problem.output == "fixed":
        return jnp.zeros_like(a)
    return jnp.ones_like(a)


def output_scale(problem: Problem, n_particles):
    """1/N (mean field) or 1/sqrt(N) (NTK)."""
    n = jnp.asarray(n_particles, dtype=jnp.result_type(float))
    return 1.0 / n if problem.scaling == "mean_field" else jax.lax.rsqrt(n)


def predict(problem: Problem, a, w, x=None, *, n_particles=None):
    """Network output on features ``x`` (default: the training features)."""
    x = problem.x if x is None else x
    n_particles = a.shape[0] if n_particles is None else n_particles
    s = problem.activation.fn(w @ x.T)
    return output_scale(problem, n_particles) * (output_weight(problem, a) @ s)


def interaction(problem: Problem, a, w, x=None, y=None, *, n_particles=None) -> Interaction:
    """Fused forward and backward pass on a batch (default: all training data)."""
    x = problem.x if x is None else x
    y = problem.y if y is None else y
    m = x.shape[0]
    n_particles = a.shape[0] if n_particles is None else n_particles
    scale = output_scale(problem, n_particles)
    s, ds = problem.activation.value_and_derivative(w @ x.T)  # (N, m) each
    a_eff = output_weight(problem, a)
    f = scale * (a_eff @ s)
    u = problem.loss.derivative(f, y)
    g = (s @ u) / m
    # Under mean-field scaling N dL/dtheta cancels the 1/N; under NTK 1/sqrt(N) remains.
    c = 1.0 if problem.scaling == "mean_field" else scale
    grad_a = c * output_weight_derivative(problem, a) * g
    grad_w = (c * a_eff / m)[:, None] * ((ds * u[None, :]) @ x)
    return Interaction(f, u, g, grad_a, grad_w)


def decay_rate(problem: Problem, n_particles):
    """Rate k of the weight-decay drift -k theta: lam (mean field) or lam / N (NTK)."""
    if problem.scaling == "mean_field":
        return problem.lam
    return problem.lam / n_particles


def potential_gradient(problem: Problem, a, w, x=None, y=None, *, n_particles=None):
    """The full particle drift (grad_a, grad_w): interaction plus weight decay.

    Mean field: grad V_rho(theta_i). NTK: dL/dtheta_i. For a fixed output layer the
    a-component is zero.
    """
    n_particles = a.shape[0] if n_particles is None else n_particles
    it = interaction(problem, a, w, x, y, n_particles=n_particles)
    k = decay_rate(problem, n_particles)
    ga = it.grad_a + (0.0 if problem.output == "fixed" else k * a)
    return ga, it.grad_w + k * w, it


def risk(problem: Problem, f, y=None):
    """R = (1/m) sum_j l(f_j, y_j)."""
    y = problem.y if y is None else y
    return jnp.mean(problem.loss.value(f, y))


def regulariser(problem: Problem, a, w):
    """(1/2) E|theta|^2 over the trained coordinates (a excluded when fixed)."""
    m2 = jnp.mean(jnp.sum(w * w, axis=1))
    if problem.output != "fixed":
        m2 = m2 + jnp.mean(a * a)
    return 0.5 * m2


def finite_loss(problem: Problem, a, w):
    """Finite-N training loss L = R(rho_N) + (lam/2N) sum_i |theta_i|^2 (autodiff oracle)."""
    f = predict(problem, a, w)
    return risk(problem, f) + problem.lam * regulariser(problem, a, w)
