"""The Brenier map ``T = grad u`` as a NumPyro :class:`Transform`.

Forward: ``y = grad u(x)``, with ``log |det J_T(x)| = log det Hess u(x)``
returned as an intermediate, so that ``TransformedDistribution.log_prob`` of a
draw made by ``sample_with_intermediates`` (as NumPyro's ``Trace_ELBO``,
``Predictive`` and ``psis_diagnostic`` do) never inverts the map.

Inverse: ``x = grad u*(y) = argmin_x u(x) - <x, y>``, a strictly convex problem
solved by damped Newton steps. It is needed only for ``log_prob`` at points the
guide did not draw itself (e.g. MCMC draws).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

from numpyro_pma.logdet import (
    LogdetEstimate,
    choose_logdet_method,
    hessian_and_gradient,
    logdet_cholesky,
    logdet_slq,
)
from numpyro_pma.lowrank import (
    low_rank_factors,
    map_and_logdet_low_rank,
    projection_rank,
)
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients

__all__ = ["BrenierTransform", "map_and_logdet", "map_and_logdet_slq"]

# Step lengths tried by the Newton line search: 1, 1/2, ..., 2^-12.
_LINE_SEARCH_STEPS = 2.0 ** -jnp.arange(13)


def map_and_logdet(potential_fn: Callable, x: jax.Array):
    """Evaluate ``T(x) = grad u(x)`` and ``log det Hess u(x)`` at one point.

    Args:
        potential_fn: ``u``, maps a point of shape ``(dim,)`` to a scalar.
        x: Point of shape ``(dim,)``.

    Returns:
        ``(T(x), log det Hess u(x))`` with shapes ``(dim,)`` and ``()``. The log
        determinant is NaN where the Hessian is not positive definite.
    """
    gradient, hessian = hessian_and_gradient(potential_fn, x)
    logdet, _ = logdet_cholesky(hessian)
    return gradient, logdet


def map_and_logdet_slq(
    rng_key: jax.Array,
    potential_fn: Callable,
    x: jax.Array,
    *,
    num_probes: int = 16,
    num_lanczos_steps: int = 30,
    preconditioner: jax.Array | None = None,
) -> tuple[jax.Array, LogdetEstimate]:
    """Evaluate ``T(x) = grad u(x)`` and estimate ``log det Hess u(x)`` by SLQ.

    ``jax.linearize`` of ``grad u`` at ``x`` gives the gradient and a linear map
    ``v -> Hess u(x) v`` that reuses the stored intermediates, so each of the
    ``num_probes * num_lanczos_steps`` Hessian-vector products costs about one
    gradient evaluation. The Hessian of shape ``(dim, dim)`` is never formed; the
    largest array is the Lanczos basis of shape
    ``(num_probes, num_lanczos_steps, dim)``.

    With a lower-triangular ``preconditioner`` ``C`` (for example the Cholesky
    factor of the potential's quadratic part), the estimate is

        log det H = 2 sum_i log C_ii + log det(C^{-1} H C^{-T}),

    exact for any invertible ``C``, with SLQ applied to the second term. When
    ``C C^T`` is close to ``H`` that matrix is close to the identity, so the
    probe noise and the quadrature bias both shrink. Each product then adds
    two triangular solves, ``O(dim^2)``.

    Args:
        rng_key: Key for the Rademacher probes.
        potential_fn: ``u``, maps a point of shape ``(dim,)`` to a scalar.
        x: Point of shape ``(dim,)``.
        num_probes: Probes of :func:`~numpyro_pma.logdet.logdet_slq`.
        num_lanczos_steps: Lanczos steps per probe.
        preconditioner: ``C``, lower triangular with a positive diagonal, shape
            ``(dim, dim)``; ``None`` applies SLQ to the Hessian itself.

    Returns:
        ``(T(x), estimate)``: the map of shape ``(dim,)`` and a
        :class:`~numpyro_pma.logdet.LogdetEstimate` whose values carry no
        gradient. The estimate is NaN when a Ritz value is negative (proof that
        the Hessian is not positive definite).
    """
    gradient, hessian_vector_product = jax.linearize(jax.grad(potential_fn), x)
    matvec_fn = hessian_vector_product
    offset = jnp.zeros((), jnp.result_type(x))
    if preconditioner is not None:

        def matvec_fn(vector):
            inner = solve_triangular(preconditioner, vector, lower=True, trans="T")
            product = hessian_vector_product(inner)
            return solve_triangular(preconditioner, product, lower=True)

        offset = 2.0 * jnp.sum(jnp.log(jnp.diagonal(preconditioner)))

    estimate = logdet_slq(
        rng_key,
        matvec_fn,
        jnp.shape(x)[0],
        num_probes=num_probes,
        num_lanczos_steps=num_lanczos_steps,
        dtype=jnp.result_type(x),
    )
    offset = jax.lax.stop_gradient(offset)
    return gradient, LogdetEstimate(estimate.logdet + offset, estimate.standard_error)


def _vectorize(fn: Callable, x: jax.Array, dim: int):
    """Apply a one-point function over all leading axes of ``x``."""
    batch_shape = jnp.shape(x)[:-1]
    flat = jnp.reshape(x, (-1, dim))
    out = jax.vmap(fn)(flat)
    return jax.tree.map(lambda o: jnp.reshape(o, batch_shape + o.shape[1:]), out)


class BrenierTransform(Transform):
    """Bijection ``x -> grad u(x)`` of R^d, with ``u`` a :class:`BrenierPotential`.

    Args:
        potential: The Flax module defining ``u``.
        params: Its ``params`` collection.
        inverse_tolerance: Newton stops when ``max |grad u(x) - y|`` is below
            this; ``None`` picks ``100 * eps`` of the dtype, scaled by ``|y|``.
        max_newton_steps: Upper bound on Newton iterations of the inverse.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(
        self,
        potential: BrenierPotential,
        params: dict,
        *,
        inverse_tolerance: float | None = None,
        max_newton_steps: int = 50,
    ):
        self.potential = potential
        self.params = params
        self.inverse_tolerance = inverse_tolerance
        self.max_newton_steps = max_newton_steps

    def potential_fn(self, x: jax.Array) -> jax.Array:
        """Evaluate ``u(x)`` at one point of shape ``(dim,)``."""
        return self.potential.apply({"params": self.params}, x)

    def __call__(self, x):
        """Map ``x`` of shape ``(..., dim)`` to ``grad u(x)``."""
        return _vectorize(jax.grad(self.potential_fn), x, self.potential.dim)

    def call_with_intermediates(self, x):
        """Return ``grad u(x)`` and ``log det Hess u(x)`` for ``x`` ``(..., dim)``.

        Both are exact. Above ``EXACT_LOGDET_MAX_DIM`` dimensions, for a
        potential without axis tails, the log determinant comes from the
        matrix determinant lemma over the network's first layer
        (:mod:`numpyro_pma.lowrank`). Its shared factors are computed once for
        all points. Otherwise each point's Hessian is formed and factorized.
        """
        dim = self.potential.dim
        rank = projection_rank(self.potential)
        if choose_logdet_method(dim, "auto", projection_rank=rank) == "low_rank":
            factors = low_rank_factors(self.potential, self.params)
            return _vectorize(
                lambda point: map_and_logdet_low_rank(
                    self.potential, self.params, factors, point
                ),
                x,
                dim,
            )
        return _vectorize(
            lambda point: map_and_logdet(self.potential_fn, point), x, dim
        )

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        """Return ``log det Hess u(x)``, from ``intermediates`` when given."""
        if intermediates is not None:
            return intermediates
        return self.call_with_intermediates(x)[1]

    def _inverse(self, y):
        return _vectorize(self._inverse_one, y, self.potential.dim)

    def _inverse_one(self, y: jax.Array) -> jax.Array:
        """Solve ``grad u(x) = y`` for one ``y`` of shape ``(dim,)``."""
        matrix, shift = quadratic_coefficients(
            self.params, self.potential.min_eigenvalue
        )
        # The quadratic part's inverse is exact when the network is flat, and a
        # good start otherwise.
        x0 = jnp.linalg.solve(matrix, y - shift)
        tolerance = self.inverse_tolerance
        if tolerance is None:
            eps = jnp.finfo(jnp.result_type(y)).eps
            tolerance = 100 * eps * (1.0 + jnp.max(jnp.abs(y)))

        def dual_objective(x):
            return self.potential_fn(x) - x @ y

        def newton_step(carry):
            x, _, step = carry
            gradient, hessian = hessian_and_gradient(self.potential_fn, x)
            residual = gradient - y
            direction = -jnp.linalg.solve(hessian, residual)
            slope = residual @ direction
            candidates = x + _LINE_SEARCH_STEPS[:, None] * direction
            values = jax.vmap(dual_objective)(candidates)
            # Armijo condition; the last (shortest) step is taken if none passes.
            sufficient = values <= dual_objective(x) + 1e-4 * _LINE_SEARCH_STEPS * slope
            sufficient = sufficient.at[-1].set(True)
            x_new = candidates[jnp.argmax(sufficient)]
            return x_new, jnp.max(jnp.abs(residual)), step + 1

        def not_converged(carry):
            _, error, step = carry
            return (error > tolerance) & (step < self.max_newton_steps)

        x, _, _ = jax.lax.while_loop(
            not_converged, newton_step, (x0, jnp.inf, jnp.zeros((), jnp.int32))
        )
        return x

    def tree_flatten(self):
        """Flatten with the potential parameters as the only leaves."""
        aux = {
            "potential": self.potential,
            "inverse_tolerance": self.inverse_tolerance,
            "max_newton_steps": self.max_newton_steps,
        }
        return (self.params,), (("params",), aux)

    def eq(self, other, static: bool = False):
        """Compare by identity: potentials are not compared by value."""
        return self is other
