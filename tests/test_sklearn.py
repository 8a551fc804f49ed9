"""The scikit-learn estimators (mfld.sklearn): scikit-learn's own estimator checks, Pipeline and
GridSearchCV, the certificate against the solver's F*, one-vs-rest, and the NumPy forward pass
against mfld's JAX network."""

import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_iris, make_classification  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from mfld.sklearn import MFLDClassifier, MFLDRegressor  # noqa: E402

# Small and fast: the checks fit ~50 times at ~40 different shapes, and each new shape compiles one
# lax.scan (the run time is the compile time; 100 steps cost ~nothing more than 10). eta = 0.2 with
# 100 steps is what check_regressors_train (R^2 > 0.5 on a 1-informative-feature linear problem)
# and check_classifiers_train (accuracy > 0.83 on blobs) need; no check is expected to fail and no
# tag other than the defaults is declared (non_deterministic stays False: with an integer
# random_state the noise is seeded and a fit is reproducible bit for bit).
FAST = dict(n_particles=32, n_steps=100, eta=0.2, certify=False)


@parametrize_with_checks([MFLDRegressor(**FAST), MFLDClassifier(**FAST)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _regression(n=80, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.tanh(X @ rng.standard_normal(d)) + 0.1 * rng.standard_normal(n)
    return X, y


def test_pipeline_and_grid_search():
    X, y = _regression()
    pipe = make_pipeline(StandardScaler(), MFLDRegressor(n_particles=32, n_steps=200, eta=0.2, random_state=0,
                                                         certify=False))
    gs = GridSearchCV(pipe, {"mfldregressor__lam": [1e-3, 1e-1]}, cv=2).fit(X, y)
    assert gs.best_params_["mfldregressor__lam"] in (1e-3, 1e-1)
    # the refitted best pipeline predicts, and fits the training data better than the mean
    assert gs.best_estimator_.score(X, y) > 0.5
    assert set(gs.cv_results_["params"][0]) == {"mfldregressor__lam"}


def test_fitted_attributes_and_pickle():
    X, y = _regression()
    est = MFLDRegressor(n_particles=24, n_steps=60, eta=0.2, random_state=3, certify=False).fit(X, y)
    a, w = est.particles_
    assert a.shape == (24,) and w.shape == (24, 4) and a.dtype == np.float64  # bias feature appended
    assert est.n_features_in_ == 3 and est.certificate_ is None
    h = est.history_
    assert len(h["risk"]) == 61 and h["step"][-1] == 60 and h["t"][-1] == pytest.approx(60 * 0.2)
    assert h["risk"][-1] < h["risk"][0]
    # the last history entry is the training risk of the final particles: (1/2n)|f - y|^2
    assert h["risk"][-1] == pytest.approx(0.5 * np.mean((est.predict(X) - y) ** 2), rel=1e-12)
    est2 = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(est2.predict(X), est.predict(X))
    # same random_state, same fit, bit for bit; another random_state, another fit
    np.testing.assert_array_equal(clone(est).fit(X, y).particles_[1], w)
    assert not np.array_equal(clone(est).set_params(random_state=4).fit(X, y).particles_[1], w)
    # what a fitted estimator predicts is frozen at fit time
    before = est.predict(X)
    est.set_params(activation="relu", bias=False)
    np.testing.assert_array_equal(est.predict(X), before)


@pytest.mark.parametrize("output", ["trained", "bounded"])
def test_numpy_forward_matches_mfld_network(output):
    # the estimator predicts in NumPy float64; mfld.network.predict is the JAX network
    import jax

    from mfld import network
    from mfld.problem import Problem

    X, y = _regression(n=40, d=2)
    est = MFLDRegressor(n_particles=16, n_steps=30, eta=0.2, output=output, r_out=2.0, random_state=0,
                        certify=False).fit(X, y)
    a, w = est.particles_
    with jax.enable_x64(True):
        pb = Problem.create(X, y, activation="tanh", lam=1e-3, tau=1e-4, output=output, r_out=2.0,
                            dtype=np.float64)
        f = np.asarray(network.predict(pb, a, w))
    np.testing.assert_allclose(est.predict(X), f, rtol=1e-12, atol=1e-13)


def test_certificate_brackets_the_solvers_optimum():
    # d = 1 with bias: p = 2, so the certificate is by adaptive quadrature (certified). The bounds
    # must bracket F* from mfld.optimum.solve_optimum on the same objective.
    from mfld.optimum import solve_optimum
    from mfld.problem import Problem

    rng = np.random.default_rng(1)
    X = rng.uniform(-2, 2, (30, 1))
    y = np.tanh(1.5 * X[:, 0]) + 0.05 * rng.standard_normal(30)
    est = MFLDRegressor(n_particles=400, n_steps=400, lam=0.2, tau=0.05, eta=0.05, random_state=0).fit(X, y)
    c = est.certificate_
    assert c["certified"] == 1.0
    F_star = solve_optimum(Problem.create(X, y, activation="tanh", lam=0.2, tau=0.05)).F_star
    # the solver's own tolerance is 1e-6; the quadrature error is inside the bounds already
    assert c["dual_lower"] <= F_star + 1e-6 and F_star <= c["primal_upper"] + 1e-6
    # and 400 particles after t = 20 are close: the gap is small (O(1/N) plus the transient)
    assert c["gap"] < 0.02


def test_binary_classifier():
    X, y = make_classification(n_samples=120, n_features=4, n_informative=2, n_redundant=0, random_state=0)
    labels = np.array(["no", "yes"])[y]
    clf = MFLDClassifier(n_particles=32, n_steps=150, eta=0.2, random_state=0, certify=False).fit(X, labels)
    assert list(clf.classes_) == ["no", "yes"]
    f = clf.decision_function(X)
    p = clf.predict_proba(X)
    assert f.shape == (120,) and p.shape == (120, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-f)), rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), np.where(f > 0, "yes", "no"))
    assert clf.score(X, labels) > 0.85


def test_multiclass_one_vs_rest():
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    clf = MFLDClassifier(n_particles=32, n_steps=150, eta=0.2, random_state=0, lam=1e-2, tau=1e-3).fit(X, y)
    a, w = clf.particles_
    assert a.shape == (3, 32) and w.shape == (3, 32, 5)
    f = clf.decision_function(X)
    p = clf.predict_proba(X)
    assert f.shape == (150, 3) and p.shape == (150, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.predict(X), np.argmax(f, axis=1))
    assert clf.score(X, y) > 0.85
    # one-vs-rest: class k's particles are those of a binary fit of (y == k) with seed + k
    c = clf.certificate_
    assert len(c["per_class"]) == 3 and len(clf.history_) == 3
    assert c["dual_lower"] == pytest.approx(sum(pc["dual_lower"] for pc in c["per_class"]))
    assert c["primal_upper"] == pytest.approx(sum(pc["primal_upper"] for pc in c["per_class"]))


def test_bad_hyperparameters_raise_at_fit():
    X, y = _regression(n=10)
    for bad in (dict(n_particles=0), dict(lam=0.0), dict(tau=-1.0), dict(eta=float("nan")), dict(n_steps=2.5),
                dict(output="nope"), dict(batch_size=0)):
        est = MFLDRegressor(**bad)  # the constructor stores, never checks (scikit-learn's rule)
        with pytest.raises(ValueError):
            est.fit(X, y)


def test_readme_example_runs_and_certifies(monkeypatch, capsys):
    # examples/sklearn_estimator.py is the README's scikit-learn block (tests/test_examples.py)
    import runpy
    from pathlib import Path

    ns = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "sklearn_estimator.py"),
                        run_name="__main__")
    clf, fit = ns["clf"], ns["mfld_fit"]
    assert clf.score(ns["X"], ns["y"]) > 0.95
    c = fit.certificate_
    # 31 weights per neuron: Monte Carlo bounds (statistical). Either reported (ordered and, at this
    # temperature, tight) or withheld for a low effective sample size / heavy tails (measured: ESS
    # 4,939 of 65,536 < 10%, withheld = 3, bounds -inf/+inf); the point estimates still bracket closely
    assert c["certified"] == 0.0 and c["dual_lower"] <= c["primal_upper"]
    if c["withheld"]:
        assert c["withheld"] in (3.0, 4.0) and c["gap"] == float("inf")
    else:
        assert c["gap"] < 0.05
    assert 0 <= c["primal_value"] - c["dual_value"] < 0.05
    assert ns["a"].shape == (256,) and ns["w"].shape == (256, 31)
