"""Every user mistake: one line on stderr naming the field and the value, exit code 2, no
traceback, and nothing written.

The error-record convention (docs/runs.md): a mistake is detected before anything is written,
so no run directory is created (an existing one is left byte-for-byte as it was); the record
of the error is the one stderr line ``error: <field>: <message> (got <value>); allowed: ...``
and the exit code 2.

The table runs in-process through ``mfld.cli.main`` (fast); one subprocess checks that a bad
config fails before JAX is imported.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mfld.cli import main
from mfld.errors import ConfigError

TINY = ["--set", "model.n_particles=8", "--set", "dynamics.steps=4", "--set", "record.every=2",
        "--set", "record.checkpoint_every=0", "--set", "record.certify_every=0", "--set", "record.optimum=false",
        "--quiet"]


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def file_case(kind, maker, *extra):
    """argv for a run on a data file made by ``maker(tmp_path)``."""
    def build(tmp):
        return ["--set", "data.kind=file", "--set", f"data.params.path={maker(tmp)}", *extra]
    return build


XY = "x1,x2,y\n" + "".join(f"{i * 0.1},{(i * 7 % 5) * 0.3},{np.sin(i)}\n" for i in range(12))

# (id, argv builder (tmp_path -> args after `mfld run`), field that must be named, value fragment)
CASES = [
    ("unknown-section", lambda t: ["--set", "objectiv.tau=0.1"], "--set", "objectiv.tau"),
    ("unknown-key-typo", lambda t: ["--set", "objective.tua=0.1"], "--set", "did you mean 'objective.tau'"),
    ("lam-negative", lambda t: ["--set", "objective.lam=-1"], "objective.lam", "-1"),
    ("lam-string", lambda t: ["--set", "objective.lam=big"], "objective.lam", "'big'"),
    ("tau-negative", lambda t: ["--set", "objective.tau=-0.1"], "objective.tau", "-0.1"),
    ("tau-nan", lambda t: ["--set", "objective.tau=.nan"], "objective.tau", "nan"),
    ("eta-zero", lambda t: ["--set", "dynamics.eta=0"], "dynamics.eta", "0"),
    ("eta-inf", lambda t: ["--set", "dynamics.eta=.inf"], "dynamics.eta", "inf"),
    ("steps-negative", lambda t: ["--set", "dynamics.steps=-5"], "dynamics.steps", "-5"),
    ("steps-fraction", lambda t: ["--set", "dynamics.steps=1.5"], "dynamics.steps", "1.5"),
    ("particles-zero", lambda t: ["--set", "model.n_particles=0"], "model.n_particles", "0"),
    ("particles-bool", lambda t: ["--set", "model.n_particles=true"], "model.n_particles", "True"),
    ("activation", lambda t: ["--set", "model.activation=swish"], "model.activation", "swish"),
    ("loss", lambda t: ["--set", "objective.loss=hinge"], "objective.loss", "hinge"),
    ("output", lambda t: ["--set", "model.output=free"], "model.output", "free"),
    ("scaling", lambda t: ["--set", "model.scaling=ntk2"], "model.scaling", "ntk2"),
    ("precision", lambda t: ["--set", "precision=float16"], "precision", "float16"),
    ("scheme", lambda t: ["--set", "dynamics.scheme=heun"], "dynamics.scheme", "heun"),
    ("record-every-zero", lambda t: ["--set", "record.every=0"], "record.every", "0"),
    ("checkpoint-not-multiple", lambda t: ["--set", "record.checkpoint_every=31"], "record.checkpoint_every",
     "31"),
    ("batch-zero", lambda t: ["--set", "dynamics.batch_size=0"], "dynamics.batch_size", "0"),
    ("seed-negative", lambda t: ["--set", "seed=-1"], "seed", "-1"),
    ("name-slash", lambda t: ["--set", "name=a/b"], "name", "a/b"),
    ("override-no-equals", lambda t: ["--set", "objective.tau"], "--set", "objective.tau"),
    ("config-missing", lambda t: [str(t / "nope.yaml")], "config", "nope.yaml"),
    ("config-bad-yaml", lambda t: [_csv(t / "bad.yaml", "objective: {tau: [1,\n")], "config", "bad.yaml"),
    ("config-a-list", lambda t: [_csv(t / "list.yaml", "- 1\n- 2\n")], "config", "list.yaml"),
    ("config-unknown-field", lambda t: [_csv(t / "c.yaml", "dynamics:\n  etta: 0.1\n")], "dynamics.etta",
     "did you mean 'dynamics.eta'"),
    ("config-section-scalar", lambda t: [_csv(t / "s.yaml", "model: 3\n")], "model: invalid value 3", "3"),
    ("data-kind", lambda t: ["--set", "data.kind=mnist"], "data.kind", "mnist"),
    ("data-param-unknown", lambda t: ["--set", "data.params.nn=5"], "data.params.nn", "5"),
    ("data-param-range", lambda t: ["--set", "data.params.n=0"], "data.params.n", "0"),
    ("data-param-inf", lambda t: ["--set", "data.params.n=.inf"], "data.params.n", "inf"),
    ("data-param-text", lambda t: ["--set", "data.params.teacher_scale=abc"], "data.params.teacher_scale", "abc"),
    ("data-param-negative-scale", lambda t: ["--set", "data.params.input_scale=-1"], "data.params.input_scale",
     "-1"),
    ("data-param-unhashable", lambda t: ["--set", "data.params.activation=[1]"], "data.params.activation", "[1]"),
    ("data-param-label-noise-text", lambda t: ["--set", "data.kind=sparse_parity", "--set",
                                               "data.params.label_noise=abc"], "data.params.label_noise", "abc"),
    ("file-no-path", lambda t: ["--set", "data.kind=file"], "data.params", "n"),
    ("file-missing", file_case("missing", lambda t: str(t / "missing.csv")), "data.params.path", "missing.csv"),
    ("file-wrong-type", file_case("txt", lambda t: _csv(t / "d.txt", XY)), "data.params.path", "d.txt"),
    ("csv-nan", file_case("csv", lambda t: _csv(t / "nan.csv", XY + "1.3,nan,0.2\n")), "data.params.path",
     "NaN"),
    ("csv-inf", file_case("csv", lambda t: _csv(t / "inf.csv", XY + "1.3,0.1,inf\n")), "data.params.path",
     "inf"),
    ("csv-text-cell", file_case("csv", lambda t: _csv(t / "txt.csv", XY + "1.3,abc,0.2\n")), "data.params.path",
     "'abc'"),
    ("csv-ragged", file_case("csv", lambda t: _csv(t / "ragged.csv", XY + "1.3,0.2\n")), "data.params.path",
     "fields"),
    ("csv-header-only", file_case("csv", lambda t: _csv(t / "hdr.csv", "x1,x2,y\n")), "data.params.path",
     "no data rows"),
    ("csv-empty", file_case("csv", lambda t: _csv(t / "empty.csv", "")), "data.params.path", "empty"),
    ("csv-no-y-column", file_case("csv", lambda t: _csv(t / "noy.csv", XY.replace(",y\n", ",target\n", 1))),
     "data.params.y_column", "'y'"),
    ("csv-constant-column", file_case("csv", lambda t: _csv(
        t / "const.csv", "a,b,y\n" + "".join(f"{i},3.0,{i % 3}\n" for i in range(10)))), "data.params.path",
     "'b' is constant"),
    ("csv-constant-target", file_case("csv", lambda t: _csv(
        t / "consty.csv", "a,y\n" + "".join(f"{i},1.5\n" for i in range(10)))), "data.params.path",
     "target is constant"),
    ("csv-logistic-01-labels", file_case("csv", lambda t: _csv(
        t / "lab.csv", "a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(10))), "--set", "objective.loss=logistic"),
     "data.params.path", "labels -1 and +1"),
    ("npz-shape-mismatch", file_case("npz", lambda t: _npz(t / "m.npz", x=np.ones((5, 2)), y=np.ones(4))),
     "data.params.path", "(5, 2)"),
    ("npz-missing-y", file_case("npz", lambda t: _npz(t / "noy.npz", x=np.ones((5, 2)))), "data.params.path",
     "lacks"),
    ("npz-inf", file_case("npz", lambda t: _npz(t / "inf.npz", x=np.array([[1.0], [np.inf]]),
                                                y=np.array([0.0, 1.0]))), "data.params.path", "NaN/inf"),
    ("npz-3d", file_case("npz", lambda t: _npz(t / "x3.npz", x=np.ones((4, 2, 2)), y=np.ones(4))),
     "data.params.path", "(4, 2, 2)"),
    ("logistic-on-regression", lambda t: ["--set", "objective.loss=logistic"], "objective.loss", "labels"),
    ("batch-larger-than-data", lambda t: ["--set", "dynamics.batch_size=1000"], "dynamics.batch_size", "1000"),
    # certificate settings that would fail at the first record, after the run directory is written
    ("certify-quadrature-dim-w-3", lambda t: ["--set", "data.params.d=2", "--set", "record.certify_every=2",
                                              "--set", "record.certify_method=quadrature"],
     "record.certify_method", "dim(w) = 3"),
    ("particles-too-few-for-knn-entropy", lambda t: ["--set", "model.n_particles=3", "--set",
                                                     "record.certify_every=2"], "model.n_particles", "3"),
    ("fixed-sign-group-too-small-for-knn-entropy", lambda t: [
        "--set", "model.output=fixed", "--set", "model.n_particles=20", "--set", "model.init.plus_fraction=0.1",
        "--set", "record.certify_every=2"], "model.n_particles", "sign group"),
    ("resume-nothing", lambda t: ["--resume", "--out", str(t / "none")], "--resume", "none"),
    ("resume-and-overwrite", lambda t: ["--resume", "--overwrite", "--out", str(t / "existing")], "--overwrite",
     "--resume"),
    ("out-is-a-file", lambda t: ["--out", _csv(t / "afile", "x")], "--out", "afile"),
    ("out-not-empty", lambda t: ["--out", str(t / "existing")], "--out", "existing"),
    ("unknown-option", lambda t: ["--steps", "5"], "--steps", "mfld run"),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, build, field, value", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(case_id, build, field, value, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    existing = work / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("name: precious\n")
    (existing / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)  # the default run directory would be created under ./runs
    argv = ["run", *TINY, *build(work)]  # the case last: its --set wins
    before = _snapshot(work)
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2, (case_id, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in err and "Usage:" not in err
    assert field in line, (field, line)
    assert value in line, (value, line)
    assert _snapshot(work) == before, "a bad input wrote something"


def test_validate_accepts_good_and_rejects_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("objective:\n  tau: 0.02\ndynamics:\n  steps: 10\n")
    main(["validate", str(good)])
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and "10 steps" in out and err == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  tau: -0.02\n")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(bad)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: objective.tau: ")
    # validate checks the data too: a data file with a NaN
    csv = tmp_path / "d.csv"
    csv.write_text(XY + "nan,1,1\n")
    with pytest.raises(SystemExit):
        main(["validate", str(good), "--set", "data.kind=file", "--set", f"data.params.path={csv}"])
    assert "NaN" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [good, bad, csv] or set(tmp_path.iterdir()) == {good, bad, csv}


def test_certificate_checks_only_when_certificates_are_on(tmp_path, capsys):
    """The up-front certificate checks refuse exactly what would fail later: with certificates
    off, or where they are not defined (tau = 0), 3 particles and quadrature on dim(w) = 3 run."""
    from mfld.app.inputs import KNN_K, validate_inputs
    from mfld.entropy import free_energy_estimate, knn_entropy

    # the checks' k is the one the certificates use (mfld.entropy's default neighbour order)
    assert KNN_K == inspect.signature(free_energy_estimate).parameters["k"].default
    assert KNN_K == inspect.signature(knn_entropy).parameters["k"].default
    knn_entropy(np.arange(KNN_K + 1.0))  # the smallest group the check lets through is estimable
    with pytest.raises(ConfigError):
        knn_entropy(np.arange(float(KNN_K)))  # ... and one fewer is not
    few = {"model.n_particles": 3, "data.params.d": 2, "record.certify_method": "quadrature",
           "record.every": 2, "record.checkpoint_every": 0}
    for ok in ({"record.certify_every": 0}, {"record.certify_every": 2, "objective.tau": 0.0},
               {"record.certify_every": 2, "model.scaling": "ntk"}):
        validate_inputs(None, {**few, **ok})
    # a sweep and `mfld optimum` certify nothing: their data checks (check_data) let it through
    from mfld import config as cfgmod
    from mfld.app.inputs import check_data, check_run_setup, make_dataset

    cfg = cfgmod.validate(cfgmod.apply_overrides({}, {**few, "record.certify_every": 2}))
    check_data(cfg, make_dataset(cfg))
    with pytest.raises(ConfigError):
        check_run_setup(cfg, make_dataset(cfg))
    main(["run", *TINY, "--set", "model.n_particles=3", "--set", "data.params.d=2", "--set",
          "record.certify_method=quadrature", "--out", str(tmp_path / "r")])
    assert "status=completed" in capsys.readouterr().out


def test_config_errors_fail_before_jax_is_imported(tmp_path):
    """`mfld validate` and a bad `mfld run` never import JAX (fast failure)."""
    good = tmp_path / "good.yaml"
    good.write_text("dynamics:\n  steps: 10\n")
    code = f"""
import sys, json
from mfld.cli import main
codes = []
for argv in (["validate", {str(good)!r}], ["run", "--set", "objective.lam=-1"],
             ["run", {str(good)!r}, "--set", "data.params.nn=1"], ["run", "--resume", "--out", "nowhere"]):
    try:
        main(argv)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({{"codes": codes, "jax": "jax" in sys.modules}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"codes": [0, 2, 2, 2], "jax": False}, (got, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 3  # one line per mistake
    assert not (tmp_path / "runs").exists()
