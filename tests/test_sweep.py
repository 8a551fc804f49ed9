"""Sweeps: one vmapped, compiled call reproduces each member's lone ``simulate`` run.

Tolerance: member m runs the same arithmetic as its lone run, batched; XLA may reassociate
sums inside the batched GEMMs, so we allow 1e-12 relative in float64 (eps64 * terms * steps
~ 1e-14; measured: bitwise equal) and 1e-4 in float32 (eps32 = 1.2e-7 propagated over 12
steps of O(1) dynamics, ~1e-6 measured-scale; values O(0.1-1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import dynamics, sweep
from mfld.dynamics import Langevin, init_particles
from mfld.errors import ConfigError
from mfld.loop import simulate
from mfld.problem import Problem


def _problem(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((25, 2))
    return Problem.create(x, np.sin(x[:, 0]), dtype=dtype, x_test=rng.standard_normal((9, 2)),
                          y_test=rng.standard_normal(9))


def _compare(problem, stepper, rtol, atol):
    members = sweep.grid(problem, stepper, tau=[0.01, 0.1], lam=[0.1, 0.5], eta=[0.02, 0.05], seeds=2)
    assert len(members) == 16 and len({m.label() for m in members}) == 16
    final, hists = sweep.run(problem, stepper, members, 30, 12, record_every=4, chunk=2)
    assert final.w.shape == (16, 30, problem.p)
    for i in (0, 5, 10, 15):
        m = members[i]
        pb = problem.replace(lam=m.lam, tau=m.tau)
        st = Langevin(m.eta, scheme=stepper.scheme, batch_size=stepper.batch_size)
        ref, h = simulate(pb, init_particles(pb, 30, m.seed), st, 12, record_every=4, chunk=2)
        assert set(h.columns) == set(hists[i].columns)
        for c in h.columns:
            if c != "wall_time":
                np.testing.assert_allclose(hists[i][c], h[c], rtol=rtol, atol=atol, err_msg=c)
        np.testing.assert_allclose(sweep.member_state(final, i).w, ref.w, rtol=rtol, atol=atol)
    # members really differ (tau, lam, eta and seed all act)
    risks = np.array([h["risk"][-1] for h in hists])
    assert len(np.unique(np.round(risks, 12))) == 16


def test_sweep_equals_lone_runs_float64():
    with jax.enable_x64(True):
        _compare(_problem(jnp.float64), Langevin(0.05), rtol=1e-12, atol=1e-14)


def test_sweep_equals_lone_runs_float32_minibatch_ou():
    with jax.enable_x64(False):
        _compare(_problem(jnp.float32), Langevin(0.05, scheme="ou", batch_size=10), rtol=1e-4, atol=1e-5)


def test_sweep_compiles_once_per_shape():
    """A second grid of the same size with other values reuses the compiled call."""
    with jax.enable_x64(True):
        problem = _problem(jnp.float64)
        stepper = Langevin(0.05)
        m1 = sweep.grid(problem, stepper, tau=[0.01, 0.02], seeds=2)
        m2 = sweep.grid(problem, stepper, tau=[0.3, 0.4], lam=[2.0], eta=[0.01], seeds=[7, 9])
        sweep.run(problem, stepper, m1, 20, 4, record_every=4)
        runner = sweep.compiled_runner(problem, sweep.stack_members(problem, stepper, m1, 20, {})[2], True)
        n_compiled = runner._cache_size()
        sweep.run(problem, stepper, m2, 20, 4, record_every=4)
        assert runner._cache_size() == n_compiled


def test_sweep_validates_values():
    problem = _problem(jnp.float32)
    with pytest.raises(ConfigError, match="objective.lam"):
        sweep.grid(problem, Langevin(0.1), lam=[0.1, -1.0])
    with pytest.raises(ConfigError, match="dynamics.eta"):
        sweep.grid(problem, Langevin(0.1), eta=[0.0])
    with pytest.raises(ConfigError, match="members"):
        sweep.run(problem, Langevin(0.1), [], 10, 1)
    # each member has a directory named by its label: duplicates are refused before running
    with pytest.raises(ConfigError, match="objective.tau"):
        sweep.grid(problem, Langevin(0.1), tau=[0.01, 0.02, 0.01])
    with pytest.raises(ConfigError, match="dynamics.eta"):
        sweep.grid(problem, Langevin(0.1), eta=[0.1, 0.1000000001])
    with pytest.raises(ConfigError, match="seeds") as err:
        sweep.grid(problem, Langevin(0.1), seeds=[3, 3])
    assert err.value.field == "seeds"  # the argument's name: no config path holds the seeds
    assert dynamics.Langevin(0.1).memory_budget is None


# ---- mfld sweep: certificates, checkpoints, resume, exit codes (issues 10 and 11) ----------

SMALL = ["--set", "model.n_particles=64", "--set", "dynamics.steps=20", "--set", "record.every=10",
         "--set", "record.certify_every=10", "--quiet"]


def _member_dirs(out):
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("lam="))


def test_cli_sweep_2x2x2_certificates_checkpoints_and_plot(tmp_path, monkeypatch):
    """The acceptance case of issue 10 item 6: a 2 x 2 x 2 sweep of the default problem writes
    the gap columns and member checkpoints; the optimum is solved once per (lam, tau); each
    member's last certificate is exactly what mfld.duality.certify gives on its checkpointed
    final particles (same float64 arithmetic, so equality); mfld plot works on a member."""
    import csv
    import json

    from mfld import config as cfgmod
    from mfld import duality, optimum
    from mfld.app import inputs, rundir
    from mfld.cli import main

    solves = []
    real_solve = optimum.solve_optimum
    monkeypatch.setattr(optimum, "solve_optimum", lambda pb, **kw: solves.append(kw) or real_solve(pb, **kw))
    out = tmp_path / "sw"
    main(["sweep", "--grid", "tau=0.02,0.05", "--grid", "lam=0.1,0.2", "--seeds", "2", *SMALL, "--out", str(out)])
    assert len(solves) == 4  # one per distinct (lam, tau), not one per member
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"completed"}
    for r in rows:
        lo, up, gap = float(r["dual_lower"]), float(r["primal_upper"]), float(r["gap"])
        assert np.isfinite(gap) and lo <= up and gap == pytest.approx(up - lo, rel=1e-12)
        assert float(r["F_star"]) >= lo - 1e-12 and float(r["certified"]) == 1.0  # d = 1: quadrature
    dirs = _member_dirs(out)
    assert len(dirs) == 8 and len(list((out / "figures").glob("risk_*.png"))) == 4
    opt_text = {}
    for d in dirs:
        cfg = cfgmod.validate(__import__("yaml").safe_load((d / rundir.CONFIG).read_text()))
        opt_text.setdefault((cfg.objective.lam, cfg.objective.tau), set()).add((d / rundir.OPTIMUM).read_text())
        ck = rundir.load_checkpoint(d / rundir.CHECKPOINT)
        assert int(ck["step"]) == 20 and ck["w"].shape == (64, 2)
        m = rundir.read_metrics(d / rundir.METRICS)
        assert list(m["step"]) == [0, 10, 20] and np.all(np.isfinite(m["gap"]))
        row = next(r for r in rows if d.name.endswith(f"seed={r['seed']}") and f"tau={float(r['tau']):g}_" in d.name
                   and d.name.startswith(f"lam={float(r['lam']):g}_"))
        for k in ("risk", "gap", "dual_lower", "primal_upper"):  # sweep.csv: the member's last record
            assert float(row[k]) == m[k][-1], k
        with inputs.precision_context(cfg.precision):
            problem = inputs.build_problem(cfg, inputs.make_dataset(cfg))
            opt = optimum.Optimum.from_json((d / rundir.OPTIMUM).read_text(), problem=problem)
            want = duality.certify(problem, ck["a"], ck["w"], method=cfg.record.certify_method,
                                   n_samples=cfg.record.certify_samples, seed=cfg.seed, optimum=opt)
        for k, v in want.items():
            np.testing.assert_equal(m[k][-1], v, err_msg=k)
        s = json.loads((d / rundir.SUMMARY).read_text())
        assert s["status"] == "completed" and s["checkpoint_step"] == 20 and s["F_star"] == opt.F_star
    assert len(opt_text) == 4 and all(len(v) == 1 for v in opt_text.values())  # seeds share the optimum
    assert len({r["risk"] for r in rows}) == 8  # every member differs (lam, tau and seed act)
    main(["plot", str(dirs[3])])
    assert (dirs[3] / "figures" / "gap.png").stat().st_size > 5000


def test_cli_sweep_resumes_after_a_kill_with_identical_results(tmp_path, monkeypatch):
    """A sweep killed between its members' metrics and the stacked checkpoint (the worst place)
    resumes with --resume and ends with the same files as an uninterrupted sweep (wall times
    aside); no member is marked complete (summary.json) before the end; a rerun without
    --resume, or with another grid, is refused with exit 2."""
    from mfld.app import rundir
    from mfld.cli import main

    args = ["sweep", "--grid", "tau=0.02,0.05", *SMALL, "--set", "dynamics.steps=30",
            "--set", "record.checkpoint_every=10"]
    main(args + ["--out", str(tmp_path / "a")])
    real_save = rundir.save_checkpoint

    def killed(path, a, w, step, *rest, **kw):
        if path.name == rundir.SWEEP_CHECKPOINT and step == 20:
            raise KeyboardInterrupt  # metrics of step 20 are written, its checkpoint is not
        return real_save(path, a, w, step, *rest, **kw)

    monkeypatch.setattr(rundir, "save_checkpoint", killed)
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "b")])
    assert e.value.code == 130
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    b_dirs = _member_dirs(tmp_path / "b")
    assert len(b_dirs) == 2 and not any((d / rundir.SUMMARY).exists() for d in b_dirs)
    assert list(rundir.read_metrics(b_dirs[0] / rundir.METRICS)["step"]) == [0, 10, 20]  # one row too many
    for bad in ([], ["--grid", "tau=0.02,0.06"]):
        with pytest.raises(SystemExit) as e:
            main((args + bad if bad else args) + ["--out", str(tmp_path / "b")] + ([] if not bad else ["--resume"]))
        assert e.value.code == 2
    main(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert (tmp_path / "a" / "sweep.csv").read_text() == (tmp_path / "b" / "sweep.csv").read_text()
    for da, db in zip(_member_dirs(tmp_path / "a"), b_dirs, strict=True):
        ma, mb = rundir.read_metrics(da / rundir.METRICS), rundir.read_metrics(db / rundir.METRICS)
        assert list(ma) == list(mb) and list(mb["step"]) == [0, 10, 20, 30]
        for k in ma:
            if k != "wall_time":
                np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
        ca, cb = rundir.load_checkpoint(da / rundir.CHECKPOINT), rundir.load_checkpoint(db / rundir.CHECKPOINT)
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


def test_cli_sweep_diverged_member_exits_3_and_bad_grids_are_refused_up_front(tmp_path, capsys):
    """A member that diverges ends 'diverged' (its last finite state checkpointed, the others
    unaffected) and the sweep exits 3 like mfld run; no progress bars when stderr is not a
    terminal; duplicate grid values are refused before anything is written (exit 2, one line)."""
    import csv
    import json

    from mfld.app import rundir
    from mfld.cli import main

    for grid in (["--grid", "tau=0.01,0.01"], ["--grid", "tau=0.01,0.0100000001"],
                 ["--grid", "tau=0.01", "--grid", "tau=0.02"], ["--grid", "alpha=1,2"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["sweep", *grid, "--out", str(tmp_path / "dup")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--grid" in err and grid[1][:3] in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "dup").exists()
    out = tmp_path / "div"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # (without --quiet: stderr is not a terminal here)
        main(["sweep", "--grid", "eta=0.02,50", *[a for a in SMALL if a != "--quiet"],
              "--set", "record.certify_every=0", "--set", "record.optimum=false", "--out", str(out)])
    assert e.value.code == 3
    cap = capsys.readouterr()
    assert cap.err == "" and "1 of 2 members diverged" in cap.out  # no progress bars off a terminal
    rows = {r["eta"]: r for r in csv.DictReader((out / "sweep.csv").read_text().splitlines())}
    assert rows["0.02"]["status"] == "completed" and rows["50.0"]["status"] == "diverged"
    d = out / "lam=0.1_tau=0.05_eta=50_seed=0"
    s = json.loads((d / rundir.SUMMARY).read_text())
    ck = rundir.load_checkpoint(d / rundir.CHECKPOINT)
    assert s["status"] == "diverged" and int(ck["step"]) == s["last_good_step"] < 20
    assert np.all(np.isfinite(ck["w"])) and np.all(np.isfinite(rundir.read_metrics(d / rundir.METRICS)["risk"]))
    assert json.loads((out / "sweep.json").read_text())["n_diverged"] == 1
