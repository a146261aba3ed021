"""Property-based tests of the Brenier map at random parameters and points.

Hypothesis draws a potential (dimension, network widths, output power, a seed
and a perturbation of every parameter away from its initial value) and a few
points, and checks three exact properties in float64:

- convexity: every eigenvalue of ``Hess u(x)`` is at least ``min_eigenvalue``;
- invertibility: ``T^{-1}(T(x)) = x`` for ``T = grad u``;
- change of variables: ``log q(T(x)) = log N(x; 0, I) - log det Hess u(x)``,
  with ``log q`` computed by NumPyro's ``TransformedDistribution`` through the
  inverse map.

``derandomize=True`` makes every run draw the same examples, so a failure
reproduces.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numpyro_pma.potential import BrenierPotential
from numpyro_pma.transform import BrenierTransform, map_and_logdet

MIN_EIGENVALUE = 1e-3
NUM_POINTS = 4
PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@functools.cache
def make_potential(dim, hidden_sizes, output_power):
    return BrenierPotential(
        dim=dim,
        hidden_sizes=hidden_sizes,
        min_eigenvalue=MIN_EIGENVALUE,
        output_power=output_power,
    )


def random_params(potential, seed, perturbation):
    """Initial parameters plus ``perturbation * N(0, 1)`` noise on every entry."""
    init_key, noise_key = jax.random.split(jax.random.key(seed))
    params = potential.init(init_key, jnp.zeros(potential.dim))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(noise_key, len(leaves))
    noisy = [
        leaf + perturbation * jax.random.normal(key, leaf.shape, leaf.dtype)
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


@st.composite
def potentials_and_points(draw):
    dim = draw(st.sampled_from([1, 3]))
    hidden_sizes = draw(st.sampled_from([(), (4, 3)]))
    # The output power only matters with a network.
    output_power = draw(st.sampled_from([1, 3])) if hidden_sizes else 1
    seed = draw(st.integers(0, 2**16))
    # Up to 2: the network's output weights softplus(-6 + 2 z) reach O(1).
    perturbation = draw(st.floats(0.0, 2.0))
    points = draw(
        st.lists(
            st.lists(st.floats(-4.0, 4.0), min_size=dim, max_size=dim),
            min_size=NUM_POINTS,
            max_size=NUM_POINTS,
        )
    )
    potential = make_potential(dim, hidden_sizes, output_power)
    params = random_params(potential, seed, perturbation)
    return potential, params, jnp.asarray(points, jnp.float64)


class MapProperties(NamedTuple):
    hessians: jax.Array  # (NUM_POINTS, dim, dim)
    images: jax.Array  # T(x), (NUM_POINTS, dim)
    recovered: jax.Array  # T^{-1}(T(x)), (NUM_POINTS, dim)
    residual: jax.Array  # T(T^{-1}(T(x))) - T(x), (NUM_POINTS, dim)
    log_q: jax.Array  # log q(T(x)) through the inverse, (NUM_POINTS,)
    log_q_forward: jax.Array  # log N(x) - log det Hess u(x), (NUM_POINTS,)


@functools.cache
def properties_fn(potential):
    """Compile once per potential configuration; the three tests share it."""

    def properties(params, x):
        transform = BrenierTransform(potential, params)
        hessians = jax.vmap(
            jax.hessian(lambda y: potential.apply({"params": params}, y))
        )(x)
        images = transform(x)
        recovered = transform.inv(images)
        base = dist.Normal(jnp.zeros(potential.dim), 1.0).to_event(1)
        guide = dist.TransformedDistribution(base, transform)
        # A plain array carries no intermediates, so log_prob inverts the map.
        log_q = guide.log_prob(images)
        _, logdet = jax.vmap(
            lambda point: map_and_logdet(transform.potential_fn, point)
        )(x)
        return MapProperties(
            hessians=hessians,
            images=images,
            recovered=recovered,
            residual=transform(recovered) - images,
            log_q=log_q,
            log_q_forward=base.log_prob(x) - logdet,
        )

    return jax.jit(properties)


@PROPERTY_SETTINGS
@given(potentials_and_points())
def test_hessian_eigenvalues_at_least_min_eigenvalue(case):
    potential, params, points = case
    hessians = np.asarray(properties_fn(potential)(params, points).hessians)
    eigenvalues = np.linalg.eigvalsh(hessians)
    # The bound is exact: L L^T is PSD and the network convex. Eigenvalue
    # rounding in float64 is below 1e-12 times the largest eigenvalue.
    tolerance = 1e-12 * np.maximum(1.0, np.abs(eigenvalues).max(-1, keepdims=True))
    assert np.all(eigenvalues >= MIN_EIGENVALUE - tolerance)
    np.testing.assert_allclose(hessians, np.swapaxes(hessians, -1, -2), atol=1e-12)


@PROPERTY_SETTINGS
@given(potentials_and_points())
def test_inverse_round_trip(case):
    potential, params, points = case
    result = properties_fn(potential)(params, points)
    # Newton stops once max |grad u(x) - y| <= 100 eps (1 + max |y|); since
    # Hess u >= 1e-3 I, the error in x is at most 1e3 times that residual.
    eps = np.finfo(np.float64).eps
    residual_bound = 100 * eps * (1.0 + np.abs(np.asarray(result.images)).max(-1))
    residual = np.abs(np.asarray(result.residual)).max(-1)
    assert np.all(residual <= 10 * residual_bound)
    error = np.abs(np.asarray(result.recovered) - np.asarray(points)).max(-1)
    assert np.all(error <= 10 * residual_bound / MIN_EIGENVALUE)


@PROPERTY_SETTINGS
@given(potentials_and_points())
def test_log_density_change_of_variables(case):
    potential, params, points = case
    result = properties_fn(potential)(params, points)
    # log q goes through the inverse (x error below 1e-8 by the round-trip
    # bound), so both sides agree to that error times the gradients of log N
    # and log det, which are O(10) on [-4, 4]^d.
    np.testing.assert_allclose(result.log_q, result.log_q_forward, rtol=0, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(result.log_q)))
