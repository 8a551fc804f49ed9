"""`mfld run`, `mfld config` and `mfld plot` end to end on a tiny config (issue 2).

In-process through ``mfld.cli.main`` (the console script's entry point) to keep CI fast; the
subprocess path of the same entry point is exercised by tests/test_resume.py.
"""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest
import yaml

import mfld
from mfld import config as cfgmod
from mfld.cli import main

STEPS, EVERY, N = 60, 20, 64
TINY = ["--set", f"model.n_particles={N}", "--set", f"dynamics.steps={STEPS}", "--set", f"record.every={EVERY}",
        "--set", "record.checkpoint_every=40", "--set", "record.certify_every=0", "--set", "record.optimum=false",
        "--quiet"]
PNG = b"\x89PNG\r\n\x1a\n"
COLUMNS = {"step", "t", "risk", "test_risk", "reg_risk", "m2_a", "m2_w", "mean_abs_a", "grad_norm", "wall_time"}


def _overrides():
    return [TINY[i + 1] for i in range(0, len(TINY) - 1, 2) if TINY[i] == "--set"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    main(["run", *TINY, "--out", str(out)])
    return out


def test_run_directory_files(tiny_run, capsys):
    out = tiny_run
    names = {p.name for p in out.iterdir()}
    assert names == {"config.yaml", "env.json", "metrics.csv", "summary.json", "checkpoint.npz", "figures",
                     ".mfld-run"}
    # no lock and no temporary files left behind (the one hidden file is the run marker)
    assert [p.name for p in out.rglob(".*")] == [".mfld-run"]

    # config.yaml: every field, and it parses to the resolved config
    cfg = cfgmod.validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert cfg == cfgmod.load(None, _overrides())

    env = json.loads((out / "env.json").read_text())
    for key in ("mfld", "python", "jax", "jaxlib", "numpy", "scipy", "backend", "devices", "device_count",
                "x64", "precision", "seed", "git", "argv", "data_sha256"):
        assert key in env, key
    assert env["jax"] == jax.__version__ and env["mfld"] == mfld.__version__
    assert env["x64"] is False and env["precision"] == "float32" and env["seed"] == cfg.seed
    assert re.fullmatch(r"[0-9a-f]{64}", env["data_sha256"])
    from mfld.blocking import cpu_threads

    assert env["cpu_threads"] == cpu_threads() >= 1  # block sizes (and so rounding) follow it
    from mfld.xla import compiler_options
    assert env["xla_compiler_options"] == compiler_options()  # float32 rounding depends on them
    from mfld.kernels import status as kernel_status
    assert env["kernels"] == kernel_status()  # so does the compiled tanh kernel (mfld.kernels)

    run = mfld.load_run(out)
    m = run.metrics
    assert set(m) == COLUMNS
    assert m.n_rows == STEPS // EVERY + 1
    np.testing.assert_array_equal(m["step"], np.arange(0, STEPS + 1, EVERY))
    np.testing.assert_array_equal(m["t"], m["step"] * cfg.dynamics.eta)  # t = step * eta, exactly
    assert all(np.all(np.isfinite(v)) for v in m.values())
    assert np.all(np.diff(m["wall_time"]) >= 0)

    # the checkpoint is the final state the last metrics row describes: recompute the moments
    # from it (float64 sums of float32 particles vs the float32 reduction: rtol 1e-5 covers the
    # O(sqrt(N) eps_32) summation error)
    assert run.step == STEPS and run.a.shape == (N,) and run.w.shape == (N, 2)
    assert run.a.dtype == np.float32
    np.testing.assert_allclose(m["m2_a"][-1], np.mean(run.a.astype(float) ** 2), rtol=1e-5)
    np.testing.assert_allclose(m["m2_w"][-1], np.mean(np.sum(run.w.astype(float) ** 2, axis=1)), rtol=1e-5)
    np.testing.assert_allclose(m["mean_abs_a"][-1], np.mean(np.abs(run.a.astype(float))), rtol=1e-5)

    s = run.summary
    assert s["status"] == "completed" and s["checkpoint_step"] == STEPS and s["run_time_s"] > 0
    assert s["final"]["step"] == STEPS
    for k in COLUMNS - {"step"}:
        assert s["final"][k] == m[k][-1], k  # the same float (round-trip formats on both sides)
    assert set(s["figures"]) == {"risk.png", "neurons.png", "function.png"}
    for name in s["figures"]:
        assert (out / "figures" / name).read_bytes()[:8] == PNG


def test_run_prints_a_summary_line(tmp_path, capsys):
    main(["run", *TINY, "--set", "dynamics.steps=20", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert re.search(r"status=completed\s+steps=20\s+risk=\S+", out)
    assert f"run directory: {tmp_path / 'r'}" in out


def test_second_run_refused_then_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "r"
    main(["run", *TINY, "--set", "dynamics.steps=20", "--out", str(out)])
    before = (out / "metrics.csv").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["run", *TINY, "--set", "dynamics.steps=20", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out: run directory already exists" in err
    assert (out / "metrics.csv").read_text() == before
    (out / "stray.txt").write_text("old")
    main(["run", *TINY, "--set", "dynamics.steps=40", "--out", str(out), "--overwrite"])
    assert not (out / "stray.txt").exists()
    assert mfld.load_run(out).step == 40


def test_config_command_prints_the_defaults(capsys):
    main(["config"])
    text = capsys.readouterr().out
    assert text.lstrip().startswith("#") and sum("  # " in line for line in text.splitlines()) > 10  # commented
    assert cfgmod.validate(yaml.safe_load(text)) == cfgmod.Config()
    main(["config", "--plain"])
    assert cfgmod.validate(yaml.safe_load(capsys.readouterr().out)) == cfgmod.Config()


def test_plot_redraws_the_figures(tiny_run, capsys):
    figdir = tiny_run / "figures"
    for p in figdir.iterdir():
        p.unlink()
    main(["plot", str(tiny_run)])
    printed = capsys.readouterr().out.split()
    assert {p.name for p in figdir.iterdir()} == {"risk.png", "neurons.png", "function.png"}
    assert sorted(printed) == sorted(str(figdir / n) for n in ("risk.png", "neurons.png", "function.png"))
    for p in figdir.iterdir():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000


def test_plot_of_a_non_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: run_dir: ")


@pytest.fixture
def restore_x64():
    old = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", old)


def test_x64_end_to_end(tmp_path, restore_x64):
    out = tmp_path / "r64"
    main(["run", *TINY, "--set", "dynamics.steps=20", "--x64", "--out", str(out)])
    run = mfld.load_run(out)
    assert run.config["precision"] == "float64"
    assert run.env["x64"] is True and run.env["precision"] == "float64"
    assert run.a.dtype == np.float64 and run.w.dtype == np.float64
    # the recorded numbers are float64 computations: not all representable in float32
    risk = run.metrics["risk"]
    assert any(float(np.float32(v)) != v for v in risk)
    assert all(math.isfinite(v) for v in risk)
    # switching back: a float32 run gets float32 checkpoints (the switch is not sticky in the runner)
    jax.config.update("jax_enable_x64", False)
    out32 = tmp_path / "r32"
    main(["run", *TINY, "--set", "dynamics.steps=20", "--out", str(out32)])
    r32 = mfld.load_run(out32)
    assert r32.a.dtype == np.float32 and r32.env["x64"] is False
    assert all(float(np.float32(v)) == v for v in r32.metrics["risk"])


def test_user_data_file_and_arrays_replot_and_change_detection(tmp_path, capsys):
    xs = np.linspace(-2, 2, 30)
    csv = tmp_path / "d.csv"
    csv.write_text("x,y\n" + "".join(f"{float(v)!r},{float(np.sin(2 * v))!r}\n" for v in xs))
    out = tmp_path / "file-run"
    main(["run", *TINY, "--set", "dynamics.steps=20", "--set", "data.kind=file",
          "--set", f"data.params.path={csv}", "--out", str(out)])
    run = mfld.load_run(out)
    assert run.config["data"]["params"]["path"] == str(csv) and run.summary["status"] == "completed"
    main(["plot", str(out)])
    capsys.readouterr()
    # the file changes after the run: redrawing or resuming against it is refused, in one line
    csv.write_text("x,y\n" + "".join(f"{float(v)!r},{float(np.cos(v))!r}\n" for v in xs))
    for argv in (["plot", str(out)], ["run", "--resume", str(out), "--set", "dynamics.steps=40"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "SHA-256 mismatch" in err, err
    assert mfld.load_run(out).step == 20

    # a run given plain arrays stores them, so `mfld plot` redraws the same data
    res = mfld.run({"model": {"n_particles": N}, "dynamics": {"steps": 20},
                    "record": {"certify_every": 0, "optimum": False, "every": 10}},
                   x=xs[:, None], y=np.sin(2 * xs), out=tmp_path / "arrays", progress=False)
    with np.load(tmp_path / "arrays" / "data.npz") as z:
        np.testing.assert_array_equal(z["x"][:, 0], xs)
    from mfld.app.replot import replot

    assert replot(res.run_dir) == ["risk.png", "neurons.png", "function.png"]
    # ... and `mfld run --resume` continues it on the stored arrays
    main(["run", "--resume", str(res.run_dir), "--set", "dynamics.steps=40", "--quiet"])
    again = mfld.load_run(res.run_dir)
    assert again.step == 40 and again.summary["resumed_from_step"] == 20


def test_entropy_note_when_the_particle_dimension_exceeds_five():
    """d = 5 inputs + bias + a: particle dimension 7 > RELIABLE_MAX_DIM; the summary says so once
    (the entropy_reliable column is 0); at d = 1 (dimension 3) nothing is said."""
    from mfld.app import runner

    base = {"model.n_particles": 32, "dynamics.steps": 10, "record.every": 10, "record.certify_every": 10,
            "record.certify_samples": 256, "record.optimum": False, "record.checkpoint_every": 0}
    res = runner.run(overrides={**base, "data.params.d": 5}, progress=False, write=False)
    assert np.all(res.metrics["entropy_reliable"] == 0.0)
    hits = [n for n in res.notes if "k-NN entropy" in n]
    assert len(hits) == 1 and "dimension 7 > 5" in hits[0], res.notes
    res1 = runner.run(overrides=base, progress=False, write=False)
    assert np.all(res1.metrics["entropy_reliable"] == 1.0)
    assert not [n for n in res1.notes if "k-NN entropy" in n]


def test_fixed_layer_certificates_use_the_particles_sign_fraction():
    """N = 20, plus_fraction 0.325: round(6.5) = 6 particles have a = +1, a fraction 0.3. The
    certificate of the run is that of the particles' mixture (0.3), not of the config's 0.325.
    The activation is sigmoid: for an odd one (tanh) w -> -w maps the a = +1 Gibbs component
    onto the a = -1 one, Z+ = Z-, and the fraction would not change D(u) at all."""
    from mfld import duality
    from mfld.app import runner

    res = runner.run(overrides={"model.output": "fixed", "model.activation": "sigmoid", "model.n_particles": 20,
                                "model.init.plus_fraction": 0.325,
                                "dynamics.steps": 10, "record.every": 10, "record.certify_every": 10,
                                "record.optimum": True, "record.checkpoint_every": 0},
                     progress=False, write=False)
    a = np.asarray(res.state.a)
    assert np.mean(a > 0) == 0.3
    assert res.optimum.plus_fraction == 0.3
    kw = {"method": res.config.record.certify_method, "n_samples": res.config.record.certify_samples,
          "seed": res.config.seed, "optimum": res.optimum}
    want = duality.certify(res.problem, res.state.a, res.state.w, plus_fraction=0.3, **kw)
    other = duality.certify(res.problem, res.state.a, res.state.w, plus_fraction=0.325, **kw)
    assert abs(want["dual_lower"] - other["dual_lower"]) > 1e-6  # the fraction matters (not rounding)
    for k in ("dual_lower", "primal_upper", "gap"):
        assert res.metrics[k][-1] == want[k], k  # the same float64 computation: bit for bit


def test_certificates_available_is_check_applicable():
    """The runner's reason is duality.check_applicable's TheoryNotApplicable message."""
    from mfld import duality
    from mfld.app import inputs
    from mfld.errors import TheoryNotApplicable
    from mfld.problem import Problem

    x, y = np.linspace(-1, 1, 8)[:, None], np.sin(np.linspace(-1, 1, 8))
    assert inputs.certificates_available(Problem.create(x, y, tau=0.1)) is None
    for kw in ({"tau": 0.0}, {"tau": 0.1, "scaling": "ntk"}):
        prob = Problem.create(x, y, **kw)
        with pytest.raises(TheoryNotApplicable) as info:
            duality.check_applicable(prob)
        assert inputs.certificates_available(prob) == str(info.value)


def test_cli_resolves_and_checks_the_config_and_data_once(tmp_path, monkeypatch, capsys):
    """`mfld run` prepares the config and its data once (before JAX) and the runner takes them."""
    from mfld.app import inputs

    calls = {"resolve": 0, "check": 0, "make": 0}
    for name, key in (("resolve_config", "resolve"), ("check_data", "check"), ("make_dataset", "make")):
        orig = getattr(inputs, name)
        monkeypatch.setattr(inputs, name, lambda *a, _o=orig, _k=key, **k: (calls.__setitem__(_k, calls[_k] + 1),
                                                                            _o(*a, **k))[1])
    main(["run", *TINY, "--out", str(tmp_path / "r")])
    assert calls == {"resolve": 1, "check": 1, "make": 1}
    assert "status=completed" in capsys.readouterr().out
