"""The vocabulary of discrete choices, in one JAX-free place.

The config schema (:mod:`mfld.config`, validated before JAX is imported), the core modules that
implement each choice and the error messages all take their names from here, so that a name
the config accepts is one the core implements and the other way round (``tests/test_layers.py``
checks the registries against these tuples).
"""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS", "OUTPUTS", "SCALINGS", "LOSSES", "SCHEMES", "TAU_SCHEDULES", "CERTIFY_METHODS",
    "PROPOSALS", "PRECISIONS", "DATA_KINDS", "closed_form_applies", "plus_count",
]

#: Registered activations (:data:`mfld.activations.ACTIVATIONS`, with NumPy forms in
#: :data:`mfld.activations_numpy.NUMPY_FORMS`).
ACTIVATIONS = ("tanh", "sigmoid", "erf", "relu", "softplus", "gelu", "linear", "quadratic")
#: The output layer: trained a_i, fixed signs a_i = +-1, or bounded r_out tanh(a_i).
OUTPUTS = ("trained", "fixed", "bounded")
#: 1/N (mean-field) or 1/sqrt(N) (NTK) output scaling.
SCALINGS = ("mean_field", "ntk")
#: Losses (:data:`mfld.losses.LOSSES`).
LOSSES = ("squared", "logistic")
#: Time discretisations of the Langevin SDE (:class:`mfld.dynamics.Langevin`).
SCHEMES = ("euler", "ou")
#: Temperature schedules.
TAU_SCHEDULES = ("constant", "log")
#: How the Gibbs integral over w is computed for the certificates (:mod:`mfld.gibbs`).
CERTIFY_METHODS = ("auto", "closed_form", "quadrature", "mc")
#: Monte Carlo importance proposals (:func:`mfld.gibbs.adapt_proposal`, or the prior).
PROPOSALS = ("adapted", "prior")
#: Floating-point precision of a run.
PRECISIONS = ("float32", "float64")
#: Data generators (:data:`mfld.data.GENERATORS`).
DATA_KINDS = ("teacher_student", "single_index", "gaussian_mixture", "sparse_parity", "sklearn", "file")


def closed_form_applies(linear: bool, output: str) -> bool:
    """Whether the certificate's Gibbs integral has a closed form: a (registered) linear
    activation with a trained or fixed output layer (the Gibbs measure is Gaussian)."""
    return bool(linear) and output in ("trained", "fixed")


def plus_count(plus_fraction: float, n: int) -> int:
    """How many of ``n`` fixed output weights are +1: round(plus_fraction * n) (the first ones;
    the rest are -1). One rule for the particles, the optimum and the checks."""
    return int(round(float(plus_fraction) * int(n)))
