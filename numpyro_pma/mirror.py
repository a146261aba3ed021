r"""The PMA mirror step on a plain log density over R^d (the pure core).

The guide draws ``z = loc + scale * grad u(x)`` with ``x ~ N(0, I_d)``, where
``loc`` and ``scale`` are a fixed whitening (e.g. a diagonal Gaussian fit) and
``u`` a :class:`~numpyro_pma.potential.BrenierPotential`. For the target
``pi(z) ∝ exp(l(z))`` the residual of a reference draw ``x`` is

.. math::

    r(x) = \log N(x; 0, I) - \log\det \nabla^2 u(x) - \sum_i \log s_i
           - l(\mathrm{loc} + s \odot \nabla u(x)),

so that ``E[r] = -ELBO`` and ``-r(x)`` is the importance log weight of the draw.
One mirror step of the parabolic Monge-Ampère flow (step size ``eta``) is

.. math::

    u_{k+1}(x) = u_k(x) - \eta\,(r_k(x) - \bar r_k),

projected back onto the potential family by regression on the batch of draws:
an exact least-squares fit of the quadratic part, then a few optimizer steps on
the network. The regression needs only the *value* of ``log det Hess u``; its
gradient with respect to the parameters, the costly part of ELBO training, is
never formed.

A step whose residuals are not all finite, or whose ELBO falls clearly below
the last accepted one (by more than ``rejection_threshold`` combined standard
errors), is rejected: the potential goes back to the last accepted one and the
step-size multiplier shrinks; each accepted step lets it grow back towards 1.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from numpyro_pma.potential import BrenierPotential
from numpyro_pma.projection import (
    centered_sum_of_squares,
    project_potential,
    quadratic_feature_count,
)
from numpyro_pma.transform import map_and_logdet

__all__ = [
    "MirrorAlgorithm",
    "MirrorInfo",
    "MirrorState",
    "mirror_descent",
]

PyTree = Any
StepSize = float | Callable[[jax.Array], jax.Array]


class MirrorState(NamedTuple):
    """State of the PMA iteration.

    Attributes:
        params: Potential parameters ``theta_k`` (a Flax ``params`` collection),
            evaluated at the next step.
        accepted_params: The last parameters whose ELBO passed the check; a
            rejected step returns to them.
        projection_state: Optimizer state of the projection's regression.
        loc: Whitening location, shape ``(dim,)``; fixed during training.
        scale: Whitening scale, shape ``(dim,)``; fixed during training.
        step: Number of mirror steps taken, accepted or not.
        step_size_scale: Multiplier in ``(0, 1]`` on the scheduled step size.
        accepted_elbo: ELBO estimate of the last accepted potential.
        accepted_elbo_stderr: Its Monte Carlo standard error.
        consecutive_rejections: Rejected steps since the last accepted one.
    """

    params: PyTree
    accepted_params: PyTree
    projection_state: optax.OptState
    loc: jax.Array
    scale: jax.Array
    step: jax.Array
    step_size_scale: jax.Array
    accepted_elbo: jax.Array
    accepted_elbo_stderr: jax.Array
    consecutive_rejections: jax.Array


class MirrorInfo(NamedTuple):
    """Measurements of one mirror step (each a scalar).

    Attributes:
        step_size: ``eta_k`` used, after the adaptive multiplier; 0 if rejected.
        elbo: Monte Carlo estimate of the ELBO of ``q_k``, ``-mean r_k``.
        elbo_stderr: Its standard error, ``std r_k / sqrt(num_particles)``.
        displacement: ``mean |T_{k+1}(x) - T_k(x)|^2`` over the batch, in the
            whitened coordinates; 0 if rejected.
        projection_loss: Relative regression error of the projection,
            ``sum (u_{k+1} - t)^2 / sum (u_k - t)^2`` over the batch after
            removing the mean, where ``t`` are the mirror-step targets
            (0 is an exact projection, 1 no progress); 0 if rejected.
        accepted: Whether the step produced new parameters.
        num_nonfinite: Number of draws whose residual is not finite.
    """

    step_size: jax.Array
    elbo: jax.Array
    elbo_stderr: jax.Array
    displacement: jax.Array
    projection_loss: jax.Array
    accepted: jax.Array
    num_nonfinite: jax.Array


class MirrorAlgorithm(NamedTuple):
    """A pair of pure functions, in the style of BlackJAX and optax.

    Attributes:
        init: ``init(params, loc=None, scale=None) -> MirrorState``.
        step: ``step(rng_key, state) -> (MirrorState, MirrorInfo)``.
    """

    init: Callable[..., MirrorState]
    step: Callable[[jax.Array, MirrorState], tuple[MirrorState, MirrorInfo]]


def _tree_where(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def _tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def mirror_descent(
    logdensity_fn: Callable[[jax.Array], jax.Array],
    potential: BrenierPotential,
    step_size: StepSize = 0.5,
    *,
    num_particles: int = 256,
    projection_optimizer: optax.GradientTransformation | None = None,
    num_projection_steps: int = 10,
    quadratic_projection: str = "auto",
    rejection_threshold: float = 3.0,
    step_size_shrink: float = 0.5,
    step_size_growth: float = 1.25,
) -> MirrorAlgorithm:
    """Build the PMA mirror-descent algorithm for ``pi ∝ exp(logdensity_fn)``.

    Args:
        logdensity_fn: ``l``, maps a point of shape ``(dim,)`` to a scalar.
        potential: The convex potential family; ``potential.dim`` is ``d``.
        step_size: ``eta``: a positive float, or an optax schedule mapping the
            step count to a step size.
        num_particles: Reference draws ``x ~ N(0, I)`` per step.
        projection_optimizer: Optimizer of the projection's regression;
            defaults to ``optax.adam(3e-2)``.
        num_projection_steps: Optimizer steps per mirror step.
        quadratic_projection: ``"lstsq"`` fits the quadratic part exactly by
            least squares and the network by the optimizer; ``"optimizer"``
            fits everything by the optimizer; ``"auto"`` uses least squares
            when ``num_particles >= 2 * quadratic_feature_count(d)``, so that
            the fit is well determined.
        rejection_threshold: A step is rejected when its ELBO is below the last
            accepted ELBO by more than this many combined standard errors.
        step_size_shrink: Factor applied to the step-size multiplier on a
            rejected step.
        step_size_growth: Factor applied on an accepted step (capped at 1).

    Returns:
        The ``(init, step)`` pair.
    """
    dim = potential.dim
    if projection_optimizer is None:
        projection_optimizer = optax.adam(3e-2)
    if quadratic_projection == "auto":
        enough = num_particles >= 2 * quadratic_feature_count(dim)
        quadratic_projection = "lstsq" if enough else "optimizer"
    if quadratic_projection not in ("lstsq", "optimizer"):
        raise ValueError(
            "quadratic_projection must be 'auto', 'lstsq' or 'optimizer', "
            f"got {quadratic_projection!r}"
        )
    use_lstsq = quadratic_projection == "lstsq"
    schedule = step_size if callable(step_size) else (lambda count: step_size)

    def apply(params, x):
        return potential.apply({"params": params}, x)

    def init(params, loc=None, scale=None) -> MirrorState:
        dtype = jax.tree.leaves(params)[0].dtype
        loc = jnp.zeros(dim, dtype) if loc is None else jnp.asarray(loc, dtype)
        scale = jnp.ones(dim, dtype) if scale is None else jnp.asarray(scale, dtype)
        return MirrorState(
            params=params,
            accepted_params=params,
            projection_state=projection_optimizer.init(params),
            loc=loc,
            scale=scale,
            step=jnp.zeros((), jnp.int32),
            step_size_scale=jnp.ones((), dtype),
            accepted_elbo=jnp.full((), -jnp.inf, dtype),
            accepted_elbo_stderr=jnp.zeros((), dtype),
            consecutive_rejections=jnp.zeros((), jnp.int32),
        )

    def residuals(params, loc, scale, x):
        """Return ``(r(x), T(x))`` for a batch ``x`` of shape ``(n, d)``."""
        transport, logdet = jax.vmap(
            lambda point: map_and_logdet(lambda y: apply(params, y), point)
        )(x)
        z = loc + scale * transport
        log_reference = -0.5 * jnp.sum(x**2, -1) - 0.5 * dim * jnp.log(2 * jnp.pi)
        log_target = jax.vmap(logdensity_fn)(z)
        return log_reference - logdet - jnp.sum(jnp.log(scale)) - log_target, transport

    def step(rng_key: jax.Array, state: MirrorState):
        dtype = state.loc.dtype
        x = jax.random.normal(rng_key, (num_particles, dim), dtype)
        residual, transport = residuals(state.params, state.loc, state.scale, x)

        finite = jnp.isfinite(residual)
        num_nonfinite = jnp.sum(~finite)
        elbo = -jnp.mean(residual)
        elbo_stderr = jnp.std(residual) / jnp.sqrt(num_particles)
        tolerance = rejection_threshold * jnp.sqrt(
            elbo_stderr**2 + state.accepted_elbo_stderr**2
        )
        acceptable = (num_nonfinite == 0) & (elbo >= state.accepted_elbo - tolerance)

        eta = schedule(state.step) * state.step_size_scale
        values = jax.vmap(lambda point: apply(state.params, point))(x)
        safe_residual = jnp.where(finite, residual, 0.0)
        targets = values - eta * (safe_residual - jnp.mean(safe_residual))
        new_params, projection_state, loss = project_potential(
            potential,
            state.params,
            state.projection_state,
            x,
            targets,
            optimizer=projection_optimizer,
            num_steps=num_projection_steps,
            fit_quadratic_exactly=use_lstsq,
        )
        new_transport = jax.vmap(jax.grad(lambda y: apply(new_params, y)))(x)

        projected = _tree_all_finite(new_params) & jnp.isfinite(loss)
        accepted = acceptable & projected
        target_spread = centered_sum_of_squares(values - targets) / num_particles
        relative_loss = loss / jnp.maximum(target_spread, jnp.finfo(dtype).tiny)

        # An acceptable ELBO makes the evaluated potential the one that later
        # steps are compared with and return to, even if its projection failed.
        accepted_params = _tree_where(acceptable, state.params, state.accepted_params)
        growth = jnp.where(accepted, step_size_growth, step_size_shrink)
        new_state = MirrorState(
            params=_tree_where(accepted, new_params, accepted_params),
            accepted_params=accepted_params,
            projection_state=_tree_where(
                accepted, projection_state, state.projection_state
            ),
            loc=state.loc,
            scale=state.scale,
            step=state.step + 1,
            step_size_scale=jnp.minimum(1.0, state.step_size_scale * growth),
            accepted_elbo=jnp.where(acceptable, elbo, state.accepted_elbo),
            accepted_elbo_stderr=jnp.where(
                acceptable, elbo_stderr, state.accepted_elbo_stderr
            ),
            consecutive_rejections=jnp.where(
                accepted, 0, state.consecutive_rejections + 1
            ),
        )
        zero = jnp.zeros((), dtype)
        info = MirrorInfo(
            step_size=jnp.where(accepted, eta, zero),
            elbo=elbo,
            elbo_stderr=elbo_stderr,
            displacement=jnp.where(
                accepted, jnp.mean(jnp.sum((new_transport - transport) ** 2, -1)), zero
            ),
            projection_loss=jnp.where(accepted, relative_loss, zero),
            accepted=accepted,
            num_nonfinite=num_nonfinite,
        )
        return new_state, info

    return MirrorAlgorithm(init=init, step=step)
