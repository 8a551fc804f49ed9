"""benchmarks/bench_step.py: every contender takes the same step, so the benchmark compares
equal work.

With tau = 0 the noise is multiplied by zero, and after three steps the particles of the hand
NumPy step and of the torch steps (naive autograd, analytic) must equal mfld's in float64 up to
rounding: each step sums n = 64 and N = 50 terms of O(1) (relative rounding ~1e-15 per sum,
amplified over 3 steps by at most 1 + eta * |drift Jacobian| ~ 1.1 per step), so 1e-12
relative to the largest weight, against O(eta) = 1e-2 differences for a wrong drift (a
missing u, a wrong scale or a misplaced bias column).
"""

import importlib.util
import os

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("x64")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_step.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("contender", ["numpy", "torch_naive", "torch_analytic"])
def test_contenders_take_mfld_s_step_in_float64(contender):
    bench = _bench()
    if contender.startswith("torch"):
        pytest.importorskip("torch")
    x, y, a, w = bench.data(64, 3, 50, "float64", seed=3)
    ref = bench.make_mfld(x, y, a, w, "float64", tau=0.0)
    other = getattr(bench, f"make_{contender}")(x, y, a, w, "float64", tau=0.0)
    ref(3)
    other(3)
    (a_ref, w_ref), (a_o, w_o) = ref.state(), other.state()
    assert np.abs(w_ref - w).max() > 1e-3  # the particles moved
    scale = max(np.abs(a_ref).max(), np.abs(w_ref).max())
    np.testing.assert_allclose(a_o, a_ref, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(w_o, w_ref, rtol=0, atol=1e-12 * scale)


def test_a_row_is_publishable_by_its_foreign_load_not_the_lagging_load_average():
    # the 1-minute load average before a row counts the benchmark's own previous row (1-2 on an
    # otherwise idle 2-core machine); the foreign load is what other processes took
    pub = _bench().publishable
    assert pub({"foreign_load": 0.01, "load_avg_before": 1.6}, 0.5)
    assert not pub({"foreign_load": 0.8, "load_avg_before": 0.1}, 0.5)
