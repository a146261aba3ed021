"""Projection of a mirror-step target onto the convex potential family.

A mirror step asks for the potential ``t(x) = u_k(x) - eta (r_k(x) - mean r_k)``,
which in general lies outside the family. The projection regresses
``u_theta`` on ``t`` over the batch of reference draws ``x``, warm-started at
``theta_k``: an exact least-squares fit of the quadratic part (when the batch
determines it), then a few optimizer steps on the network. Potentials are
defined up to a constant, so the regression loss ignores the mean offset.
"""

import jax
import jax.numpy as jnp
import optax

from numpyro_pma.potential import BrenierPotential

__all__ = [
    "centered_sum_of_squares",
    "fit_quadratic",
    "project_potential",
    "quadratic_feature_count",
]


def quadratic_feature_count(dim: int) -> int:
    """Number of monomials of degree at most 2 in ``dim`` variables."""
    return dim * (dim + 1) // 2 + dim + 1


def quadratic_features(x: jax.Array) -> jax.Array:
    """Monomials ``[x_i^2 / 2, x_i x_j (i < j), x_i, 1]`` of ``x`` ``(n, d)``."""
    n, d = x.shape
    rows, cols = jnp.triu_indices(d)
    products = x[:, rows] * x[:, cols]
    products = jnp.where(rows == cols, 0.5 * products, products)
    return jnp.concatenate([products, x, jnp.ones((n, 1), x.dtype)], axis=1)


def fit_quadratic(x: jax.Array, targets: jax.Array, min_eigenvalue: float):
    """Least-squares fit of ``x'Ax/2 + b'x + c`` to ``targets`` at ``x`` ``(n, d)``.

    Returns ``(scale_tril, shift)`` with ``L L^T + epsilon I = A``; ``L`` is NaN
    where ``A - epsilon I`` is not positive definite (the step was too large
    for the convex family).
    """
    d = x.shape[1]
    coefficients, *_ = jnp.linalg.lstsq(quadratic_features(x), targets)
    num_products = d * (d + 1) // 2
    rows, cols = jnp.triu_indices(d)
    upper = jnp.zeros((d, d), x.dtype).at[rows, cols].set(coefficients[:num_products])
    matrix = upper + jnp.triu(upper, 1).T
    shift = coefficients[num_products : num_products + d]
    identity = jnp.eye(d, dtype=x.dtype)
    scale_tril = jnp.linalg.cholesky(matrix - min_eigenvalue * identity)
    return scale_tril, shift


def centered_sum_of_squares(values: jax.Array) -> jax.Array:
    """``sum (v - mean v)^2``: potentials are defined up to a constant."""
    return jnp.sum((values - jnp.mean(values)) ** 2)


def project_potential(
    potential: BrenierPotential,
    params: dict,
    optimizer_state: optax.OptState,
    x: jax.Array,
    targets: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    fit_quadratic_exactly: bool,
):
    """Regress ``u_theta`` on ``targets`` at ``x``, warm-started at ``params``.

    Minimizes ``sum_i (u_theta(x_i) - t_i - c)^2 / n`` over ``theta`` and the
    offset ``c``.

    Args:
        potential: The potential family.
        params: Starting parameters ``theta_k``.
        optimizer_state: State of ``optimizer`` for ``params``.
        x: Reference draws, shape ``(n, dim)``.
        targets: ``t(x)``, shape ``(n,)``.
        optimizer: Optax optimizer of the regression.
        num_steps: Optimizer steps.
        fit_quadratic_exactly: Fit the quadratic part by least squares first,
            then move only the network with the optimizer.

    Returns:
        ``(params, optimizer_state, loss)`` with ``loss`` the final mean
        squared error after removing the offset. The quadratic part is NaN when
        its least-squares fit is not positive definite.
    """

    def apply(params, point):
        return potential.apply({"params": params}, point)

    def network_value(params, point):
        return potential.apply(
            {"params": params}, point, method=lambda module, y: module.network(y)
        )

    if fit_quadratic_exactly:
        network_at_x = jax.vmap(lambda point: network_value(params, point))(x)
        scale_tril, shift = fit_quadratic(
            x, targets - network_at_x, potential.min_eigenvalue
        )
        params = {**params, "scale_tril": scale_tril, "shift": shift}

    def regression_loss(trainable):
        values = jax.vmap(lambda point: apply(trainable, point))(x)
        return centered_sum_of_squares(values - targets) / x.shape[0]

    def mask_quadratic(grads):
        # With an exact quadratic fit the optimizer moves only the network.
        if not fit_quadratic_exactly:
            return grads
        return {
            **grads,
            "scale_tril": jnp.zeros_like(grads["scale_tril"]),
            "shift": jnp.zeros_like(grads["shift"]),
        }

    def optimizer_step(carry, _):
        trainable, opt_state = carry
        grads = mask_quadratic(jax.grad(regression_loss)(trainable))
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), None

    if "network" in params:
        (params, optimizer_state), _ = jax.lax.scan(
            optimizer_step, (params, optimizer_state), None, length=num_steps
        )
    return params, optimizer_state, regression_loss(params)
