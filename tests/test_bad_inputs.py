"""Every user mistake: at most three lines on stderr (one, as a rule) naming the field or the
file and the place, exit code 2, no traceback, and nothing written or half-written.

The error-record convention (docs/runs.md): a mistake is detected before anything is written,
so no run directory is created (an existing one is left byte-for-byte as it was); the record
of the error is the stderr line ``error: <field>: <message> (got <value>); allowed: ...``
and the exit code 2.

The table covers every category of issue 11: config values and overrides, hostile YAML
(alias bombs, duplicate keys, deep nesting, size), data files (CSV and .npz: encodings, huge
cells, duplicate headers, pickled/complex/lying arrays), output paths (``--out ''``, ``.``,
``--overwrite`` of a directory that holds no run, planted ``.lock`` symlinks), resources
(1e12 particles, 1e11 test points or Monte Carlo samples, seeds out of range), damaged and
tampered run directories (resume and plot: metrics.csv, checkpoint, optimum.json, env.json,
config.yaml, summary.json, the marker, data.npz), animate, validate, sweep and the
multi-process options. Each case runs in-process through ``mfld.cli.main`` (fast); the work
directory is compared byte for byte before and after. One subprocess checks that a bad
config fails before JAX is imported.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


def _bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _npz_lying_header(path: Path) -> str:
    """An .npz whose x.npy header claims 10^12 float64 values (7.3 TiB) over 64 bytes."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    buf.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
        zf.writestr("y.npy", buf.getvalue())
    return str(path)


def file_case(kind, maker, *extra):
    """argv for a run on a data file made by ``maker(tmp_path)``."""
    def build(tmp):
        return ["--set", "data.kind=file", "--set", f"data.params.path={maker(tmp)}", *extra]
    return build


XY = "x1,x2,y\n" + "".join(f"{i * 0.1},{(i * 7 % 5) * 0.3},{np.sin(i)}\n" for i in range(12))
BOMB = ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n")
FLOW_BOMB = "{" + BOMB.strip().replace("\n", ", ") + "}"

# (id, argv builder (tmp_path -> args after `mfld run`), field that must be named, value fragment)
RUN_CASES = [
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
    ("certify-quadrature-dim-w-4", lambda t: ["--set", "data.params.d=3", "--set", "record.certify_every=2",
                                              "--set", "record.certify_method=quadrature"],
     "record.certify_method", "dim(w) = 4"),
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



# more `mfld run` cases (args after `mfld run`, TINY first): config values, overrides, hostile
# YAML, data files, output paths and resources
RUN_CASES += [
    # -- config values (and "did you mean" for enumerated values)
    ("activation-typo-suggested", lambda t: ["--set", "model.activation=tahn"], "model.activation",
     "did you mean 'tanh'"),
    ("loss-capitalised-suggested", lambda t: ["--set", "objective.loss=Logistic"], "objective.loss",
     "did you mean 'logistic'"),
    ("precision-typo-suggested", lambda t: ["--set", "precision=float6"], "precision", "did you mean 'float64'"),
    ("scheme-typo", lambda t: ["--set", "dynamics.scheme=eulr"], "dynamics.scheme", "did you mean 'euler'"),
    ("tau-schedule", lambda t: ["--set", "dynamics.tau_schedule=exp"], "dynamics.tau_schedule", "exp"),
    ("certify-method", lambda t: ["--set", "record.certify_method=mcmc"], "record.certify_method", "mcmc"),
    ("r-out-zero", lambda t: ["--set", "model.r_out=0"], "model.r_out", "0"),
    ("plus-fraction-above-one", lambda t: ["--set", "model.init.plus_fraction=1.5"], "model.init.plus_fraction",
     "1.5"),
    ("a-scale-negative", lambda t: ["--set", "model.init.a_scale=-1"], "model.init.a_scale", "-1"),
    ("w-scale-text", lambda t: ["--set", "model.init.w_scale=wide"], "model.init.w_scale", "wide"),
    ("bias-text", lambda t: ["--set", "model.bias=yes please"], "model.bias", "yes please"),
    ("lam-zero", lambda t: ["--set", "objective.lam=0"], "objective.lam", "0"),
    ("lam-exponent-negative", lambda t: ["--set", "objective.lam=-1e-3"], "objective.lam", "-0.001"),
    ("eta-list", lambda t: ["--set", "dynamics.eta=[0.1, 0.2]"], "dynamics.eta", "[0.1, 0.2]"),
    ("steps-exponent-float", lambda t: ["--set", "dynamics.steps=1e3"], "dynamics.steps", "1000.0"),
    ("chunk-zero", lambda t: ["--set", "dynamics.chunk=0"], "dynamics.chunk", "0"),
    ("certify-samples-small", lambda t: ["--set", "record.certify_samples=4"], "record.certify_samples", "4"),
    ("certify-every-not-multiple", lambda t: ["--set", "record.certify_every=3"], "record.certify_every", "3"),
    ("snapshot-every-not-multiple", lambda t: ["--set", "record.snapshot_every=5"], "record.snapshot_every", "5"),
    ("progress-number", lambda t: ["--set", "record.progress=2"], "record.progress", "2"),
    ("optimum-text", lambda t: ["--set", "record.optimum=maybe"], "record.optimum", "maybe"),
    ("data-seed-negative", lambda t: ["--set", "data.seed=-3"], "data.seed", "-3"),
    ("name-empty", lambda t: ["--set", "name="], "name", "''"),
    ("name-dotdot", lambda t: ["--set", "name=.."], "name", "'..'"),
    ("name-300-chars", lambda t: ["--set", "name=" + "n" * 300], "name", "300 characters"),
    ("name-control-char", lambda t: ["--set", "name=a\x07b"], "name", "invalid run name"),
    ("name-a-number", lambda t: ["--set", "name=5"], "name", "5"),
    ("data-params-scalar", lambda t: ["--set", "data.params=3"], "data.params", "3"),
    ("section-a-list", lambda t: ["--set", "objective=[1, 2]"], "objective", "[1, 2]"),
    ("data-kind-sklearn-bad-name", lambda t: ["--set", "data.kind=sklearn", "--set", "data.params.name=iris"],
     "data.params.name", "iris"),
    ("teacher-bias-text", lambda t: ["--set", "data.params.bias=maybe"], "data.params.bias", "maybe"),
    ("single-index-link", lambda t: ["--set", "data.kind=single_index", "--set", "data.params.link=sin"],
     "data.params.link", "sin"),
    ("parity-k-above-d", lambda t: ["--set", "data.kind=sparse_parity", "--set", "data.params.d=3", "--set",
                                    "data.params.k=5"], "data.params.k", "5"),
    ("mixture-std-zero", lambda t: ["--set", "data.kind=gaussian_mixture", "--set", "data.params.std=0"],
     "data.params.std", "0"),
    ("teacher-width-zero", lambda t: ["--set", "data.params.teacher_width=0"], "data.params.teacher_width", "0"),
    ("n-test-negative", lambda t: ["--set", "data.params.n_test=-1"], "data.params.n_test", "-1"),
    # -- overrides
    ("override-empty-key", lambda t: ["--set", "=3"], "--set", "malformed"),
    ("override-double-dot", lambda t: ["--set", "objective..tau=1"], "--set", "objective..tau"),
    ("override-leading-dot", lambda t: ["--set", ".tau=1"], "--set", ".tau"),
    ("override-through-a-scalar", lambda t: ["--set", "objective.tau.x=1"], "--set", "objective.tau.x"),
    ("override-value-too-long", lambda t: ["--set", "name=" + "x" * 200000], "--set", "too long"),
    ("override-alias-bomb", lambda t: ["--set", f"data.params.n={FLOW_BOMB}"], "--set", "expands to more than"),
    ("override-recursive-alias", lambda t: ["--set", "data.params.n=&a [*a]"], "--set", "recursive alias"),
    ("override-deep-nesting", lambda t: ["--set", "data.params.n=" + "[" * 500 + "]" * 500], "--set",
     "nested deeper"),
    ("override-duplicate-key", lambda t: ["--set", "data.params={n: 1, n: 2}"], "--set", "duplicate key 'n'"),
    # -- hostile or broken YAML files
    ("yaml-billion-laughs", lambda t: [_csv(t / "bomb.yaml", BOMB)], "config", "expands to more than"),
    ("yaml-recursive-alias", lambda t: [_csv(t / "rec.yaml", "a: &a [*a]\n")], "config", "recursive alias"),
    ("yaml-deep-flow-nesting", lambda t: [_csv(t / "deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")],
     "config", "nested deeper"),
    ("yaml-duplicate-section", lambda t: [_csv(t / "dup.yaml", "objective:\n  tau: 0.1\nobjective:\n  lam: 1\n")],
     "config", "duplicate key 'objective' at line 3"),
    ("yaml-duplicate-field", lambda t: [_csv(t / "dup2.yaml", "dynamics:\n  eta: 0.1\n  eta: 5\n")], "config",
     "duplicate key 'eta' at line 3"),
    ("yaml-too-large", lambda t: [_csv(t / "big.yaml", "# " + "x" * (1 << 21) + "\n")], "config", "larger than"),
    ("yaml-binary", lambda t: [_bytes(t / "bin.yaml", bytes(range(256)) * 4)], "config", "not a text file"),
    ("yaml-latin1", lambda t: [_bytes(t / "lat.yaml", "name: caf\xe9\n".encode("latin-1"))], "config",
     "not a text file"),
    ("yaml-python-tag", lambda t: [_csv(t / "tag.yaml", "name: !!python/object/apply:os.system ['true']\n")],
     "config", "not valid YAML at line 1"),
    ("yaml-tab-indent", lambda t: [_csv(t / "tab.yaml", "objective:\n\ttau: 0.1\n")], "config",
     "not valid YAML"),
    ("yaml-a-scalar", lambda t: [_csv(t / "scalar.yaml", "3\n")], "config", "mapping"),
    ("yaml-a-directory", lambda t: [str(t / "existing")], "config", "directory"),
    ("yaml-unknown-nested", lambda t: [_csv(t / "u.yaml", "model:\n  init:\n    scale: 1\n")],
     "model.init.scale", "unknown key"),
    ("yaml-seed-inf", lambda t: [_csv(t / "s.yaml", "seed: 1e400\n")], "seed", "inf"),
    # -- data files
    ("csv-latin1", file_case("csv", lambda t: _bytes(t / "lat.csv", "x,y\n1,2\n\xe9,3\n".encode("latin-1"))),
     "data.params.path", "line 3: not UTF-8"),
    ("csv-binary", file_case("csv", lambda t: _bytes(t / "bin.csv", bytes(range(256)) * 8)), "data.params.path",
     "not UTF-8"),
    ("csv-nul-byte", file_case("csv", lambda t: _bytes(t / "nul.csv", b"x,y\n1,\x002\n")), "data.params.path",
     "line 2"),
    ("csv-200k-text-cell", file_case("csv", lambda t: _csv(t / "cell.csv", "x,y\n" + "a" * 200000 + ",2\n")),
     "data.params.path", "line 2: non-numeric value 'aaaa"),
    ("csv-2m-cell", file_case("csv", lambda t: _csv(t / "huge.csv", "x,y\n\"" + "1" * (2 << 20) + "\",2\n")),
     "data.params.path", "line 2"),
    ("csv-duplicate-header", file_case("csv", lambda t: _csv(t / "dup.csv", "x,y,x\n1,2,3\n2,3,5\n")),
     "data.params.path", "column 'x' appears twice"),
    ("csv-empty-header-name", file_case("csv", lambda t: _csv(t / "eh.csv", "x,,y\n1,2,3\n2,3,5\n")),
     "data.params.path", "column 2 of the header has no name"),
    ("csv-nonnumeric-after-blank-lines", file_case("csv", lambda t: _csv(t / "bl.csv", "x,y\n\n1,2\n\n2,q\n")),
     "data.params.path", "line 5: non-numeric value 'q'"),
    ("csv-x-columns-twice", file_case("csv", lambda t: _csv(t / "xc.csv", XY), "--set",
                                      "data.params.x_columns=[x1, x1]"), "data.params.x_columns", "twice"),
    ("csv-x-columns-unknown", file_case("csv", lambda t: _csv(t / "xu.csv", XY), "--set",
                                        "data.params.x_columns=[x9]"), "data.params.x_columns", "x9"),
    ("csv-target-as-input", file_case("csv", lambda t: _csv(t / "ti.csv", XY), "--set",
                                      "data.params.x_columns=[x1, y]"), "data.params.x_columns", "target column"),
    ("csv-test-fraction-one", file_case("csv", lambda t: _csv(t / "tf.csv", XY), "--set",
                                        "data.params.test_fraction=1.0"), "data.params.test_fraction", "1.0"),
    ("npz-object-array", file_case("npz", lambda t: _npz(t / "obj.npz", x=np.array([{"a": 1}, 2], dtype=object),
                                                          y=np.ones(2))), "data.params.path", "object"),
    ("npz-complex", file_case("npz", lambda t: _npz(t / "c.npz", x=np.ones((3, 1)) + 1j, y=np.ones(3))),
     "data.params.path", "complex"),
    ("npz-text-array", file_case("npz", lambda t: _npz(t / "s.npz", x=np.array(["a", "b"]), y=np.ones(2))),
     "data.params.path", "text"),
    ("npz-lying-header-1e12", file_case("npz", lambda t: _npz_lying_header(t / "lie.npz")), "data.params.path",
     "header claims 1000000000000 values"),
    ("npz-garbage", file_case("npz", lambda t: _bytes(t / "g.npz", b"PK\x03\x04" + b"\x00" * 200)),
     "data.params.path", "not a valid .npz"),
    ("npz-random-bytes", file_case("npz", lambda t: _bytes(t / "r.npz", bytes(range(256)))), "data.params.path",
     "not a valid .npz"),
    ("npz-only-x-test", file_case("npz", lambda t: _npz(t / "xt.npz", x=np.ones((3, 1)), y=np.arange(3.0),
                                                         x_test=np.ones((2, 1)))), "data.params.path",
     "only one of x_test"),
    ("npz-test-columns-differ", file_case("npz", lambda t: _npz(t / "tc.npz", x=np.arange(6.0).reshape(3, 2),
                                                                y=np.arange(3.0), x_test=np.ones((2, 3)),
                                                                y_test=np.ones(2))), "data.params.path",
     "x_test has 3 columns"),
    ("npz-empty", file_case("npz", lambda t: _npz(t / "e.npz", x=np.ones((0, 2)), y=np.ones(0))),
     "data.params.path", "empty"),
    ("file-a-directory", file_case("dir", lambda t: str(t / "existing")), "data.params.path", "not a regular file"),
    ("file-path-not-text", lambda t: ["--set", "data.kind=file", "--set", "data.params.path=[1, 2]"],
     "data.params.path", "[1, 2]"),
    ("file-unknown-param", lambda t: ["--set", "data.kind=file", "--set", "data.params.delimiter=;"],
     "data.params.delimiter", "';'"),
    # -- output paths
    ("out-empty-string", lambda t: ["--out", ""], "--out", "empty run directory path"),
    ("out-whitespace", lambda t: ["--out", "  "], "--out", "empty run directory path"),
    ("out-dot-overwrite", lambda t: ["--out", ".", "--overwrite"], "--out", "current directory"),
    ("out-dot", lambda t: ["--out", "."], "--out", "current directory"),
    ("out-parent-overwrite", lambda t: ["--out", "..", "--overwrite"], "--out", "current directory"),
    ("out-cwd-absolute-overwrite", lambda t: ["--out", str(t), "--overwrite"], "--out", "current directory"),
    ("overwrite-user-directory", lambda t: ["--out", str(t / "existing"), "--overwrite"], "--out",
     "does not hold an mfld run"),
    ("overwrite-user-files", lambda t: ["--out", str(t / "thesis"), "--overwrite"], "--out",
     "does not hold an mfld run"),
    ("out-holds-only-a-symlink", lambda t: ["--out", str(t / "linkonly")], "--out", "not empty"),
    ("out-holds-only-a-lock-symlink", lambda t: ["--out", str(t / "lockonly")], "--out", "not empty"),
    ("overwrite-lock-symlink-dir", lambda t: ["--out", str(t / "lockonly"), "--overwrite"], "--out",
     "does not hold an mfld run"),
    ("out-broken-symlink", lambda t: ["--out", str(t / "broken")], "--out", "broken link"),
    ("out-name-too-long", lambda t: ["--out", str(t / "deep" / ("x" * 300))], "--out", "x" * 20),
    ("resume-a-user-directory", lambda t: ["--resume", "--out", str(t / "thesis")], "--resume", "thesis"),
    ("resume-empty-out", lambda t: ["--resume", "--out", ""], "--out", "empty run directory path"),
    ("resume-a-file", lambda t: ["--resume", "--out", _csv(t / "f.txt", "x")], "--out", "f.txt"),
    # -- resources (before anything is written or allocated)
    ("particles-1e12", lambda t: ["--set", "model.n_particles=1000000000000"], "model.n_particles",
     "1000000000000"),
    ("particles-1e10-float64", lambda t: ["--set", "model.n_particles=10000000000", "--x64"],
     "model.n_particles", "float64"),
    ("n-test-1e11", lambda t: ["--set", "data.params.n_test=100000000000"], "data.params.n_test", "100000000000"),
    ("n-1e11", lambda t: ["--set", "data.params.n=100000000000"], "data.params.n", "100000000000"),
    ("n-test-1e11-as-exponent", lambda t: ["--set", "data.params.n_test=1e11"], "data.params.n_test", "100000000000.0"),
    ("n-times-d-too-large", lambda t: ["--set", "data.kind=single_index", "--set", "data.params.n=1000000",
                                       "--set", "data.params.d=10000000"], "data.params", "memory"),
    ("certify-samples-1e11", lambda t: ["--set", "record.certify_samples=100000000000", "--set",
                                        "record.certify_every=2", "--set", "record.certify_method=mc"],
     "record.certify_samples", "100000000000"),
    ("seed-2-to-32", lambda t: ["--set", "seed=4294967296"], "seed", "4294967296"),
    ("seed-2-to-63", lambda t: ["--set", "seed=9223372036854775808"], "seed", "9223372036854775808"),
    ("seed-2-to-64", lambda t: ["--set", "seed=18446744073709551616"], "seed", "18446744073709551616"),
    ("data-seed-2-to-63", lambda t: ["--set", "data.seed=9223372036854775808"], "data.seed",
     "9223372036854775808"),
    # -- options
    ("devices-zero", lambda t: ["--devices", "0"], "devices", "0"),
    ("threads-zero", lambda t: ["--threads", "0"], "threads", "0"),
    ("coordinator-without-port", lambda t: ["--coordinator", "localhost", "--num-processes", "2",
                                            "--process-id", "0"], "--coordinator", "HOST:PORT"),
    ("coordinator-port-out-of-range", lambda t: ["--coordinator", "127.0.0.1:99999", "--num-processes", "2",
                                                 "--process-id", "0"], "--coordinator", "99999"),
    ("process-id-out-of-range", lambda t: ["--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                                           "--process-id", "5"], "process_id", "5"),
    ("coordinator-partial", lambda t: ["--coordinator", "127.0.0.1:1234"], "num_processes", "together"),
    ("coordinator-bind-alone", lambda t: ["--coordinator-bind", "0.0.0.0:1234"], "--coordinator-bind",
     "multi-process"),
    ("steps-option-not-a-number", lambda t: ["--devices", "two"], "--devices", "two"),
]


def _run_case(case_id, build, field, value):
    return Case(case_id, lambda t, _b=build: ["run", *TINY, *_b(t)], field, value)


@dataclass
class Case:
    """A bad input: ``argv(work)`` (after ``mfld``), the field (or file) and a fragment of the
    message the one error line must name, and a ``setup(work, runs)`` that prepares the work
    directory (e.g. copies a finished run and damages it) before the snapshot is taken."""

    id: str
    argv: Callable
    field: str
    value: str
    setup: Callable | None = None


def _copy(runs: Path, name: str, work: Path) -> Path:
    dst = work / name
    shutil.copytree(runs / name, dst, symlinks=True)
    return dst


def damaged(fn, name="run"):
    """A setup that copies the finished run ``name`` into the work directory and damages it."""
    def setup(work, runs):
        fn(_copy(runs, name, work))
    return setup


def _ck(run, **change):
    """Rewrite the checkpoint with some arrays changed (None: removed)."""
    p = run / "checkpoint.npz"
    with np.load(p) as z:
        d = {k: z[k] for k in z.files}
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v(d) if callable(v) else v
    with open(p, "wb") as f:
        np.savez(f, **d)


def _text(run, name, fn):
    p = run / name
    p.write_text(fn(p.read_text()))


def _json(run, name, fn):
    p = run / name
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def _metrics_lines(fn):
    return lambda run: _text(run, "metrics.csv", lambda s: "".join(fn(s.splitlines(keepends=True))))


def resume(t):
    return ["run", "--resume", str(t / "run"), "--quiet"]


def plot(t):
    return ["plot", str(t / "run")]


def _set(d, k, v):
    d[k] = v


DAMAGE = [
    # metrics.csv
    ("metrics-nul-bytes", damaged(lambda r: (r / "metrics.csv").write_bytes(b"step,risk\n0,\x00\x00\n")),
     "metrics.csv", "line 2"),
    ("metrics-ragged-row", damaged(_metrics_lines(lambda ls: ls + ["1,2\n"])), "metrics.csv", "2 fields"),
    ("metrics-truncated-last-row", damaged(_metrics_lines(lambda ls: ls[:-1] + [ls[-1][:5]])), "metrics.csv",
     "fields"),
    ("metrics-no-step-column", damaged(_metrics_lines(lambda ls: [ls[0].replace("step", "stp", 1)] + ls[1:])),
     "metrics.csv", "no 'step' column"),
    ("metrics-text-value", damaged(_metrics_lines(lambda ls: [ls[0], ls[1].replace(",", ",abc,", 1)
                                                               .replace(",abc,", ",abc", 1)] + ls[2:])),
     "metrics.csv", "line 2"),
    ("metrics-duplicated-row", damaged(_metrics_lines(lambda ls: ls[:2] + ls[1:])), "metrics.csv",
     "does not follow"),
    ("metrics-negative-step", damaged(_metrics_lines(lambda ls: [ls[0], "-5" + ls[1][1:]] + ls[2:])),
     "metrics.csv", "'-5' is not a non-negative integer"),
    ("metrics-empty", damaged(lambda r: (r / "metrics.csv").write_text("")), "metrics.csv", "empty"),
    ("metrics-latin1", damaged(lambda r: (r / "metrics.csv").write_bytes(b"step,risk\n0,\xe9\n")),
     "metrics.csv", "not UTF-8"),
    ("metrics-duplicate-column", damaged(_metrics_lines(lambda ls: [ls[0].replace(",t,", ",step,", 1)] + ls[1:])),
     "metrics.csv", "repeated name 'step'"),
    ("metrics-missing", damaged(lambda r: (r / "metrics.csv").unlink()), "metrics.csv",
     "missing, but the checkpoint"),
    # checkpoint
    ("checkpoint-garbage", damaged(lambda r: (r / "checkpoint.npz").write_bytes(b"garbage" * 50)),
     "checkpoint.npz", "not a readable checkpoint"),
    ("checkpoint-no-key", damaged(lambda r: _ck(r, key_data=None)), "checkpoint.npz", "'key_data'"),
    ("checkpoint-no-particles", damaged(lambda r: _ck(r, a=None)), "checkpoint.npz", "'a'"),
    ("checkpoint-step-negative", damaged(lambda r: _ck(r, step=np.asarray(-50))), "checkpoint.npz", "-50"),
    ("checkpoint-step-1e9", damaged(lambda r: _ck(r, step=np.asarray(10**9))), "checkpoint.npz",
     "step 1000000000 has no row"),
    ("checkpoint-step-float", damaged(lambda r: _ck(r, step=np.asarray(2.5))), "checkpoint.npz", "2.5"),
    ("checkpoint-step-2-to-40", damaged(lambda r: _ck(r, step=np.asarray(2**40))), "checkpoint.npz",
     "1099511627776"),
    ("checkpoint-nan-particles", damaged(lambda r: _ck(r, a=lambda d: d["a"] * np.nan)), "checkpoint.npz", "NaN"),
    ("checkpoint-wrong-particle-count", damaged(lambda r: _ck(r, a=lambda d: d["a"][:-1],
                                                              w=lambda d: d["w"][:-1])),
     "checkpoint.npz", "shapes"),
    ("checkpoint-w-3d", damaged(lambda r: _ck(r, w=lambda d: d["w"][:, :, None])), "checkpoint.npz", "'w'"),
    ("checkpoint-rows-differ", damaged(lambda r: _ck(r, a=lambda d: d["a"][:-1])), "checkpoint.npz",
     "do not match"),
    ("checkpoint-float64-in-float32-run", damaged(lambda r: _ck(r, a=lambda d: d["a"].astype(np.float64),
                                                                w=lambda d: d["w"].astype(np.float64))),
     "checkpoint.npz", "precision"),
    ("checkpoint-key-float", damaged(lambda r: _ck(r, key_data=np.zeros(2))), "checkpoint.npz", "'key_data'"),
    ("checkpoint-key-wrong-length", damaged(lambda r: _ck(r, key_data=np.zeros(5, np.uint32))),
     "checkpoint.npz", "'key_data'"),
    ("checkpoint-pickled", damaged(lambda r: _ck(r, a=np.array([{"x": 1}], dtype=object))), "checkpoint.npz",
     "not a readable checkpoint"),
    # optimum.json
    ("optimum-garbage", damaged(lambda r: (r / "optimum.json").write_text("{not json")), "optimum.json",
     "line 1"),
    ("optimum-missing-key", damaged(lambda r: _json(r, "optimum.json", lambda d: d.pop("u"))), "optimum.json",
     "no key 'u'"),
    ("optimum-u-wrong-length", damaged(lambda r: _json(r, "optimum.json", lambda d: _set(d, "u", d["u"][:3]))),
     "optimum.json", "one per data point"),
    ("optimum-F-star-nan", damaged(lambda r: _text(r, "optimum.json", lambda s: s.replace(
        '"F_star": ', '"F_star": NaN, "x": ', 1))), "optimum.json", "not a finite number"),
    ("optimum-a-list", damaged(lambda r: (r / "optimum.json").write_text("[1, 2]")), "optimum.json",
     "not an object"),
    ("optimum-cov-not-square", damaged(lambda r: _json(r, "optimum.json", lambda d: _set(d, "cov", [[1.0]]))),
     "optimum.json", "cov"),
    ("optimum-method-unknown", damaged(lambda r: _json(r, "optimum.json", lambda d: _set(d, "method", "guess"))),
     "optimum.json", "guess"),
    # env.json
    ("env-garbage", damaged(lambda r: (r / "env.json").write_text("garbage")), "env.json", "not valid JSON"),
    ("env-a-list", damaged(lambda r: (r / "env.json").write_text("[]")), "env.json", "not an object"),
    ("env-data-hash-edited", damaged(lambda r: _json(r, "env.json", lambda d: _set(d, "data_sha256", "0" * 64))),
     "env.json", "edited since the run wrote it at data_sha256"),
    ("env-seed-edited", damaged(lambda r: _json(r, "env.json", lambda d: _set(d, "seed", 7))), "env.json",
     "at seed"),
    ("env-history-dropped", damaged(lambda r: _json(r, "env.json", lambda d: d.pop("argv"))), "env.json",
     "at argv"),
    # config.yaml
    ("config-eta-edited", damaged(lambda r: _text(r, "config.yaml", lambda s: s.replace("eta: 0.02", "eta: 0.05"))),
     "config.yaml", "edited since the run wrote it at dynamics.eta"),
    ("config-tau-edited", damaged(lambda r: _text(r, "config.yaml", lambda s: s.replace("tau: 0.05", "tau: 0.1"))),
     "config.yaml", "at objective.tau"),
    ("config-garbage", damaged(lambda r: (r / "config.yaml").write_text("objective: [1,\n")), "config.yaml",
     "not valid YAML"),
    ("config-invalid-value", damaged(lambda r: _text(r, "config.yaml", lambda s: s.replace("eta: 0.02",
                                                                                          "eta: -1"))),
     "config.yaml", "dynamics.eta"),
    ("config-alias-bomb", damaged(lambda r: (r / "config.yaml").write_text(BOMB)), "config.yaml",
     "expands to more than"),
    ("config-duplicate-key", damaged(lambda r: _text(r, "config.yaml", lambda s: s + "seed: 3\n")),
     "config.yaml", "duplicate key 'seed'"),
    ("config-binary", damaged(lambda r: (r / "config.yaml").write_bytes(b"\xff\xfe" * 20)), "config.yaml",
     "not UTF-8"),
    # the marker and the lock
    ("marker-garbage", damaged(lambda r: (r / ".mfld-run").write_text("{")), ".mfld-run", "not valid JSON"),
    ("marker-not-a-marker", damaged(lambda r: (r / ".mfld-run").write_text('{"x": 1}')), ".mfld-run",
     "not an mfld run marker"),
    ("lock-symlink-planted", damaged(lambda r: os.symlink(r.parent / "victim.txt", r / ".lock")), "--out",
     "symbolic link"),
]

CASES = [_run_case(*c) for c in RUN_CASES]
CASES += [Case(f"resume-{i}", resume, f, v, s) for i, s, f, v in DAMAGE]
CASES += [
    # resume through the CLI with a different config (the stored one is what a resume uses)
    Case("resume-with-other-eta", lambda t: ["run", "--resume", str(t / "run"), "--set", "dynamics.eta=0.5"],
         "--resume", "dynamics.eta", damaged(lambda r: None)),
    Case("resume-with-other-seed", lambda t: ["run", "--resume", str(t / "run"), "--set", "seed=9"],
         "--resume", "seed", damaged(lambda r: None)),
    Case("resume-and-overwrite-run", lambda t: ["run", "--resume", str(t / "run"), "--overwrite"], "--overwrite",
         "exclude", damaged(lambda r: None)),
    Case("new-run-into-a-finished-run", lambda t: ["run", *TINY, "--out", str(t / "run")], "--out",
         "not empty", damaged(lambda r: None)),
]

PLOT_DAMAGE = [
    ("summary-garbage", damaged(lambda r: (r / "summary.json").write_text("{{{")), "summary.json", "line 1"),
    ("summary-a-string", damaged(lambda r: (r / "summary.json").write_text('"done"')), "summary.json",
     "not an object"),
    ("summary-deeply-nested", damaged(lambda r: (r / "summary.json").write_text("[" * 100000 + "]" * 100000)),
     "summary.json", "nested too deeply"),
    ("optimum-garbage", damaged(lambda r: (r / "optimum.json").write_text("\x00")), "optimum.json", "line 1"),
    ("optimum-u-wrong-length", damaged(lambda r: _json(r, "optimum.json", lambda d: _set(d, "u", [1.0]))),
     "optimum.json", "one per data point"),
    ("env-garbage", damaged(lambda r: (r / "env.json").write_text("nope")), "env.json", "not valid JSON"),
    ("env-hash-not-a-hash", damaged(lambda r: _json(r, "env.json", lambda d: _set(d, "data_sha256", 5))),
     "env.json", "data_sha256"),
    ("config-garbage", damaged(lambda r: (r / "config.yaml").write_text(": : :\n")), "config.yaml", "YAML"),
    ("config-a-list", damaged(lambda r: (r / "config.yaml").write_text("- 1\n")), "config.yaml", "mapping"),
    ("config-unknown-key", damaged(lambda r: _text(r, "config.yaml", lambda s: s + "colour: red\n")),
     "config.yaml", "colour"),
    ("config-particles-changed", damaged(lambda r: _text(r, "config.yaml", lambda s: s.replace(
        "n_particles: 16", "n_particles: 17"))), "checkpoint.npz", "16 particles"),
    ("metrics-garbage", damaged(lambda r: (r / "metrics.csv").write_text("a,b\n1,2\n")), "metrics.csv",
     "no 'step' column"),
    ("metrics-no-risk-column", damaged(_metrics_lines(lambda ls: [ls[0].replace(",risk,", ",rusk,", 1)] + ls[1:])),
     "metrics.csv", "no column 'risk'"),
    ("metrics-text", damaged(_metrics_lines(lambda ls: ls + ["x" * 5 + "\n"])), "metrics.csv", "fields"),
    ("checkpoint-garbage", damaged(lambda r: (r / "checkpoint.npz").write_bytes(b"\x00" * 100)), "checkpoint.npz",
     "not a readable checkpoint"),
    ("checkpoint-step-negative", damaged(lambda r: _ck(r, step=np.asarray(-1))), "checkpoint.npz", "-1"),
    ("checkpoint-w-columns", damaged(lambda r: _ck(r, w=lambda d: np.concatenate([d["w"], d["w"]], axis=1))),
     "checkpoint.npz", "columns"),
    ("data-npz-garbage", damaged(lambda r: (r / "data.npz").write_bytes(b"zz" * 40), "arrays"), "data.npz",
     "not a readable .npz"),
    ("data-npz-no-y", damaged(lambda r: _npz(r / "data.npz", x=np.ones((3, 1))), "arrays"), "data.npz",
     "instead of x, y"),
    ("data-npz-changed", damaged(lambda r: _npz(r / "data.npz", x=np.arange(20.0)[:, None],
                                                y=np.cos(np.arange(20.0))), "arrays"), "data", "SHA-256 mismatch"),
]


def _plot_argv(name):
    return lambda t: ["plot", str(t / name)]


CASES += [Case(f"plot-{i}", _plot_argv("arrays" if i.startswith("data-npz") else "run"), f, v, s)
          for i, s, f, v in PLOT_DAMAGE]
CASES += [
    Case("plot-missing-directory", lambda t: ["plot", str(t / "nowhere")], "run_dir", "not a directory"),
    Case("plot-a-user-directory", lambda t: ["plot", str(t / "thesis")], "run_dir", "no config.yaml"),
    Case("plot-a-file", lambda t: ["plot", str(t / "thesis" / "thesis.tex")], "plot", "file"),
    Case("plot-without-checkpoint", _plot_argv("run"), "run_dir", "no checkpoint",
         damaged(lambda r: (r / "checkpoint.npz").unlink())),
    Case("animate-missing-directory", lambda t: ["animate", str(t / "nowhere")], "run_dir", "no particle snapshots"),
    Case("animate-a-user-directory", lambda t: ["animate", str(t / "thesis")], "run_dir", "no particle snapshots"),
    Case("plot-config-bomb", _plot_argv("run"), "config.yaml", "expands to more than",
         damaged(lambda r: (r / "config.yaml").write_text(BOMB))),
    Case("validate-alias-bomb", lambda t: ["validate", _csv(t / "b.yaml", BOMB)], "config", "expands to more than"),
    Case("validate-duplicate-key", lambda t: ["validate", _csv(t / "d.yaml", "seed: 1\nseed: 2\n")], "config",
         "duplicate key 'seed'"),
    Case("validate-particles-1e12", lambda t: ["validate", _csv(t / "p.yaml", "model:\n  n_particles: 1e12\n")],
         "model.n_particles", "an integer"),
    Case("validate-particles-10-to-12", lambda t: ["validate", _csv(t / "q.yaml", "dynamics:\n  steps: 1\n"),
                                                   "--set", "model.n_particles=1000000000000"],
         "model.n_particles", "memory available"),
    Case("validate-n-test-1e11", lambda t: ["validate", _csv(t / "n.yaml", "data:\n  params:\n    n_test: 1e11\n")],
         "data.params.n_test", "memory available"),
    Case("validate-certify-samples-1e11", lambda t: [
        "validate", _csv(t / "c.yaml", "record:\n  certify_samples: 100000000000\n  certify_method: mc\n")],
        "record.certify_samples", "memory available"),
    Case("validate-seed-2-to-63", lambda t: ["validate", _csv(t / "s.yaml", "seed: 9223372036854775808\n")],
         "seed", "4294967295"),
    Case("validate-set-bomb", lambda t: ["validate", _csv(t / "ok.yaml", "seed: 1\n"), "--set",
                                         f"data.params.n={FLOW_BOMB}"], "--set", "expands"),
    Case("validate-csv-latin1", lambda t: ["validate", _csv(t / "ok2.yaml", "seed: 1\n"), "--set",
                                           "data.kind=file", "--set",
                                           f"data.params.path={_bytes(t / 'l.csv', b'x,y' + bytes([10, 233]))}"],
         "data.params.path", "not UTF-8"),
    Case("config-file-missing-validate", lambda t: ["validate", str(t / "nope.yaml")], "config", "not found"),
    Case("sweep-grid-without-values", lambda t: ["sweep", "--grid", "tau"], "--grid", "NAME=V1"),
    Case("sweep-grid-unknown-setting", lambda t: ["sweep", "--grid", "gamma=1"], "--grid", "gamma"),
    Case("sweep-grid-text", lambda t: ["sweep", "--grid", "tau=a,b"], "--grid tau", "a,b"),
    Case("sweep-grid-empty", lambda t: ["sweep", "--grid", "tau="], "--grid tau", "no values"),
    Case("sweep-zero-seeds", lambda t: ["sweep", "--grid", "tau=0.1", "--seeds", "0"], "--seeds", "0"),
    Case("sweep-config-bomb", lambda t: ["sweep", _csv(t / "sb.yaml", BOMB), "--grid", "tau=0.1"], "config",
         "expands"),
    Case("sweep-set-duplicate-key", lambda t: ["sweep", "--grid", "tau=0.1", "--set", "data.params={n: 1, n: 2}"],
         "--set", "duplicate key"),
    Case("unknown-command", lambda t: ["runn"], "No such command", "runn"),
]


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its content hash (links: their target, not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs to copy and damage: ``run`` (certificates and the optimum: every file)
    and ``arrays`` (a run given arrays: data.npz)."""
    import mfld

    root = tmp_path_factory.mktemp("runs")
    main(["run", "--set", "model.n_particles=16", "--set", "dynamics.steps=4", "--set", "record.every=2",
          "--set", "record.checkpoint_every=2", "--set", "record.certify_every=2", "--set",
          "record.certify_samples=256", "--set", "record.snapshot_every=2", "--quiet", "--out", str(root / "run")])
    xs = np.linspace(-2, 2, 20)
    mfld.run({"model": {"n_particles": 16}, "dynamics": {"steps": 4},
              "record": {"certify_every": 0, "optimum": False, "every": 2}},
             x=xs[:, None], y=np.sin(2 * xs), out=root / "arrays", progress=False)
    assert {"optimum.json", "checkpoint.npz", "metrics.csv", ".mfld-run"} <= {p.name for p in (root / "run").iterdir()}
    return root


def _refused(argv, capsys) -> list[str]:
    """Run ``mfld argv`` and check the error contract: exit code 2, nothing on stdout, one to
    three lines on stderr, the first ``error: ...``, no traceback or usage text, no value
    expanded into the message. Returns the stderr lines."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2, (argv, err)
    assert out == ""
    lines = err.splitlines()
    assert 1 <= len(lines) <= 3, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Usage:" not in err
    assert len(" ".join(lines)) < 1000, err  # no value is ever expanded into the message
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(case, runs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    existing = work / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("name: precious\n")
    (existing / "notes.txt").write_text("keep me")
    thesis = work / "thesis"
    (thesis / "sub").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    (thesis / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (work / "victim.txt").write_text("not a lock")
    (work / "linkonly").mkdir()
    os.symlink(work / "thesis", work / "linkonly" / "elsewhere")
    (work / "lockonly").mkdir()
    os.symlink(work / "victim.txt", work / "lockonly" / ".lock")
    os.symlink(work / "gone", work / "broken")
    if case.setup is not None:
        case.setup(work, runs)
    monkeypatch.chdir(work)  # the default run directory would be created under ./runs
    argv = case.argv(work)
    before = _snapshot(work)
    line = " ".join(_refused(argv, capsys))
    assert case.field in line, (case.id, case.field, line)
    assert case.value in line, (case.id, case.value, line)
    assert _snapshot(work) == before, "a bad input wrote something"


def test_validate_accepts_good_and_rejects_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("objective:\n  tau: 0.02\ndynamics:\n  steps: 10\n")
    main(["validate", str(good)])
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and "10 steps" in out and err == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  tau: -0.02\n")
    lines = _refused(["validate", str(bad)], capsys)
    assert len(lines) == 1 and lines[0].startswith("error: objective.tau: ")
    # validate checks the data too: a data file with a NaN
    csv = tmp_path / "d.csv"
    csv.write_text(XY + "nan,1,1\n")
    lines = _refused(["validate", str(good), "--set", "data.kind=file", "--set", f"data.params.path={csv}"], capsys)
    assert "NaN" in lines[0]
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


def test_help_texts_say_where_runs_go_and_what_validate_set_does(capsys):
    main(["run", "--help"])
    text = "".join(capsys.readouterr().out.split())  # (click wraps lines, also at hyphens)
    assert "runs/<name>-<YYYYmmdd-HHMMSS>underthecurrentdirectory" in text
    assert "nevercleared" in text and "--coordinator-bind" in text
    main(["validate", "--help"])
    text = "".join(capsys.readouterr().out.split())
    assert "--setKEY=VALUEDottedoverrideappliedbeforechecking" in text and "memory" in text


def test_overwrite_clears_a_run_and_accepts_new_or_empty_directories(tmp_path, capsys):
    """--overwrite into a missing or empty directory is an ordinary new run; into a run it
    clears the run (its own files and anything put next to them); into anything else it is
    refused (the table above) and the user's files survive."""
    new, empty, run = tmp_path / "new", tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    for d in (new, empty, run):
        main(["run", *TINY, "--out", str(d), "--overwrite"])
    (run / "stray.txt").write_text("next to a run")
    main(["run", *TINY, "--set", "dynamics.steps=6", "--out", str(run), "--overwrite"])
    assert not (run / "stray.txt").exists() and (run / ".mfld-run").is_file()
    assert json.loads((run / "summary.json").read_text())["final"]["step"] == 6
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("keep")
    (user / "sub" / "data.bin").write_bytes(b"\x00")
    assert "does not hold an mfld run" in " ".join(_refused(["run", *TINY, "--out", str(user), "--overwrite"], capsys))
    assert (user / "thesis.tex").read_text() == "keep" and (user / "sub" / "data.bin").read_bytes() == b"\x00"


def test_quadrature_up_to_the_library_limit_passes_the_up_front_check():
    # the check and mfld.gibbs agree: dim(w) = 3 (d = 2 with bias) is certified by quadrature
    # (it was refused up front while the library offered it)
    from mfld.app.inputs import validate_inputs
    from mfld.gibbs import QUAD_MAX_DIM

    validate_inputs(None, {"data.params.d": QUAD_MAX_DIM - 1, "record.certify_method": "quadrature",
                           "record.every": 2, "record.certify_every": 2})
