"""Convexity, invertibility and the change-of-variables identity of the map."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from numpyro_pma.potential import BrenierPotential
from numpyro_pma.transform import BrenierTransform, map_and_logdet

DIM = 4


def random_transform(seed, hidden_sizes=(8, 8)):
    """A potential whose network part is far from zero (weights ~ O(1))."""
    potential = BrenierPotential(dim=DIM, hidden_sizes=hidden_sizes)
    params = potential.init(jax.random.key(seed), jnp.zeros(DIM))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [
        leaf + 0.5 * jax.random.normal(key, leaf.shape, leaf.dtype)
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(treedef, leaves)
    params["network"]["output"] = jnp.zeros_like(params["network"]["output"])
    return BrenierTransform(potential, params)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_is_positive_definite(x64, seed):
    transform = random_transform(seed)
    points = 2.0 * jax.random.normal(jax.random.key(seed), (50, DIM))
    hessians = jax.vmap(jax.hessian(transform.potential_fn))(points)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessians))
    # Hess u >= epsilon I by construction (epsilon = min_eigenvalue).
    assert eigenvalues.min() >= transform.potential.min_eigenvalue * (1 - 1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_map_is_monotone(x64, seed):
    # Gradients of strictly convex functions satisfy
    # <T(x) - T(y), x - y> >= epsilon |x - y|^2.
    transform = random_transform(seed)
    x = jax.random.normal(jax.random.key(seed), (100, DIM)) * 3
    y = jax.random.normal(jax.random.key(seed + 1), (100, DIM)) * 3
    inner = jnp.sum((transform(x) - transform(y)) * (x - y), -1)
    bound = transform.potential.min_eigenvalue * jnp.sum((x - y) ** 2, -1)
    assert bool(jnp.all(inner >= bound * (1 - 1e-9)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_round_trip(x64, seed):
    transform = random_transform(seed)
    x = 2.0 * jax.random.normal(jax.random.key(seed), (30, DIM))
    y = transform(x)
    np.testing.assert_allclose(transform.inv(y), x, atol=1e-9)
    # And the other way round, from points the map did not produce.
    z = 3.0 * jax.random.normal(jax.random.key(seed + 7), (30, DIM))
    np.testing.assert_allclose(transform(transform.inv(z)), z, atol=1e-9)


def test_logdet_intermediate_matches_slogdet(x64):
    transform = random_transform(3)
    x = jax.random.normal(jax.random.key(3), (20, DIM))
    y, logdet = transform.call_with_intermediates(x)
    hessians = jax.vmap(jax.hessian(transform.potential_fn))(x)
    sign, expected = np.linalg.slogdet(np.asarray(hessians))
    assert np.all(sign > 0)
    np.testing.assert_allclose(logdet, expected, atol=1e-10)
    np.testing.assert_allclose(y, transform(x), atol=1e-12)


def test_log_prob_change_of_variables(x64):
    # log q(T(x)) = log N(x; 0, I) - log det Hess u(x), both through the cached
    # intermediates and through the Newton inverse.
    transform = random_transform(4)
    base = dist.Normal(jnp.zeros(DIM), 1.0).to_event(1)
    guide_dist = dist.TransformedDistribution(base, [transform])
    x = jax.random.normal(jax.random.key(4), (25, DIM))
    y, logdet = transform.call_with_intermediates(x)
    expected = base.log_prob(x) - logdet
    np.testing.assert_allclose(guide_dist.log_prob(y), expected, atol=1e-9)
    z, intermediates = guide_dist.sample_with_intermediates(jax.random.key(5), (25,))
    np.testing.assert_allclose(
        guide_dist.log_prob(z, intermediates), guide_dist.log_prob(z), atol=1e-9
    )


def test_log_prob_integrates_to_one_in_one_dimension(x64):
    # A normalization check that does not reuse the change-of-variables code:
    # integrate q on a fine grid in d = 1.
    potential = BrenierPotential(dim=1, hidden_sizes=(6,))
    params = potential.init(jax.random.key(9), jnp.zeros(1))["params"]
    params["network"]["output"] = jnp.ones_like(params["network"]["output"])
    transform = BrenierTransform(potential, params)
    guide_dist = dist.TransformedDistribution(
        dist.Normal(jnp.zeros(1), 1.0).to_event(1), [transform]
    )
    grid = jnp.linspace(-15.0, 15.0, 6001)[:, None]
    density = jnp.exp(guide_dist.log_prob(grid))
    assert float(jnp.trapezoid(density, grid[:, 0])) == pytest.approx(1.0, abs=1e-6)


def test_transform_is_a_pytree(x64):
    transform = random_transform(0)
    leaves, treedef = jax.tree.flatten(transform)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    x = jnp.ones((2, DIM))
    np.testing.assert_allclose(rebuilt(x), transform(x))


def test_large_dimension_without_tails_uses_exact_low_rank(x64):
    # Above 256 dimensions a potential without axis tails gets its log
    # determinant from the determinant lemma. It must equal the Cholesky
    # value, also where the network's curvature matters.
    dim = 260
    potential = BrenierPotential(dim=dim, hidden_sizes=(6, 5), axis_tails=False)
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    network = params["network"]
    params = {**params, "network": {**network, "output": network["output"] + 9.0}}
    transform = BrenierTransform(potential, params)
    x = jax.random.normal(jax.random.key(1), (2, 3, dim))
    mapped, logdet = transform.call_with_intermediates(x)
    expected_map, expected_logdet = jax.vmap(
        jax.vmap(lambda point: map_and_logdet(transform.potential_fn, point))
    )(x)
    quadratic_only = jnp.linalg.slogdet(
        jnp.tril(params["scale_tril"]) @ jnp.tril(params["scale_tril"]).T
        + potential.min_eigenvalue * jnp.eye(dim)
    )[1]
    assert logdet.shape == (2, 3)
    assert float(jnp.min(jnp.abs(expected_logdet - quadratic_only))) > 0.1
    np.testing.assert_allclose(mapped, expected_map, atol=1e-10)
    np.testing.assert_allclose(logdet, expected_logdet, atol=1e-9)
