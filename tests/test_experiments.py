"""Experiments (``--quick`` settings): files written and facts about the numbers; the NTK
closed forms against Monte Carlo; SVRG with a full batch equals full-batch descent; animate."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import dynamics
from mfld.errors import ConfigError
from mfld.experiments import EXPERIMENTS, run_experiment
from mfld.experiments.mf_vs_ntk import empirical_kernel, ntk_kernel
from mfld.experiments.minibatch import svrg_epoch
from mfld.problem import Problem


def _read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _common_files(p):
    assert (p / "report.md").read_text().startswith("# ")
    assert list(p.glob("*.png")) and list(p.glob("*.csv"))
    return json.loads((p / "summary.json").read_text())


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("exp")


def test_unknown_experiment_is_a_config_error(outdir):
    with pytest.raises(ConfigError, match="linear-convergence"):
        run_experiment("nope", outdir / "nope")
    assert set(EXPERIMENTS) >= {"linear-convergence", "global-optimality", "discretisation", "mf-vs-ntk",
                                "annealing", "minibatch"}


def test_linear_convergence_quick(outdir):
    p = run_experiment("linear-convergence", outdir / "lc", quick=True)
    s = _common_files(p)
    rows = _read(p / "rates.csv")
    assert len(rows) == 2
    for r in rows:
        rate, lo, hi = float(r["measured_rate"]), float(r["ci_low"]), float(r["ci_high"])
        assert np.isfinite(rate) and rate > 0 and lo <= rate <= hi
        assert r["envelope_holds"] == "True"
        # THEORY 5: the bound is below what it bounds -- never faster than the grid C_P rate
        assert float(r["bound_rate_at_R_star"]) <= float(r["poincare_rate_at_rho_star"])
    gap = _read(p / "gap_exact.csv")
    assert all(float(g["gap_exact"]) <= float(g["envelope"]) * (1 + 1e-9) for g in gap)
    assert s["quick"] is True


def test_discretisation_quick(outdir):
    p = run_experiment("discretisation", outdir / "disc", quick=True)
    s = _common_files(p)
    f = s["fits"]
    # signs of the orders (the 0.25-accuracy check is the slow test below, on the full setting)
    assert f["N_dual_gap"]["slope"] < 0 and f["N_risk"]["slope"] < 0
    # the eta study is exact (no particle noise), so even the quick setting pins the orders
    assert abs(f["eta_variance"]["slope"] - 1) < 0.25 and abs(f["eta_free_energy"]["slope"] - 2) < 0.25
    # particles agree with the exact N = infinity recursion (z-score with the sampling SE)
    assert all(abs(z) < 4 for z in s["particle_check"]["z_score"])


@pytest.mark.slow
def test_discretisation_full_slopes_within_quarter(tmp_path):
    s = json.loads((run_experiment("discretisation", tmp_path / "d") / "summary.json").read_text())
    for k, want in s["expected"].items():
        assert abs(s["fits"][k]["slope"] - want) <= 0.25, (k, s["fits"][k])


def test_global_optimality_quick(outdir):
    p = run_experiment("global-optimality", outdir / "go", quick=True)
    s = _common_files(p)
    fin = s["final"]
    assert len(fin["init"]) == 5
    # certified bracket around F* for every start
    for lo, hi in zip(fin["dual_lower_final"], fin["primal_upper_final"], strict=True):
        assert lo <= s["F_star"] + 1e-9 and hi >= s["F_star"] - 1e-9
    # every start gets close to the same F*: O(1/N) with N = 400 is ~1e-3 here
    assert max(fin["Fstar_minus_D_avg"]) < 5e-3


def test_ntk_closed_forms_match_monte_carlo():
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(-2, 2, 5), np.ones(5)])
    n = 400_000
    w = rng.standard_normal((n, 2))
    a = rng.standard_normal(n)
    with jax.enable_x64(True):
        for act in ("relu", "erf"):
            pb = Problem.create(X[:, :1], np.zeros(5), activation=act, bias=True, tau=0.0,
                                scaling="ntk")
            K_mc = np.asarray(empirical_kernel(pb, jnp.asarray(a), jnp.asarray(w)))
            K = ntk_kernel(act, X, X)
            # MC standard error of a mean of n products of O(1..5) variables: < 0.02 here
            assert np.max(np.abs(K - K_mc)) < 0.05 * max(1.0, np.max(np.abs(K)) / 5)
            assert np.allclose(K, K.T) and np.min(np.linalg.eigvalsh(K)) > 0


def test_mf_vs_ntk_quick(outdir):
    p = run_experiment("mf-vs-ntk", outdir / "ntk", quick=True)
    s = _common_files(p)
    r = s["rows"]
    ntk = [i for i, sc in enumerate(r["scaling"]) if sc == "ntk"]
    mf = [i for i, sc in enumerate(r["scaling"]) if sc == "mean_field"]
    # lazy training: NTK neurons move less as N grows, and much less than mean-field ones
    assert r["distance"][ntk[-1]] < r["distance"][ntk[0]]
    assert r["distance"][ntk[-1]] < 0.2 * r["distance"][mf[-1]]
    assert s["fits"]["relu/ntk/distance"]["slope"] < -0.25
    assert np.isfinite(s["kernel_regression"]["kernel_regression_test_risk"][0])


def test_annealing_quick(outdir):
    p = run_experiment("annealing", outdir / "ann", quick=True)
    s = _common_files(p)
    fin = s["final"]
    assert len(fin["run"]) == 3 and all(np.isfinite(fin["final_risk"]))
    # the annealed run ends at the cold temperature c/log(T+e)
    assert fin["final_tau"][2] == pytest.approx(fin["final_tau"][1], rel=1e-6)


def test_svrg_with_full_batch_is_full_batch_descent():
    # with b = n the control variate cancels exactly: v = grad_full(theta) (same noise law);
    # with tau = 0 the SVRG epoch must equal m plain full-batch steps
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (6, 1))
    with jax.enable_x64(True):
        pb = Problem.create(x, np.sin(x[:, 0]), tau=0.0, lam=0.1, bias=True)
        st = dynamics.init_particles(pb, 50, 0)
        a, w = svrg_epoch(pb, st.a, st.w, jax.random.key(0), 0, 0.05, m=5, b=6)
        st2, _ = dynamics.run_steps(pb, st, dynamics.Langevin(0.05), 5)
        assert np.allclose(a, st2.a, atol=1e-12) and np.allclose(w, st2.w, atol=1e-12)


def test_minibatch_quick(outdir):
    p = run_experiment("minibatch", outdir / "mb", quick=True)
    s = _common_files(p)
    st = s["stationary"]
    assert st["method"] == ["full batch", "minibatch b=4", "SVRG"]
    assert all(v >= -1e-9 for v in st["stationary_Fstar_minus_D"])  # D <= F*


def test_animate_gif(tmp_path):
    from PIL import Image

    from mfld.app import runner
    from mfld.app.animate import animate

    run_dir = tmp_path / "run"
    runner.run(overrides={"model.n_particles": 64, "dynamics.steps": 40, "record.every": 10,
                          "record.snapshot_every": 10, "record.certify_every": 0, "record.checkpoint_every": 0,
                          "data.params.d": 1, "model.bias": False}, out=run_dir, progress=False)
    gif = animate(run_dir, tmp_path / "a.gif")
    with Image.open(gif) as im:
        assert im.n_frames == 5
    with pytest.raises(ConfigError, match="snapshot"):
        animate(tmp_path)


def test_cli_experiment_unknown_name_is_one_line_error(capsys):
    from mfld.cli import main

    with pytest.raises(SystemExit) as e:
        main(["experiment", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "linear-convergence" in err
