"""The two-layer network of a particle system: predictions, residual weights and the
particle drift (THEORY sections 1-3, 8).

Shapes: ``a (N,)``, ``w (N, p)``, data ``x (m, p)`` (features, bias included), ``y (m,)``.
The layout is particle-major: pre-activations are ``w @ x.T`` of shape ``(N, m)``.

The drift is *analytic*: two GEMMs (forward ``w x^T`` and the w-gradient
``(sigma' * u) x``), the activation and its derivative computed together, no ``(m, N, p)``
intermediate. Large problems are blocked (:func:`mfld.blocking.plan_chunks`) so that the temporaries stay
within a memory budget and a block's activations stay in cache. Two blocked evaluations:

- *data blocks* (all particles x ``b`` data rows): the block's outputs f_j are complete, so
  its residual weights u_j and its share of the backward GEMM follow at once -- still two
  GEMMs, nothing of size (N, n) stored; used when p is large enough that a GEMM costs more
  than the accumulation of the (N, p) gradient over blocks;
- *particle blocks* (``c`` particles x all rows): f needs every particle, so the backward
  pass recomputes ``w x^T`` blockwise -- three GEMMs, cheap when p is small (the elementwise
  work, not the GEMM, is the cost there, and it stays in cache).

For tanh networks with thin features (p <= 9) in float32 on CPU, :func:`interaction` hands
the two particle sums to the compiled kernels of :mod:`mfld.kernels` instead (one pass per
sum, tanh once per pair and pass, nothing of size (N, m) in memory); the blocking then does
not apply. With wide features (p > 9) the one-block and data-block plans run each block's
two GEMMs as the compiled block kernels (tanh, ``a S``, ``1 - S^2`` and ``S u`` inside the
GEMMs' register tiles), over blocks of :func:`mfld.kernels.block_rows` rows.

Autodiff of :func:`finite_loss` is the test oracle, and :func:`autodiff_drift` is the drift
computed that way.

Mean-field scaling: f = (1/N) sum_i phi(theta_i; x) and the drift of particle i is
grad V_rho(theta_i) = N * dL/dtheta_i, with L the finite-N loss
L = R + (lam / 2N) sum_i |theta_i|^2 (for the trained coordinates).
NTK scaling: f = (1/sqrt N) sum_i phi(theta_i; x) and the drift is dL/dtheta_i itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mfld import kernels
from mfld.blocking import ChunkPlan, plan_chunks
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
    """1/N (mean field) or 1/sqrt(N) (NTK), in the dtype of the data."""
    n = jnp.asarray(n_particles, dtype=problem.x.dtype)
    return 1.0 / n if problem.scaling == "mean_field" else jax.lax.rsqrt(n)


def predict(problem: Problem, a, w, x=None, *, n_particles=None, memory_budget: int | None = None):
    """Network output on features ``x`` (default: the training features), blocked like
    :func:`interaction` when N x m is large."""
    x = problem.x if x is None else x
    n_particles = a.shape[0] if n_particles is None else n_particles
    plan = plan_chunks(w.shape[0], x.shape[0], x.dtype.itemsize, n_features=x.shape[1],
                       memory_budget=memory_budget)
    a_eff = output_weight(problem, a)
    if plan.particles >= w.shape[0] and plan.data >= x.shape[0]:
        fsum = a_eff @ problem.activation.fn(w @ x.T)
    else:
        fsum = _forward_sum(problem.activation, a_eff, w, x, plan)
    return output_scale(problem, n_particles) * fsum


def _pad_rows(v, rows):
    extra = rows - v.shape[0]
    if extra == 0:
        return v
    return jnp.pad(v, [(0, extra)] + [(0, 0)] * (v.ndim - 1))


def _varying(tree, axis_name):
    """Mark zero-initialised loop carries as per-device inside ``shard_map`` (the sums they
    accumulate depend on the device's particles)."""
    if axis_name is None:
        return tree
    return jax.tree.map(lambda v: jax.lax.pcast(v, axis_name, to="varying"), tree)


def _forward_sum(act, a_eff, w, x, plan: ChunkPlan, axis_name=None):
    """F_j = sum_i a_eff_i sigma(w_i . x_j) over all particles, blocked (no scale)."""
    N, m = w.shape[0], x.shape[0]
    nc, nb = plan.n_blocks(N, m)
    c, b = plan.particles, plan.data
    wc = _pad_rows(w, nc * c).reshape(nc, c, -1)
    ac = _pad_rows(a_eff, nc * c).reshape(nc, c)

    def over_particles(xj):
        def body(acc, blk):
            ai, wi = blk
            return acc + ai @ act.fn(wi @ xj.T), None

        return jax.lax.scan(body, _varying(jnp.zeros(xj.shape[0], x.dtype), axis_name), (ac, wc))[0]

    if nb == 1:
        return over_particles(x)
    xb = _pad_rows(x, nb * b).reshape(nb, b, -1)
    return jax.lax.map(over_particles, xb).reshape(-1)[:m]


def _backward_sums(act, w, x, u, plan: ChunkPlan, axis_name=None):
    """G_i = sum_j u_j sigma(w_i.x_j) and H_i = sum_j u_j sigma'(w_i.x_j) x_j, blocked."""
    N, m = w.shape[0], x.shape[0]
    nc, nb = plan.n_blocks(N, m)
    c, b = plan.particles, plan.data
    wc = _pad_rows(w, nc * c).reshape(nc, c, -1)
    if nb > 1:
        xb = _pad_rows(x, nb * b).reshape(nb, b, -1)
        ub = _pad_rows(u, nb * b).reshape(nb, b)  # padded rows carry u = 0: no contribution

    def block(wi, xj, uj):
        s, ds = act.value_and_derivative(wi @ xj.T)
        return s @ uj, ds @ (uj[:, None] * xj)

    def per_chunk(wi):
        if nb == 1:
            return block(wi, x, u)

        def body(acc, blk):
            g, h = block(wi, *blk)
            return (acc[0] + g, acc[1] + h), None

        init = _varying((jnp.zeros(wi.shape[0], x.dtype), jnp.zeros(wi.shape, x.dtype)), axis_name)
        return jax.lax.scan(body, init, (xb, ub))[0]

    g, h = jax.lax.map(per_chunk, wc)
    return g.reshape(-1)[:N], h.reshape(nc * c, -1)[:N]


def _data_blocked(problem, a_eff, w, x, y, scale, plan: ChunkPlan, axis_name):
    """Two-GEMM evaluation over data blocks of ``plan.data`` rows with all particles: each
    block's outputs f_j are complete, so u_j and the block's backward GEMM follow at once.
    Returns (f, u, G, H) with G_i = sum_j u_j sigma_ij and H_i = sum_j u_j sigma'_ij x_j.
    With the wide-feature kernels (:func:`mfld.kernels.applies_wide`) each block is their two
    calls, on blocks of :func:`mfld.kernels.block_rows` rows (not ``plan.data``, which follows
    the thread count), otherwise XLA's GEMMs and elementwise passes."""
    act = problem.activation
    N, m = w.shape[0], x.shape[0]
    wide = kernels.applies_wide(act, x)
    b = kernels.block_rows(m) if wide else plan.data  # wide: the kernels' own row blocks
    nb = -(-m // b)
    xb = _pad_rows(x, nb * b).reshape(nb, b, -1)
    yb = _pad_rows(y, nb * b).reshape(nb, b)
    real = (jnp.arange(nb * b) < m).reshape(nb, b)  # padded rows get u = 0: no contribution

    def body(acc, blk):
        xj, yj, rj = blk
        if wide:
            fsum, s = kernels.tanh_block_forward(w, a_eff, xj)
        else:
            s, ds = act.value_and_derivative(w @ xj.T)  # (N, b)
            fsum = a_eff @ s
        if axis_name is not None:
            fsum = jax.lax.psum(fsum, axis_name)
        f = scale * fsum
        u = jnp.where(rj, problem.loss.derivative(f, yj), 0.0)
        if wide:
            return kernels.tanh_block_backward(s, xj, u, *acc), (f, u)
        return (acc[0] + s @ u, acc[1] + ds @ (u[:, None] * xj)), (f, u)

    init = _varying((jnp.zeros(N, x.dtype), jnp.zeros(w.shape, x.dtype)), axis_name)
    (gsum, hsum), (f, u) = jax.lax.scan(body, init, (xb, yb, real))
    return f.reshape(-1)[:m], u.reshape(-1)[:m], gsum, hsum


def _two_passes(problem, y, scale, axis_name, forward_sum, backward_sums):
    """(f, u, G, H) of an evaluation in two passes over the particles: ``forward_sum()`` ->
    F (summed over devices), then u, then ``backward_sums(u)`` -> (G, H). The compiled
    kernels of :mod:`mfld.kernels` and XLA's particle blocks are both this."""
    fsum = forward_sum()
    if axis_name is not None:
        fsum = jax.lax.psum(fsum, axis_name)
    f = scale * fsum
    u = problem.loss.derivative(f, y)
    gsum, hsum = backward_sums(u)
    return f, u, gsum, hsum


def interaction(problem: Problem, a, w, x=None, y=None, *, n_particles=None, active=None,
                plan: ChunkPlan | None = None, memory_budget: int | None = None,
                axis_name=None) -> Interaction:
    """Fused forward and backward pass on a batch (default: all training data).

    ``n_particles``: the true N of the 1/N (or 1/sqrt N) scale (default ``a.shape[0]``).
    ``active``: optional (N,) mask; inactive (padding) particles contribute nothing to f
    and get zero drift from the interaction. ``plan``/``memory_budget``: blocking over
    particles and data (default :func:`mfld.blocking.plan_chunks` of the shapes); one block computes
    sigma once -- a single block reuses the forward activations for the backward pass, data
    blocks (all particles) complete f blockwise (two GEMMs), particle blocks recompute the
    forward GEMM blockwise; no (N, n) array is stored when blocked. ``axis_name``: when the
    particles are sharded (inside ``shard_map``), the per-device partial sums of f are
    ``psum``-ed over this axis.

    The result is independent of the blocking up to reassociation of the sums.
    """
    x = problem.x if x is None else x
    y = problem.y if y is None else y
    m = x.shape[0]
    n_particles = a.shape[0] if n_particles is None else n_particles
    scale = output_scale(problem, n_particles)
    act = problem.activation
    a_eff = output_weight(problem, a)
    if active is not None:
        a_eff = jnp.where(active, a_eff, 0.0)
    if plan is None:
        plan = plan_chunks(w.shape[0], m, x.dtype.itemsize, n_features=x.shape[1],
                           memory_budget=memory_budget)
    if kernels.applies(act, x):  # thin features, tanh: the compiled one-pass sums
        f, u, gsum, hsum = _two_passes(problem, y, scale, axis_name,
                                       lambda: kernels.tanh_sums_forward(w, a_eff, x),
                                       lambda u: kernels.tanh_sums_backward(w, x, u))
    elif plan.particles >= w.shape[0] and (plan.data < m or kernels.applies_wide(act, x)):
        # data blocks (two GEMMs, f complete per block), or the wide-feature kernels' blocks
        f, u, gsum, hsum = _data_blocked(problem, a_eff, w, x, y, scale, plan, axis_name)
    elif plan.particles >= w.shape[0]:
        # one block: sigma and sigma' together, the forward activations reused backwards
        s, ds = act.value_and_derivative(w @ x.T)  # (N, m) each
        fsum = a_eff @ s
        if axis_name is not None:
            fsum = jax.lax.psum(fsum, axis_name)
        f = scale * fsum
        u = problem.loss.derivative(f, y)
        # u scales the (m, p) rows of x, not the (N, m) block: one pass over the block less
        # (faster with YNNPACK's dot fusion; docs/performance.md)
        gsum, hsum = s @ u, ds @ (u[:, None] * x)
    else:  # particle blocks: the backward pass recomputes w x^T blockwise
        f, u, gsum, hsum = _two_passes(problem, y, scale, axis_name,
                                       lambda: _forward_sum(act, a_eff, w, x, plan, axis_name),
                                       lambda u: _backward_sums(act, w, x, u, plan, axis_name))
    g = gsum / m
    # Under mean-field scaling N dL/dtheta cancels the 1/N; under NTK 1/sqrt(N) remains.
    c = 1.0 if problem.scaling == "mean_field" else scale
    grad_a = c * output_weight_derivative(problem, a) * g
    grad_w = (c * a_eff / m)[:, None] * hsum
    if active is not None:
        grad_a = jnp.where(active, grad_a, 0.0)
    return Interaction(f, u, g, grad_a, grad_w)


def decay_rate(problem: Problem, n_particles):
    """Rate k of the weight-decay drift -k theta: lam (mean field) or lam / N (NTK)."""
    if problem.scaling == "mean_field":
        return problem.lam
    return problem.lam / n_particles


def potential_gradient(problem: Problem, a, w, x=None, y=None, *, n_particles=None, **blocking):
    """The full particle drift (grad_a, grad_w): interaction plus weight decay.

    Mean field: grad V_rho(theta_i). NTK: dL/dtheta_i. For a fixed output layer the
    a-component is zero. ``blocking``: ``plan``/``memory_budget`` of :func:`interaction`.
    """
    n_particles = a.shape[0] if n_particles is None else n_particles
    it = interaction(problem, a, w, x, y, n_particles=n_particles, **blocking)
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


def autodiff_drift(problem: Problem, a, w):
    """The particle drift by autodiff of :func:`finite_loss` (reference path).

    Mean field: N dL/dtheta_i; NTK: dL/dtheta_i -- the same quantities as
    :func:`potential_gradient`. A fixed output layer gets a zero a-component.
    """
    n = a.shape[0]
    ga, gw = jax.grad(lambda aa, ww: finite_loss(problem, aa, ww), argnums=(0, 1))(a, w)
    c = n if problem.scaling == "mean_field" else 1.0
    if problem.output == "fixed":
        ga = jnp.zeros_like(a)
    return c * ga, c * gw
