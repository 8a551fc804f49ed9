"""mfld: simulate, measure and certify mean-field Langevin dynamics of two-layer networks.

The public API is re-exported here lazily, so that ``import mfld`` (and the CLI's config
validation) does not import JAX until a numerical name is used.

Step convention (mean-field scaling), time t = step * eta::

    theta_i <- theta_i - eta * grad V_rho(theta_i) + sqrt(2 * eta * tau) * xi_i
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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

__all__ = [  # sorted(_EXPORTS) + ["__version__"] (a test checks), literal for linters and IDEs
    "Activation", "Config", "ConfigError", "Dataset", "History", "Langevin", "Loss", "ParticleState",
    "Problem", "RunResult", "StepInfo", "TheoryNotApplicable", "certify", "from_callable", "init_particles",
    "load_run", "make_dataset", "run", "run_steps", "simulate", "solve_optimum", "step", "teacher_student",
    "__version__",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as _EXPORTS (a test checks)
    from mfld.activations import Activation, from_callable
    from mfld.app.rundir import load_run
    from mfld.app.runner import RunResult, run
    from mfld.config import Config
    from mfld.data import Dataset, make_dataset, teacher_student
    from mfld.duality import certify
    from mfld.dynamics import Langevin, ParticleState, StepInfo, init_particles, run_steps, step
    from mfld.errors import ConfigError, TheoryNotApplicable
    from mfld.loop import History, simulate
    from mfld.losses import Loss
    from mfld.optimum import solve_optimum
    from mfld.problem import Problem


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mfld' has no attribute {name!r}")


def __dir__():
    return __all__
