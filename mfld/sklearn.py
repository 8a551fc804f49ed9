"""scikit-learn estimators: a mean-field two-layer network trained by MFLD, with its certificate.

``MFLDRegressor`` (squared loss) and ``MFLDClassifier`` (logistic loss) follow scikit-learn's
estimator API (``fit``/``predict``/``score``, ``get_params``/``set_params``, ``clone``), pass
its estimator checks (``sklearn.utils.estimator_checks``; ``tests/test_sklearn.py``) and work
in ``Pipeline`` and ``GridSearchCV``. They need the optional extra ``pip install 'mfld[sklearn]'``
(scikit-learn >= 1.6).

What ``fit`` does: builds a :class:`mfld.problem.Problem` from (X, y) (mean-field scaling, bias
feature appended when ``bias=True``), draws ``n_particles`` particles
(:func:`mfld.dynamics.init_particles`, a ~ N(0, 1), w ~ N(0, I)), runs ``n_steps`` steps of
noisy gradient descent (:func:`mfld.dynamics.run_steps`, step ``eta``, temperature ``tau``,
weight decay ``lam``) and, with ``certify=True`` and ``tau > 0``, certifies the final particles
(:func:`mfld.duality.certify`: a lower bound ``dual_lower`` <= F* and an upper bound
``primal_upper`` >= F* on the optimal free energy of the training objective; certified for
d + bias <= 2 input features, a Monte Carlo estimate with 2-SE margins -- ``certified`` 0, read
``ess``/``pareto_k`` -- above). Inputs are not rescaled: put a ``StandardScaler`` in front (a
``Pipeline``), and for regression targets far from unit scale use
``TransformedTargetRegressor`` or scale y yourself -- lam and tau are in the units of the loss.

Fitted attributes: ``particles_`` (a tuple ``(a, w)`` of float64 arrays, ``a`` (N,) and ``w``
(N, p), p = n_features_in_ + bias; for a multiclass classifier ``a`` (K, N) and ``w`` (K, N, p),
one particle system per class), ``history_`` (a dict of 1-D arrays of length n_steps + 1:
``step``, ``t`` = step * eta and ``risk``, the training risk before each step -- the
minibatch's risk when ``batch_size`` is set -- and, last, the full training risk of the final
particles; a list of K such dicts for a multiclass classifier), ``certificate_`` (the dict of
:func:`mfld.duality.certify`, or ``None`` when ``certify=False`` or ``tau = 0``; for a
multiclass classifier the sums of the K per-class bounds -- the one-vs-rest objective is the
sum of K independent free energies -- with ``per_class``),
``n_features_in_`` (and ``feature_names_in_`` for a DataFrame), ``classes_`` (classifier).

Classification: two classes are one logistic MFLD problem (labels -1/+1 for ``classes_[0]`` /
``classes_[1]``; ``predict_proba`` = sigmoid(f)). More classes are fitted one-vs-rest: one
binary problem per class (seed ``random_state + k``), ``decision_function`` returns the K
network outputs, ``predict`` their argmax and ``predict_proba`` the per-class sigmoids
normalised to sum to one.

Prediction is NumPy float64 (no JAX), so fitted estimators pickle and predict without
compiling anything. Training runs in JAX's default precision (float32 unless x64 is enabled).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from mfld import choices

__all__ = ["MFLDRegressor", "MFLDClassifier"]

_PREDICT_BLOCK = 1 << 22  # (particles x rows) entries per block of the NumPy forward pass
_RUN_STEPS = []


def _run_steps():
    """``mfld.dynamics.run_steps`` compiled with mfld's XLA options (built once, at first use)."""
    if not _RUN_STEPS:
        from mfld import dynamics, xla

        _RUN_STEPS.append(xla.jit(dynamics.run_steps, static_argnames=("n_steps",)))
    return _RUN_STEPS[0]


class _MFLDBase(BaseEstimator):
    _loss = "squared"

    def __init__(self, n_particles=256, lam=1e-3, tau=1e-4, eta=0.05, n_steps=1000, activation="tanh", bias=True,
                 output="trained", r_out=1.0, batch_size=None, random_state=None, certify=True):
        self.n_particles = n_particles
        self.lam = lam
        self.tau = tau
        self.eta = eta
        self.n_steps = n_steps
        self.activation = activation
        self.bias = bias
        self.output = output
        self.r_out = r_out
        self.batch_size = batch_size
        self.random_state = random_state
        self.certify = certify

    # ---- checks of the hyperparameters (at fit time, as scikit-learn asks) ----
    def _check_params(self):
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        def number(name, low, strict):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or \
                    (v <= low if strict else v < low):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {v!r}")

        positive_int("n_particles")
        positive_int("n_steps")
        number("lam", 0.0, True)
        number("tau", 0.0, False)
        number("eta", 0.0, True)
        number("r_out", 0.0, True)
        if self.batch_size is not None:
            positive_int("batch_size")
        if self.output not in choices.OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(choices.OUTPUTS)}, got {self.output!r}")

    def _seed(self, rs) -> int:
        return int(rs.randint(0, 2 ** 31 - 1))

    # ---- one MFLD problem ----
    def _fit_one(self, X, y, seed: int):
        """Train one particle system on (X, y) (y already in the loss's convention)."""
        from mfld import dynamics
        from mfld.problem import Problem

        pb = Problem.create(X, y, activation=self.activation, loss=self._loss, lam=self.lam, tau=self.tau,
                            bias=self.bias, output=self.output, r_out=self.r_out)
        state = dynamics.init_particles(pb, self.n_particles, seed)
        stepper = dynamics.Langevin(self.eta, batch_size=self.batch_size)
        # one compiled lax.scan over all the steps (mfld.dynamics.run_steps); its per-step
        # outputs are the history, so nothing else is compiled per fit
        state, info = _run_steps()(pb, state, stepper, n_steps=self.n_steps)
        a = np.asarray(state.a, np.float64)
        w = np.asarray(state.w, np.float64)
        f = self._forward(X, a, w, self._network_spec())
        from mfld.losses import get_loss

        final = float(np.mean(get_loss(self._loss).np_value(f, y)))
        risk = np.append(np.asarray(info.risk, np.float64), final)
        steps = np.arange(self.n_steps + 1)
        hist = {"step": steps, "t": steps * float(self.eta), "risk": risk}
        cert = None
        if self.certify and self.tau > 0:
            from mfld import duality

            cert = duality.certify(pb, state.a, state.w, seed=seed)
        return a, w, hist, cert

    # ---- the network in NumPy float64 ----
    def _network_spec(self) -> dict:
        """What the forward pass needs, frozen at fit time (``_spec_``): a later ``set_params``
        does not change what a fitted estimator predicts."""
        from mfld.activations import get_activation

        get_activation(self.activation)  # fails early on an unknown name
        return {"activation": self.activation, "bias": bool(self.bias), "bounded": self.output == "bounded",
                "r_out": float(self.r_out)}

    def _forward(self, X, a, w, spec=None):
        """f(X) = (1/N) sum_i a_eff,i sigma(w_i . [X, 1]) (``spec``: default the fitted one)."""
        spec = spec or self._spec_
        if spec["bias"]:
            X = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
        a_eff = spec["r_out"] * np.tanh(a) if spec["bounded"] else a
        from mfld.activations import get_activation

        sigma = get_activation(spec["activation"]).np_fn
        rows = max(1, _PREDICT_BLOCK // max(1, w.shape[0]))
        out = np.empty(X.shape[0])
        for s in range(0, X.shape[0], rows):
            out[s:s + rows] = sigma(X[s:s + rows] @ w.T) @ a_eff / a_eff.shape[0]
        return out

    def _validate_predict(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # deterministic for an integer random_state (the noise is seeded; the checks set random_state=0)
        tags.non_deterministic = False
        return tags


class MFLDRegressor(RegressorMixin, _MFLDBase):
    """A mean-field two-layer network fitted by mean-field Langevin dynamics (squared loss).

    Parameters:
        n_particles: number of neurons N.
        lam: weight decay (> 0) of the objective F = R + (lam/2) E|theta|^2 + tau Ent.
        tau: temperature (>= 0; 0 is the noiseless gradient flow, and then no certificate).
        eta: time step of the dynamics (mean-field convention: time t = step * eta).
        n_steps: number of steps.
        activation: an mfld activation name (``tanh``, ``relu``, ``erf``, ``quadratic``, ...) or a callable.
        bias: append a constant-1 input feature.
        output: ``trained`` (a sigma(w.x)), ``fixed`` (a = +-1) or ``bounded`` (r_out tanh(a) sigma(w.x)).
        r_out: the bound of a ``bounded`` output layer.
        batch_size: minibatch size (``None``: full batch).
        random_state: seed of the initialisation and the noise (int, RandomState or None).
        certify: compute ``certificate_`` (dual/primal bounds on F*) after training.

    See the module docstring for the fitted attributes.
    """

    _loss = "squared"

    def fit(self, X, y):
        """Fit the particles to (X, y); returns self."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        spec = self._network_spec()
        rs = check_random_state(self.random_state)
        a, w, hist, cert = self._fit_one(X, y, self._seed(rs))
        self.particles_ = (a, w)
        self.history_ = hist
        self.certificate_ = cert
        self._spec_ = spec
        return self

    def predict(self, X):
        """The network's output on X."""
        X = self._validate_predict(X)
        return self._forward(X, *self.particles_)


class MFLDClassifier(ClassifierMixin, _MFLDBase):
    """A mean-field two-layer network fitted by mean-field Langevin dynamics (logistic loss).

    Two classes: one problem with labels -1 (``classes_[0]``) and +1 (``classes_[1]``). More:
    one-vs-rest, one particle system per class. Parameters as :class:`MFLDRegressor`.
    """

    _loss = "logistic"

    def fit(self, X, y):
        """Fit the particles to (X, y); returns self."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        spec = self._network_spec()
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        codes = enc.transform(y)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(f"MFLDClassifier needs samples of at least two classes; got one class "
                             f"({self.classes_[0]!r})")
        rs = check_random_state(self.random_state)
        seed = self._seed(rs)
        if k == 2:
            a, w, hist, cert = self._fit_one(X, np.where(codes == 1, 1.0, -1.0), seed)
            self.particles_ = (a, w)
            self.history_ = hist
            self.certificate_ = cert
            self._spec_ = spec
            return self
        fits = [self._fit_one(X, np.where(codes == c, 1.0, -1.0), seed + c) for c in range(k)]
        self._spec_ = spec
        self.particles_ = (np.stack([f[0] for f in fits]), np.stack([f[1] for f in fits]))
        self.history_ = [f[2] for f in fits]
        certs = [f[3] for f in fits]
        if any(c is None for c in certs):
            self.certificate_ = None
        else:
            self.certificate_ = {
                "dual_lower": float(sum(c["dual_lower"] for c in certs)),
                "primal_upper": float(sum(c["primal_upper"] for c in certs)),
                "gap": float(sum(c["gap"] for c in certs)),
                "certified": float(min(c["certified"] for c in certs)),
                "per_class": certs,
            }
        return self

    def decision_function(self, X):
        """The network output f(X) (binary, shape (n,): > 0 means ``classes_[1]``), or the K
        one-vs-rest outputs (n, K)."""
        X = self._validate_predict(X)
        a, w = self.particles_
        if a.ndim == 1:
            return self._forward(X, a, w)
        return np.stack([self._forward(X, a[c], w[c]) for c in range(a.shape[0])], axis=1)

    def predict_proba(self, X):
        """Class probabilities: sigmoid(f) (binary); one-vs-rest sigmoids normalised (multiclass)."""
        from scipy.special import expit

        f = self.decision_function(X)
        if f.ndim == 1:
            p1 = expit(f)
            return np.stack([1.0 - p1, p1], axis=1)
        p = expit(f)
        s = p.sum(axis=1, keepdims=True)
        return np.where(s > 0, p / np.where(s > 0, s, 1.0), 1.0 / p.shape[1])

    def predict_log_proba(self, X):
        return np.log(self.predict_proba(X))

    def predict(self, X):
        """The predicted class labels."""
        f = self.decision_function(X)
        if f.ndim == 1:
            return self.classes_[(f > 0).astype(int)]
        return self.classes_[np.argmax(f, axis=1)]
