"""The particle dynamics against exact laws (THEORY 3, 7) and its determinism guarantees.

Error model used for tolerances (THEORY 3):
- sampling: a second moment v estimated from N particles pooled over D independent
  coordinates has standard error SE = v sqrt(2/(N D)); an entry E[theta_k theta_l] of a
  centred Gaussian has SE sqrt((S_kk S_ll + S_kl^2)/N). We allow 5 SE (two-sided
  probability ~6e-7 per comparison for a Gaussian estimate).
- particles: O(1/N) bias. With no signal the interaction drift is O(N^-1/2) and changes the
  pooled second moment by 2 eta mean_j f_j^2 / D ~ 2 eta v/(N D) per step, i.e. O(1/N) =
  ~1e-4 relative here, two orders below the SE; in the linear case the O(1/N) bias of the
  fluctuating c is likewise << SE at N = 20000. It is added explicitly as v/N.
- time step: removed exactly by comparing with the law of the *scheme* (EM recursion, exact
  OU law, N = infinity covariance recursion of mfld.reference), never the continuous law.
Randomness is seeded, so every test is deterministic.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import network
from mfld import reference as ref
from mfld.dynamics import Langevin, SVRGLangevin, init_particles, run_steps, step, svrg_anchor, svrg_step
from mfld.errors import ConfigError
from mfld.loop import simulate
from mfld.problem import Problem

pytestmark = pytest.mark.usefixtures("x64")

# one compiled scan per (problem structure, stepper, n_steps): reused across calls in a test
run_steps_jit = jax.jit(run_steps, static_argnames=("n_steps",))


def _no_signal_problem(dtype=jnp.float64, scaling="mean_field", lam=1.0, tau=0.5):
    x = np.linspace(-1.5, 1.5, 8)[:, None]
    return Problem.create(x, np.zeros(8), activation="tanh", lam=lam, tau=tau, bias=True,
                          scaling=scaling, dtype=dtype)


def _pooled_m2(problem, state):
    th = jnp.concatenate([state.a[:, None], state.w], axis=1)
    return {"m2": jnp.mean(th * th)}


def _run_m2(problem, stepper, n_particles, n_steps, every, scale=1.5, seed=0):
    st = init_particles(problem, n_particles, seed, a_scale=scale, w_scale=scale)
    _, hist = simulate(problem, st, stepper, n_steps, record_every=every, recorder=_pooled_m2)
    return hist["step"].astype(int), hist["m2"]


# ------------------------------------------------------------------------- no signal
@pytest.mark.parametrize("eta,n_steps,every", [(0.05, 60, 10), (0.2, 20, 4), (1.0, 4, 1)])
def test_no_signal_second_moment_follows_euler_recursion(eta, n_steps, every):
    lam, tau, n_part, D = 1.0, 0.5, 20000, 3
    problem = _no_signal_problem(lam=lam, tau=tau)
    steps, m2 = _run_m2(problem, Langevin(eta), n_part, n_steps, every)
    v = ref.no_signal_second_moment(1.5 ** 2, lam, tau, eta, n_steps)[steps]
    tol = 5 * v * math.sqrt(2 / (n_part * D)) + v / n_part
    assert np.all(np.abs(m2 - v) < tol), (m2, v, tol)
    if eta == 1.0:  # 1 - eta lam = 0: one step forgets the start, v = 2 eta tau = 2 tau
        assert v[-1] == pytest.approx(2 * tau) == ref.no_signal_stationary_variance(lam, tau, eta)


def test_no_signal_euler_float32_too():
    """The same law in the default float32 precision (rounding ~1e-7 << SE ~1e-2)."""
    with jax.enable_x64(False):
        problem = _no_signal_problem(dtype=jnp.float32)
        steps, m2 = _run_m2(problem, Langevin(0.2), 20000, 20, 5)
    v = ref.no_signal_second_moment(2.25, 1.0, 0.5, 0.2, 20)[steps]
    assert np.all(np.abs(m2 - v) < 5 * v * math.sqrt(2 / (20000 * 3)) + v / 20000)


@pytest.mark.parametrize("eta,n_steps", [(0.5, 6), (2.0, 3), (5.0, 2)])
def test_no_signal_ou_splitting_follows_exact_law(eta, n_steps):
    """OU splitting is exact with no signal for any eta, even where Euler is unstable."""
    lam, tau, n_part, D = 1.0, 0.5, 20000, 3
    problem = _no_signal_problem(lam=lam, tau=tau)
    steps, m2 = _run_m2(problem, Langevin(eta, scheme="ou"), n_part, n_steps, 1)
    t = eta * steps
    v = 2.25 * np.exp(-2 * lam * t) + tau / lam * (1 - np.exp(-2 * lam * t))  # continuous-time OU
    np.testing.assert_allclose(v, ref.no_signal_second_moment(2.25, lam, tau, eta, n_steps, "ou")[steps],
                               rtol=1e-13)
    tol = 5 * v * math.sqrt(2 / (n_part * D)) + v / n_part
    assert np.all(np.abs(m2 - v) < tol), (m2, v, tol)


def test_log_temperature_schedule():
    """tau_schedule='log': step k uses tau/log(e + k eta), and the no-signal second moment
    follows the EM recursion with that temperature."""
    lam, tau, eta, n_steps, n_part = 1.0, 0.5, 0.2, 20, 20000
    problem = _no_signal_problem(lam=lam, tau=tau)
    stepper = Langevin(eta, tau_schedule="log")
    st = init_particles(problem, n_part, 0, a_scale=1.5, w_scale=1.5)
    _, infos = run_steps_jit(problem, st, stepper, n_steps)
    k = np.arange(n_steps)
    np.testing.assert_allclose(infos.tau, tau / np.log(math.e + k * eta), rtol=1e-14)
    steps, m2 = _run_m2(problem, stepper, n_part, n_steps, 5)
    v = ref.no_signal_second_moment(2.25, lam, tau, eta, n_steps,
                                    tau_schedule=lambda t: tau / math.log(math.e + t))[steps]
    v_const = ref.no_signal_second_moment(2.25, lam, tau, eta, n_steps)[steps]
    tol = 5 * v * math.sqrt(2 / (n_part * 3)) + v / n_part
    assert np.all(np.abs(m2 - v) < tol)
    assert np.abs(m2[-1] - v_const[-1]) > 3 * tol[-1]  # the schedule makes a measurable difference


def test_no_signal_ntk_scaling_step_convention():
    """NTK: theta <- theta - eta (lam/N) theta + sqrt(2 eta tau/N) xi (raw-parameter GD with an
    O(1) step): the EM recursion with lam/N and tau/N. Under NTK scaling f = O(1) at a random
    start, so "no signal" needs no interaction at all: x = 0 without bias (tanh(0) = 0)."""
    lam, tau, eta, n_part, n_steps = 1.0, 0.5, 200.0, 4000, 40
    problem = Problem.create(np.zeros((4, 1)), np.zeros(4), lam=lam, tau=tau, bias=False, scaling="ntk",
                             dtype=jnp.float64)
    steps, m2 = _run_m2(problem, Langevin(eta), n_part, n_steps, 5)
    v = ref.no_signal_second_moment(2.25, lam / n_part, tau / n_part, eta, n_steps)[steps]
    tol = 5 * v * math.sqrt(2 / (n_part * 2)) + v / n_part
    assert np.all(np.abs(m2 - v) < tol)
    assert v[0] - v[-1] > 5 * tol[-1]  # the decay is resolved at this eta


# ------------------------------------------------------------------------- linear case
def _linear_problem(n=16, seed=0, lam=1.0, tau=0.2):
    rng = np.random.default_rng(seed)
    xr = rng.uniform(-2, 2, n)
    y = 0.8 * xr + 0.3 + 0.1 * rng.standard_normal(n)
    return Problem.create(xr[:, None], y, activation="linear", loss="squared", lam=lam, tau=tau,
                          bias=True, dtype=jnp.float64)


_IJ = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]


def _second_moments(problem, state):
    th = jnp.concatenate([state.a[:, None], state.w], axis=1)
    s = th.T @ th / th.shape[0]
    return {f"s{i}{j}": s[i, j] for i, j in _IJ}


def _entry_tol(sig, n_part):
    return np.array([5 * math.sqrt((sig[i, i] * sig[j, j] + sig[i, j] ** 2) / n_part)
                     + abs(sig[i, j]) / n_part for i, j in _IJ])


@pytest.mark.parametrize("scheme,eta", [("euler", 0.1), ("ou", 0.2)])
def test_linear_case_transient_and_fixed_point(scheme, eta):
    """Linear activation, squared loss: the N = infinity law of the scheme is Gaussian and
    follows the exact covariance recursion (c recomputed every step). The particles follow it
    in the transient and settle at its fixed point, whose distance to rho* is the time-step
    bias: tiny for E[a w] under the plain scheme (O(eta^2)), and for OU splitting (O(eta))
    larger than 5 SE, so the particles must match the scheme's law, not rho*."""
    lam, tau, n_part, every = 1.0, 0.2, 20000, 20
    n_steps = int(round(40 / eta))  # t = 40: 8 e-folds of the slowest mode (rate lam - |c| ~ 0.2)
    problem = _linear_problem(lam=lam, tau=tau)
    x, y = np.asarray(problem.x), np.asarray(problem.y)
    st = init_particles(problem, n_part, 3, a_scale=1.0, w_scale=1.0)
    final, hist = simulate(problem, st, Langevin(eta, scheme=scheme), n_steps, record_every=every,
                           recorder=_second_moments)
    _, path = ref.linear_covariance_recursion(x, y, lam, tau, eta, n_steps, scheme=scheme, return_path=True)
    fp = ref.linear_scheme_fixed_point(x, y, lam, tau, eta, scheme=scheme)
    opt = ref.linear_gaussian_optimum(x, y, lam, tau)
    assert np.abs(path[-1] - fp.sigma).max() < 1e-8  # the run is long enough to be stationary
    for row, k in enumerate(hist["step"].astype(int)):
        sig = path[k]
        got = np.array([hist[f"s{i}{j}"][row] for i, j in _IJ])
        want = np.array([sig[i, j] for i, j in _IJ])
        assert np.all(np.abs(got - want) < _entry_tol(sig, n_part)), (k, got, want)
    # stationary E[a w]: within the time-step bias + O(1/N) + 5 SE of the optimum's m
    th = np.c_[np.asarray(final.a), np.asarray(final.w)]
    m_hat = th[:, 0] @ th[:, 1:] / n_part
    se = np.sqrt((opt.sigma[0, 0] * np.diag(opt.sigma)[1:] + opt.m ** 2) / n_part)
    bias = np.abs(fp.m - opt.m)
    assert np.all(np.abs(m_hat - opt.m) < bias + 5 * se + np.abs(opt.m) / n_part)
    if scheme == "euler":
        assert np.all(bias < 0.05 * se)  # O(eta^2): negligible at this N
    else:
        k = int(np.argmax(bias / se))
        assert bias[k] > 5 * se[k]  # O(eta): resolved by the particles (E[a w_1] here)...
        assert np.all(np.abs(m_hat - fp.m) < 5 * se + np.abs(opt.m) / n_part)  # ...which follow it


# ------------------------------------------------------------------------- determinism
def _small_problem():
    rng = np.random.default_rng(2)
    x = rng.uniform(-2, 2, (12, 1))
    return Problem.create(x, np.sin(2 * x[:, 0]), activation="tanh", lam=0.1, tau=0.01, dtype=jnp.float64)


@pytest.mark.parametrize("stepper", [Langevin(0.05), Langevin(0.05, scheme="ou", batch_size=5)],
                         ids=["euler", "ou-minibatch"])
def test_trajectory_independent_of_chunk_and_record_every(stepper):
    problem = _small_problem()
    st = init_particles(problem, 64, 7)
    ref_state, _ = run_steps_jit(problem, st, stepper, 60)
    runs = {}
    # (segment lengths are compiled once each: keep their set small)
    for every, chunk in [(10, None), (15, 10), (60, 25)]:  # segment lengths {10}, {5, 10}, {10, 25}
        final, hist = simulate(problem, st, stepper, 60, record_every=every, chunk=chunk)
        np.testing.assert_array_equal(final.a, ref_state.a)
        np.testing.assert_array_equal(final.w, ref_state.w)
        assert int(final.step) == 60
        runs[every] = dict(zip(hist["step"].astype(int), hist["risk"], strict=True))
    for k in (0, 60):  # steps recorded by every run agree exactly
        assert len({r[k] for r in runs.values()}) == 1
    # resuming from a mid-run state replays the same trajectory
    mid, _ = simulate(problem, st, stepper, 25, record_every=5)
    end, _ = simulate(problem, mid, stepper, 35, record_every=15, chunk=10)
    np.testing.assert_array_equal(end.w, ref_state.w)


def test_particles_get_independent_standard_noise():
    """Recover xi_i = (theta_i' - theta_i + eta grad V(theta_i)) / sqrt(2 eta tau) from single
    steps (float64: recovery error ~1e-13). Over K steps and D coordinates each particle has
    K D = 150 draws; the empirical correlation between two independent particles is ~N(0, 1/150):
    every pairwise |corr| < 5/sqrt(150) (780 pairs: P(any > 5 sigma) ~ 5e-4) and the mean
    squared correlation is 1/150 within 5 of its SE sqrt(2/780)/150."""
    problem = _small_problem()
    n_part, K, eta = 40, 50, 0.05
    stepper = Langevin(eta)
    tau = problem.tau
    st = init_particles(problem, n_part, 11)
    step_jit = jax.jit(step)
    drift = jax.jit(lambda pr, a, w: network.potential_gradient(pr, a, w)[:2])
    xis = []
    for _ in range(K):
        ga, gw = drift(problem, st.a, st.w)
        new, _ = step_jit(problem, st, stepper)
        xa = (new.a - st.a + eta * ga) / math.sqrt(2 * eta * tau)
        xw = (new.w - st.w + eta * gw) / math.sqrt(2 * eta * tau)
        xis.append(np.c_[np.asarray(xa), np.asarray(xw)])
        st = new
    xi = np.stack(xis, axis=1).reshape(n_part, -1)  # (N, K D)
    kd = xi.shape[1]
    assert abs(xi.mean()) < 5 / math.sqrt(xi.size)
    assert abs((xi ** 2).mean() - 1) < 5 * math.sqrt(2 / xi.size)
    corr = np.corrcoef(xi)
    off = corr[np.triu_indices(n_part, 1)]
    assert np.abs(off).max() < 5 / math.sqrt(kd)
    assert abs(np.mean(off ** 2) * kd - 1) < 5 * math.sqrt(2 / off.size)
    # and across steps: lag-1 correlation of each particle's noise sequence
    per_step = np.stack(xis, axis=1)  # (N, K, D)
    lag = np.mean(per_step[:, 1:] * per_step[:, :-1])
    assert abs(lag) < 5 / math.sqrt(per_step[:, 1:].size)


def test_particle_noise_does_not_depend_on_particle_count():
    """Particle i's trajectory depends on (seed, k, i) only: the first 20 of 40 particles with
    no interaction (y = 0, x = 0: sigma(0) = 0, so f = 0) move exactly as a 20-particle run."""
    problem = Problem.create(np.zeros((4, 1)), np.zeros(4), lam=1.0, tau=0.5, bias=False, dtype=jnp.float64)
    s40 = init_particles(problem, 40, 5)
    s20 = s40._replace(a=s40.a[:20], w=s40.w[:20])
    f40, _ = run_steps_jit(problem, s40, Langevin(0.1), 5)
    f20, _ = run_steps_jit(problem, s20, Langevin(0.1), 5)
    np.testing.assert_array_equal(f40.w[:20], f20.w)
    np.testing.assert_array_equal(f40.a[:20], f20.a)


def test_minibatch_reproducible_and_uses_batch_size_points():
    """tau = 0 and all-zero particles with tanh: the state never moves, so the risk reported
    for step k is (1/B) sum over the batch of y_j^2/2. With y_j^2/2 = 2^j, B * risk is the
    bitmask of the batch: it has exactly B bits set (no point twice) and the inclusion
    frequency of each point over K steps is B/n within 5 binomial SE."""
    n, B, K = 12, 5, 400
    y = np.sqrt(2.0 * 2.0 ** np.arange(n))
    problem = Problem.create(np.linspace(-1, 1, n)[:, None], y, lam=0.1, tau=0.0, dtype=jnp.float64)
    st = init_particles(problem, 8, 0, a_scale=0.0, w_scale=0.0)
    stepper = Langevin(0.1, batch_size=B)
    end, infos = run_steps_jit(problem, st, stepper, K)
    assert np.all(np.asarray(end.w) == 0) and np.all(np.asarray(end.a) == 0)
    masks = np.rint(np.asarray(infos.risk) * B).astype(np.int64)
    np.testing.assert_allclose(np.asarray(infos.risk) * B, masks, atol=1e-9)
    bits = (masks[:, None] >> np.arange(n)[None, :]) & 1
    assert np.all(bits.sum(axis=1) == B)
    freq = bits.mean(axis=0)
    p = B / n
    assert np.all(np.abs(freq - p) < 5 * math.sqrt(p * (1 - p) / K))
    assert len(np.unique(masks)) > K // 4  # batches vary from step to step
    _, again = run_steps_jit(problem, st, stepper, K)
    np.testing.assert_array_equal(again.risk, infos.risk)
    other = st._replace(key=init_particles(problem, 8, 1).key)
    _, diff = run_steps_jit(problem, other, stepper, K)
    assert np.any(np.asarray(diff.risk) != np.asarray(infos.risk))
    # full batch when batch_size >= n: the risk is the mean over all points
    _, full = run_steps_jit(problem, st, Langevin(0.1, batch_size=n), 3)
    np.testing.assert_allclose(full.risk, np.mean(y ** 2 / 2), rtol=1e-14)


def test_fixed_output_layer_keeps_a():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (10, 1))
    problem = Problem.create(x, np.tanh(x[:, 0]), output="fixed", lam=0.1, tau=0.05, dtype=jnp.float64)
    st = init_particles(problem, 30, 0, plus_fraction=0.6)
    assert np.asarray(st.a).sum() == 18 - 12
    end, _ = simulate(problem, st, Langevin(0.1), 50, record_every=25)
    np.testing.assert_array_equal(end.a, st.a)
    assert np.abs(np.asarray(end.w) - np.asarray(st.w)).max() > 0.1


# ------------------------------------------------------------------------- SVRG
def _svrg_problem(scaling="mean_field", output="trained"):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.5, 1.5, (12, 2))
    return Problem.create(x, np.sin(2 * x[:, 0]) + 0.3 * x[:, 1], lam=0.1, tau=0.05, bias=True,
                          scaling=scaling, output=output, dtype=jnp.float64)


@pytest.mark.parametrize("scaling,output", [("mean_field", "trained"), ("ntk", "trained"),
                                            ("mean_field", "fixed")])
def test_svrg_anchored_at_the_state_is_the_full_batch_step(scaling, output):
    """With the anchor at the current particles the control variate cancels the 3-point batch
    exactly (grad_B(theta) - grad_B(theta~) = 0), so the SVRG step is Langevin's full-batch
    step: the same drift (the anchor's full gradient), decay and noise (row i from (key, step, i))."""
    problem = _svrg_problem(scaling, output)
    st = init_particles(problem, 40, 1)._replace(step=jnp.asarray(7, jnp.int32))
    anchor = svrg_anchor(problem, st.a, st.w)
    new, info = jax.jit(svrg_step)(problem, st, SVRGLangevin(0.05, batch_size=3), anchor)
    full, _ = jax.jit(step)(problem, st, Langevin(0.05))
    assert int(new.step) == 8 and float(info.tau) == pytest.approx(0.05 if scaling == "mean_field" else 0.05 / 40)
    assert np.abs(np.asarray(new.w) - np.asarray(st.w)).max() > 1e-3  # it moved
    np.testing.assert_allclose(new.w, full.w, rtol=0, atol=1e-14)
    np.testing.assert_allclose(new.a, full.a, rtol=0, atol=1e-14)


def test_svrg_with_the_whole_data_as_batch_is_the_full_batch_step():
    """batch_size = n: grad_B is the full gradient at the current particles, so the anchor's
    terms cancel whatever the anchor (here the particles of another seed), up to rounding."""
    problem = _svrg_problem()
    st = init_particles(problem, 40, 1)._replace(step=jnp.asarray(3, jnp.int32))
    other = init_particles(problem, 40, 2)
    anchor = svrg_anchor(problem, other.a, 2.0 * other.w)
    new, _ = jax.jit(svrg_step)(problem, st, SVRGLangevin(0.05, batch_size=12), anchor)
    full, _ = jax.jit(step)(problem, st, Langevin(0.05))
    np.testing.assert_allclose(new.w, full.w, rtol=0, atol=1e-13)
    np.testing.assert_allclose(new.a, full.a, rtol=0, atol=1e-13)
    with pytest.raises(ConfigError, match="batch_size"):
        SVRGLangevin(0.05, batch_size=0)


# ------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("x64,dtype", [(True, "float64"), (True, "float32"), (False, "float32")])
def test_outputs_follow_the_data_dtype(x64, dtype):
    """Predictions, the drift (one block, data blocks, particle blocks), the step's particles,
    risk and temperature (both schedules) and the SVRG step have the dtype of the data --
    float32 data under x64 included, where JAX's default float is float64."""
    from mfld.blocking import ChunkPlan

    dt = jnp.dtype(dtype)
    with jax.enable_x64(x64):
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (9, 2))
        for scaling in ("mean_field", "ntk"):
            problem = Problem.create(x, np.sin(x[:, 0]), lam=0.1, tau=0.05, scaling=scaling, dtype=dt)
            st = init_particles(problem, 6, 0)
            assert st.a.dtype == dt and st.w.dtype == dt
            assert network.predict(problem, st.a, st.w).dtype == dt
            for plan in (None, ChunkPlan(6, 4), ChunkPlan(2, 9)):
                it = network.interaction(problem, st.a, st.w, plan=plan)
                assert {v.dtype for v in it} == {dt}, (plan, [v.dtype for v in it])
            for stepper in (Langevin(0.05), Langevin(0.05, tau_schedule="log"), Langevin(0.05, batch_size=4)):
                new, info = jax.jit(step)(problem, st, stepper)
                assert (new.a.dtype, new.w.dtype, info.risk.dtype, info.tau.dtype) == (dt,) * 4, stepper
            new, info = svrg_step(problem, st, SVRGLangevin(0.05, batch_size=4), svrg_anchor(problem, st.a, st.w))
            assert (new.a.dtype, new.w.dtype, info.risk.dtype, info.tau.dtype) == (dt,) * 4
