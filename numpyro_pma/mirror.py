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

Large dimensions: above ``EXACT_LOGDET_MAX_DIM`` (256) no ``(dim, dim)``
Hessian is formed per draw (``logdet_method``). For a potential without axis
tails the log determinant stays exact through the low rank of the network's
curvature (:mod:`numpyro_pma.lowrank`); otherwise it is estimated by stochastic
Lanczos quadrature from Hessian-vector products. Many devices: with a
``mesh`` the draws are split over its devices and the parameters replicated.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from numpyro_pma.logdet import check_logdet_method, choose_logdet_method
from numpyro_pma.lowrank import (
    check_low_rank_potential,
    low_rank_factors,
    map_and_logdet_low_rank,
    projection_rank,
)
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients
from numpyro_pma.projection import (
    centered_sum_of_squares,
    project_potential,
    quadratic_feature_count,
)
from numpyro_pma.sharding import check_particle_mesh, replicate, shard_particles
from numpyro_pma.transform import map_and_logdet, map_and_logdet_slq

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
        scale: Whitening scale, shape ``(dim,)``, or a lower-triangular
            ``C`` of shape ``(dim, dim)`` (``z = loc + C T(x)``); fixed during
            training.
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

    With ``logdet_method="slq"`` each residual contains the estimation error
    of its log determinant, so ``elbo`` carries that noise too: ``elbo_stderr``
    includes the probe noise (the probes are independent across draws), and
    ``logdet_stderr`` isolates it. The finite Lanczos quadrature also
    overestimates ``log det``, which biases ``elbo`` upwards by the same
    amount; the bias is negligible once ``num_lanczos_steps`` exceeds about
    ``sqrt(cond(Hess u))``.

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
        logdet_stderr: Standard error that the SLQ probe noise adds to
            ``elbo``, ``sqrt(sum_i se_i^2) / num_particles`` with ``se_i`` the
            per-draw SLQ standard error; 0 with the exact log determinants
            (``"cholesky"`` and ``"low_rank"``).
    """

    step_size: jax.Array
    elbo: jax.Array
    elbo_stderr: jax.Array
    displacement: jax.Array
    projection_loss: jax.Array
    accepted: jax.Array
    num_nonfinite: jax.Array
    logdet_stderr: jax.Array


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


def _check_int(name: str, value: Any, minimum: int) -> None:
    integer = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not integer or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


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
    logdet_method: str = "auto",
    num_probes: int = 16,
    num_lanczos_steps: int = 30,
    residual_batch_size: int | None = None,
    mesh: Mesh | None = None,
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
        quadratic_projection: How the quadratic part is projected before the
            optimizer moves the network. ``"lstsq"``: least squares over all
            ``quadratic_feature_count(d)`` coefficients, exact for a Gaussian
            target. ``"min_norm"``: the smallest change of the quadratic that
            fits the targets at the draws (a kernel solve of size
            ``num_particles``), defined for any number of draws.
            ``"optimizer"``: the optimizer fits everything. ``"auto"`` uses
            least squares when ``num_particles >= 2 * quadratic_feature_count(d)``,
            so that the fit is well determined, and ``"min_norm"`` otherwise.
        rejection_threshold: A step is rejected when its ELBO is below the last
            accepted ELBO by more than this many combined standard errors.
            With ``inf``, only steps with non-finite residuals are rejected.
        step_size_shrink: Factor applied to the step-size multiplier on a
            rejected step.
        step_size_growth: Factor applied on an accepted step (capped at 1).
        logdet_method: How the residual gets ``log det Hess u(x)``.
            ``"cholesky"`` forms the ``(d, d)`` Hessian and factorizes it
            (exact, ``O(d^2)`` memory and ``O(d^3)`` time per draw).
            ``"low_rank"`` uses ``Hess u = A + P' M(x) P``, with ``P`` the
            network's ``(r, d)`` first-layer kernels, ``r = sum(hidden_sizes)``
            (:func:`~numpyro_pma.lowrank.map_and_logdet_low_rank`): exact, one
            ``O(d^3)`` factorization of ``A`` per step and ``O(r^3 + d r)``
            time per draw. It needs a potential without axis tails.
            ``"slq"`` estimates it by stochastic Lanczos quadrature from
            Hessian-vector products, preconditioned by the Cholesky factor of
            the quadratic part's Hessian, in ``O(num_probes *
            num_lanczos_steps * d)`` memory per draw. Its Monte Carlo noise
            enters every residual (see :class:`MirrorInfo`). ``"auto"`` uses
            Cholesky up to ``EXACT_LOGDET_MAX_DIM`` (256) dimensions; above,
            ``"low_rank"`` when the potential has no axis tails and ``r < d``,
            else SLQ (:func:`~numpyro_pma.logdet.choose_logdet_method`).
        num_probes: Rademacher probes per draw for SLQ (at least 2).
        num_lanczos_steps: Lanczos steps per probe for SLQ.
        residual_batch_size: Evaluate the residuals of this many draws at a
            time (a ``jax.lax.map`` over batches), which bounds the memory of
            the log determinants at the cost of less parallel work; it must
            divide ``num_particles``. ``None`` evaluates all draws at once.
        mesh: A :class:`jax.sharding.Mesh` (e.g. from
            :func:`~numpyro_pma.sharding.particle_mesh`) over which the draws
            are split and the parameters replicated; its size must divide the
            number of draws evaluated at once. ``None`` leaves placement to JAX.
            Call ``step`` under ``jax.jit``.

    Returns:
        The ``(init, step)`` pair.

    Raises:
        ValueError: If an option is out of range, ``mesh`` does not divide
            the batch of draws, or ``logdet_method="low_rank"`` is given for a
            potential with axis tails.
        TypeError: If ``mesh`` is not a ``Mesh``.
    """
    dim = potential.dim
    _check_int("num_particles", num_particles, 1)
    _check_int("num_projection_steps", num_projection_steps, 0)
    check_logdet_method(logdet_method)
    if logdet_method == "low_rank":
        check_low_rank_potential(potential)
    if not rejection_threshold >= 0:
        raise ValueError(
            f"rejection_threshold must be >= 0 (inf disables the ELBO check), "
            f"got {rejection_threshold!r}"
        )
    if not 0 < step_size_shrink <= 1:
        raise ValueError(
            f"step_size_shrink must be in (0, 1], got {step_size_shrink!r}"
        )
    if not step_size_growth >= 1:
        raise ValueError(f"step_size_growth must be >= 1, got {step_size_growth!r}")
    _check_int("num_probes", num_probes, 2)
    _check_int("num_lanczos_steps", num_lanczos_steps, 1)
    if residual_batch_size is not None:
        _check_int("residual_batch_size", residual_batch_size, 1)
        if num_particles % residual_batch_size != 0:
            raise ValueError(
                f"residual_batch_size ({residual_batch_size}) must divide "
                f"num_particles ({num_particles})."
            )
    batch_size = num_particles if residual_batch_size is None else residual_batch_size
    if mesh is not None:
        check_particle_mesh(mesh, batch_size)
    chosen_method = choose_logdet_method(
        dim, logdet_method, projection_rank=projection_rank(potential)
    )

    if projection_optimizer is None:
        projection_optimizer = optax.adam(3e-2)
    if quadratic_projection == "auto":
        enough = num_particles >= 2 * quadratic_feature_count(dim)
        quadratic_projection = "lstsq" if enough else "min_norm"
    if quadratic_projection not in ("lstsq", "min_norm", "optimizer"):
        raise ValueError(
            "quadratic_projection must be 'auto', 'lstsq', 'min_norm' or "
            f"'optimizer', got {quadratic_projection!r}"
        )
    fit_quadratic_exactly = quadratic_projection != "optimizer"
    quadratic_solver = "lstsq" if quadratic_projection == "lstsq" else "min_norm"
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

    def map_and_logdet_at(params, point, rng_key, shared):
        """Return ``(T(x), log det Hess u(x), its standard error)`` at one point.

        ``shared`` is what :func:`shared_logdet_terms` computed once per step.
        """

        def potential_fn(y):
            return apply(params, y)

        if chosen_method == "slq":
            transport, estimate = map_and_logdet_slq(
                rng_key,
                potential_fn,
                point,
                num_probes=num_probes,
                num_lanczos_steps=num_lanczos_steps,
                preconditioner=shared,
            )
            return transport, estimate.logdet, estimate.standard_error
        if chosen_method == "low_rank":
            transport, logdet = map_and_logdet_low_rank(
                potential, params, shared, point
            )
        else:
            transport, logdet = map_and_logdet(potential_fn, point)
        return transport, logdet, jnp.zeros_like(logdet)

    def shared_logdet_terms(params):
        """Compute the per-step part of the log determinants, shared by all draws."""
        if chosen_method == "slq":
            # SLQ runs on C^{-1} Hess u C^{-T}, with C C^T the quadratic part's
            # Hessian: close to the identity unless the network's curvature
            # dominates, so the probe noise and the quadrature bias shrink.
            matrix, _ = quadratic_coefficients(params, potential.min_eigenvalue)
            return jnp.linalg.cholesky(matrix)
        if chosen_method == "low_rank":
            # log det A and the (r, r) coupling of the determinant lemma.
            return low_rank_factors(potential, params)
        return None

    def batch_residuals(params, loc, scale, shared, x, keys):
        """Return ``r(x)``, ``T(x)`` and the log-det standard errors of a batch."""
        x = shard_particles(x, mesh)
        keys = shard_particles(keys, mesh)
        transport, logdet, logdet_error = jax.vmap(
            lambda point, key: map_and_logdet_at(params, point, key, shared)
        )(x, keys)
        if scale.ndim == 2:
            # Dense whitening: z = loc + C T(x), C lower triangular.
            z = loc + transport @ scale.T
            log_scale = jnp.sum(jnp.log(jnp.diagonal(scale)))
        else:
            z = loc + scale * transport
            log_scale = jnp.sum(jnp.log(scale))
        log_reference = -0.5 * jnp.sum(x**2, -1) - 0.5 * dim * jnp.log(2 * jnp.pi)
        log_target = jax.vmap(logdensity_fn)(z)
        residual = log_reference - logdet - log_scale - log_target
        return residual, transport, logdet_error

    def residuals(params, loc, scale, x, rng_key):
        """Return ``(r(x), T(x), se)`` of shapes ``(n,)``, ``(n, d)``, ``(n,)``.

        ``x`` has shape ``(n, d)``; each draw gets its own SLQ probes.
        """
        keys = jax.random.split(rng_key, num_particles)
        shared = shared_logdet_terms(params)
        if batch_size == num_particles:
            return batch_residuals(params, loc, scale, shared, x, keys)

        num_batches = num_particles // batch_size
        x_batches = jnp.reshape(x, (num_batches, batch_size, dim))
        key_batches = jnp.reshape(keys, (num_batches, batch_size) + keys.shape[1:])
        outputs = jax.lax.map(
            lambda batch: batch_residuals(params, loc, scale, shared, *batch),
            (x_batches, key_batches),
        )
        return jax.tree.map(
            lambda out: jnp.reshape(out, (num_particles,) + out.shape[2:]), outputs
        )

    def step(rng_key: jax.Array, state: MirrorState):
        dtype = state.loc.dtype
        # The draws come from rng_key itself, so that every logdet_method uses
        # the same draws for the same key.
        x = shard_particles(
            jax.random.normal(rng_key, (num_particles, dim), dtype), mesh
        )
        probe_key = jax.random.fold_in(rng_key, 1)
        params, loc, scale = replicate((state.params, state.loc, state.scale), mesh)
        residual, transport, logdet_error = residuals(params, loc, scale, x, probe_key)

        finite = jnp.isfinite(residual)
        num_nonfinite = jnp.sum(~finite)
        elbo = -jnp.mean(residual)
        elbo_stderr = jnp.std(residual) / jnp.sqrt(num_particles)
        if math.isinf(rejection_threshold):
            # inf * 0 is NaN: an exact ELBO (zero standard error) must still pass.
            acceptable = num_nonfinite == 0
        else:
            tolerance = rejection_threshold * jnp.sqrt(
                elbo_stderr**2 + state.accepted_elbo_stderr**2
            )
            acceptable = (num_nonfinite == 0) & (
                elbo >= state.accepted_elbo - tolerance
            )

        eta = schedule(state.step) * state.step_size_scale
        values = jax.vmap(lambda point: apply(params, point))(x)
        safe_residual = jnp.where(finite, residual, 0.0)
        targets = values - eta * (safe_residual - jnp.mean(safe_residual))
        new_params, projection_state, loss = project_potential(
            potential,
            params,
            state.projection_state,
            x,
            targets,
            optimizer=projection_optimizer,
            num_steps=num_projection_steps,
            fit_quadratic_exactly=fit_quadratic_exactly,
            quadratic_solver=quadratic_solver,
        )
        new_params = replicate(new_params, mesh)
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
            logdet_stderr=jnp.sqrt(jnp.sum(logdet_error**2)) / num_particles,
        )
        return new_state, info

    return MirrorAlgorithm(init=init, step=step)
