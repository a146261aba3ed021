"""Cheap Gaussian fits that whiten the target before PMA.

Near its fixed point a PMA step contracts a direction of posterior standard
deviation ``sigma`` by ``1 - 2 eta / sigma``, so one step size cannot suit
directions of very different scales. Running PMA in coordinates
``w = (z - loc) / scale`` standardized by a diagonal Gaussian fit makes
``eta ≈ 0.5`` a good choice along every axis. When the posterior's
correlations are strong (regressions on correlated predictors), the directions
of very different scales are not the axes; :func:`fit_dense_gaussian` then
refines the diagonal fit into a full-covariance Gaussian, and PMA runs in
``w = C^{-1} (z - loc)``.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DenseGaussianFit",
    "DiagonalGaussianFit",
    "fit_dense_gaussian",
    "fit_diagonal_gaussian",
]


class DiagonalGaussianFit(NamedTuple):
    """Result of :func:`fit_diagonal_gaussian`.

    Attributes:
        loc: Mean of the fit, shape ``(dim,)``.
        scale: Standard deviations of the fit, shape ``(dim,)``.
        elbo: ELBO estimate at each optimizer step, shape ``(num_steps,)``.
    """

    loc: jax.Array
    scale: jax.Array
    elbo: jax.Array


def fit_diagonal_gaussian(
    rng_key: jax.Array,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    init_position: jax.Array,
    *,
    num_steps: int = 1000,
    num_particles: int = 16,
    learning_rate: float = 0.02,
    init_scale: float = 0.1,
) -> DiagonalGaussianFit:
    """Fit ``N(loc, diag(scale^2))`` to ``pi ∝ exp(logdensity_fn)`` by ELBO ascent.

    Maximizes ``ELBO = E_eps[l(loc + scale * eps)] + sum log scale + d (1 +
    log 2 pi) / 2`` with Adam and reparameterized draws ``eps ~ N(0, I)``.

    Args:
        rng_key: Key for the reparameterized draws.
        logdensity_fn: ``l``, maps a point of shape ``(dim,)`` to a scalar.
        init_position: Starting ``loc``, shape ``(dim,)``.
        num_steps: Adam steps.
        num_particles: Draws per step.
        learning_rate: Adam learning rate on ``loc`` and ``log scale``.
        init_scale: Starting ``scale`` of every coordinate.

    Returns:
        The fitted location and scale and the ELBO trace.
    """
    init_position = jnp.asarray(init_position)
    dim = init_position.shape[-1]
    optimizer = optax.adam(learning_rate)
    params = (init_position, jnp.full(dim, jnp.log(init_scale), init_position.dtype))

    def negative_elbo(params, key):
        loc, log_scale = params
        noise = jax.random.normal(key, (num_particles, dim), loc.dtype)
        log_target = jax.vmap(logdensity_fn)(loc + jnp.exp(log_scale) * noise)
        return -jnp.mean(log_target) - jnp.sum(log_scale)

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(negative_elbo)(params, key)
        # A non-finite gradient (a draw far in the tails) is skipped, not applied.
        finite = jnp.all(jnp.isfinite(grads[0])) & jnp.all(jnp.isfinite(grads[1]))
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), -loss

    keys = jax.random.split(rng_key, num_steps)
    (params, _), elbo = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    loc, log_scale = params
    gaussian_entropy_constant = 0.5 * dim * (1.0 + jnp.log(2 * jnp.pi))
    return DiagonalGaussianFit(
        loc=loc, scale=jnp.exp(log_scale), elbo=elbo + gaussian_entropy_constant
    )


# Fractions of the Newton and gradient steps tried by fit_dense_gaussian,
# 4^-k for k = 0..5; the best candidate is kept.
_STEP_FRACTIONS = tuple(4.0**-k for k in range(6))


class DenseGaussianFit(NamedTuple):
    """Result of :func:`fit_dense_gaussian`.

    Attributes:
        loc: Mean of the fit, shape ``(dim,)``.
        scale_tril: Lower Cholesky factor ``C`` of its covariance, ``(dim, dim)``.
        elbo: ELBO estimate of each iterate, the start first, shape
            ``(num_steps + 1,)``; NaN for a skipped step.
        num_accepted: Newton steps kept (0 means the start is returned).
    """

    loc: jax.Array
    scale_tril: jax.Array
    elbo: jax.Array
    num_accepted: jax.Array


def _gaussian_elbo(logdensity_fn, loc, scale_tril, noise):
    """``mean_i l(loc + C eps_i) + log det C + d (1 + log 2 pi) / 2``."""
    dim = loc.shape[-1]
    log_target = jax.vmap(logdensity_fn)(loc + noise @ scale_tril.T)
    entropy = jnp.sum(jnp.log(jnp.diagonal(scale_tril)))
    entropy = entropy + 0.5 * dim * (1.0 + jnp.log(2 * jnp.pi))
    return jnp.mean(log_target) + entropy


def _antithetic_normal(rng_key, num_particles: int, dim: int, dtype) -> jax.Array:
    """``(num_particles, dim)`` standard normal draws in pairs ``eps, -eps``.

    Their mean is exactly zero, so the mean gradient of a quadratic ``l`` at
    ``loc + C eps`` is its gradient at ``loc``: the Newton step is then exact
    for a Gaussian target, not exact up to Monte Carlo error.
    """
    half = jax.random.normal(rng_key, (num_particles // 2, dim), dtype)
    return jnp.concatenate([half, -half])


def _inverse_scale_tril(precision: jax.Array) -> jax.Array:
    """Lower-triangular ``C`` with ``C C' = H^{-1}``, from ``H`` of shape ``(d, d)``.

    Regression posteriors on unscaled predictors give ``H`` condition numbers
    of 1e7 and more, beyond what float32 Cholesky factorizes, so ``H`` is first
    scaled to unit diagonal, ``H = D^{1/2} Ht D^{1/2}``. With ``J`` the
    reversal permutation and ``J Ht J = R R'`` (``R`` lower), ``Ht = U U'``
    with ``U = J R J`` upper triangular, so ``C = D^{-1/2} U^{-T}`` is lower
    triangular and ``C C' = D^{-1/2} Ht^{-1} D^{-1/2} = H^{-1}``. No inverse
    is formed and only one factorization is needed. NaN entries mean ``H`` is
    not positive definite.
    """
    diagonal = jnp.diagonal(precision)
    inverse_sqrt = jnp.where(diagonal > 0, 1.0 / jnp.sqrt(diagonal), jnp.nan)
    scaled = precision * inverse_sqrt[:, None] * inverse_sqrt[None, :]
    reversed_tril = jnp.linalg.cholesky(scaled[::-1, ::-1])
    upper = reversed_tril[::-1, ::-1]
    identity = jnp.eye(precision.shape[0], dtype=precision.dtype)
    # U^{-T} = (U^T)^{-1}, and U^T is lower triangular.
    upper_inverse_transpose = jax.scipy.linalg.solve_triangular(
        upper.T, identity, lower=True
    )
    return inverse_sqrt[:, None] * upper_inverse_transpose


def fit_dense_gaussian(
    rng_key: jax.Array,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    loc: jax.Array,
    scale: jax.Array,
    *,
    num_steps: int = 30,
    num_particles: int = 64,
) -> DenseGaussianFit:
    """Refine a Gaussian ``N(loc, C C')`` towards the best full-covariance fit.

    Each step is a Newton step on the ELBO of a Gaussian (the fixed point of
    Gaussian variational inference, by Stein's lemma): with draws
    ``z_i = loc + C eps_i``,

        H = -mean_i Hess l(z_i),  g = mean_i grad l(z_i),
        Sigma_new = H^{-1},       loc_new = loc + Sigma_new g.

    With draws in antithetic pairs, one step is exact for a Gaussian target.
    Far from a Gaussian target the full step can overshoot. Each step
    therefore tries the fractions ``t = 4^-k``, ``k = 0, ..., 5``, of it:
    means moved by ``t`` times the Newton step and precisions interpolated.
    It also tries the same fractions of the gradient step ``loc + t C C' g``
    at the current covariance, which moves the mean where ``H`` is not
    positive definite. The candidate with the highest ELBO on common fresh
    draws is kept if that ELBO is above the current one; otherwise the step
    is skipped. Each step
    forms ``num_particles`` Hessians of shape ``(dim, dim)``.

    Args:
        rng_key: Key for the draws.
        logdensity_fn: ``l``, maps a point of shape ``(dim,)`` to a scalar.
        loc: Starting mean, shape ``(dim,)``.
        scale: Starting scale: standard deviations ``(dim,)`` or a lower
            Cholesky factor ``(dim, dim)``.
        num_steps: Newton steps at most.
        num_particles: Draws per step, in antithetic pairs; an even number.

    Returns:
        The :class:`DenseGaussianFit`.

    Raises:
        ValueError: If ``num_particles`` is not an even number >= 2.
    """
    if num_particles < 2 or num_particles % 2:
        raise ValueError(
            f"num_particles must be an even number >= 2, got {num_particles}"
        )
    loc = jnp.asarray(loc)
    scale = jnp.asarray(scale, loc.dtype)
    dim = loc.shape[-1]
    scale_tril = jnp.diag(scale) if scale.ndim == 1 else scale
    gradient = jax.grad(logdensity_fn)
    hessian = jax.hessian(logdensity_fn)

    identity = jnp.eye(dim, dtype=loc.dtype)

    def newton_step(carry, key):
        loc, scale_tril = carry
        moment_key, check_key = jax.random.split(key)
        noise = _antithetic_normal(moment_key, num_particles, dim, loc.dtype)
        z = loc + noise @ scale_tril.T
        precision = -jnp.mean(jax.vmap(hessian)(z), axis=0)
        precision = 0.5 * (precision + precision.T)
        mean_gradient = jnp.mean(jax.vmap(gradient)(z), axis=0)
        newton_scale_tril = _inverse_scale_tril(precision)
        newton_direction = newton_scale_tril @ (newton_scale_tril.T @ mean_gradient)
        # Damped candidates: far from a Gaussian target the full step can
        # overshoot (a regression's log-noise scale, whose Hessian depends on
        # the other coefficients), so the means move by a fraction t of it
        # and the precisions are interpolated.
        inverse_scale_tril = jax.scipy.linalg.solve_triangular(
            scale_tril, identity, lower=True
        )
        current_precision = inverse_scale_tril.T @ inverse_scale_tril

        def candidate(fraction):
            blended = (1 - fraction) * current_precision + fraction * precision
            return loc + fraction * newton_direction, _inverse_scale_tril(blended)

        fractions = jnp.asarray(_STEP_FRACTIONS, loc.dtype)
        newton_locs, newton_scale_trils = jax.vmap(candidate)(fractions)
        # Far from the data a regression's noise scale makes H indefinite, so
        # every Newton candidate fails there. Gradient steps preconditioned by
        # the current covariance move the mean out of that region.
        gradient_direction = scale_tril @ (scale_tril.T @ mean_gradient)
        candidate_locs = jnp.concatenate(
            [newton_locs, loc + fractions[:, None] * gradient_direction]
        )
        candidate_scale_trils = jnp.concatenate(
            [newton_scale_trils, jnp.broadcast_to(scale_tril, newton_scale_trils.shape)]
        )

        # Common draws for all iterates make the ELBO differences precise.
        check_noise = _antithetic_normal(check_key, num_particles, dim, loc.dtype)
        old_elbo = _gaussian_elbo(logdensity_fn, loc, scale_tril, check_noise)
        new_elbos = jax.vmap(
            lambda m, c: _gaussian_elbo(logdensity_fn, m, c, check_noise)
        )(candidate_locs, candidate_scale_trils)
        valid = (
            jnp.all(jnp.isfinite(candidate_scale_trils), axis=(1, 2))
            & jnp.all(jnp.isfinite(candidate_locs), axis=1)
            & jnp.isfinite(new_elbos)
        )
        best = jnp.argmax(jnp.where(valid, new_elbos, -jnp.inf))
        # A tolerance of a few standard errors would let a wild candidate
        # through (its spread inflates the error), so the estimate on the
        # common draws must rise.
        keep = valid[best] & (new_elbos[best] > old_elbo)
        loc = jnp.where(keep, candidate_locs[best], loc)
        scale_tril = jnp.where(keep, candidate_scale_trils[best], scale_tril)
        elbo = jnp.where(keep, new_elbos[best], jnp.nan)
        return (loc, scale_tril), (elbo, keep, old_elbo)

    keys = jax.random.split(rng_key, num_steps)
    (loc, scale_tril), (elbos, kept, start_elbos) = jax.lax.scan(
        newton_step, (loc, scale_tril), keys
    )
    return DenseGaussianFit(
        loc=loc,
        scale_tril=scale_tril,
        elbo=jnp.concatenate([start_elbos[:1], elbos]),
        num_accepted=jnp.sum(kept),
    )
