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
from mfld.app.guards import precision_notes, quantised_fraction
from mfld.app.lock import LOCK, RunLock
from mfld.cli import main
from mfld.errors import ConfigError
from mfld.stability import drift_curvature

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


def test_quantised_fraction_uses_the_entropy_subsample_and_no_float64_copy():
    """The float32-quantisation guard measures nearest-neighbour distances within the evenly
    strided subsample the k-NN entropy uses (mfld.entropy.subsample), at the scale of all the
    points, and upcasts only that subsample: at N = 10^7 a k-d tree over every particle in
    float64 took 85 s and 0.8 GB at the end of a run."""
    import tracemalloc

    from scipy.spatial import cKDTree

    from mfld.entropy import RELIABLE_MAX_SAMPLES, subsample

    rng = np.random.default_rng(1)
    n, m = 40_000, 2048
    theta = (1.0 + 3e-7 * rng.standard_normal((n, 3))).astype(np.float32)
    theta[n // 2 + 1] = 4.0  # the largest coordinate, not in the subsample: it sets the scale
    sub = subsample(theta, m).astype(np.float64)
    assert sub.shape[0] == m and not np.any(sub == 4.0)

    def by_hand(points, scale):
        d, _ = cKDTree(points).query(points, k=2)
        return float(np.mean(d[:, 1] < 100 * float(np.spacing(np.float32(scale)))))

    assert quantised_fraction(theta, max_samples=m) == by_hand(sub, 4.0)
    # up to the cap (every run up to 2^20 particles) all points, as before
    assert RELIABLE_MAX_SAMPLES >= n
    assert quantised_fraction(theta) == by_hand(theta.astype(np.float64), 4.0)
    # memory: a boolean mask of the points (1 byte a coordinate) and O(m) for the subsample's
    # tree, never a float64 copy of all the points (8 bytes a coordinate)
    tracemalloc.start()
    quantised_fraction(theta, max_samples=m)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < theta.size + 100 * m, peak


def test_the_heap_is_trimmed_after_each_certificate(tmp_path, monkeypatch):
    """A run hands the C heap's free pages back (mfld.resources.release_freed_memory) after each
    certificate, before the next compiled segment: at N = 10^7 a certificate's freed float64
    blocks left 150-250 MB resident otherwise, on top of the step's own peak."""
    from mfld import resources

    calls = []
    monkeypatch.setattr(resources, "release_freed_memory", lambda: calls.append(1) or True)
    res = mfld.run({"model": {"n_particles": 64}, "dynamics": {"steps": 20},
                    "record": {"every": 5, "certify_every": 10, "optimum": False}}, write=False, progress=False)
    assert list(res.metrics["step"]) == [0, 5, 10, 15, 20]
    assert len(calls) == 3  # the certified records: steps 0, 10, 20


def test_an_unexpected_error_leaves_a_consistent_directory(tmp_path, monkeypatch):
    """A crash inside the loop (here: injected) writes summary status `failed` with the reason,
    releases the lock, keeps the files written so far, and re-raises (a bug shows its traceback)."""
    from mfld import loop

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(loop, "simulate", broken)
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
    from mfld.app import certificates, runner

    run_dir = tmp_path / "r"
    main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(run_dir)])
    capsys.readouterr()
    reads = []
    for mod, name in ((runner._Run, "_read_resume"), (runner, "_restore"), (certificates, "read_optimum"),
                      (rundir, "read_metrics"), (rundir, "load_checkpoint")):
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


# --------------------------------------------------------------------------- issue 11
def test_first_signal_prints_the_resume_command_second_signal_one_line(tmp_path, cli_env):
    """Ctrl-C: the run stops at the next record and prints the exact command that continues
    it; a second Ctrl-C stops at once with one line, ``error: interrupted; resume with: ...``
    (no empty line, not click's "Aborted!"), exit 130."""
    run_dir = tmp_path / "two signals"  # a space: the printed command quotes the path
    proc = spawn([*BASE[:-1], "--set", "record.every=200000", "--set", "record.checkpoint_every=0",
                  "--set", "dynamics.chunk=100", "--set", "dynamics.steps=100000000", "--quiet",
                  "--out", str(run_dir)], cli_env, tmp_path)
    t0 = time.monotonic()
    while not (run_dir / rundir.ENV).exists():
        assert proc.poll() is None and time.monotonic() - t0 < 120, proc.communicate()
        time.sleep(0.02)
    time.sleep(1.0)  # compiled and stepping
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.splitlines() == [f"error: interrupted; resume with: mfld run --resume '{run_dir}'"], err
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "interrupted" and "second signal" in summary["reason"]
    assert not (run_dir / LOCK).exists()


def test_resume_command_after_one_signal(tmp_path, cli_env):
    run_dir = tmp_path / "one"
    proc = spawn([*BASE, "--set", "dynamics.steps=1000000", "--out", str(run_dir)], cli_env, tmp_path)
    wait_for_checkpoint(proc, run_dir, 50)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "", err
    assert f"resume with: mfld run --resume {run_dir}" in out.splitlines(), out


def _arrays_run(tmp_path, name="arrays"):
    xs = np.linspace(-2, 2, 24)
    res = mfld.run({"model": {"n_particles": 16}, "dynamics": {"steps": 20},
                    "record": {"certify_every": 0, "optimum": False, "every": 10, "checkpoint_every": 10}},
                   x=xs[:, None], y=np.sin(2 * xs), out=tmp_path / name, progress=False)
    return res.run_dir, xs


def test_python_api_resume_with_different_data_is_refused(tmp_path, monkeypatch):
    """mfld.run(out=d, resume=True, x=..., y=...) or dataset=... on other data is refused, by
    the check before JAX (inputs.check_resume_data) and, with that one disabled, by the one
    under the run's lock -- so disabling the latter fails this test."""
    from mfld import data
    from mfld.app import inputs

    run_dir, xs = _arrays_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    other = dict(x=xs[:, None], y=np.cos(xs))
    other_ds = data.Dataset(xs[:, None], np.cos(xs), None, None, {"kind": "arrays"})
    for kw in (other, {"dataset": other_ds}):
        with pytest.raises(ConfigError, match="SHA-256 mismatch"):
            mfld.run(out=run_dir, resume=True, overrides={"dynamics.steps": 40}, progress=False, **kw)
    monkeypatch.setattr(inputs, "check_resume_data", lambda out, dataset: None)  # the early check off
    for kw in (other, {"dataset": other_ds}):
        with pytest.raises(ConfigError, match="SHA-256 mismatch") as info:
            mfld.run(out=run_dir, resume=True, overrides={"dynamics.steps": 40}, progress=False, **kw)
        assert info.value.field == "--resume"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # the same data resume
    res = mfld.run(out=run_dir, resume=True, overrides={"dynamics.steps": 40}, progress=False,
                   x=xs[:, None], y=np.sin(2 * xs))
    assert res.summary["status"] == "completed" and res.summary["resumed_from_step"] == 20


def test_integrity_record_follows_legitimate_resumes_and_refuses_edits(tmp_path, capsys):
    """Resumes rewrite config.yaml (dynamics.steps) and env.json (resumes) and the marker with
    them: two extensions in a row are accepted; an edit of eta in config.yaml is refused naming
    the field, and the run is left as it was; a run without the marker (an older mfld) resumes
    with a note and gets one."""
    run_dir = tmp_path / "r"
    main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(run_dir)])
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=30", "--quiet"])
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=40", "--quiet"])
    env = json.loads((run_dir / rundir.ENV).read_text())
    assert [r["from_step"] for r in env["resumes"]] == [20, 30]
    capsys.readouterr()
    cfg = run_dir / rundir.CONFIG
    cfg.write_text(cfg.read_text().replace("eta: 0.02", "eta: 0.5"))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=50", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "config.yaml: edited since the run wrote it at dynamics.eta" in err, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    cfg.write_text(cfg.read_text().replace("eta: 0.5", "eta: 0.02"))  # undone: accepted again
    (run_dir / rundir.MARKER).unlink()
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=50", "--quiet"])
    s = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert s["final"]["step"] == 50 and any("no integrity record" in n for n in s["notes"])
    assert rundir.read_marker(run_dir) is not None


def test_summary_is_strict_json_and_files_follow_the_umask(tmp_path):
    """NaN (e.g. the Monte Carlo-only columns of a quadrature certificate) is written as null,
    so strict parsers read every JSON file; files get 0666 & ~umask, not mkstemp's 0600."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    old = os.umask(0o027)
    try:
        run_dir = tmp_path / "r"
        main(["run", "--set", "record.every=10", "--set", "record.certify_every=10", "--set", "record.optimum=false",
              "--set", "model.n_particles=30", "--set", "dynamics.steps=20", "--quiet", "--out", str(run_dir)])
    finally:
        os.umask(old)
    summary = strict((run_dir / rundir.SUMMARY).read_text())
    assert summary["final"]["ess"] is None and summary["final"]["pareto_k"] is None
    for name in (rundir.ENV, rundir.MARKER):
        strict((run_dir / name).read_text())
    for p in [*run_dir.iterdir(), *(run_dir / "figures").iterdir()]:
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o640, (p.name, oct(p.stat().st_mode))


def test_default_run_directories_are_unique(tmp_path, monkeypatch):
    """Two runs named alike in the same second get two directories (the name is reserved
    with an atomic mkdir), and a run that fails before writing leaves no runs/ behind."""
    from mfld.app import inputs, runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inputs, "default_out_dir", lambda cfg: Path("runs") / f"{cfg.name}-20260101-000000")
    cfg = mfld.config.Config()
    created = []
    a = runner.reserve_default_dir(cfg, created)
    b = runner.reserve_default_dir(cfg, created)
    assert a != b and a.is_dir() and b.is_dir() and b.name == "run-20260101-000000-2"
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(tmp_path / "runs")
    r1 = mfld.run(overrides={"model.n_particles": 8, "dynamics.steps": 4, "record.every": 2,
                             "record.certify_every": 0, "record.optimum": False}, progress=False)
    r2 = mfld.run(overrides={"model.n_particles": 8, "dynamics.steps": 4, "record.every": 2,
                             "record.certify_every": 0, "record.optimum": False}, progress=False)
    assert r1.run_dir != r2.run_dir and r2.run_dir.name.endswith("-2")
    assert r1.summary["status"] == r2.summary["status"] == "completed"


def test_ntk_divergence_suggests_a_sane_step(tmp_path, capsys):
    """Under NTK scaling the last finite state before a blow-up has a curvature ~1e7 times the
    initial one; the suggestion ignores it (it used to say eta = 3e-14) and is stable."""
    args = ["--set", "model.scaling=ntk", "--set", "model.n_particles=100", "--set", "dynamics.steps=200",
            "--set", "record.every=10", "--set", "record.checkpoint_every=0", "--set", "record.certify_every=0",
            "--set", "record.optimum=false", "--quiet"]
    run_dir = tmp_path / "ntk"
    with pytest.raises(SystemExit) as info:
        main(["run", *args, "--set", "dynamics.eta=20", "--out", str(run_dir)])
    assert info.value.code == 3
    s = mfld.load_run(run_dir).summary
    assert 0.1 < s["suggested_eta"] < 10 and s["curvature"] > 0
    main(["run", *args, "--set", f"dynamics.eta={s['suggested_eta']!r}", "--out", str(run_dir), "--overwrite"])
    assert mfld.load_run(run_dir).summary["status"] == "completed"


def test_not_converging_note(monkeypatch):
    """A completed run whose gap oscillates without falling over the last half, at a step
    beyond the stability limit 2/mu, gets a note naming a stable step; a falling gap, or a
    plateau at a stable step, gets none. (The rule, with a fixed curvature mu; the curvature
    itself is tested against the dense Hessian above.)"""
    from mfld import dynamics, stability
    from mfld.app import runner

    mu = 0.8
    monkeypatch.setattr(runner, "drift_curvature", lambda problem, a, w: mu)
    monkeypatch.setattr(stability, "drift_curvature", lambda problem, a, w: mu)
    st = dynamics.ParticleState(np.zeros(64), np.zeros((64, 2)), 0, None)
    steps = np.arange(0, 410, 10)
    rng = np.random.default_rng(0)
    oscillating = {"step": steps, "gap": 0.3 + 0.7 * rng.random(steps.size)}
    falling = {"step": steps, "gap": np.exp(-steps / 100)}
    unstable = mfld.config.validate({"dynamics": {"eta": 4.0 / mu}})
    stable = mfld.config.validate({"dynamics": {"eta": 0.5 / mu}})
    note = runner._convergence_note(unstable, None, oscillating, st, st)
    assert note and "not converging" in note and "stability limit 2/mu = 2.5" in note
    assert "a stable step is dynamics.eta=1.25 " in note  # 1/mu: half the limit
    assert runner._convergence_note(unstable, None, falling, st, st) is None
    assert runner._convergence_note(stable, None, oscillating, st, st) is None
    assert runner._convergence_note(unstable, None, {"step": steps[:5], "gap": oscillating["gap"][:5]},
                                    st, st) is None


def test_the_directory_is_checked_again_under_the_lock(tmp_path, monkeypatch, capsys):
    """Two runs into one directory, the second one delayed: the first finishes between the
    second one's early check and its lock. The second one must see the finished run under the
    lock and refuse it (without --overwrite), leaving it byte for byte."""
    import shutil

    from mfld.app import lock as lockmod

    done = tmp_path / "done"
    main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(done)])
    target = tmp_path / "target"
    orig = lockmod.RunLock.acquire

    def first_run_finishes_meanwhile(self):
        if self.path.parent == target and not (target / rundir.CONFIG).exists():
            shutil.copytree(done, target, dirs_exist_ok=True)
        return orig(self)

    monkeypatch.setattr(lockmod.RunLock, "acquire", first_run_finishes_meanwhile)
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["run", *BASE, "--set", "dynamics.steps=20", "--out", str(target)])
    assert info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before


def test_the_starting_state_is_released_after_the_first_record(monkeypatch):
    """A run holds no full copy of its starting state once the first segment and record are
    done (the diagnostics keep a subsample): at N = 10^7 that is 120 MB resident all run long."""
    import gc
    import weakref

    from mfld import dynamics
    from mfld.app import runner

    refs, alive_at = [], {}
    init = dynamics.init_particles

    def init_and_watch(*args, **kwargs):
        state = init(*args, **kwargs)
        refs.append(weakref.ref(state.w))
        return state

    call = runner._RecordHook.__call__

    def watched(hook, s, row):
        gc.collect()
        alive_at[row["step"]] = refs[0]() is not None
        return call(hook, s, row)

    monkeypatch.setattr(dynamics, "init_particles", init_and_watch)
    monkeypatch.setattr(runner._RecordHook, "__call__", watched)
    res = mfld.run({"model": {"n_particles": 2 * runner.CURVATURE_SUBSAMPLE}, "dynamics": {"steps": 30},
                    "record": {"every": 10, "certify_every": 0, "optimum": False}}, write=False, progress=False)
    assert list(res.metrics["step"]) == [0, 10, 20, 30]
    assert alive_at == {0: True, 10: True, 20: False, 30: False}  # at 10 the hook still holds it (last good)


@pytest.mark.parametrize("checkpoint_every", [0, 5])  # replayed from the initial particles / the checkpoint
def test_a_replayed_last_finite_state_is_the_held_one_bit_for_bit(tmp_path, checkpoint_every):
    """A writing run holds no state in its record hook (each segment donates its input) and,
    when it diverges, recomputes its last finite state from its checkpoint or its initial
    particles; a run that does not write holds it. Both must give the same bits."""
    cfg = {"model": {"n_particles": 100}, "dynamics": {"steps": 200, "eta": 20.0},
           "record": {"every": 5, "checkpoint_every": checkpoint_every, "certify_every": 0, "optimum": False}}
    written = mfld.run(cfg, out=tmp_path / "r", progress=False)
    held = mfld.run(cfg, write=False, progress=False)
    assert written.summary["status"] == held.summary["status"] == "diverged"
    assert written.summary["last_good_step"] == held.summary["last_good_step"] > 0
    for k in ("a", "w"):
        assert np.asarray(getattr(written.state, k)).tobytes() == np.asarray(getattr(held.state, k)).tobytes()
    ckpt = rundir.load_checkpoint(tmp_path / "r" / rundir.CHECKPOINT)
    assert int(ckpt["step"]) == held.summary["last_good_step"]
    assert ckpt["w"].tobytes() == np.asarray(held.state.w).tobytes()
    assert written.summary["suggested_eta"] == held.summary["suggested_eta"]


def test_states_shown_to_a_callback_that_keeps_none_are_donated():
    from mfld import dynamics, loop
    from mfld.problem import Problem

    x = np.linspace(-1, 1, 16)[:, None]
    pr = Problem.create(x, np.sin(x[:, 0]), lam=0.1, tau=0.01, dtype=jnp.float32)
    for keeps in (True, False):
        for handed_over in (False, True):
            shown = []
            loop.simulate(pr, dynamics.init_particles(pr, 64, 0), dynamics.Langevin(0.01), 30, record_every=10,
                          callback=lambda s, row, shown=shown: shown.append(s), callback_keeps_state=keeps,
                          caller_keeps_state=not handed_over)
            # the states of steps 0 (the caller's), 10, 20, 30 (the last one is returned, not advanced)
            first = handed_over and not keeps
            assert [s.w.is_deleted() for s in shown] == [first, not keeps, not keeps, False], (keeps, handed_over)
