"""The step kernel: blocked drift == unblocked drift == autodiff, compile-once, memory bound.

Tolerances: in float64 two evaluations of the same sums in a different order differ by
reassociation only, ~ (number of terms) * eps * |terms| ~ 1e-13 relative here; we allow
1e-11. Autodiff of the finite loss is an independent computation of the same gradient
(same error model).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import activations, blocking, network, noise
from mfld.dynamics import Langevin, ParticleState, init_particles, run_steps, step
from mfld.loop import simulate
from mfld.problem import Problem

pytestmark = pytest.mark.usefixtures("x64")


def _problem(output="trained", scaling="mean_field", loss="squared", activation="tanh", n=37, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.sign(rng.standard_normal(n)) if loss == "logistic" else rng.standard_normal(n)
    return Problem.create(x, y, activation=activation, loss=loss, output=output, scaling=scaling,
                          lam=0.3, tau=0.02, dtype=jnp.float64)


def _particles(problem, n_part=53, seed=1):
    st = init_particles(problem, n_part, seed)
    return st.a, st.w


# Plans: several particle chunks (53 = 4 * 14 - 3: padded), several data chunks (37 = 3 * 13 - 2);
# c53-b13 is the two-GEMM data-blocked path (all particles, data blocks), the others with c < 53
# the recomputing particle-blocked path.
PLANS = [blocking.ChunkPlan(14, 37), blocking.ChunkPlan(53, 13), blocking.ChunkPlan(14, 13), blocking.ChunkPlan(1, 1)]


@pytest.mark.parametrize("output,scaling,loss", [("trained", "mean_field", "squared"),
                                                 ("fixed", "mean_field", "logistic"),
                                                 ("bounded", "ntk", "squared")])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"c{p.particles}-b{p.data}")
def test_blocked_drift_equals_single_block(output, scaling, loss, plan):
    problem = _problem(output, scaling, loss)
    a, w = _particles(problem)
    ref = network.interaction(problem, a, w)  # N n = 1961 pairs: one block
    assert blocking.plan_chunks(53, 37, 8) == blocking.ChunkPlan(53, 37)
    it = jax.jit(lambda a, w: network.interaction(problem, a, w, plan=plan))(a, w)
    for name in ref._fields:
        np.testing.assert_allclose(getattr(it, name), getattr(ref, name), rtol=1e-11, atol=1e-13,
                                   err_msg=name)
    np.testing.assert_allclose(network.predict(problem, a, w, memory_budget=24 * 10), ref.f, rtol=1e-11)


@pytest.mark.parametrize("output,scaling", [("trained", "mean_field"), ("fixed", "mean_field"),
                                            ("bounded", "ntk")])
def test_analytic_and_autodiff_paths_agree(output, scaling):
    """Three computations of the same drift: analytic tanh (blocked and not), the generic
    path for a user callable (sigma' by autodiff of the callable), and jax.grad of the
    finite loss."""
    problem = _problem(output, scaling)
    a, w = _particles(problem)
    ga, gw, _ = network.potential_gradient(problem, a, w)
    ga_b, gw_b, _ = network.potential_gradient(problem, a, w, plan=blocking.ChunkPlan(10, 11))
    ga_d, gw_d, _ = network.potential_gradient(problem, a, w, plan=blocking.ChunkPlan(53, 11))
    ga_ad, gw_ad = network.autodiff_drift(problem, a, w)
    user = problem.replace(activation=activations.from_callable(lambda z: jnp.tanh(z), name="mytanh"))
    assert not user.activation.analytic
    ga_u, gw_u, _ = network.potential_gradient(user, a, w, plan=blocking.ChunkPlan(10, 11))
    ga_ud, gw_ud, _ = network.potential_gradient(user, a, w, plan=blocking.ChunkPlan(53, 11))
    for g_a, g_w in [(ga_b, gw_b), (ga_d, gw_d), (ga_ad, gw_ad), (ga_u, gw_u), (ga_ud, gw_ud)]:
        np.testing.assert_allclose(g_a, ga, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(g_w, gw, rtol=1e-11, atol=1e-13)


def test_user_activation_step_equals_builtin_step():
    """A full noisy step with a user-supplied activation (autodiff path) moves the particles
    as the built-in analytic one (same noise, drift equal to ~1e-13)."""
    problem = _problem()
    user = problem.replace(activation=activations.from_callable(jnp.tanh))
    st = init_particles(problem, 40, 3)
    s1, _ = run_steps(problem, st, Langevin(0.05), 5)
    s2, _ = run_steps(user, st, Langevin(0.05), 5)
    np.testing.assert_allclose(s2.w, s1.w, rtol=1e-11, atol=1e-13)


def test_plan_respects_budget_and_covers_the_problem():
    for n_part, n_data, budget in [(10 ** 6, 10 ** 4, 1 << 30), (1000, 10 ** 7, 1 << 20), (97, 5, 64),
                                   (100000, 512, 1 << 30), (16384, 4096, 1 << 30)]:
        plan = blocking.plan_chunks(n_part, n_data, 4, memory_budget=budget)
        nc, nb = plan.n_blocks(n_part, n_data)
        assert nc * plan.particles >= n_part and nb * plan.data >= n_data
        assert nc * plan.particles - n_part < nc and nb * plan.data - n_data < nb  # balanced padding
        if plan.particles > 1 and plan.data > 1:
            assert 3 * plan.particles * plan.data * 4 <= max(budget, 3 * 8 * 4)
    # a huge data set forces data blocks; a small problem is one block
    assert blocking.plan_chunks(1000, 10 ** 7, 4, memory_budget=1 << 20).data < 10 ** 7
    assert blocking.plan_chunks(1024, 256, 4) == blocking.ChunkPlan(1024, 256)


def test_plan_chooses_two_gemm_data_blocks_only_where_they_pay():
    """The documented rules of plan_chunks: features with p >= 8 and a cache-sized (N, p)
    accumulator get data blocks of all particles (two GEMMs) of 128 T rows; thin features, or
    an accumulator too large to stay in cache, get cache-sized particle blocks (three GEMMs);
    blocks grow with the thread count (T^2 pairs, T data rows)."""
    P = blocking.ChunkPlan
    for t in (1, 2):
        assert blocking.plan_chunks(16384, 4096, 4, n_features=101, threads=t) == P(16384, 128 * t)
        # thin features: particle blocks of ~BLOCK_TARGET T^2 pairs with all data rows
        c, b = blocking.plan_chunks(100000, 512, 4, n_features=3, threads=t)
        assert b == 512 and c * b <= blocking.BLOCK_TARGET * t * t + b and c < 100000
        assert c * b > blocking.BLOCK_TARGET * t * t // 2
        assert blocking.plan_chunks(4096, 1024, 4, n_features=7, threads=t).particles < 4096
        assert blocking.plan_chunks(4096, 1024, 4, n_features=8, threads=t) == P(4096, 128 * t)
    assert blocking.plan_chunks(4096, 1024, 4, n_features=26, threads=1) == P(4096, 128)
    assert blocking.plan_chunks(8192, 4096, 4, n_features=51, threads=8) == P(8192, blocking.DATA_BLOCK_MAX)
    # N = 1e6, p = 101: a 400 MB accumulator would be streamed once per data block
    c, b = blocking.plan_chunks(10 ** 6, 10 ** 4, 4, n_features=101)
    assert c < 10 ** 6 and 3 * c * b * 4 <= blocking.DEFAULT_MEMORY_BUDGET
    # a budget too small for N x 64 temporaries falls back to particle blocks
    assert blocking.plan_chunks(16384, 4096, 4, n_features=101, memory_budget=3 * 4 * 16384 * 32,
                               threads=1).particles < 16384
    # many cores: the block target is capped
    assert blocking.plan_chunks(10 ** 6, 10 ** 4, 4, n_features=3, threads=64).particles * 10 ** 4 <= (
        blocking.BLOCK_TARGET_MAX + 10 ** 4)


def test_step_compiles_once_for_new_hyperparameters():
    """lam, tau (Problem leaves) and eta (Langevin leaf) are traced: new values reuse the
    compiled step; a new shape compiles again."""
    traces = []

    def counted(problem, state, stepper):
        traces.append(1)
        return step(problem, state, stepper)

    f = jax.jit(counted)
    problem = _problem()
    st = init_particles(problem, 16, 0)
    for lam, tau, eta in [(0.3, 0.02, 0.05), (0.1, 0.5, 0.01), (2.0, 0.0, 0.2)]:
        new, _ = f(problem.replace(lam=lam, tau=tau), st, Langevin(eta))
    assert len(traces) == 1
    f(problem, init_particles(problem, 17, 0), Langevin(0.05))
    assert len(traces) == 2
    # and the result does depend on the traced values
    a1, _ = f(problem.replace(tau=0.3), st, Langevin(0.05))
    a2, _ = f(problem.replace(tau=0.01), st, Langevin(0.05))
    assert np.abs(np.asarray(a1.w) - np.asarray(a2.w)).max() > 1e-3


def test_simulate_leaves_caller_and_callback_states_valid():
    """Buffer donation happens only for internal states: the caller's state and every state
    handed to the callback are still readable and unchanged afterwards, and donation does
    not change the trajectory (chunk < record_every exercises the donating path)."""
    problem = _problem()
    st = init_particles(problem, 32, 2)
    w0 = np.asarray(st.w).copy()
    seen = []
    final, _ = simulate(problem, st, Langevin(0.05), 12, record_every=6, chunk=2,
                        callback=lambda s, row: seen.append((s, np.asarray(s.w).copy())) and False)
    np.testing.assert_array_equal(np.asarray(st.w), w0)
    for s, w_copy in seen:
        np.testing.assert_array_equal(np.asarray(s.w), w_copy)
    ref, _ = run_steps(problem, st, Langevin(0.05), 12)
    np.testing.assert_array_equal(final.w, ref.w)


def test_padding_mask_keeps_real_particles_exact():
    """Padding rows (active = False) change neither f, nor the drift, nor the noise of the
    real particles: a padded step equals the unpadded step on the first N rows, and the
    padding does not move."""
    problem = _problem()
    st = init_particles(problem, 21, 4)
    pad = 11
    padded = ParticleState(jnp.pad(st.a, (0, pad)), jnp.pad(st.w, ((0, pad), (0, 0)), constant_values=0.7),
                           st.step, st.key)
    active = jnp.arange(21 + pad) < 21
    ref, info = step(problem, st, Langevin(0.05))
    new, info_p = step(problem, padded, Langevin(0.05), n_particles=21, active=active)
    np.testing.assert_allclose(new.w[:21], ref.w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new.a[:21], ref.a, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(new.w[21:], padded.w[21:])
    np.testing.assert_array_equal(new.a[21:], 0.0)
    np.testing.assert_allclose(info_p.risk, info.risk, rtol=1e-12)


def test_one_big_step_fits_the_memory_budget_by_compilation():
    """N = 1e6, n = 1e4, d = 100 (float32): XLA's own accounting of the compiled step
    (arguments + outputs + temporaries, no execution) is below 8 GB and matches the
    documented formula 5 N D s + n p s + 3 c b s within 10 % (the fused noise draw keeps no
    hash state; JAX's own draw kept two more N x D arrays: 7 N D s before)."""
    S = jax.ShapeDtypeStruct
    N, n, d = 10 ** 6, 10 ** 4, 100
    with jax.enable_x64(False):
        base = Problem.create(np.zeros((2, d)), np.zeros(2), dtype=jnp.float32)
        problem = base.replace(x=S((n, d + 1), jnp.float32), y=S((n,), jnp.float32))
        st = ParticleState(S((N,), jnp.float32), S((N, d + 1), jnp.float32), S((), jnp.int32),
                           jax.random.key(0))
        stats = jax.jit(step).lower(problem, st, Langevin(0.1)).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    plan = blocking.plan_chunks(N, n, 4, n_features=d + 1)
    formula = 5 * N * (d + 2) * 4 + n * (d + 1) * 4 + 3 * plan.particles * plan.data * 4
    assert total < 8e9
    assert abs(total - formula) < 0.1 * formula, (total, formula)


BIG_STEP = textwrap.dedent("""
    import json, resource, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from mfld.problem import Problem
    from mfld.dynamics import Langevin, init_particles, step
    N, n, d = 10 ** 6, 10 ** 4, 100
    rng = np.random.default_rng(0)
    problem = Problem.create(rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal(n), dtype=jnp.float32)
    st = init_particles(problem, N, 0)
    t = time.perf_counter()
    new, info = jax.jit(step)(problem, st, Langevin(0.1))
    new.w.block_until_ready()
    print(json.dumps({"maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "seconds": time.perf_counter() - t, "finite": bool(jnp.isfinite(info.risk))}))
""")


@pytest.mark.slow
def test_one_big_step_peak_rss_below_8gb():
    """Executes one step at N = 1e6, n = 1e4, d = 100 in a fresh process and reads the peak
    resident set size (includes Python, JAX and the compiler)."""
    out = subprocess.run([sys.executable, "-c", BIG_STEP], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "JAX_ENABLE_X64": "0"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["finite"] and res["maxrss_gb"] < 8.0, res


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_noise_module_keeps_noise_convention(dtype):
    """step_noise is row i of normal(fold_in(fold_in(key, k), 0), (N, D)) bit for bit (the
    unrolled threefry of noise.threefry_normal equals jax.random's, jitted or not, in both
    precisions), and row i does not depend on the number of rows (so padding and sharding
    leave it unchanged)."""
    dt = jnp.dtype(dtype)
    with jax.enable_x64(dtype == "float64"):
        key = jax.random.key(3)
        kk = jax.random.fold_in(key, 7)
        xi = noise.step_noise(kk, 10, 4, dt)
        np.testing.assert_array_equal(xi, jax.random.normal(jax.random.fold_in(kk, 0), (10, 4), dt))
        np.testing.assert_array_equal(noise.step_noise(kk, 23, 4, dt)[:10], xi)
        big = jax.jit(noise.step_noise, static_argnums=(1, 2, 3))(kk, 1001, 37, dt)
        np.testing.assert_array_equal(big, jax.random.normal(jax.random.fold_in(kk, 0), (1001, 37), dt))
        assert big.dtype == dt and abs(float(jnp.mean(big))) < 5 / np.sqrt(big.size)  # N(0, 1): 5 SE
