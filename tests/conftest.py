"""Shared fixtures. Keep small.

``x64``: float64 for the duration of one test via JAX's scoped context (the library never
flips x64 globally). Use per module with ``pytestmark = pytest.mark.usefixtures("x64")``.
The suite runs with JAX's strict dtype promotion.
"""

import os

# strict dtype promotion for the whole suite (and the CLI subprocesses it starts): an implicit
# float32 -> float64 promotion (a Python float, a NumPy float64 scalar, the default dtype mixed
# with the data's) is an error here, not a silent change of precision
os.environ["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
