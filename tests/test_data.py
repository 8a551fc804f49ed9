"""Data generators, shipped datasets and user files (mfld.data).

Statistical checks use 5 standard errors of the estimate (two-sided ~6e-7 for a Gaussian
estimate); the data are seeded, so every test is deterministic.
"""

import math
import sys

import numpy as np
import pytest

from mfld import data
from mfld.errors import ConfigError
from mfld.problem import Problem

KINDS = {
    "teacher_student": dict(n=50, d=2),
    "single_index": dict(n=50, d=3),
    "gaussian_mixture": dict(n=50, d=3),
    "sparse_parity": dict(n=50, d=6, k=2),
    "sklearn": dict(name="diabetes"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_seeded_and_deterministic(kind):
    a = data.make_dataset(kind, seed=3, **KINDS[kind])
    b = data.make_dataset(kind, seed=3, **KINDS[kind])
    c = data.make_dataset(kind, seed=4, **KINDS[kind])
    for f in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.x, c.x) or not np.array_equal(a.y, c.y)
    assert a.x.dtype == np.float64 and a.y.shape == (a.x.shape[0],)
    assert a.meta["seed"] == 3
    d2 = data.make_dataset(kind, seed=3, **{k: (float(v) if isinstance(v, int) else v)
                                             for k, v in KINDS[kind].items()})  # 50.0 is an integer too
    np.testing.assert_array_equal(d2.x, a.x)
    # a Problem accepts it (classification kinds with the logistic loss)
    loss = "logistic" if kind in data.CLASSIFICATION_KINDS or a.meta.get("name") == "breast_cancer" else "squared"
    pr = Problem.create(a.x, a.y, loss=loss, x_test=a.x_test, y_test=a.y_test)
    assert pr.n == a.x.shape[0]


def test_make_dataset_errors():
    with pytest.raises(ConfigError) as e:
        data.make_dataset("mnist", seed=0)
    assert e.value.field == "data.kind" and "sparse_parity" in str(e.value)
    with pytest.raises(ConfigError) as e:
        data.make_dataset("sparse_parity", seed=0, teacher_width=3)
    assert e.value.field == "data.params.teacher_width" and "label_noise" in str(e.value)
    with pytest.raises(ConfigError, match="data.params.path"):
        data.make_dataset("file", seed=0)
    with pytest.raises(ConfigError, match="data.params.k"):
        data.make_dataset("sparse_parity", seed=0, d=3, k=4)
    with pytest.raises(ConfigError, match="data.params.n"):
        data.make_dataset("single_index", seed=0, n=0)
    with pytest.raises(ConfigError, match="data.params.link"):
        data.make_dataset("single_index", seed=0, link="sin")
    with pytest.raises(ConfigError, match="data.params.std"):
        data.make_dataset("gaussian_mixture", seed=0, std=0.0)
    with pytest.raises(ConfigError, match="data.params.label_noise"):
        data.make_dataset("sparse_parity", seed=0, label_noise=0.7)
    with pytest.raises(ConfigError, match="data.params.noise"):
        data.make_dataset("teacher_student", seed=0, noise=-1.0)


def test_teacher_student_target_and_noise():
    ds = data.teacher_student(n=4000, d=2, noise=0.1, n_test=0, seed=1)
    r = ds.y - ds.target(ds.x)
    assert abs(r.std() - 0.1) < 5 * 0.1 / math.sqrt(2 * 4000)  # SE of a std: s/sqrt(2n)
    assert ds.x_test is None and np.all(np.abs(ds.x) <= 2.0)
    # the target is the mean-field teacher network of meta
    a, w, b = (np.array(ds.meta[k]) for k in ("teacher_a", "teacher_w", "teacher_b"))
    np.testing.assert_allclose(ds.target(ds.x[:5]), np.tanh(ds.x[:5] @ w.T + b) @ a / len(a), rtol=1e-14)


def test_single_index_statistics():
    n, d = 20000, 4
    ds = data.single_index(n=n, d=d, link="he2", noise=0.0, n_test=10, seed=2)
    beta = np.array(ds.meta["direction"])
    assert np.linalg.norm(beta) == pytest.approx(1.0, rel=1e-14)
    z = ds.x @ beta
    np.testing.assert_allclose(ds.y, (z * z - 1) / math.sqrt(2), rtol=1e-14, atol=1e-15)
    # He2 is normalised: E y = 0, E y^2 = 1 (5 SE, with the sample's own standard deviations)
    assert abs(ds.y.mean()) < 5 * ds.y.std() / math.sqrt(n)
    assert abs((ds.y ** 2).mean() - 1) < 5 * (ds.y ** 2).std() / math.sqrt(n)
    # x ~ N(0, I): the covariance is the identity within 5 SE (1/sqrt n off-diagonal, sqrt(2/n) diagonal)
    cov = ds.x.T @ ds.x / n
    assert np.all(np.abs(cov - np.eye(d)) < 5 * math.sqrt(2 / n))
    noisy = data.single_index(n=n, d=d, link="tanh", noise=0.3, n_test=0, seed=2)
    res = noisy.y - np.tanh(noisy.x @ np.array(noisy.meta["direction"]))
    assert abs(res.std() - 0.3) < 5 * 0.3 / math.sqrt(2 * n)


def test_gaussian_mixture_statistics():
    n, d, sep, std = 20000, 3, 3.0, 0.5
    ds = data.gaussian_mixture(n=n, d=d, separation=sep, std=std, n_test=0, seed=5)
    mu = np.array(ds.meta["mean"])
    assert set(np.unique(ds.y)) == {-1.0, 1.0}
    assert abs(np.mean(ds.y == 1) - 0.5) < 5 * 0.5 / math.sqrt(n)
    for s in (-1, 1):
        xs = ds.x[ds.y == s]
        np.testing.assert_allclose(xs.mean(axis=0), s * sep / 2 * mu, atol=5 * std / math.sqrt(len(xs)))
        cov = np.cov(xs.T)
        assert np.all(np.abs(cov - std ** 2 * np.eye(d)) < 5 * std ** 2 * math.sqrt(2 / len(xs)))
    # Bayes classifier's error matches Phi(-sep/(2 std)) within its binomial SE
    err = np.mean(np.sign(ds.x @ mu) != ds.y)
    p = ds.meta["bayes_error"]
    assert p == pytest.approx(0.5 * math.erfc(sep / (2 * std) / math.sqrt(2)))
    assert abs(err - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_sparse_parity_statistics():
    n, d, k = 20000, 8, 3
    ds = data.sparse_parity(n=n, d=d, k=k, n_test=0, seed=6)
    S = ds.meta["support"]
    assert len(set(S)) == k and all(0 <= s < d for s in S)
    assert set(np.unique(ds.x)) == {-1.0, 1.0}
    np.testing.assert_array_equal(ds.y, np.prod(ds.x[:, S], axis=1))
    # no coordinate (nor any pair) alone is correlated with a 3-parity: correlations ~ N(0, 1/n)
    assert np.all(np.abs(ds.x.T @ ds.y / n) < 5 / math.sqrt(n))
    assert abs(np.mean(ds.x[:, S[0]] * ds.x[:, S[1]] * ds.y)) < 5 / math.sqrt(n)
    assert abs(ds.y.mean()) < 5 / math.sqrt(n)
    noisy = data.sparse_parity(n=n, d=d, k=k, label_noise=0.1, n_test=0, seed=6)
    flips = np.mean(noisy.y != np.prod(noisy.x[:, noisy.meta["support"]], axis=1))
    assert abs(flips - 0.1) < 5 * math.sqrt(0.09 / n)


@pytest.mark.parametrize("name,shape", [("diabetes", (442, 10)), ("breast_cancer", (569, 30))])
def test_sklearn_datasets_standardised(name, shape):
    ds = data.make_dataset("sklearn", seed=0, name=name, test_fraction=0.25)
    n_test = round(0.25 * shape[0])
    assert ds.x.shape == (shape[0] - n_test, shape[1]) and ds.x_test.shape == (n_test, shape[1])
    np.testing.assert_allclose(ds.x.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(ds.x.std(axis=0), 1, rtol=1e-12)
    if name == "breast_cancer":
        assert set(np.unique(np.r_[ds.y, ds.y_test])) == {-1.0, 1.0}
        assert np.sum(np.r_[ds.y, ds.y_test] == 1) == 357  # benign count of the dataset
    else:
        assert abs(ds.y.mean()) < 1e-12 and ds.y.std() == pytest.approx(1, rel=1e-12)
    # the test split is standardised with the training statistics, not its own
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-6


def test_sklearn_missing_gives_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    with pytest.raises(ConfigError) as e:
        data.make_dataset("sklearn", seed=0, name="diabetes")
    assert "scikit-learn is not installed" in str(e.value) and "mfld[datasets]" in str(e.value)
    with pytest.raises(ConfigError, match="data.params.name"):
        data.make_dataset("sklearn", seed=0, name="iris2")


# ----------------------------------------------------------------------------- files
def test_npz_roundtrip_and_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 2)), rng.standard_normal(30)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    ds = data.make_dataset("file", seed=0, path=str(p))
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.x_test is None
    sp = data.make_dataset("file", seed=1, path=str(p), test_fraction=0.2)
    assert sp.x.shape == (24, 2) and sp.x_test.shape == (6, 2)
    # the split is a permutation of the rows
    both = np.r_[sp.x, sp.x_test]
    np.testing.assert_array_equal(both[np.lexsort(both.T)], x[np.lexsort(x.T)])
    p2 = tmp_path / "t.npz"
    np.savez(p2, x=x[:, 0], y=y, x_test=x[:5, 0], y_test=y[:5])  # 1-D x is one column
    ds2 = data.load_file(str(p2))
    assert ds2.x.shape == (30, 1) and ds2.x_test.shape == (5, 1)


def test_csv_named_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("age, height ,target,other\n1,2.5,3,9\n4,5,6e-1,9\n\n7,8,9,9\n")
    ds = data.make_dataset("file", seed=0, path=str(p), y_column="target", x_columns=["height", "age"])
    np.testing.assert_array_equal(ds.x, [[2.5, 1], [5, 4], [8, 7]])
    np.testing.assert_array_equal(ds.y, [3, 0.6, 9])
    default = data.load_file(str(p), y_column="target")
    np.testing.assert_array_equal(default.x, [[1, 2.5, 9], [4, 5, 9], [7, 8, 9]])


@pytest.mark.parametrize("content,kwargs,field,fragment", [
    ("a,y\n1,2\n", dict(y_column="target"), "data.params.y_column", "a, y"),
    ("a,y\n1,2\n", dict(x_columns=["a", "b"]), "data.params.x_columns", "'b'"),
    ("a,y\n1,x2\n", {}, "data.params.path", "line 2: non-numeric value 'x2' in column 'y'"),
    ("a,y\n1,nan\n", {}, "data.params.path", "NaN/inf"),
    ("a,y\n1,inf\n", {}, "data.params.path", "NaN/inf"),
    ("", {}, "data.params.path", "empty"),
    ("a,y\n", {}, "data.params.path", "no data rows"),
    ("a,y\n1,2,3\n", {}, "data.params.path", "3 fields"),
    ("y\n1\n", {}, "data.params.x_columns", "no input columns"),
])
def test_csv_errors(tmp_path, content, kwargs, field, fragment):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(ConfigError) as e:
        data.load_file(str(p), **kwargs)
    assert e.value.field == field and fragment in str(e.value), str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        data.load_file(str(tmp_path / "nope.npz"))
    (tmp_path / "d.txt").write_text("1 2\n")
    with pytest.raises(ConfigError, match=".npz or .csv"):
        data.load_file(str(tmp_path / "d.txt"))
    np.savez(tmp_path / "a.npz", x=np.ones((3, 1)))
    with pytest.raises(ConfigError, match=r"lacks array\(s\) y \(has: x\)"):
        data.load_file(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x=np.ones((3, 1)), y=np.array([1.0, np.inf, 0.0]))
    with pytest.raises(ConfigError, match="y in .* 1 NaN/inf"):
        data.load_file(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=np.array(["a", "b"]), y=np.ones(2))
    with pytest.raises(ConfigError, match="holds text values"):
        data.load_file(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "e.npz", x=np.ones((0, 2)), y=np.ones(0))
    with pytest.raises(ConfigError, match="empty"):
        data.load_file(str(tmp_path / "e.npz"))
    np.savez(tmp_path / "f.npz", x=np.ones((3, 2)), y=np.ones(4))
    with pytest.raises(ConfigError, match=r"\(3, 2\) and \(4,\)"):
        data.load_file(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "g.npz", x=np.ones((3, 2)), y=np.ones(3), x_test=np.ones((2, 2)))
    with pytest.raises(ConfigError, match="only one of x_test, y_test"):
        data.load_file(str(tmp_path / "g.npz"))


def test_a_relative_data_path_works_from_any_directory(tmp_path, monkeypatch, capsys):
    """The config records the data file's absolute path: `mfld plot` and `--resume` work from
    another directory than the one the run started in."""
    from mfld.cli import main

    (tmp_path / "data").mkdir()
    xs = np.linspace(-2, 2, 20)
    (tmp_path / "data" / "d.csv").write_text("x,y\n" + "".join(f"{float(v)!r},{float(np.sin(v))!r}\n" for v in xs))
    monkeypatch.chdir(tmp_path)
    args = ["--set", "model.n_particles=16", "--set", "dynamics.steps=10", "--set", "record.every=5",
            "--set", "record.certify_every=0", "--set", "record.optimum=false", "--quiet"]
    main(["run", *args, "--set", "data.kind=file", "--set", "data.params.path=data/d.csv", "--out", "r"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_dir = tmp_path / "r"
    assert "data/d.csv" not in (run_dir / "config.yaml").read_text().replace(str(tmp_path / "data/d.csv"), "")
    main(["plot", str(run_dir)])
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=20", "--quiet"])
    assert "status=completed  steps=20" in capsys.readouterr().out
