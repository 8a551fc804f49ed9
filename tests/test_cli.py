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
    assert names == {"config.yaml", "env.json", "metrics.csv", "summary.json", "checkpoint.npz", "figures"}
    # no lock and no temporary files left behind
    assert not list(out.rglob(".*"))

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
