"""Particles sharded over devices: same trajectory for 1, 2, 4 simulated CPU devices and for
two processes on localhost.

Tolerance model: the sharded and unsharded runs draw identical noise (row i from
(seed, step, i)) and differ only in the order of the sum over particles in f (per-device
partial sums, then a psum), i.e. by reassociation: ~ a few ulp of f per step, propagated
over 20 steps of a contracting dynamics. Allowed: 1e-12 absolute in float64 (measured
~2e-16) and 2e-5 in float32 (measured ~1e-6; eps32 = 1.2e-7, O(1) values).
Multi-device runs are in subprocesses: the device count must be set before JAX starts.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfld import sharding
from mfld.dynamics import Langevin, init_particles
from mfld.errors import ConfigError
from mfld.loop import simulate
from mfld.problem import Problem

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETUP = """
import json, os, sys
import numpy as np
def problem_and_state(jnp, dtype, n_part=101):
    from mfld.problem import Problem
    from mfld.dynamics import init_particles
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 2))
    pr = Problem.create(x, np.sin(x[:, 0]) + 0.1 * rng.standard_normal(30), lam=0.1, tau=0.02, dtype=dtype,
                        x_test=rng.standard_normal((7, 2)), y_test=rng.standard_normal(7))
    return pr, init_particles(pr, n_part, 0)
"""

DEVICES_SCRIPT = SETUP + textwrap.dedent("""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import re
    import jax, jax.numpy as jnp
    from mfld import dynamics, loop, sharding
    out = {"n_devices": len(jax.devices())}
    for prec in ("f32", "f64"):
        with jax.enable_x64(prec == "f64"):
            pr, st = problem_and_state(jnp, jnp.float64 if prec == "f64" else jnp.float32)
            stepper = dynamics.Langevin(0.05, scheme="ou" if prec == "f32" else "euler", batch_size=None)
            ref, h0 = loop.simulate(pr, st, stepper, 20, record_every=4)
            for k in (1, 2, 4):
                fin, h = sharding.simulate(pr, st, stepper, 20, n_devices=k, record_every=4, chunk=2)
                a, w = sharding.gather(fin)
                out[f"{prec}-{k}"] = {
                    "w": float(np.abs(w - np.asarray(ref.w)).max()),
                    "a": float(np.abs(a - np.asarray(ref.a)).max()),
                    "shape": list(w.shape),
                    "records": {c: float(np.abs(h[c] - h0[c]).max()) for c in h0.columns if c != "wall_time"},
                }
    # wide features (p = 41) and a small memory budget: the device counts take different blockings
    # of the drift (particle blocks; data blocks of all local particles, 128 T rows for T threads):
    # the budget fits data blocks of the 26 local particles of 4 devices, not of 51 or 101
    with jax.enable_x64(True):
        from mfld import blocking
        from mfld.problem import Problem
        rng = np.random.default_rng(1)
        x = rng.standard_normal((300, 40))
        pr = Problem.create(x, np.tanh(x[:, 0]), lam=0.1, tau=0.02, dtype=jnp.float64)
        st = dynamics.init_particles(pr, 101, 0)
        rows = min(blocking.DATA_BLOCK * blocking.cpu_threads(), blocking.DATA_BLOCK_MAX)
        budget = 26 * rows * 3 * 8
        stepper = dynamics.Langevin(0.05, memory_budget=budget)
        ref, _ = loop.simulate(pr, st, stepper, 6, record_every=3)
        for k in (1, 2, 4):
            local = sharding.padded_count(101, k) // k
            plan = blocking.plan_chunks(local, 300, 8, n_features=41, memory_budget=budget)
            kind = ("one" if plan == (local, 300) else "data" if plan.particles >= local else "particle")
            fin, _ = sharding.simulate(pr, st, stepper, 6, n_devices=k, record_every=3)
            a, w = sharding.gather(fin)
            out[f"wide-{k}"] = {"kind": kind, "w": float(np.abs(w - np.asarray(ref.w)).max()),
                                "a": float(np.abs(a - np.asarray(ref.a)).max())}
    with jax.enable_x64(True):
        pr, st = problem_and_state(jnp, jnp.float64)
        mesh = sharding.make_mesh(4)
        sh = sharding.shard_state(st, mesh)
        out["padded"] = sh.n_padded
        out["shard_rows"] = sorted({s.data.shape[0] for s in sh.state.w.addressable_shards})
        txt = sharding.compiled_runner(mesh, 101, False).lower(sharding.replicate(pr, mesh), sh.state,
                                                               dynamics.Langevin(0.05), n_steps=3).compile().as_text()
        out["collectives"] = {op: len(re.findall(op + r"[-a-z]*\\(", txt))
                              for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")}
    print("RESULT " + json.dumps(out))
""")


def _run(script, *args, timeout=240, env_extra=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_ENABLE_X64": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def devices_result():
    return _result(_run(DEVICES_SCRIPT))


@pytest.mark.parametrize("prec,tol", [("f64", 1e-12), ("f32", 2e-5)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_same_trajectory_on_1_2_4_devices(devices_result, prec, tol, k):
    r = devices_result[f"{prec}-{k}"]
    assert devices_result["n_devices"] == 4
    assert r["shape"] == [101, 3]  # the padding is gone from the result
    assert r["w"] < tol and r["a"] < tol, r
    # records (risk, test risk, moments, drift norm) see the real particles only
    assert max(r["records"].values()) < 10 * tol, r["records"]


def test_every_blocking_of_the_drift_gives_the_same_sharded_trajectory(devices_result):
    """p = 41 with a small memory budget: 1 device uses particle blocks (three GEMMs), 4
    devices data blocks with a psum per block (two GEMMs), 2 devices either (by the thread
    count); all equal the unsharded run up to reassociation (float64, 6 steps: 1e-12 as above)."""
    kinds = {k: devices_result[f"wide-{k}"]["kind"] for k in (1, 2, 4)}
    assert kinds[1] == "particle" and kinds[4] == "data" and kinds[2] in ("particle", "data"), kinds
    for k in (1, 2, 4):
        r = devices_result[f"wide-{k}"]
        assert r["w"] < 1e-12 and r["a"] < 1e-12, (k, r)


def test_particles_are_split_not_replicated(devices_result):
    """101 particles on 4 devices: padded to 104, 26 rows per device, and a step's only
    collective is the all-reduce of the network output (no all-gather of particles)."""
    assert devices_result["padded"] == 104
    assert devices_result["shard_rows"] == [26]
    c = devices_result["collectives"]
    assert c["all-reduce"] >= 1 and c["all-gather"] == 0 and c["all-to-all"] == 0, c


PROCESS_SCRIPT = SETUP + textwrap.dedent("""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax
    from mfld import sharding
    sharding.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]), timeout_s=60)
    import jax.numpy as jnp
    from mfld import dynamics
    with jax.enable_x64(True):
        pr, st = problem_and_state(jnp, jnp.float64)
        fin, h = sharding.simulate(pr, st, dynamics.Langevin(0.05), 20, record_every=4, chunk=2)
        a, w = sharding.gather(fin, 101)
        if sharding.is_writer():
            print("RESULT " + json.dumps({"w": w.tolist(), "a": a.tolist(), "risk": h["risk"].tolist(),
                                          "devices": len(jax.devices()), "processes": jax.process_count()}))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_give_the_same_trajectory():
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_ENABLE_X64": "0"}
    other = subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, port, "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        main = _run(PROCESS_SCRIPT, port, "0", timeout=180)
        other_out, other_err = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            other.kill()
            other.communicate()
    res = _result(main)
    assert res["devices"] == 2 and res["processes"] == 2
    assert other.returncode == 0 and "RESULT" not in other_out, other_err[-2000:]  # only process 0 reports
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((30, 2))
        pr = Problem.create(x, np.sin(x[:, 0]) + 0.1 * rng.standard_normal(30), lam=0.1, tau=0.02,
                            dtype=jnp.float64, x_test=rng.standard_normal((7, 2)), y_test=rng.standard_normal(7))
        ref, h = simulate(pr, init_particles(pr, 101, 0), Langevin(0.05), 20, record_every=4)
        np.testing.assert_allclose(np.array(res["w"]), np.asarray(ref.w), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.array(res["a"]), np.asarray(ref.a), rtol=0, atol=1e-12)
        np.testing.assert_allclose(res["risk"], h["risk"], rtol=1e-12)


def test_settings_are_validated():
    assert sharding.padded_count(101, 4) == 104 and sharding.padded_count(8, 4) == 8
    with pytest.raises(ConfigError, match="devices"):
        sharding.make_mesh(len(jax.devices()) + 1)
    with pytest.raises(ConfigError, match="coordinator, num_processes, process_id"):
        sharding.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ConfigError, match="process_id"):
        sharding.initialize("127.0.0.1:1234", 2, 5)
    with pytest.raises(ConfigError, match="threads"):
        sharding.configure_cpu(threads=0)


def test_thread_setting_pins_the_process():
    script = textwrap.dedent("""
        import os
        from mfld import sharding
        sharding.configure_cpu(threads=1)
        import jax.numpy as jnp
        jnp.ones(3).block_until_ready()
        print("RESULT", len(os.sched_getaffinity(0)), os.environ["OPENBLAS_NUM_THREADS"])
    """)
    proc = _run(script, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("RESULT")[-1].split() == ["1", "1"]


# ------------------------------------------------------------------- mfld run --devices/--threads
CLI_TINY = ["--set", "model.n_particles=101", "--set", "dynamics.steps=30", "--set", "record.every=10",
            "--set", "record.certify_every=0", "--set", "record.optimum=false", "--set", "record.checkpoint_every=0",
            "--quiet"]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_ENABLE_X64": "0"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "mfld.cli", "run", *CLI_TINY, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _finish(procs, timeout=240):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _metrics_and_particles(run_dir):
    from mfld.app import rundir

    ck = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    return rundir.read_metrics(run_dir / rundir.METRICS), ck["a"], ck["w"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """`mfld run` with --devices 1, 2 and 3 (101 particles: padded to 102 and 102), and the
    same run as two processes on localhost (--coordinator, one CPU device each)."""
    base = tmp_path_factory.mktemp("cli_devices")
    port = str(_free_port())
    procs = [_cli("--devices", str(k), "--threads", "1" if k == 1 else "2", "--out", str(base / f"d{k}"))
             for k in (1, 2, 3)]
    procs += [_cli("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                   "--out", str(base / f"p{i}")) for i in (0, 1)]
    outs = _finish(procs)  # all five at once: start-up and compilation overlap
    return base, {1: outs[0], 2: outs[1], 3: outs[2], "procs": outs[3:]}


def test_cli_devices_give_the_same_run(cli_runs):
    """Same seed, any device count: the recorded metrics and the final particles of --devices 2
    and 3 (3 does not divide 101: padding) equal --devices 1 up to float32 reassociation of the
    sums over particles (measured ~1e-7 relative after 30 steps; allowed 2e-5 on O(1)
    particles as in the simulated-device test above, 1e-4 relative on the records, whose
    risks are differences of O(1) terms)."""
    base, res = cli_runs
    for k in (1, 2, 3):
        rc, out, err = res[k]
        assert rc == 0, err[-3000:]
        env = json.loads((base / f"d{k}" / "env.json").read_text())
        assert env["particle_devices"] == k and len(env["devices"]) == k, env
    m1, a1, w1 = _metrics_and_particles(base / "d1")
    for k in (2, 3):
        mk, ak, wk = _metrics_and_particles(base / f"d{k}")
        assert wk.shape == w1.shape == (101, 2)  # d = 1 plus the bias
        np.testing.assert_allclose(wk, w1, rtol=0, atol=2e-5)
        np.testing.assert_allclose(ak, a1, rtol=0, atol=2e-5)
        assert list(mk["step"]) == list(m1["step"]) == [0, 10, 20, 30]
        for col in m1:
            if col != "wall_time":
                np.testing.assert_allclose(mk[col], m1[col], rtol=1e-4, atol=1e-6, err_msg=col)


def test_cli_two_processes_only_process_zero_writes(cli_runs):
    base, res = cli_runs
    (rc0, out0, err0), (rc1, out1, err1) = res["procs"]
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert (base / "p0" / "metrics.csv").exists() and not (base / "p1").exists()  # process 1 wrote nothing
    assert "run directory" in out0 and "run directory" not in out1 and "status=" not in out1  # (gloo chats)
    env = json.loads((base / "p0" / "env.json").read_text())
    assert env["particle_devices"] == 2
    m1, a1, w1 = _metrics_and_particles(base / "d1")
    m, a, w = _metrics_and_particles(base / "p0")
    np.testing.assert_allclose(w, w1, rtol=0, atol=2e-5)
    np.testing.assert_allclose(m["risk"], m1["risk"], rtol=1e-4, atol=1e-6)


def test_cli_bad_device_settings_are_one_line_errors(tmp_path):
    (rc, out, err), (rc2, out2, err2) = _finish([_cli("--devices", "0", "--out", str(tmp_path / "a")),
                                                 _cli("--coordinator", "127.0.0.1:1", "--out", str(tmp_path / "b"))])
    assert rc == 2 and err.strip().count("\n") == 0 and "devices" in err, err
    assert rc2 == 2 and err2.strip().count("\n") == 0 and "num_processes" in err2, err2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
