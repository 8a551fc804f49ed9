"""MFLD as a scikit-learn classifier, with its certificate: the README's third example (executed by
the tests)."""

from sklearn.datasets import load_breast_cancer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mfld.sklearn import MFLDClassifier

X, y = load_breast_cancer(return_X_y=True)
clf = make_pipeline(StandardScaler(), MFLDClassifier(n_particles=256, lam=0.1, tau=1e-2, n_steps=500,
                                                     random_state=0)).fit(X, y)
mfld_fit = clf[-1]
print(clf.score(X, y), mfld_fit.certificate_["dual_lower"], mfld_fit.certificate_["primal_upper"])
a, w = mfld_fit.particles_                  # the neurons; mfld_fit.history_["risk"] the training curve
