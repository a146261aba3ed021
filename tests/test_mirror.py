"""The mirror step against the exact Gaussian recursion.

With a purely quadratic potential ``u(x) = x'Ax/2 + b'x`` and a Gaussian target
``N(m, S)`` the residual is quadratic in ``x``, the least-squares projection is
exact, and one mirror step of size ``eta`` is

    A_{k+1} = A_k + eta (I - A_k S^-1 A_k)
    b_{k+1} = b_k - eta A_k S^-1 (b_k - m).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_pma.mirror import mirror_descent
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients
from numpyro_pma.projection import quadratic_feature_count

DIM = 3


def gaussian_target(seed=0):
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(DIM, DIM))
    covariance = factor @ factor.T / DIM + 0.5 * np.eye(DIM)
    mean = rng.normal(size=DIM)
    precision = np.linalg.inv(covariance)

    def logdensity_fn(z):
        centered = z - mean
        return -0.5 * centered @ precision @ centered

    return mean, covariance, logdensity_fn


def quadratic_algorithm(logdensity_fn, step_size, **kwargs):
    potential = BrenierPotential(dim=DIM, hidden_sizes=(), min_eigenvalue=1e-3)
    params = potential.init(jax.random.key(0), jnp.zeros(DIM))["params"]
    options = dict(
        num_particles=4 * quadratic_feature_count(DIM),
        quadratic_projection="lstsq",
        rejection_threshold=jnp.inf,
    )
    options.update(kwargs)
    algorithm = mirror_descent(logdensity_fn, potential, step_size, **options)
    return potential, algorithm, algorithm.init(params)


def test_quadratic_step_matches_gaussian_recursion(x64):
    mean, covariance, logdensity_fn = gaussian_target()
    precision = np.linalg.inv(covariance)
    step_size = 0.3
    potential, algorithm, state = quadratic_algorithm(logdensity_fn, step_size)
    step = jax.jit(algorithm.step)

    matrix, shift = np.eye(DIM), np.zeros(DIM)
    for k in range(25):
        state, info = step(jax.random.key(k), state)
        assert bool(info.accepted)
        matrix, shift = (
            matrix + step_size * (np.eye(DIM) - matrix @ precision @ matrix),
            shift - step_size * matrix @ precision @ (shift - mean),
        )
        fitted_matrix, fitted_shift = quadratic_coefficients(
            state.params, potential.min_eigenvalue
        )
        # Exact arithmetic up to float64 rounding through a least-squares solve.
        np.testing.assert_allclose(fitted_matrix, matrix, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(fitted_shift, shift, atol=1e-9, rtol=1e-9)


def test_quadratic_fixed_point_is_square_root(x64):
    mean, covariance, logdensity_fn = gaussian_target(seed=1)
    potential, algorithm, state = quadratic_algorithm(logdensity_fn, 0.4)
    step = jax.jit(algorithm.step)
    for k in range(200):
        state, _ = step(jax.random.key(k), state)
    matrix, shift = quadratic_coefficients(state.params, potential.min_eigenvalue)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    square_root = vectors @ np.diag(np.sqrt(eigenvalues)) @ vectors.T
    np.testing.assert_allclose(matrix, square_root, atol=1e-8)
    np.testing.assert_allclose(shift, mean, atol=1e-8)


def test_exact_elbo_at_fixed_point_is_log_normalizer(x64):
    # With q = pi the residual is constant: r = -log Z for every draw, and the
    # target here is unnormalized with log Z = log sqrt((2 pi)^d det S).
    mean, covariance, logdensity_fn = gaussian_target(seed=2)
    potential, algorithm, state = quadratic_algorithm(logdensity_fn, 0.4)
    step = jax.jit(algorithm.step)
    for k in range(200):
        state, info = step(jax.random.key(k), state)
    log_normalizer = 0.5 * (DIM * np.log(2 * np.pi) + np.linalg.slogdet(covariance)[1])
    assert float(info.elbo) == pytest.approx(log_normalizer, abs=1e-8)
    assert float(info.elbo_stderr) < 1e-8


def test_too_large_step_is_rejected_and_shrunk(x64):
    # Target sd 0.1: eta = 1 gives A_1 = 1 + (1 - 100) < 0, outside the family.
    def logdensity_fn(z):
        return -0.5 * jnp.sum((z / 0.1) ** 2)

    potential, algorithm, state = quadratic_algorithm(logdensity_fn, 1.0)
    new_state, info = jax.jit(algorithm.step)(jax.random.key(0), state)
    assert not bool(info.accepted)
    assert float(info.step_size) == 0.0
    assert float(new_state.step_size_scale) == pytest.approx(0.5)
    assert int(new_state.consecutive_rejections) == 1
    for new, old in zip(
        jax.tree.leaves(new_state.params), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_array_equal(new, old)


def test_nonfinite_residuals_are_rejected_not_averaged(x64):
    # The log density is -inf on half the space: some residuals are +inf.
    def logdensity_fn(z):
        return jnp.where(z[0] > 0, -0.5 * z @ z, -jnp.inf)

    potential, algorithm, state = quadratic_algorithm(
        logdensity_fn, 0.3, rejection_threshold=3.0
    )
    new_state, info = jax.jit(algorithm.step)(jax.random.key(0), state)
    assert int(info.num_nonfinite) > 0
    assert not bool(info.accepted)
    for new, old in zip(
        jax.tree.leaves(new_state.params), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_array_equal(new, old)


def test_network_projection_reduces_regression_error():
    # With the network on, the projection must fit the mirror-step targets
    # better than leaving the potential unchanged (relative loss < 1).
    def logdensity_fn(z):
        # A banana-shaped, non-Gaussian target.
        return -0.5 * z[0] ** 2 - 0.5 * (z[1] - 0.5 * z[0] ** 2) ** 2 - 0.5 * z[2] ** 2

    potential = BrenierPotential(dim=DIM, hidden_sizes=(16, 16))
    params = potential.init(jax.random.key(0), jnp.zeros(DIM))["params"]
    algorithm = mirror_descent(
        logdensity_fn, potential, 0.5, num_particles=128, num_projection_steps=20
    )
    state = algorithm.init(params)
    step = jax.jit(algorithm.step)
    losses = []
    elbos = []
    for k in range(60):
        state, info = step(jax.random.key(k), state)
        losses.append(float(info.projection_loss))
        elbos.append(float(info.elbo))
    assert max(losses) < 1.0
    # The ELBO rises by far more than its Monte Carlo error (~0.05 at 128 draws).
    assert np.mean(elbos[-10:]) > np.mean(elbos[:3]) + 0.2
