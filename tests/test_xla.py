"""mfld.xla: the compiler options of mfld's programs (YNNPACK dot fusion on CPU).

What must hold: the option is really applied (the compiled step fuses the activation into
the forward dot), it changes float32 results only at the rounding level (the float32 drift
of both compilations lies within float32 error of the float64 drift), it leaves the noise
bit-identical to jax.random.normal, and it can be switched off.

Tolerance: the drift sums n = 2048 terms per particle and N = 1024 per output in float32;
rounding (a tanh within a few ulp, any summation order) gives relative errors ~ sqrt(n) eps
~ 3e-6 (measured: 1.1e-6 for f, 1e-7 for the gradients, fused and not), so 1e-5 relative to
the largest entry, against O(1) differences if the fused program computed something else.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import blocking, dynamics, loop, network, noise, xla
from mfld.problem import Problem


@pytest.fixture
def needs_cpu_option():
    """The fused code path exists only on the CPU backend with the option accepted. On another
    backend the tests do not apply (skipped, saying which backend). On CPU without the option
    they are *expected failures* whose reason the summary prints (pytest -ra): the fused path is
    then untested -- a jaxlib that rejects the option must not look like a green run."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"the YNNPACK dot fusion is a CPU option; backend here: {jax.default_backend()}")
    if not xla.compiler_options():
        if os.environ.get(xla.ENV_SWITCH, "1").strip() == "0":
            pytest.xfail(f"{xla.ENV_SWITCH}=0 switches the fusion off: the fused code path is not tested")
        import jaxlib

        pytest.xfail(f"jaxlib {jaxlib.__version__} rejects {sorted(xla.CPU_COMPILER_OPTIONS)}: the fused code "
                     f"path is NOT tested (re-check mfld/xla.py, NOTES.md)")


@pytest.fixture
def xla_path(monkeypatch):
    """The fusion is XLA's: float32 tanh drifts with p > 9 take mfld's compiled block kernels
    (mfld.kernels) unless MFLD_KERNELS=0; compiled programs of the other path are dropped."""
    from mfld import kernels

    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    jax.clear_caches()
    yield
    monkeypatch.undo()
    jax.clear_caches()


def _case(dtype, n=2048, d=40, N=1024, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / np.sqrt(d)
    problem = Problem.create(x, np.tanh(x[:, 0]), lam=0.1, tau=0.01, dtype=dtype)
    a = jnp.asarray(rng.standard_normal(N), dtype)
    w = jnp.asarray(rng.standard_normal((N, d + 1)), dtype)
    return problem, a, w


def _drift(problem, a, w):
    r = network.interaction(problem, a, w)
    return r.f, r.grad_a, r.grad_w


@pytest.mark.usefixtures("needs_cpu_option", "xla_path")
def test_compiled_step_fuses_the_activation_into_the_dot():
    problem, a, w = _case(jnp.float32)
    state = dynamics.ParticleState(a, w, jnp.asarray(0, jnp.int32), dynamics.dynamics_keys(0)[1])
    fused = loop.run_steps_jit.lower(problem, state, dynamics.Langevin(0.01), n_steps=2).compile().as_text()
    plain = jax.jit(dynamics.run_steps, static_argnames=("n_steps",)).lower(
        problem, state, dynamics.Langevin(0.01), n_steps=2).compile().as_text()

    def tanh_in_ynn(txt):
        """Some computation called by a YNNPACK fusion holds both the dot and the tanh."""
        names = {ln.split("calls=%")[1].split(",")[0] for ln in txt.splitlines()
                 if "__ynn_fusion" in ln and "calls=%" in ln}
        comps = [c for c in txt.split("\n\n") if c.strip()]
        return any(c.split()[0].lstrip("%") in names and " tanh(" in c and " dot(" in c for c in comps)

    assert tanh_in_ynn(fused)
    assert not tanh_in_ynn(plain)


@pytest.mark.usefixtures("needs_cpu_option", "xla_path")
def test_fused_float32_drift_is_float32_accurate():
    with jax.enable_x64(True):
        p64, a64, w64 = _case(jnp.float64)
        ref = [np.asarray(v) for v in jax.jit(_drift)(p64, a64, w64)]
    p32, a32, w32 = _case(jnp.float32)
    fused = [np.asarray(v, np.float64) for v in xla.jit(_drift)(p32, a32, w32)]
    plain = [np.asarray(v, np.float64) for v in jax.jit(_drift)(p32, a32, w32)]
    for r, f, p in zip(ref, fused, plain, strict=True):
        scale = np.abs(r).max()
        assert np.abs(f - r).max() < 1e-5 * scale
        assert np.abs(p - r).max() < 1e-5 * scale


def test_noise_inside_mfld_programs_is_jax_random_normal_bit_for_bit():
    key = jax.random.fold_in(jax.random.key(5), 11)
    for n, dim in ((1001, 37), (16384, 102)):
        xi = xla.jit(noise.step_noise, static_argnums=(1, 2, 3))(key, n, dim, jnp.float32)
        np.testing.assert_array_equal(xi, jax.random.normal(jax.random.fold_in(key, 0), (n, dim), jnp.float32))


def test_switch_off_by_environment(monkeypatch):
    xla.compiler_options.cache_clear()
    try:
        monkeypatch.setenv(xla.ENV_SWITCH, "0")
        assert xla.compiler_options() == {}
        monkeypatch.setenv(xla.ENV_SWITCH, "1")
        xla.compiler_options.cache_clear()
        expected = dict(xla.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}
        assert xla.compiler_options() in (expected, {})  # {} only if this jaxlib lacks the option
    finally:
        xla.compiler_options.cache_clear()


def test_lazy_jit_forwards_the_jitted_function():
    f = xla.jit(lambda v: 2 * v)
    assert float(f(jnp.float32(3))) == 6.0
    assert "multiply" in f.lower(jnp.float32(1)).as_text()
    assert f._cache_size() == 1


def test_step_programs_skip_the_fusion_only_for_particle_blocks():
    """dot_fusion_pays follows the drift's plan (fused: one block and data blocks), and the
    step program routes each call accordingly."""
    P = blocking.ChunkPlan
    wide, a, w = _case(jnp.float32, n=4096, d=100, N=16384)
    assert blocking.drift_plan(wide, 16384) == blocking.plan_chunks(16384, 4096, 4, n_features=101)
    assert blocking.drift_plan(wide, 16384).particles == 16384 and blocking.dot_fusion_pays(wide, 16384)
    assert not blocking.dot_fusion_pays(wide, 16384, memory_budget=3 * 4 * 16384 * 8)  # too small
    assert blocking.drift_plan(wide, 16384, batch_size=64) == P(16384, 64)  # minibatch: one block
    thin, _, _ = _case(jnp.float32, n=512, d=2, N=8)
    assert not blocking.dot_fusion_pays(thin, 100000) and blocking.dot_fusion_pays(thin, 100)

    calls = []
    f = xla.jit(lambda v: v + 1, fuse_if=lambda v: calls.append(v.shape) or v.shape[0] > 2)
    f(jnp.ones(3))
    f(jnp.ones(2))
    assert calls == [(3,), (2,)] and set(f._jitted) == {True, False} and f._cache_size() == 2
