"""Shared test configuration.

Tests that need exact arithmetic switch JAX to float64 for their module with
the ``x64`` fixture; the package itself defaults to float32.
"""

import jax
import pytest


@pytest.fixture
def x64():
    """Run one test in float64, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
