"""Shared fixtures. Keep small.

``x64``: float64 for the duration of one test via JAX's scoped context (the library never
flips x64 globally). Use per module with ``pytestmark = pytest.mark.usefixtures("x64")``.
"""

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
