"""mfld: simulate, measure and certify mean-field Langevin dynamics of two-layer networks.

The public API is re-exported here lazily, so that ``import mfld`` (and the CLI's config
validation) does not import JAX until a numerical name is used.

Step convention (mean-field scaling), time t = step * eta::

    theta_i <- theta_i - eta * grad V_rho(theta_i) + sqrt(2 * eta * tau) * xi_i
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Problem": "mfld.problem",
    "ParticleState": "mfld.dynamics",
    "Langevin": "mfld.dynamics",
    "StepInfo": "mfld.dynamics",
    "History": "mfld.loop",
    "init_particles": "mfld.dynamics",
    "step": "mfld.dynamics",
    "simulate": "mfld.loop",
    "run_steps": "mfld.dynamics",
    "Activation": "mfld.activations",
    "from_callable": "mfld.activations",
    "Loss": "mfld.losses",
    "Dataset": "mfld.data",
    "make_dataset": "mfld.data",
    "teacher_student": "mfld.data",
    "Config": "mfld.config",
    "ConfigError": "mfld.errors",
    "TheoryNotApplicable": "mfld.errors",
    "run": "mfld.app.runner",
    "RunResult": "mfld.app.runner",
    "load_run": "mfld.app.rundir",
    "certify": "mfld.duality",
    "solve_optimum": "mfld.optimum",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mfld' has no attribute {name!r}")


def __dir__():
    return __all__
