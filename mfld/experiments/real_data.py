"""``real-data``: MFLD on scikit-learn's bundled datasets against an MLP and a kernel method.

Datasets (``sklearn.datasets``, shipped with scikit-learn, no download): ``diabetes``
(regression, 442 x 10), ``breast_cancer`` (binary, 569 x 30), ``digits`` (10 classes, 1797 x 64,
fitted one-vs-rest by :class:`mfld.sklearn.MFLDClassifier`). Five random splits (75% train, 25%
test, ``ShuffleSplit`` seeds 0-4); inputs standardised with the training split's statistics
(a ``StandardScaler`` in a ``Pipeline``), the regression target too (so the test MSE is in
units of the training variance of y).

Methods (none tuned on the test data; every hyperparameter is fixed below, before the runs):

- ``MFLD``: :class:`mfld.sklearn.MFLDRegressor` / ``MFLDClassifier`` with the estimator's
  defaults lam = 1e-3, tau = 1e-4, eta = 0.05, tanh with bias, N neurons, T full-batch steps.
- ``MFLD (tau=1e-2)``: the same with lam = 0.1, tau = 1e-2 -- a temperature at which the
  certificate's Monte Carlo estimate of the partition function is usable (effective sample
  size in the hundreds or more) at these input dimensions, at some cost in accuracy.
- ``MLP``: ``MLPRegressor`` / ``MLPClassifier`` with the same width N, tanh, Adam, full-batch
  (batch_size = n) for T iterations (the same number of full gradient evaluations), default
  alpha = 1e-4 and learning rate.
- ``kernel``: ``KernelRidge(kernel="rbf", alpha=1, gamma=1/p)`` for regression, ``SVC(kernel="rbf",
  C=1, gamma="scale")`` for classification (scikit-learn's defaults; gamma = 1/p matches
  "scale" on standardised inputs).

Reported per dataset and method: test MSE (regression, with R^2) or accuracy, mean over the
splits with a 95% t-interval (4 degrees of freedom), fit + predict wall time (the median over
the splits after the first, and the first, which includes JAX's compilation), and for the MFLD
fits the final certificate (:func:`mfld.duality.certify`: dual lower bound <= F* <= primal upper
bound on the training objective's optimal free energy, their gap, the Monte Carlo effective
sample size and Pareto k; for digits the sums over the 10 one-vs-rest problems and the smallest
ESS). All bounds here are Monte Carlo (statistical, 2-SE margins), since the inputs have more
than 2 dimensions.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from mfld.experiments import _common as C

NAME = "real-data"
DATASETS = ("diabetes", "breast_cancer", "digits")


def _load(name):
    from sklearn import datasets as skd

    loader = {"diabetes": skd.load_diabetes, "breast_cancer": skd.load_breast_cancer, "digits": skd.load_digits}
    X, y = loader[name](return_X_y=True)
    return np.asarray(X, np.float64), np.asarray(y), name == "diabetes"


def _methods(regression: bool, n_train: int, p: int, N: int, T: int, quick: bool):
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.svm import SVC

    from mfld.sklearn import MFLDClassifier, MFLDRegressor

    M = MFLDRegressor if regression else MFLDClassifier
    certify = not quick
    out = {
        "MFLD": M(n_particles=N, n_steps=T, random_state=0, certify=certify),
        "MFLD (tau=1e-2)": M(n_particles=N, n_steps=T, lam=0.1, tau=1e-2, random_state=0, certify=certify),
    }
    mlp = MLPRegressor if regression else MLPClassifier
    out["MLP"] = mlp(hidden_layer_sizes=(N,), activation="tanh", batch_size=n_train, max_iter=T, random_state=0)
    out["kernel"] = (KernelRidge(kernel="rbf", alpha=1.0, gamma=1.0 / p) if regression
                     else SVC(kernel="rbf", C=1.0, gamma="scale"))
    return out


def _settings(quick: bool) -> dict:
    if quick:
        return dict(splits=2, rows=150, budget={d: (32, 100) for d in DATASETS}, digits_classes=3)
    return dict(splits=5, rows=None, budget={"diabetes": (256, 1000), "breast_cancer": (256, 1000),
                                             "digits": (128, 500)}, digits_classes=10)


def _interval(v):
    from scipy import stats

    v = np.asarray(v, np.float64)
    if v.size < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def _cert_summary(est):
    c = getattr(est, "certificate_", None)
    if not c:
        return {}
    if "per_class" in c:
        ess = min(pc["ess"] for pc in c["per_class"])
        k = max(pc["pareto_k"] for pc in c["per_class"])
    else:
        ess, k = c["ess"], c["pareto_k"]
    return {"dual_lower": c["dual_lower"], "primal_upper": c["primal_upper"], "gap": c["gap"], "ess": ess,
            "pareto_k": k}


def run(out_dir, quick: bool = False) -> dict:
    return C.run_stages(compute, plot, report, out_dir, quick)


def compute(quick: bool = False) -> dict:
    """Every method on every split of every data set: ``rows`` (one per fit), ``summ`` (per
    data set and method), ``methods`` and ``info`` (the data sets' sizes and budgets)."""
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, mean_squared_error
    from sklearn.model_selection import ShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    S = _settings(quick)
    rows = {k: [] for k in ("dataset", "method", "split", "metric", "value", "r2", "fit_predict_s", "dual_lower",
                            "primal_upper", "gap", "ess", "pareto_k")}
    info = {}
    for ds in C.stages(DATASETS, "datasets"):
        X, y, regression = _load(ds)
        if ds == "digits" and S["digits_classes"] < 10:
            keep = y < S["digits_classes"]
            X, y = X[keep], y[keep]
        if S["rows"] is not None and X.shape[0] > S["rows"]:
            sel = np.random.default_rng(0).permutation(X.shape[0])[: S["rows"]]
            X, y = X[sel], y[sel]
        N, T = S["budget"][ds]
        ss = ShuffleSplit(n_splits=S["splits"], test_size=0.25, random_state=0)
        info[ds] = dict(n=X.shape[0], p=X.shape[1], N=N, T=T, classes=None if regression else len(np.unique(y)))
        for split, (tr, te) in enumerate(ss.split(X)):
            Xtr, Xte, ytr, yte = X[tr], X[te], y[tr], y[te]
            if regression:
                my, sy = ytr.mean(), ytr.std()
                ytr, yte = (ytr - my) / sy, (yte - my) / sy
            for name, est in _methods(regression, len(tr), X.shape[1], N, T, quick).items():
                pipe = make_pipeline(StandardScaler(), clone(est))
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)  # the MLP at a fixed step budget
                    pipe.fit(Xtr, ytr)
                    pred = pipe.predict(Xte)
                dt = time.perf_counter() - t0
                if regression:
                    mse = float(mean_squared_error(yte, pred))
                    val, r2 = mse, 1.0 - mse / float(np.var(yte))
                else:
                    val, r2 = float(accuracy_score(yte, pred)), math.nan
                cs = _cert_summary(pipe[-1]) if name.startswith("MFLD") else {}
                C.append_row(rows, dataset=ds, method=name, split=split,
                             metric="test MSE (standardised y)" if regression else "test accuracy", value=val, r2=r2,
                             fit_predict_s=dt, **{k: cs.get(k, math.nan) for k in
                                                  ("dual_lower", "primal_upper", "gap", "ess", "pareto_k")})
    methods = list(dict.fromkeys(rows["method"]))
    summ = {k: [] for k in ("dataset", "method", "metric", "mean", "ci95", "r2_mean", "fit_predict_s", "first_fit_s",
                            "gap_mean",
                            "dual_lower_mean", "primal_upper_mean", "ess_min", "pareto_k_max")}
    for ds in DATASETS:
        for m in methods:
            sel = [i for i in range(len(rows["value"])) if rows["dataset"][i] == ds and rows["method"][i] == m]
            mean, ci = _interval([rows["value"][i] for i in sel])

            def col(k, sel=sel):
                return [rows[k][i] for i in sel]

            has_cert = all(math.isfinite(v) for v in col("gap"))
            has_ess = all(math.isfinite(v) for v in col("ess"))  # a Monte Carlo certificate ran (maybe withheld)
            C.append_row(summ, dataset=ds, method=m, metric=rows["metric"][sel[0]], mean=mean, ci95=ci,
                         r2_mean=float(np.mean(col("r2"))),
                         fit_predict_s=float(np.median(col("fit_predict_s")[1:] or col("fit_predict_s"))),
                         first_fit_s=col("fit_predict_s")[0],
                         gap_mean=float(np.mean(col("gap"))) if has_cert else math.nan,
                         dual_lower_mean=float(np.mean(col("dual_lower"))) if has_cert else math.nan,
                         primal_upper_mean=float(np.mean(col("primal_upper"))) if has_cert else math.nan,
                         ess_min=float(np.min(col("ess"))) if has_ess else math.nan,
                         pareto_k_max=float(np.max(col("pareto_k"))) if has_ess else math.nan)
    return dict(quick=quick, settings=S, rows=rows, summ=summ, methods=methods, info=info)


def plot(res: dict, out) -> None:
    """``real_data.png``: the test metric per method and data set, and the fit + predict times."""
    _figure(out, res["summ"], res["methods"])


def report(res: dict, out, *, wall: float) -> dict:
    """``runs.csv``, ``summary_table.csv``, ``report.md`` and ``summary.json``; returns the summary."""
    S, rows, summ, methods, info, quick = (res[k] for k in ("settings", "rows", "summ", "methods", "info", "quick"))
    C.write_csv(out / "runs.csv", rows)
    C.write_csv(out / "summary_table.csv", summ)

    def best(ds):
        sel = [i for i in range(len(summ["mean"])) if summ["dataset"][i] == ds]
        key = (lambda i: summ["mean"][i]) if ds == "diabetes" else (lambda i: -summ["mean"][i])
        i = min(sel, key=key)
        ci = lambda j: summ["ci95"][j] if math.isfinite(summ["ci95"][j]) else 0.0  # noqa: E731
        tied = [summ["method"][j] for j in sel if j != i and abs(summ["mean"][j] - summ["mean"][i]) <= ci(i) + ci(j)]
        return (f"{ds}: best {summ['method'][i]} ({summ['mean'][i]:.3f} +- {ci(i):.3f})"
                + (f", not separated from it by the intervals: {', '.join(tied)}" if tied else ", separated from "
                   "every other method by the intervals"))

    def cert_line(ds, m):
        i = next(i for i in range(len(summ["mean"])) if summ["dataset"][i] == ds and summ["method"][i] == m)
        if not math.isfinite(summ["gap_mean"][i]):
            if math.isfinite(summ["ess_min"][i]):
                return (f"{ds}/{m}: withheld in at least one split (ESS down to {summ['ess_min'][i]:.3g}, Pareto k "
                        f"up to {summ['pareto_k_max'][i]:.2f}; reported only at ESS >= max(100, 10% of the samples) "
                        "and k <= 0.7)")
            return f"{ds}/{m}: not computed"
        ok = summ["ess_min"][i] >= 100 and summ["pareto_k_max"][i] <= 0.7
        return (f"{ds}/{m}: gap {summ['gap_mean'][i]:.3g} (ESS >= {summ['ess_min'][i]:.0f}, k <= "
                f"{summ['pareto_k_max'][i]:.2f}: {'usable' if ok else 'NOT reliable'})")

    setting = "; ".join(f"{ds}: n = {v['n']}, p = {v['p']}" + (f", {v['classes']} classes" if v["classes"] else "")
                        + f", N = {v['N']}, T = {v['T']}" for ds, v in info.items())
    return C.finish(out, NAME, "Real data: MFLD against an MLP and a kernel method", [
        ("Setting", f"{setting}. {S['splits']} random 75/25 splits, inputs standardised on the training split "
                    f"(and the regression target). MFLD: mfld.sklearn estimators (tanh, bias, eta = 0.05, full "
                    f"batch); `MFLD` lam = 1e-3, tau = 1e-4 (the estimator's defaults); `MFLD (tau=1e-2)` lam = "
                    f"0.1, tau = 1e-2. MLP: same width, tanh, Adam, full batch, T iterations. kernel: RBF kernel "
                    f"ridge (alpha 1, gamma 1/p) / RBF SVC (C 1, gamma 'scale'). Nothing tuned. "
                    f"{'Quick (subsampled) ' if quick else 'Full '}setting; wall time {wall:.0f} s."),
        ("Results", "Mean over the splits with the half-width of the 95% t-interval (`ci95`); `fit_predict_s`: "
                    "median wall time of fit + predict over the splits after the first, `first_fit_s`: the first "
                    "split's, which for MFLD includes JAX's compilation of the training loop (once per data "
                    "shape; the second MFLD setting reuses it).\n\n" + C.md_table(summ)),
        ("What is expected", "No theorem ranks these methods on real data. What the theory gives is the "
                             "certificate: dual_lower <= F* <= primal_upper for the training objective "
                             "F = R + (lam/2) E|theta|^2 + tau Ent of the MFLD fit, so the gap bounds how far "
                             "the final particles' Gibbs measure is from optimal. In dimension > 2 the bounds are "
                             "Monte Carlo (statistical): they mean something only when the importance weights "
                             "do (ESS >= 100 and Pareto k <= 0.7); at tau = 1e-4 the Gibbs measure is far "
                             "narrower than the N(0, tau/lam) proposal in 10-65 dimensions and they do not."),
        ("Reading", " ".join(best(ds) + "." for ds in DATASETS) + " Certificates: "
                    + "; ".join(cert_line(ds, m) for ds in DATASETS for m in methods if m.startswith("MFLD")) + "."),
    ], quick=quick, wall=wall, files=["real_data.png", "runs.csv", "summary_table.csv"], table=summ, info=info)


def _figure(out, summ, methods):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, ds in zip(axes[:3], DATASETS, strict=True):
        sel = [i for i in range(len(summ["mean"])) if summ["dataset"][i] == ds]
        x = np.arange(len(sel))
        ax.bar(x, [summ["mean"][i] for i in sel], yerr=[np.nan_to_num(summ["ci95"][i]) for i in sel], capsize=4,
               color=[f"C{methods.index(summ['method'][i])}" for i in sel])
        ax.set_xticks(x)
        ax.set_xticklabels([summ["method"][i] for i in sel], rotation=20, fontsize=8)
        ax.set_ylabel(summ["metric"][sel[0]])
        ax.set_title(ds, fontsize=9)
        vals = [summ["mean"][i] for i in sel]
        if ds != "diabetes":
            ax.set_ylim(max(0.0, min(vals) - 0.1), 1.0)
    ax = axes[3]
    for k, m in enumerate(methods):
        sel = [i for i in range(len(summ["mean"])) if summ["method"][i] == m]
        ax.semilogy(range(len(sel)), [summ["fit_predict_s"][i] for i in sel], "o-", color=f"C{k}", label=m)
    ax.set_xticks(range(len(DATASETS)))
    ax.set_xticklabels(DATASETS, fontsize=8)
    ax.set_ylabel("fit + predict wall time (s)")
    ax.legend(fontsize=7)
    C.savefig(fig, out / "real_data.png")
