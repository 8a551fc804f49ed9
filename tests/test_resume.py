"""Runs that survive: SIGKILL + resume is bit-identical, SIGINT checkpoints, locks, divergence.

Bit-for-bit contract (docs/runs.md): final particles, key, and every metrics.csv column except
``wall_time`` are identical -- compared here as the CSV text itself, which holds round-trip
float representations. ``wall_time`` is measured time and is outside the contract.

Subprocess runs share a persistent JAX compilation cache (session fixture) to save compiles.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mfld
from mfld.app import rundir
from mfld.app.lock import LOCK, RunLock
from mfld.app.runner import drift_curvature, precision_notes, quantised_fraction
from mfld.cli import main
from mfld.errors import ConfigError

BASE = ["--set", "model.n_particles=50", "--set", "record.every=10", "--set", "record.checkpoint_every=50",
        "--set", "record.certify_every=0", "--set", "record.optimum=false", "--quiet"]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory, request):
    """Environment for CLI subprocesses: one persistent compilation cache for the session
    (kept across sessions in pytest's cache dir when the cache plugin is on)."""
    try:
        cache = Path(request.config.cache.mkdir("jax-compilation-cache"))
    except AttributeError:  # -p no:cacheprovider
        cache = tmp_path_factory.mktemp("jax-compilation-cache")
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    return env


def spawn(args, env, cwd):
    return subprocess.Popen([sys.executable, "-m", "mfld.cli", "run", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoint_step(run_dir: Path) -> int:
    try:
        return int(rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)["step"])
    except (OSError, KeyError, ValueError):
        return -1


def wait_for_checkpoint(proc, run_dir, at_least, timeout=120.0):
    t0 = time.monotonic()
    while checkpoint_step(run_dir) < at_least:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended before step {at_least}: rc={proc.returncode} {err[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("no checkpoint in time")
        time.sleep(0.01)


def metrics_without_wall_time(run_dir: Path) -> list[list[str]]:
    with open(run_dir / rundir.METRICS, newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("wall_time")
    return [r[:drop] + r[drop + 1:] for r in rows]


def assert_identical_runs(a_dir: Path, b_dir: Path):
    a, b = rundir.load_checkpoint(a_dir / rundir.CHECKPOINT), rundir.load_checkpoint(b_dir / rundir.CHECKPOINT)
    assert int(a["step"]) == int(b["step"])
    for k in ("a", "w", "key_data"):
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k  # bit for bit
    ma, mb = metrics_without_wall_time(a_dir), metrics_without_wall_time(b_dir)
    assert ma[0] == mb[0]
    assert len(ma) == len(mb)
    assert ma == mb


def test_sigkill_at_a_random_point_then_resume_is_bit_identical(tmp_path, cli_env):
    steps = 2000
    args = [*BASE, "--set", f"dynamics.steps={steps}"]
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng = random.Random(seed)
    target = 50 * rng.randint(1, 16)  # a checkpoint to pass, at most 800 of 2000 steps
    delay = rng.uniform(0.0, 0.05)  # then kill anywhere: mid-chunk, mid-record or mid-write

    killed = tmp_path / "killed"
    proc = spawn([*args, "--out", str(killed)], cli_env, tmp_path)
    wait_for_checkpoint(proc, killed, target)
    time.sleep(delay)
    assert proc.poll() is None, f"(seed {seed}) the run finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ck = checkpoint_step(killed)
    assert target <= ck < steps, f"seed {seed}"
    assert (killed / LOCK).exists()  # a SIGKILL leaves its lock file behind ...
    # ... and metrics.csv may hold rows beyond the checkpoint: resume truncates them

    main(["run", "--resume", str(killed), "--quiet"])  # takes over the stale lock
    summary = json.loads((killed / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == ck, f"seed {seed}"
    assert any("stale lock" in n for n in summary["notes"])
    assert not (killed / LOCK).exists()

    ref = tmp_path / "ref"
    main(["run", *args, "--out", str(ref)])
    assert_identical_runs(killed, ref)
    assert len(metrics_without_wall_time(ref)) == steps // 10 + 2  # header + one row per record


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_then_resume_extends_bit_identically(sig, tmp_path, cli_env, capsys):
    run_dir = tmp_path / "int"
    proc = spawn([*BASE, "--set", "dynamics.steps=1000000", "--out", str(run_dir)], cli_env, tmp_path)
    wait_for_checkpoint(proc, run_dir, 50)

    # while it runs, nobody else may write the directory (lock held by a live process)
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(run_dir), "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"in use by process {proc.pid}" in err and err.count("\n") == 1

    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "status=interrupted" in out
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == sig
    ck = checkpoint_step(run_dir)
    assert summary["checkpoint_step"] == ck == summary["final"]["step"] and ck % 10 == 0
    metrics = rundir.read_metrics(run_dir / rundir.METRICS)
    assert metrics["step"][-1] == ck  # consistent: metrics end at the checkpoint
    assert not (run_dir / LOCK).exists()  # released on a clean stop
    assert all((run_dir / "figures" / n).exists() for n in ("risk.png", "neurons.png", "function.png"))

    total = ck + 300  # extend: only dynamics.steps may change on resume
    main(["run", "--resume", "--out", str(run_dir), "--set", f"dynamics.steps={total}", "--quiet"])
    ref = tmp_path / "ref"
    main(["run", *BASE, "--set", f"dynamics.steps={total}", "--out", str(ref)])
    assert_identical_runs(run_dir, ref)


def test_extending_a_run_that_ended_off_the_record_grid_with_certificates_is_bit_identical(tmp_path):
    """A run of 55 steps records at 0, 10, ..., 50 and closes with a row at 55; extended to 100
    steps it must equal a single 100-step run, which has no row at 55. Certificates on: their
    columns (float64 quadrature of the same particles) are part of the contract too."""
    args = ["--set", "model.n_particles=50", "--set", "record.every=10", "--set", "record.checkpoint_every=50",
            "--set", "record.certify_every=10", "--set", "record.optimum=true", "--quiet"]
    run_dir, ref = tmp_path / "ext", tmp_path / "ref"
    main(["run", *args, "--set", "dynamics.steps=55", "--out", str(run_dir)])
    assert list(rundir.read_metrics(run_dir / rundir.METRICS)["step"]) == [0, 10, 20, 30, 40, 50, 55]
    main(["run", "--resume", "--out", str(run_dir), "--set", "dynamics.steps=100", "--quiet"])
    main(["run", *args, "--set", "dynamics.steps=100", "--out", str(ref)])
    assert_identical_runs(run_dir, ref)
    m = rundir.read_metrics(ref / rundir.METRICS)
    assert list(m["step"]) == list(range(0, 101, 10)) and np.all(np.isfinite(m["gap"]))


def test_resume_refuses_a_different_config_and_leaves_the_run_alone(tmp_path, capsys):
    run_dir = tmp_path / "r"
    main(["run", *BASE, "--set", "dynamics.steps=100", "--out", str(run_dir)])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    for extra, field in ((["--set", "objective.tau=0.5"], "objective.tau"), (["--x64"], "precision"),
                         (["--set", "seed=3"], "seed")):
        with pytest.raises(SystemExit) as info:
            main(["run", "--resume", str(run_dir), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert err.startswith("error: --resume: the config differs from the stored run at " + field), err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # resuming a finished run with the same config does nothing and changes no numbers
    main(["run", "--resume", str(run_dir), "--quiet"])
    assert (run_dir / rundir.CHECKPOINT).read_bytes() == before[rundir.CHECKPOINT]
    assert metrics_without_wall_time(run_dir)[-1][0] == "100"


def test_live_and_stale_locks(tmp_path, capsys):
    run_dir = tmp_path / "r"
    main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(run_dir)])
    capsys.readouterr()
    with RunLock(run_dir):  # held by this (live) process
        with pytest.raises(SystemExit):
            main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=40"])
        err = capsys.readouterr().err
        assert f"in use by process {os.getpid()}" in err
        with pytest.raises(ConfigError):  # a second holder in the same process is refused too
            RunLock(run_dir).acquire()
    assert not (run_dir / LOCK).exists()
    # a lock file whose owner is gone (as after a SIGKILL or a reboot): taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=40", "--quiet"])
    s = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert s["status"] == "completed" and s["final"]["step"] == 40
    assert any("stale lock" in n for n in s["notes"]) and not (run_dir / LOCK).exists()


def test_divergence_stops_keeps_last_good_state_and_suggests_a_stable_step(tmp_path, capsys):
    args = ["--set", "model.n_particles=100", "--set", "dynamics.steps=200", "--set", "record.every=5",
            "--set", "record.checkpoint_every=0", "--set", "record.certify_every=0", "--set", "record.optimum=false",
            "--quiet"]
    run_dir = tmp_path / "div"
    with pytest.raises(SystemExit) as info:
        main(["run", *args, "--set", "dynamics.eta=20", "--out", str(run_dir)])
    assert info.value.code == 3
    out = capsys.readouterr().out
    assert "status=diverged" in out and "dynamics.eta=" in out
    run = mfld.load_run(run_dir)
    s = run.summary
    assert s["status"] == "diverged"
    bad, good = s["diverged_at_step"], s["last_good_step"]
    assert good == bad - 5 and bad <= 200
    # the checkpoint is the last finite state, loadable, and metrics stop there, all finite
    assert run.step == good == s["checkpoint_step"]
    assert np.all(np.isfinite(run.a)) and np.all(np.isfinite(run.w))
    assert run.metrics["step"][-1] == good
    assert all(np.all(np.isfinite(v)) for v in run.metrics.values())
    for name in ("risk.png", "neurons.png", "function.png"):
        assert (run_dir / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any("figures failed" in n for n in s["notes"])
    # the suggestion: half the linear stability limit 2/mu at the last finite state, below eta/2
    eta_s = s["suggested_eta"]
    assert 0 < eta_s <= 10.0
    assert s["curvature"] > 0 and eta_s == pytest.approx(min(10.0, 1.0 / s["curvature"]))
    # ... and it is stable: the same run with it completes
    main(["run", *args, "--set", f"dynamics.eta={eta_s!r}", "--out", str(run_dir), "--overwrite"])
    s2 = mfld.load_run(run_dir).summary
    assert s2["status"] == "completed" and s2["final"]["step"] == 200


@pytest.mark.parametrize("output, scaling", [("trained", "mean_field"), ("fixed", "mean_field"),
                                             ("bounded", "ntk")])
def test_drift_curvature_is_the_top_hessian_eigenvalue(output, scaling):
    """The power iteration's mu_max equals the largest eigenvalue of the exact Hessian of N L
    (mean field) or L (NTK) -- the drift's Jacobian -- computed densely by autodiff (float64)."""
    from mfld import data, dynamics, network
    from mfld.problem import Problem

    with jax.enable_x64(True):
        ds = data.teacher_student(n=20, d=2, seed=1)
        pr = Problem.create(ds.x, ds.y, activation="tanh", lam=0.1, tau=0.05, output=output, scaling=scaling)
        n = 7
        st = dynamics.init_particles(pr, n, seed=3, a_scale=2.0, w_scale=1.5)
        fixed = output == "fixed"

        def loss(v):
            a = st.a if fixed else v[:n]
            w = (v if fixed else v[n:]).reshape(n, -1)
            return (n if scaling == "mean_field" else 1.0) * network.finite_loss(pr, a, w)

        v0 = st.w.ravel() if fixed else jnp.concatenate([st.a, st.w.ravel()])
        top = float(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(v0))).max())
        mu = drift_curvature(pr, st.a, st.w, iters=200)
    # 200 power iterations on a 21-28 dimensional symmetric matrix: converged far below 1e-6
    assert mu == pytest.approx(top, rel=1e-6)


def test_precision_notes_flag_float32_resolution():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((2000, 3))
    # a cloud whose nearest-neighbour distances are ~1e-7 at scale 1: float32 quantisation
    tight = 1.0 + 1e-6 * rng.standard_normal((2000, 3))
    assert quantised_fraction(tight) > 0.5
    assert quantised_fraction(spread) < 0.01
    assert quantised_fraction(tight, np.float64) == 0.0
    metrics = {"reg_risk": [0.3], "primal_upper": [0.31], "gap": [2e-7], "free_energy_est": [0.2]}
    notes = precision_notes("float32", metrics, tight[:, 0], tight[:, 1:])
    assert any("gap" in n for n in notes) and any("entropy" in n for n in notes)
    assert precision_notes("float64", metrics, tight[:, 0], tight[:, 1:]) == []
    fine = {"reg_risk": [0.3], "primal_upper": [0.31], "gap": [1e-3], "free_energy_est": [0.2]}
    assert precision_notes("float32", fine, spread[:, 0], spread[:, 1:]) == []
    # the default problem's end (|F| ~ 0.09, gap ~ 1e-5 at its O(1/N) plateau, which a float64
    # run reaches as well) is well above 100 float32 ulps of |F| (~1e-6): no note
    default_end = {"reg_risk": [0.092], "primal_upper": [-0.0737], "gap": [9e-6], "F_minus_Fstar_upper": [7e-6]}
    assert precision_notes("float32", default_end, spread[:, 0], spread[:, 1:]) == []
    assert any("gap" in n for n in precision_notes("float32", {**default_end, "gap": [5e-7]}, None, None))


def test_an_unexpected_error_leaves_a_consistent_directory(tmp_path, monkeypatch):
    """A crash inside the loop (here: injected) writes summary status `failed` with the reason,
    releases the lock, keeps the files written so far, and re-raises (a bug shows its traceback)."""
    from mfld import dynamics

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(dynamics, "simulate", broken)
    run_dir = tmp_path / "r"
    with pytest.raises(RuntimeError, match="injected failure"):
        mfld.run({"model": {"n_particles": 8}, "dynamics": {"steps": 20},
                  "record": {"certify_every": 0, "optimum": False, "every": 10}}, out=run_dir, progress=False)
    s = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert s["status"] == "failed" and "injected failure" in s["reason"] and s["checkpoint_step"] is None
    assert (run_dir / rundir.CONFIG).exists() and not (run_dir / LOCK).exists()


def test_resume_takes_the_lock_before_reading_the_run(tmp_path, capsys, monkeypatch):
    """A resume reads the checkpoint, metrics.csv and optimum.json only under the run lock, and
    checks env.json (integrity, data hash) again there: with the lock held elsewhere it is
    refused before any of them is read. (config.yaml, env.json and the data are checked once
    before, without JAX, for a fast answer.)"""
    from mfld.app import runner

    run_dir = tmp_path / "r"
    main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(run_dir)])
    capsys.readouterr()
    reads = []
    for name in ("_read_resume", "_restore", "_read_optimum"):
        orig = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _n=name, _o=orig, **k: (reads.append(_n), _o(*a, **k))[1])
    for mod, name in ((rundir, "read_metrics"), (rundir, "load_checkpoint")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _o=orig, **k: (reads.append(_n), _o(*a, **k))[1])
    with RunLock(run_dir):  # held by a live process
        with pytest.raises(SystemExit) as info:
            main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=40", "--quiet"])
    assert info.value.code == 2 and "in use by" in capsys.readouterr().err
    assert reads == []
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=40", "--quiet"])  # free again: it reads
    assert {"_read_resume", "_restore", "read_metrics", "load_checkpoint"} <= set(reads)
    assert checkpoint_step(run_dir) == 40


def test_resume_without_writing_is_refused(tmp_path):
    """resume=True continues a run in its directory; write=False would silently drop that."""
    run_dir = tmp_path / "r"
    main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(run_dir)])
    with pytest.raises(ConfigError) as info:
        mfld.run(out=run_dir, resume=True, write=False, overrides={"dynamics.steps": 40})
    assert info.value.field == "write"
    assert checkpoint_step(run_dir) == 20


def test_resume_keeps_the_stored_optimum(tmp_path, monkeypatch):
    """A resumed run loads optimum.json instead of solving again: its F* is the stored one,
    bit for bit (a second solve agrees only to the solver's tolerance)."""
    import mfld.optimum

    run_dir = tmp_path / "r"
    args = ["--set", "model.n_particles=50", "--set", "record.every=10", "--set", "record.checkpoint_every=10",
            "--set", "record.certify_every=10", "--set", "record.optimum=true", "--quiet"]
    main(["run", *args, "--set", "dynamics.steps=20", "--out", str(run_dir)])
    stored = json.loads((run_dir / rundir.OPTIMUM).read_text())

    def no_second_solve(*a, **k):
        raise AssertionError("the optimum was solved again on resume")

    monkeypatch.setattr(mfld.optimum, "solve_optimum", no_second_solve)
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=40", "--quiet"])
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 20
    assert summary["F_star"] == stored["F_star"] and summary["F_star_err"] == stored["F_star_err"]
    m = rundir.read_metrics(run_dir / rundir.METRICS)
    assert list(m["step"]) == [0, 10, 20, 30, 40]
    assert np.all(m["F_star"] == stored["F_star"])
    assert json.loads((run_dir / rundir.OPTIMUM).read_text()) == stored


def test_suggest_step_size_rule(monkeypatch):
    """min(eta / 2, 1 / mu_max) over the states' curvatures, halving when none is usable
    (mfld.stability, without the app: the curvature itself is tested above)."""
    from types import SimpleNamespace

    from mfld import stability

    curv = {}
    monkeypatch.setattr(stability, "drift_curvature", lambda problem, a, w: curv[a])
    states = [SimpleNamespace(a="s0", w=None), SimpleNamespace(a="s1", w=None)]
    curv.update(s0=4.0, s1=10.0)  # mu_max = 10: 1/10 < eta/2 = 0.5
    got = stability.suggest_step_size(None, 1.0, states)
    assert got["eta"] == 0.1 and got["curvature"] == 10.0
    curv.update(s0=1.0, s1=0.5)  # 1/mu_max = 1 > eta/2: halve
    assert stability.suggest_step_size(None, 1.0, states) == {"eta": 0.5, "curvature": 1.0,
                                                               "why": "halving the step (curvature 1 at the "
                                                                      "last finite state)"}
    curv.update(s0=float("nan"), s1=-3.0)  # nothing positive: halve, no curvature
    got = stability.suggest_step_size(None, 0.2, states)
    assert got["eta"] == 0.1 and got["curvature"] == -3.0
