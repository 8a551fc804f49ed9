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
from mfld.dynamics import Langevin, init_particles, simulate
from mfld.errors import ConfigError
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
        runner = sweep._cached_runner(problem, sweep._stack(problem, stepper, m1, 20, {})[2], True)
        n_compiled = runner._cache_size()
        sweep.run(problem, stepper, m2, 20, 4, record_every=4)
        assert runner._cache_size() == n_compiled


def test_sweep_validates_values():
    problem = _problem(jnp.float32)
    with pytest.raises(ConfigError, match="objective.lam"):
        sweep.grid(problem, Langevin(0.1), lam=[0.1, -1.0])
    with pytest.raises(ConfigError, match="dynamics.eta"):
        sweep.grid(problem, Langevin(0.1), eta=[0.0])
    with pytest.raises(ConfigError, match="sweep"):
        sweep.run(problem, Langevin(0.1), [], 10, 1)
    assert dynamics.Langevin(0.1).memory_budget is None


def test_cli_sweep_writes_member_dirs_table_and_band_figures(tmp_path):
    import csv

    from mfld.app import rundir
    from mfld.cli import main

    out = tmp_path / "sw"
    main(["sweep", "--grid", "tau=0.01,0.05", "--seeds", "2", "--set", "dynamics.steps=20",
          "--set", "record.every=10", "--set", "model.n_particles=64", "--out", str(out)])
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert len(rows) == 4 and {r["tau"] for r in rows} == {"0.01", "0.05"}
    for r in rows:
        d = out / f"lam={float(r['lam']):g}_tau={float(r['tau']):g}_eta={float(r['eta']):g}_seed={r['seed']}"
        m = rundir.read_metrics(d / rundir.METRICS)
        assert list(m["step"]) == [0, 10, 20]
        assert float(r["risk"]) == pytest.approx(m["risk"][-1], rel=1e-6)
        assert "objective" in (d / rundir.CONFIG).read_text()
    assert rows[0]["risk"] != rows[1]["risk"]  # seeds differ
    assert len(list((out / "figures").glob("risk_*.png"))) == 2
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--grid", "alpha=1", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
