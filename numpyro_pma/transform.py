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
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

from numpyro_pma.logdet import hessian_and_gradient, logdet_cholesky
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients

__all__ = ["BrenierTransform", "map_and_logdet"]

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
        """Return ``grad u(x)`` and ``log det Hess u(x)`` for ``x`` ``(..., dim)``."""
        return _vectorize(
            lambda point: map_and_logdet(self.potential_fn, point),
            x,
            self.potential.dim,
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
