"""The compiled tanh kernels of the drift (mfld.kernels; mfld/csrc/tanh_sums.cc for thin
features, mfld/csrc/tanh_blocks.cc for wide ones).

Error model. The kernels compute in float32: tanh by XLA's rational approximation (at most
5 ulp; docs/performance.md measured 4.4 for XLA's own), each output a sum of float32 terms
in a fixed order (8 vector lanes, each summing its share sequentially, then the lanes and
the forward ranges). The worst-case error of such a
sum is (terms per lane + lanes + ranges) * eps32 times the sum of the absolute terms; the
tests allow that bound plus 8 ulp of each term for tanh and the products. A wrong
coefficient, a dropped particle or data row, a wrong sign of sigma' or a padded lane that
contributes all give errors of the order of one term / (sum of |terms|), far above it.
"""

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import kernels, network
from mfld.activations import from_callable, get_activation
from mfld.problem import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS32 = float(np.finfo(np.float32).eps)

pytestmark = pytest.mark.skipif(kernels.status() != "on", reason=f"kernels {kernels.status()}")


def _bound(terms_per_lane, abs_sum):
    return (terms_per_lane + 8 + 64 + 8) * EPS32 * abs_sum


def test_tanh_of_the_kernel_is_within_a_few_ulp_of_float64():
    """With one data row x = 1 and u = 1, G_i = tanh(w_i) and H_i = 1 - tanh(w_i)^2: the
    kernel's activation itself, on a dense grid, the small-|z| branch and the clamp."""
    z = np.concatenate([np.linspace(-12, 12, 200_003), np.geomspace(1e-8, 1e-2, 2001),
                        -np.geomspace(1e-8, 1e-2, 2001), [0.0, 7.9053, 7.9054, 30.0, -30.0]])
    w = z.astype(np.float32)[:, None]
    g, h = jax.jit(kernels.tanh_sums_backward)(w, jnp.ones((1, 1), jnp.float32), jnp.ones(1, jnp.float32))
    t64 = np.tanh(w[:, 0].astype(np.float64))
    ulp = np.spacing(np.abs(t64).astype(np.float32)).astype(np.float64)
    err = np.abs(np.asarray(g, np.float64) - t64) / ulp
    assert err.max() <= 5, f"tanh max error {err.max():.1f} ulp at z = {z[err.argmax()]}"
    d64 = 1.0 - t64 ** 2
    # 1 - t^2 from the float32 t: its error is 2|t| * err(t) plus one rounding
    assert np.all(np.abs(np.asarray(h[:, 0], np.float64) - d64) <= 2 * np.abs(t64) * 5 * ulp + EPS32)


@pytest.mark.parametrize("p,N,m", [(p, N, m) for p in (1, 2, 3, 5, 9) for N, m in ((37, 1), (1000, 33), (4099, 100))]
                         + [(2, 70_001, 3)])  # the last: two forward ranges of 2^16 particles
def test_sums_against_float64(p, N, m):
    rng = np.random.default_rng(p * 1000 + N + m)
    w = (rng.standard_normal((N, p)) / np.sqrt(p) * 1.5).astype(np.float32)
    a = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((m, p)).astype(np.float32)
    u = rng.standard_normal(m).astype(np.float32)
    f = np.asarray(jax.jit(kernels.tanh_sums_forward)(w, a, x), np.float64)
    g, h = (np.asarray(v, np.float64) for v in jax.jit(kernels.tanh_sums_backward)(w, x, u))
    assert f.shape == (m,) and g.shape == (N,) and h.shape == (N, p)
    w64, a64, x64, u64 = (v.astype(np.float64) for v in (w, a, x, u))
    t = np.tanh(w64 @ x64.T)
    lanes = -(-N // 8)
    np.testing.assert_array_less(np.abs(f - a64 @ t), _bound(lanes, np.abs(a64) @ np.abs(t)) + 1e-30)
    np.testing.assert_array_less(np.abs(g - t @ u64), _bound(m, np.abs(t) @ np.abs(u64)) + 1e-30)
    # 1 - t^2 carries 2|t| * 5 ulp(t) <= 10 eps32 of absolute error of each term
    uxa = np.abs(u64[:, None] * x64)
    hb = _bound(m, (1 - t ** 2) @ uxa) + 10 * EPS32 * uxa.sum(axis=0)
    np.testing.assert_array_less(np.abs(h - (1 - t ** 2) @ (u64[:, None] * x64)), hb + 1e-30)


def _problem(p=3, n=40, **kw):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, p - 1))
    return Problem.create(x, np.tanh(x[:, 0]) + 0.1 * rng.standard_normal(n), activation="tanh", lam=0.1,
                          tau=0.01, bias=True, dtype=jnp.float32, **kw)


@pytest.mark.parametrize("kw", [{}, {"output": "bounded"}, {"output": "fixed"}, {"scaling": "ntk"}])
def test_interaction_equals_the_xla_path(monkeypatch, kw):
    """The drift through the kernels equals the XLA path's (both float32, different orders
    of the sums), for every output layer and scaling, with padding particles masked."""
    pr = _problem(**kw)
    rng = np.random.default_rng(3)
    N = 203
    a = jnp.asarray(rng.standard_normal(N), jnp.float32)
    w = jnp.asarray(rng.standard_normal((N, 3)), jnp.float32)
    active = jnp.arange(N) < 190
    outs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(kernels.ENV_SWITCH, switch)
        assert kernels.applies(pr.activation, pr.x) == (switch == "1")
        fn = jax.jit(lambda a, w: network.potential_gradient(pr, a, w, active=active, n_particles=190)[:2])
        outs[switch] = [np.asarray(v, np.float64) for v in fn(a, w)]
    for k, x in zip(outs["1"], outs["0"], strict=True):
        scale = np.abs(x).max() + 1e-30
        assert np.abs(k - x).max() <= 1e-5 * scale  # ~100 eps32: sums of 40 terms, two orders
    assert np.all(outs["1"][0][190:] == outs["0"][0][190:])  # padding gets the same (decay-only) drift


def test_applies_only_where_the_kernel_is_compiled():
    tanh, relu = get_activation("tanh"), get_activation("relu")
    x32 = jnp.ones((4, 9), jnp.float32)
    assert kernels.applies(tanh, x32)
    assert not kernels.applies(relu, x32)
    assert not kernels.applies(tanh, jnp.ones((4, 10), jnp.float32))  # p = 10 > MAX_FEATURES
    with jax.enable_x64(True):
        assert not kernels.applies(tanh, jnp.ones((4, 3), jnp.float64))
    user_tanh = from_callable(jnp.tanh, name="tanh")
    assert not kernels.applies(user_tanh, x32)  # a user's tanh, even so named, is not the registry's


def test_missing_extension_falls_back_to_xla(monkeypatch):
    pr = _problem()
    a = jnp.ones(20, jnp.float32)
    w = jnp.full((20, 3), 0.3, jnp.float32)
    kernels._registered.cache_clear()
    try:
        monkeypatch.setattr(kernels, "library_path", lambda: None)
        assert kernels.status() == "off (extension not built (no C++ compiler at install time?))"
        assert not kernels.applies(pr.activation, pr.x)
        with pytest.raises(RuntimeError, match="not available"):
            kernels.tanh_sums_forward(w, a, pr.x)
        it = network.interaction(pr, a, w)  # the XLA path
        assert np.all(np.isfinite(np.asarray(it.grad_w)))
    finally:
        monkeypatch.undo()
        kernels._registered.cache_clear()
    assert kernels.status() == "on"


def test_vmapped_calls_equal_single_calls():
    """Sweeps vmap the step: each member's kernel call must equal its own single call."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((3, 50, 3)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((3, 50)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((11, 3)), jnp.float32)
    f = jax.vmap(kernels.tanh_sums_forward, in_axes=(0, 0, None))(w, a, x)
    g, h = jax.vmap(kernels.tanh_sums_backward, in_axes=(0, None, 0))(w, x, f)
    for k in range(3):
        np.testing.assert_array_equal(f[k], kernels.tanh_sums_forward(w[k], a[k], x))
        gk, hk = kernels.tanh_sums_backward(w[k], x, f[k])
        np.testing.assert_array_equal(g[k], gk)
        np.testing.assert_array_equal(h[k], hk)


THREADS_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    from mfld.sharding import configure_cpu
    configure_cpu(threads=int(sys.argv[1]))
    import numpy as np, jax.numpy as jnp
    from mfld import dynamics, kernels, loop
    from mfld.problem import Problem
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2))
    pr = Problem.create(x, np.tanh(x[:, 0]), activation="tanh", lam=0.1, tau=0.01, bias=True, dtype=jnp.float32)
    s = dynamics.init_particles(pr, 5000, 0)
    s = loop.run_segment(pr, s, dynamics.Langevin(0.01), 5, False)
    xw = rng.standard_normal((700, 20))  # p = 21: the wide-feature block kernels
    pw = Problem.create(xw, np.tanh(xw[:, 0]), activation="tanh", lam=0.1, tau=0.01, bias=True, dtype=jnp.float32)
    sw = loop.run_segment(pw, dynamics.init_particles(pw, 3001, 0), dynamics.Langevin(0.01), 3, False)
    print(kernels.status(), hashlib.sha256(np.asarray(s.w).tobytes() + np.asarray(s.a).tobytes()
                                           + np.asarray(sw.w).tobytes() + np.asarray(sw.a).tobytes()).hexdigest())
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_steps_are_bit_identical_for_any_thread_count():
    """The kernels' chunks depend on the shapes only, so a thin (p = 3) and a wide (p = 21)
    tanh run are the same bits on 1 and 2 threads (the XLA path's block sizes follow the
    thread count; the wide kernels' row blocks do not: kernels.BLOCK_ROWS)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    outs = [subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(t)], capture_output=True, text=True,
                           env=env, timeout=300) for t in (1, 2)]
    lines = [o.stdout.strip().splitlines()[-1] for o in outs]
    assert lines[0].startswith("on ") and lines[0] == lines[1], (lines, outs[0].stderr[-2000:])


def test_digest_of_a_fixed_case_is_stable():
    """Same inputs, same bits, call after call (no dependence on thread timing)."""
    rng = np.random.default_rng(11)
    w = jnp.asarray(rng.standard_normal((70_001, 3)), jnp.float32)
    a = jnp.asarray(rng.standard_normal(70_001), jnp.float32)
    x = jnp.asarray(rng.standard_normal((97, 3)), jnp.float32)
    fwd = jax.jit(kernels.tanh_sums_forward)
    digests = {hashlib.sha256(np.asarray(fwd(w, a, x)).tobytes()).hexdigest() for _ in range(5)}
    assert len(digests) == 1


def test_a_kernel_that_fails_its_self_test_is_not_used(monkeypatch):
    """A jaxlib whose FFI refuses the handlers (or a miscompiled kernel) must switch the kernels
    off once, at registration, not fail inside a run."""
    def broken():
        raise RuntimeError("handler refused")

    kernels._registered.cache_clear()
    try:
        monkeypatch.setattr(kernels, "_self_test", broken)
        assert kernels.status() == "off (self-test failed: handler refused)"
        assert not kernels.applies(get_activation("tanh"), jnp.ones((3, 2), jnp.float32))
    finally:
        monkeypatch.undo()
        kernels._registered.cache_clear()
    assert kernels.status() == "on"


# ------------------------------------------------------------------ wide features (p > 9)
# tanh_blocks.cc: per data block, S = tanh(w x^T) with F = a S (forward) and G += S u,
# H += (1 - S^2)(u x) (backward). Error model as above: z is a float32 sum of p products (one
# chain per element), F a sum over the chunks' chains of particles, G/H sums over the b rows.

@pytest.mark.parametrize("N,p,b", [(19, 10, 16), (1003, 37, 48), (4099, 101, 256), (7, 130, 32), (600, 17, 16)])
def test_block_kernels_against_float64(N, p, b):
    """N not a multiple of the 6-particle tile, p not a multiple of the 16-feature panel, b from
    one panel up; G and H are accumulated onto nonzero inputs (the in-place update)."""
    rng = np.random.default_rng(N + p + b)
    w = (rng.standard_normal((N, p)) / np.sqrt(p) * 1.5).astype(np.float32)
    a = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((b, p)).astype(np.float32)
    u = rng.standard_normal(b).astype(np.float32)
    g0 = rng.standard_normal(N).astype(np.float32)
    h0 = rng.standard_normal((N, p)).astype(np.float32)
    f, s = jax.jit(kernels.tanh_block_forward)(w, a, x)
    g, h = jax.jit(kernels.tanh_block_backward)(s, x, u, jnp.asarray(g0), jnp.asarray(h0))
    f, s, g, h = (np.asarray(v, np.float64) for v in (f, s, g, h))
    assert f.shape == (b,) and s.shape == (N, b) and g.shape == (N,) and h.shape == (N, p)
    w64, a64, x64, u64 = (v.astype(np.float64) for v in (w, a, x, u))
    z = w64 @ x64.T
    t = np.tanh(z)
    # S: tanh's 5 ulp plus the float32 dot product's error (p eps32 sum |w x|) through tanh' <= 1
    zb = p * EPS32 * (np.abs(w64) @ np.abs(x64).T)
    assert np.all(np.abs(s - t) <= 5 * np.spacing(np.abs(t).astype(np.float32)) + zb + 1e-30)
    # each term of F, G, H carries the error of its S (<= the bound above) besides the sum's own
    terr = 5 * EPS32 + zb.max()
    np.testing.assert_array_less(np.abs(f - a64 @ t),
                                 _bound(N, np.abs(a64) @ np.abs(t)) + terr * np.abs(a64).sum() + 1e-30)
    np.testing.assert_array_less(np.abs(g - g0 - t @ u64),
                                 _bound(b, np.abs(t) @ np.abs(u64)) + terr * np.abs(u64).sum() + np.abs(g0) * EPS32)
    uxa = np.abs(u64[:, None] * x64)
    hb = _bound(b, (1 - t ** 2) @ uxa) + 2 * terr * uxa.sum(axis=0) + np.abs(h0) * EPS32
    np.testing.assert_array_less(np.abs(h - h0 - (1 - t ** 2) @ (u64[:, None] * x64)), hb)


def test_block_rows_must_be_a_multiple_of_16():
    w = jnp.ones((5, 12), jnp.float32)
    with pytest.raises(Exception, match="multiple of 16"):
        kernels.tanh_block_forward(w, jnp.ones(5, jnp.float32), jnp.ones((10, 12), jnp.float32))
    assert [kernels.block_rows(m) for m in (10, 256, 257, 300, 4096)] == [16, 256, 144, 160, 256]


@pytest.mark.parametrize("n,kw", [(40, {}), (333, {"output": "bounded"}), (300, {"scaling": "ntk"}),
                                  (1000, {"output": "fixed"})])
def test_wide_interaction_equals_the_xla_path(monkeypatch, n, kw):
    """p = 12: the block kernels (rows padded to multiples of 16, padding particles masked)
    against XLA's one block (n = 40, 300, 333) and data blocks (n = 1000, plan below)."""
    pr = _problem(p=12, n=n, **kw)
    rng = np.random.default_rng(4)
    N = 203
    a = jnp.asarray(rng.standard_normal(N), jnp.float32)
    w = jnp.asarray(rng.standard_normal((N, 12)) / 3, jnp.float32)
    active = jnp.arange(N) < 190
    plan = network.ChunkPlan(N, 128) if n == 1000 else None
    outs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(kernels.ENV_SWITCH, switch)
        assert kernels.applies_wide(pr.activation, pr.x) == (switch == "1")
        fn = jax.jit(lambda a, w: network.interaction(pr, a, w, active=active, n_particles=190, plan=plan))
        outs[switch] = [np.asarray(v, np.float64) for v in fn(a, w)]
    for k, x in zip(outs["1"], outs["0"], strict=True):
        scale = np.abs(x).max() + 1e-30
        assert np.abs(k - x).max() <= 2e-5 * scale  # ~170 eps32: sums of up to 1000 terms, two orders
    assert np.all(outs["1"][3][190:] == 0) and np.all(outs["1"][4][190:] == 0)  # padding: no interaction drift


def test_applies_wide_only_above_the_thin_kernels():
    tanh = get_activation("tanh")
    assert not kernels.applies_wide(tanh, jnp.ones((4, 9), jnp.float32))  # the thin kernels' range
    assert kernels.applies_wide(tanh, jnp.ones((4, 10), jnp.float32))
    assert not kernels.applies_wide(get_activation("sigmoid"), jnp.ones((4, 10), jnp.float32))
    with jax.enable_x64(True):
        assert not kernels.applies_wide(tanh, jnp.ones((4, 10), jnp.float64))


def test_vmapped_block_calls_equal_single_calls():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((3, 50, 11)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((3, 50)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, 11)), jnp.float32)
    g0, h0 = jnp.zeros((3, 50), jnp.float32), jnp.zeros((3, 50, 11), jnp.float32)
    f, s = jax.vmap(kernels.tanh_block_forward, in_axes=(0, 0, None))(w, a, x)
    g, h = jax.vmap(kernels.tanh_block_backward, in_axes=(0, None, 0, 0, 0))(s, x, f, g0, h0)
    for k in range(3):
        fk, sk = kernels.tanh_block_forward(w[k], a[k], x)
        np.testing.assert_array_equal(f[k], fk)
        gk, hk = kernels.tanh_block_backward(sk, x, fk, g0[k], h0[k])
        np.testing.assert_array_equal(g[k], gk)
        np.testing.assert_array_equal(h[k], hk)
