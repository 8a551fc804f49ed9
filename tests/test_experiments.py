"""Experiments (``--quick`` settings): files written and facts about the numbers; the NTK
closed forms against Monte Carlo; SVRG with a full batch equals full-batch descent; animate."""

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import dynamics, loop, network, reference
from mfld.errors import ConfigError
from mfld.experiments import EXPERIMENTS, run_experiment
from mfld.experiments.mf_vs_ntk import empirical_kernel, kernel_flow_predictor, ntk_kernel, symmetric_init
from mfld.experiments.minibatch import svrg_epoch, variance_factor
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


def overlapping_tick_labels(fig) -> list[str]:
    """Pairs of drawn x or y tick labels of one axes whose rendered boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lim), max(lim)
            boxes = []
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                lab = tick.label1
                if lab.get_visible() and lab.get_text() and lo <= tick.get_loc() <= hi:
                    boxes.append((lab.get_text(), lab.get_window_extent(renderer).expanded(0.98, 0.98)))
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i][1].overlaps(boxes[j][1]):
                        bad.append(f"{boxes[i][0]!r} / {boxes[j][0]!r}")
    # no data point (a marker without a line) is silently outside the axes' y range
    for ax in fig.axes:
        lo, hi = sorted(ax.get_ylim())
        for line in ax.get_lines():
            if line.get_linestyle() in ("None", "", " ") and line.get_marker() not in (None, "None", ""):
                y = np.asarray(line.get_ydata(), dtype=float)
                y = y[np.isfinite(y) & ((y > 0) | (ax.get_yscale() != "log"))]
                out = int(np.sum((y < lo * (1 - 1e-9)) | (y > hi * (1 + 1e-9))))
                if out:
                    bad.append(f"{out} of {y.size} points of {line.get_label()!r} outside the y range")
    # the axes titles of one figure do not run into each other either
    titles = [(ax.get_title(), ax.title.get_window_extent(renderer)) for ax in fig.axes if ax.get_title()]
    for i in range(len(titles)):
        for j in range(i + 1, len(titles)):
            if titles[i][1].overlaps(titles[j][1]):
                bad.append(f"title {titles[i][0][:30]!r} / {titles[j][0][:30]!r}")
    return bad


@pytest.fixture
def figures(monkeypatch):
    """name -> (caption, [axes titles], [overlapping tick-label pairs]) of every figure written."""
    from mfld.app import plots

    seen = {}
    real = plots.save_figure

    def spy(fig, path, **kw):
        sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
        seen[path.name] = (sup, [ax.get_title() for ax in fig.axes], overlapping_tick_labels(fig))
        return real(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    return seen


def check_figures(figures, *parts):
    """Every figure has a caption naming ``parts`` (lam, tau, N, eta, activation...) and no
    overlapping tick labels."""
    assert figures
    for name, (sup, _, bad) in figures.items():
        for part in parts:
            assert part in sup, (name, part, sup)
        assert not bad, (name, bad)


def test_unknown_experiment_is_a_config_error(outdir):
    with pytest.raises(ConfigError, match="linear-convergence"):
        run_experiment("nope", outdir / "nope")
    assert set(EXPERIMENTS) >= {"linear-convergence", "global-optimality", "discretisation", "mf-vs-ntk",
                                "annealing", "minibatch"}


def test_linear_convergence_quick(outdir, figures):
    p = run_experiment("linear-convergence", outdir / "lc", quick=True)
    _common_files(p)
    check_figures(figures, "tanh")
    assert "N = 500" in figures["gap_vs_time.png"][0] and "η = 0.02" in figures["gap_vs_time.png"][0]
    report = (p / "report.md").read_text()
    # every fitted rate is quoted with its 95% interval, the particles' too
    for r in _read(p / "rates.csv"):
        if np.isfinite(float(r["particle_rate"])):
            assert (f"{float(r['particle_rate']):.4g} [{float(r['particle_ci_low']):.3g}, "
                    f"{float(r['particle_ci_high']):.3g}]") in report
        assert f"{float(r['measured_rate']):.4g} [{float(r['ci_low']):.3g}, {float(r['ci_high']):.3g}]" in report
    # particle records with F* - D <= 0 are counted in the report, not silently dropped
    pc = _read(p / "gap_particles.csv")
    for lam, tau in {(r["lam"], r["tau"]) for r in pc}:
        sel = [float(r["dual_gap"]) for r in pc if (r["lam"], r["tau"]) == (lam, tau)]
        n_np = sum(v <= 0 for v in sel)
        assert f"({float(lam):g}, {float(tau):g}): {n_np} of {len(sel)}" in report
    rows = _read(p / "rates.csv")
    assert len(rows) == 2
    exact = _read(p / "gap_exact.csv")
    for r in rows:
        rate, lo, hi = float(r["measured_rate"]), float(r["ci_low"]), float(r["ci_high"])
        # the quoted rate is the decay rate of the exact curve: least squares of log(gap) on t
        # over the reported window, redone with np.polyfit on gap_exact.csv (rounding only)
        t0, t1 = float(r["fit_t_start"]), float(r["fit_t_end"])
        pts = [(float(g["t"]), float(g["gap_exact"])) for g in exact
               if (g["lam"], g["tau"]) == (r["lam"], r["tau"]) and t0 - 1e-9 <= float(g["t"]) <= t1 + 1e-9]
        assert len(pts) >= 10 and t1 - t0 >= 2.0  # a real window: most of t_end = 4
        tt, gg = np.array(pts).T
        assert rate == pytest.approx(-np.polyfit(tt, np.log(gg), 1)[0], rel=1e-9)
        # on the straight part of log(gap) the 95% interval is narrow (observed: 4% and 1%)
        assert hi - lo < 0.1 * rate
        # THEORY 5: the exact gap decays at least at the bound's asymptotic rate 2 tau alpha(R*)
        assert lo >= float(r["bound_rate_at_R_star"])
        assert r["envelope_holds"] == "True"
        # THEORY 5: the bound is below what it bounds -- never faster than the grid C_P rate
        assert float(r["bound_rate_at_R_star"]) <= float(r["poincare_rate_at_rho_star"])
        # strong duality across implementations: grid F* against mfld.duality's D at the grid's u*.
        # Error model: the grid's midpoint rule in w (32 cells on +-7 sqrt(tau/lam)) converges like
        # exp(-2 pi d / h), d = pi/4 the distance of tanh(w x)'s poles (|x| <= 2) from the real
        # axis (observed: 3e-10 and 2e-6 for the bounds 1e-9 and 1e-5); the factor 50 is margin
        # for the constant. The duality side is accurate to 1e-11.
        h = 14 * np.sqrt(float(r["tau"]) / float(r["lam"])) / 32
        assert abs(float(r["F_star_minus_dual"])) <= 50 * np.exp(-2 * np.pi * (np.pi / 4) / h)
    assert all(float(g["gap_exact"]) <= float(g["envelope"]) * (1 + 1e-9) for g in exact)


def test_discretisation_quick(outdir, figures):
    p = run_experiment("discretisation", outdir / "disc", quick=True)
    s = _common_files(p)
    check_figures(figures, "linear", "λ = 1", "τ = 0.2", "N = 16-256", "η = 0.05")
    f = s["fits"]
    # the orders in N (expected -1). Error model: with 2 seeds per N the time-averaged errors
    # have a relative SE of ~0.2 per point (the per-seed relative SD is ~0.28, measured in
    # test_particle_error_is_order_one_over_n), so the slope over N = 16, 64, 256 has an SE of
    # ~0.2 / sqrt(2 ln(4)^2) = 0.1: 4 SE = 0.4 (an N^-1/2 law, -0.5, fails). The 16-seed study
    # below and the slow full setting (+-0.25) are the sharper checks.
    assert abs(f["N_dual_gap"]["slope"] + 1) < 0.4 and abs(f["N_risk"]["slope"] + 1) < 0.4
    # the eta study is exact (no particle noise), so even the quick setting pins the orders
    assert abs(f["eta_variance"]["slope"] - 1) < 0.25 and abs(f["eta_free_energy"]["slope"] - 2) < 0.25
    # particles agree with the exact N = infinity recursion (z-score with the sampling SE)
    assert all(abs(z) < 4 for z in s["particle_check"]["z_score"])


def test_particle_error_is_order_one_over_n():
    # THEORY 3 / the discretisation experiment's claim, CI-sized: at stationarity the dual gap
    # F* - D(u(rho_N)) of N particles is O(1/N). Linear activation (D in closed form, F* from
    # mfld.reference), eta = 0.05 (the scheme's N = infinity floor F* - D(u_inf(eta)) is
    # 1.5e-9, far below the smallest gap ~2e-4), 16 seeds per N, time averages over 300 steps
    # after 100 of burn-in. Error model: a weighted least-squares slope of log(gap) on log(N)
    # with the seeds' standard errors (observed SE 0.037; asserted < 0.06 so the check keeps
    # its teeth), 3 SE, plus 0.05 for the O(1/N^2) term (gap N grows by ~10% from N = 16 to
    # 256, which biases the slope by ~+0.035). A cloud whose noise is partly shared by all
    # particles (an O(1) floor) or an O(N^-1/2) error fails.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, (16, 1))
    y = 0.6 * x[:, 0] + 0.1 * rng.standard_normal(16)
    lam, tau, eta, burn, avg = 1.0, 0.2, 0.05, 100, 300
    f_star = reference.linear_gaussian_optimum(x, y, lam, tau).free_energy

    def dual(p, s):  # THEORY 7: D(u) = -(1/n) sum (u^2/2 + u y) - tau log Z(u), d = 1
        u = network.predict(p, s.a, s.w) - p.y
        c = jnp.mean(u * p.x[:, 0])
        log_z = jnp.log(2 * jnp.pi * tau) - 0.5 * jnp.log(lam ** 2 - c ** 2)
        return {"D": -jnp.mean(0.5 * u * u + u * p.y) - tau * log_z}

    Ns, means, ses = [16, 64, 256], [], []
    with jax.enable_x64(True):
        pb = Problem.create(x, y, activation="linear", lam=lam, tau=tau, bias=False)
        for n_part in Ns:
            gaps = []
            for seed in range(16):
                st = dynamics.init_particles(pb, n_part, seed)
                _, h = loop.simulate(pb, st, dynamics.Langevin(eta), burn + avg, record_every=4,
                                         recorder=dual, record_initial=False)
                gaps.append(f_star - np.mean(np.asarray(h["D"])[np.asarray(h["step"]) > burn]))
            means.append(np.mean(gaps))
            ses.append(np.std(gaps, ddof=1) / 4)
    lg, rel = np.log(means), np.asarray(ses) / np.asarray(means)
    X = np.column_stack([np.ones(3), np.log(Ns)])
    cov = np.linalg.inv(X.T @ (X / rel[:, None] ** 2))
    slope = (cov @ X.T @ (lg / rel ** 2))[1]
    se = math.sqrt(cov[1, 1])
    assert se < 0.06, (se, rel)
    assert abs(slope + 1) < 3 * se + 0.05, (slope, se, means)


@pytest.mark.slow
def test_discretisation_full_slopes_within_quarter(tmp_path):
    s = json.loads((run_experiment("discretisation", tmp_path / "d") / "summary.json").read_text())
    for k, want in s["expected"].items():
        assert abs(s["fits"][k]["slope"] - want) <= 0.25, (k, s["fits"][k])


def test_global_optimality_quick(outdir, figures):
    p = run_experiment("global-optimality", outdir / "go", quick=True)
    s = _common_files(p)
    check_figures(figures, "tanh", "λ = 0.2", "τ = 0.05", "N = 400", "η = 0.05")
    report = (p / "report.md").read_text()
    assert "{" not in report and "}" not in report  # no template placeholder left unformatted
    assert f"F* = {s['F_star']:.8g} +- {s['F_star_err']:.2g}" in report
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


def test_kernel_flow_predictor_limits():
    # df/dt = -(1/n) K (f - y) from f = 0: small t gives f = (t/n) K y + O(t^2); t -> infinity
    # interpolates the training data and gives kernel regression K_test K^-1 y on the test points.
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.uniform(-2, 2, 6), np.ones(6)])
    Xt = np.column_stack([rng.uniform(-2, 2, 4), np.ones(4)])
    y = rng.standard_normal(6)
    K, Kt = ntk_kernel("erf", X, X), ntk_kernel("erf", Xt, X)
    t = 1e-4
    f, ft = kernel_flow_predictor(K, Kt, y, t)
    np.testing.assert_allclose(f, t / 6 * K @ y, rtol=1e-3)  # relative O(t |K| / n) ~ 1e-4
    np.testing.assert_allclose(ft, t / 6 * Kt @ y, rtol=1e-3)
    f, ft = kernel_flow_predictor(K, Kt, y, 1e9)
    np.testing.assert_allclose(f, y, atol=1e-8)
    np.testing.assert_allclose(ft, Kt @ np.linalg.solve(K, y), atol=1e-6)
    # the exact ODE solution by matrix exponential (independent of the eigen-decomposition)
    from scipy.linalg import expm

    np.testing.assert_allclose(kernel_flow_predictor(K, Kt, y, 3.0)[0], (np.eye(6) - expm(-K * 3.0 / 6)) @ y,
                               atol=1e-12)


def test_symmetric_init_has_zero_output():
    x = np.linspace(-1, 1, 5)[:, None]
    with jax.enable_x64(True):
        for scaling in ("mean_field", "ntk"):
            pb = Problem.create(x, np.zeros(5), activation="relu", tau=0.0, scaling=scaling)
            st = symmetric_init(pb, 64, 3)
            from mfld import network

            assert float(jnp.max(jnp.abs(network.predict(pb, st.a, st.w)))) < 1e-14


def test_mf_vs_ntk_quick(outdir, figures):
    p = run_experiment("mf-vs-ntk", outdir / "ntk", quick=True)
    s = _common_files(p)
    check_figures(figures, "relu", "λ = 0.001", "τ = 0", "N = 32-512", "η = 0.05")  # and no tick overlap
    r = s["rows"]
    ntk = [i for i, sc in enumerate(r["scaling"]) if sc == "ntk"]
    mf = [i for i, sc in enumerate(r["scaling"]) if sc == "mean_field"]
    # lazy training: NTK neurons move less as N grows, and much less than mean-field ones
    assert r["distance"][ntk[-1]] < r["distance"][ntk[0]]
    assert r["distance"][ntk[-1]] < 0.2 * r["distance"][mf[-1]]
    assert s["fits"]["relu/ntk/distance"]["slope"] < -0.25
    # the NTK kernel freezes as N grows (O(N^-1/2) in general, O(1/N) for smooth sigma with the
    # symmetric init; relu is in between): over N = 32 -> 512 ask for at least N^-1/4 (ratio 0.5)
    assert r["kernel_change"][ntk[-1]] < 0.5 * r["kernel_change"][ntk[0]]
    # the mean-field kernel changes O(1)
    assert min(r["kernel_change"][i] for i in mf) > 10 * r["kernel_change"][ntk[-1]]
    # and the NTK network approaches the infinite-width kernel gradient flow at the same time T
    assert r["dist_to_kernel_flow"][ntk[-1]] < 0.6 * r["dist_to_kernel_flow"][ntk[0]]
    assert np.isfinite(s["kernel_limit"]["kernel_flow_test_risk"][0])


def test_annealing_quick(outdir, figures):
    from mfld.experiments.annealing import _settings, window_means

    p = run_experiment("annealing", outdir / "ann", quick=True)
    s = _common_files(p)
    check_figures(figures, "tanh", "λ = 0.01", "τ = 0.05", "N = 300", "η = 0.05")
    # the F_0 panel's title says what the annealed curve does, from the data drawn: "still
    # descending" only when its last window average is its lowest
    title = figures["annealing.png"][1][0]
    assert title == s["figure_title_F0"]
    rows = _read(p / "annealing.csv")
    ann = [(float(r["t"]), float(r["F0"])) for r in rows if r["run"].startswith("annealed")]
    cfg = _settings(True)
    edges = np.geomspace(cfg["every"] * 0.05, cfg["steps"] * 0.05 * (1 + 1e-9), cfg["windows"] + 1)
    wm = window_means([t for t, _ in ann], [v for _, v in ann], edges)
    descending = int(np.argmin(wm[:, 1])) == len(wm) - 1
    assert ("still descending" in title) == descending and ("not descending" in title) == (not descending)
    fin = s["final"]
    assert len(fin["run"]) == 3 and all(np.isfinite(fin["final_F0"]))
    # the schedule tau_t = c/log(t + e) (c = tau = 0.05, eta = 0.05, written out here) at every
    # record of the annealed run, and its end T = steps * eta
    c, eta = 0.05, 0.05
    t_ann = np.array([float(r["t"]) for r in rows if r["run"].startswith("annealed")])
    tau_ann = np.array([float(r["tau"]) for r in rows if r["run"].startswith("annealed")])
    np.testing.assert_allclose(tau_ann, c / np.log(t_ann + np.e), rtol=1e-9)
    assert fin["final_tau"][2] == pytest.approx(c / math.log(cfg["steps"] * eta + math.e), rel=1e-9)
    # the stepper really anneals: all runs share the initial particles and the noise, so a
    # stepper that ignored the schedule would end exactly at the hot run's F_0, one at the
    # final temperature throughout exactly at the cold run's; the annealed run ends between
    # them, lagging the cold run (the report's claim), each by more than 4 batch-means SEs
    F0, se = fin["final_F0"], fin["final_F0_se"]
    assert F0[1] + 4 * np.hypot(se[1], se[2]) < F0[2] < F0[0] - 4 * np.hypot(se[0], se[2])
    # the entropic spread of a hot fixed temperature costs F_0 (4 combined SEs)
    assert F0[0] - F0[1] > 4 * np.hypot(se[0], se[1])


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


def test_variance_factor_is_the_without_replacement_variance():
    # exact variance of the mean of a uniformly random b-subset of n values, by enumeration
    from itertools import combinations

    v = np.random.default_rng(0).standard_normal(7)
    for b in (1, 2, 3, 7):
        means = [np.mean(v[list(c)]) for c in combinations(range(7), b)]
        assert np.var(means) == pytest.approx(variance_factor(7, b) * np.var(v), rel=1e-12, abs=1e-15)


def test_minibatch_quick(outdir, figures):
    p = run_experiment("minibatch", outdir / "mb", quick=True)
    s = _common_files(p)
    check_figures(figures, "tanh", "λ = 0.1", "τ = 0.01", "N = ", "η = 0.05")
    st = s["stationary"]
    assert st["method"] == ["full batch", "minibatch b=4", "SVRG b=4"]
    assert st["gradient_cost_epochs"] == [60.0, 60.0, 60.0]  # equal gradient cost
    assert all(v >= -1e-9 for v in st["stationary_Fstar_minus_D"])  # D <= F* (certified)
    rows = _read(p / "minibatch.csv")
    assert all(float(r["Fstar_minus_D"]) >= -1e-9 for r in rows)


@pytest.mark.slow
def test_minibatch_full_floor(tmp_path):
    # full setting: the b = 4 minibatch floor is above full batch, SVRG's is not, and the floor
    # is linear in the batch variance factor (chi^2 of the weighted fit below its 99.9% quantile)
    from scipy import stats

    s = json.loads((run_experiment("minibatch", tmp_path / "m") / "summary.json").read_text())
    assert s["z_minibatch_vs_full"] > 4 and abs(s["z_svrg_vs_full"]) < 3
    law = s["variance_law"]
    assert law["slope"] > 4 * law["slope_se"] and law["chi2"] < stats.chi2.ppf(0.999, law["dof"])
    assert all(abs(z) <= 4 for z in s["stationary"]["halves_z"])


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


# ---------------------------------------------------------------------------------------
# Shared helpers (mfld.experiments._common)
# ---------------------------------------------------------------------------------------


def test_common_writers_are_atomic_with_unique_temp_files(tmp_path, monkeypatch):
    # rundir.atomic_write_*: a unique temp file in the same directory, fsync, rename. A stale
    # (or concurrent) "<name>.tmp" must not matter, and every file is fsynced before the rename.
    import os

    from mfld.experiments import _common as C

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    for name in ("t.csv", "s.json", "r.md", "f.png"):
        (tmp_path / (name + ".tmp")).mkdir()  # a fixed temp name would collide with this
    C.write_csv(tmp_path / "t.csv", {"a": [1.5, float("nan")], "b": ["x", "y"]})
    C.write_json(tmp_path / "s.json", {"v": np.float64(np.inf), "k": np.arange(2), "ok": np.bool_(True)})
    C.write_report(tmp_path / "r.md", "T", [("H", "body")])
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    C.savefig(fig, tmp_path / "f.png")
    assert len(synced) == 4
    assert _read(tmp_path / "t.csv") == [{"a": "1.5", "b": "x"}, {"a": "nan", "b": "y"}]
    assert json.loads((tmp_path / "s.json").read_text()) == {"v": "inf", "k": [0, 1], "ok": True}
    assert (tmp_path / "r.md").read_text() == "# T\n\n## H\n\nbody\n"
    from PIL import Image

    with Image.open(tmp_path / "f.png") as im:
        assert im.size == (440, 330)  # 4 x 3 inches at the experiments' 110 dpi, no bbox cropping
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["t.csv", "s.json", "r.md", "f.png", "t.csv.tmp", "s.json.tmp", "r.md.tmp", "f.png.tmp"])


def test_append_rows_and_certificate_rows():
    from mfld import duality
    from mfld.experiments import _common as C

    t = {"run": [], "t": [], "v": []}
    C.append_rows(t, run="a", t=np.array([0.0, 1.0]), v=[3, 4])
    C.append_row(t, run="b", t=2.0, v=5)
    assert t == {"run": ["a", "a", "b"], "t": [0.0, 1.0, 2.0], "v": [3, 4, 5]}
    with pytest.raises(ValueError, match="one length"):
        C.append_rows(t, run="c", t=[1.0], v=[1, 2])
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (10, 1))
    with jax.enable_x64(True):
        pb = Problem.create(x, np.tanh(x[:, 0]), lam=0.5, tau=0.1, bias=False)
        st = dynamics.init_particles(pb, 100, 0)
        tab = {"t": [], "risk": [], "dual_lower": [], "Fstar_minus_D": []}
        _, h = loop.simulate(pb, st, dynamics.Langevin(0.05), 20, record_every=10,
                                 callback=C.certify_callback(tab, pb, F_star=1.0, keep=lambda r: r["step"] > 0))
        assert tab["t"] == pytest.approx([0.5, 1.0]) and tab["risk"] == pytest.approx(list(h["risk"][1:]))
        final = dynamics.run_steps(pb, st, dynamics.Langevin(0.05), 20)[0]
        c = duality.certify(pb, final.a, final.w)
    assert tab["dual_lower"][-1] == c["dual_lower"]
    assert tab["Fstar_minus_D"][-1] == 1.0 - c["dual_lower"]


def test_every_figure_goes_through_one_writer(tmp_path, monkeypatch):
    # run figures, the certificate figure and the experiments' figures share
    # mfld.app.plots.save_figure (atomic write, one place for format and dpi)
    from mfld.app import certificate_plots, plots
    from mfld.experiments import _common as C

    seen = []
    real = plots.save_figure
    def spy(fig, path, **kw):
        seen.append(path.name)
        return real(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    t = np.linspace(0, 5, 30)
    certificate_plots.plot_gap({"t": t, "dual_lower": -np.exp(-t), "primal_upper": np.exp(-t)}, tmp_path / "gap.png")
    plots.plot_risk({"t": t, "risk": np.exp(-t) + 0.1}, tmp_path / "risk.png")
    fig, _ = C.pyplot().subplots()
    C.savefig(fig, tmp_path / "exp.png")
    assert seen == ["gap.png", "risk.png", "exp.png"]
    assert all((tmp_path / n).read_bytes().startswith(b"\x89PNG") for n in seen)
