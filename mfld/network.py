"""The two-layer network of a particle system: predictions, residual weights and the
particle drift (THEORY sections 1-3, 8).

Shapes: ``a (N,)``, ``w (N, p)``, data ``x (m, p)`` (features, bias included), ``y (m,)``.
The layout is particle-major: pre-activations are ``w @ x.T`` of shape ``(N, m)``.

The drift is *analytic*: two GEMMs (forward ``w x^T`` and the w-gradient
``(sigma' * u) x``), the activation and its derivative computed together, no ``(m, N, p)``
intermediate. Large problems are blocked over particles and data (:func:`plan_chunks`)
so that the temporaries stay within a memory budget and a block's activations stay in
cache (a blocked evaluation recomputes ``w x^T`` once more: three GEMMs, but no (N, n)
array is stored). Autodiff of :func:`finite_loss` is the test oracle, and
:func:`autodiff_drift` is the drift computed that way.

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


def predict(problem: Problem, a, w, x=None, *, n_particles=None, memory_budget: int | None = None):
    """Network output on features ``x`` (default: the training features), blocked like
    :func:`interaction` when N x m is large."""
    x = problem.x if x is None else x
    n_particles = a.shape[0] if n_particles is None else n_particles
    plan = plan_chunks(w.shape[0], x.shape[0], x.dtype.itemsize, memory_budget=memory_budget)
    a_eff = output_weight(problem, a)
    if plan.particles >= w.shape[0] and plan.data >= x.shape[0]:
        fsum = a_eff @ problem.activation.fn(w @ x.T)
    else:
        fsum = _forward_sum(problem.activation, a_eff, w, x, plan)
    return output_scale(problem, n_particles) * fsum


# ---------------------------------------------------------------------------- chunking
#: Default budget (bytes) for the temporaries of one drift evaluation (see :func:`plan_chunks`).
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Target number of (particle, data) pairs per block: big enough that the GEMMs run near
#: peak, small enough that a block's activations stay in the last-level cache slice of a
#: core. Measured on a 2-core AVX-512 machine (benchmarks/README.md).
BLOCK_TARGET = 1 << 22
#: Temporaries of shape (block particles, block data) alive at once inside a block:
#: pre-activations/sigma, sigma' * u (and the GEMM's output).
_BLOCK_BUFFERS = 3


class ChunkPlan(NamedTuple):
    """How a drift evaluation is blocked: ``particles`` per particle chunk and ``data`` rows
    per data chunk. One block holds ``particles x data`` pre-activations."""

    particles: int
    data: int

    def n_blocks(self, n_particles, n_data):
        return -(-n_particles // self.particles), -(-n_data // self.data)


def plan_chunks(n_particles: int, n_data: int, itemsize: int = 4, *,
                memory_budget: int | None = None, block_target: int | None = None) -> ChunkPlan:
    """Choose the blocking of a drift evaluation over (particles, data).

    Memory formula (bytes) of the temporaries of one evaluation with blocks of ``c``
    particles and ``b`` data rows::

        temporaries = 3 * c * b * itemsize            (sigma, sigma' u, GEMM output)

    ``c * b`` is the largest of ``min(N n, block_target)`` that keeps the temporaries within
    ``memory_budget``; the data axis is split only when even 8 particles times all ``n``
    rows exceed the budget. The whole step adds the particle arrays and the data::

        step total ~= 6 * N * D * itemsize + 2 * n * p * itemsize + temporaries

    (state in and out, the drift, the noise draw and padding copies; see docs/performance.md).
    Block sizes are balanced so the padding is less than one row per block.
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    target = BLOCK_TARGET if block_target is None else int(block_target)
    max_pairs = max(1, budget // (_BLOCK_BUFFERS * itemsize))
    pairs = max(1, min(target, max_pairs))
    n_particles, n_data = int(n_particles), int(n_data)
    if n_particles * n_data <= pairs:
        return ChunkPlan(n_particles, n_data)
    min_c = min(8, n_particles)
    if min_c * n_data <= max_pairs:
        b = n_data
        c = max(min_c, pairs // n_data)
    else:  # split the data too
        c = min_c
        b = max(1, max_pairs // c)
    c = _balanced(n_particles, c)
    b = _balanced(n_data, b)
    return ChunkPlan(c, b)


def _balanced(total, size):
    size = max(1, min(size, total))
    k = -(-total // size)
    return -(-total // k)


def _pad_rows(v, rows):
    extra = rows - v.shape[0]
    if extra == 0:
        return v
    return jnp.pad(v, [(0, extra)] + [(0, 0)] * (v.ndim - 1))


def _forward_sum(act, a_eff, w, x, plan: ChunkPlan):
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

        return jax.lax.scan(body, jnp.zeros(xj.shape[0], x.dtype), (ac, wc))[0]

    if nb == 1:
        return over_particles(x)
    xb = _pad_rows(x, nb * b).reshape(nb, b, -1)
    return jax.lax.map(over_particles, xb).reshape(-1)[:m]


def _backward_sums(act, w, x, u, plan: ChunkPlan):
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
        return s @ uj, (ds * uj[None, :]) @ xj

    def per_chunk(wi):
        if nb == 1:
            return block(wi, x, u)

        def body(acc, blk):
            g, h = block(wi, *blk)
            return (acc[0] + g, acc[1] + h), None

        init = (jnp.zeros(wi.shape[0], x.dtype), jnp.zeros(wi.shape, x.dtype))
        return jax.lax.scan(body, init, (xb, ub))[0]

    g, h = jax.lax.map(per_chunk, wc)
    return g.reshape(-1)[:N], h.reshape(nc * c, -1)[:N]


def interaction(problem: Problem, a, w, x=None, y=None, *, n_particles=None, active=None,
                plan: ChunkPlan | None = None, memory_budget: int | None = None,
                axis_name=None) -> Interaction:
    """Fused forward and backward pass on a batch (default: all training data).

    ``n_particles``: the true N of the 1/N (or 1/sqrt N) scale (default ``a.shape[0]``).
    ``active``: optional (N,) mask; inactive (padding) particles contribute nothing to f
    and get zero drift from the interaction. ``plan``/``memory_budget``: blocking over
    particles and data (default :func:`plan_chunks` of the shapes); one block computes
    sigma once -- a single block reuses the forward activations for the backward pass, several
    blocks recompute them blockwise so no (N, n) array is ever stored. ``axis_name``: when the
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
        plan = plan_chunks(w.shape[0], m, x.dtype.itemsize, memory_budget=memory_budget)
    if plan.particles >= w.shape[0] and plan.data >= m:
        # one block: sigma and sigma' together, the forward activations reused backwards
        s, ds = act.value_and_derivative(w @ x.T)  # (N, m) each
        fsum = a_eff @ s
        if axis_name is not None:
            fsum = jax.lax.psum(fsum, axis_name)
        f = scale * fsum
        u = problem.loss.derivative(f, y)
        gsum, hsum = s @ u, (ds * u[None, :]) @ x
    else:
        fsum = _forward_sum(act, a_eff, w, x, plan)
        if axis_name is not None:
            fsum = jax.lax.psum(fsum, axis_name)
        f = scale * fsum
        u = problem.loss.derivative(f, y)
        gsum, hsum = _backward_sums(act, w, x, u, plan)
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
