r"""PMA mirror steps towards a distribution known only by samples (pure core).

The model draws ``y = loc + scale * grad u(x)`` with ``x ~ N(0, I_d)``, where
``loc`` and ``scale`` are the data's mean and standard deviation (fixed) and
``u`` a :class:`~numpyro_pma.potential.BrenierPotential`. In the whitened
coordinates ``w = (y - loc) / scale`` the data have law ``pi`` and the model
``q_k = (grad u_k) # N(0, I)``. The mirror step of the parabolic Monge-Ampère
flow needs the residual ``r_k(x) = log q_k(T_k(x)) - log pi(T_k(x))`` (up to a
constant), which is unknown because ``pi`` is known only by samples. Two
estimators replace it (Deb and Liang, "No-Regret Generative Modeling via
Parabolic Monge-Ampère PDE", arXiv:2504.09279):

- ``"classifier"``: a classifier between draws of ``q_k`` and a minibatch of
  data, trained for a few warm-started steps per mirror step, whose logit
  estimates ``log q_k - log pi``. Then ``r_k(x) = logit(T_k(x))`` and the value
  step ``u_{k+1} = u_k - eta (r_k - mean r_k)`` is projected by regression of
  ``u_theta`` on the target values (:func:`~numpyro_pma.generative.project_values`).
  No Hessian of ``u`` is formed.
- ``"score_matching"``: a network ``s ≈ grad log pi`` fitted once by denoising
  score matching, and the map form of the step,
  ``T_{k+1}(x) = T_k(x) + eta Hess u_k(x) (s - grad log q_k)(T_k(x))``,
  projected by regression of ``grad u_theta`` on the target map
  (:func:`~numpyro_pma.generative.map_projection.project_map`). The score of
  ``q_k`` enters exactly: differentiating ``log q_k(T_k(x)) = log N(x; 0, I) -
  log det Hess u_k(x)`` in ``x`` gives ``Hess u_k(x) grad log q_k(T_k(x)) =
  -x - grad_x log det Hess u_k(x)``. A value target would need ``log pi`` itself,
  which a score does not give, so the map form is used.

A step whose estimates or projected parameters are not all finite is
rejected. The parameters then stay and the step-size multiplier shrinks, and
each accepted step lets it grow back towards 1.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_pma.generative.projections import (
    network_only,
    project_map,
    project_values,
)
from numpyro_pma.generative.ratio import RatioClassifier, train_classifier
from numpyro_pma.generative.score import ScoreNetwork, fit_score
from numpyro_pma.logdet import hessian_and_gradient, logdet_cholesky
from numpyro_pma.potential import BrenierPotential
from numpyro_pma.projection import centered_sum_of_squares, quadratic_feature_count

__all__ = [
    "RATIO_ESTIMATORS",
    "GenerativeAlgorithm",
    "GenerativeInfo",
    "GenerativeState",
    "generative_mirror_descent",
]

PyTree = Any
StepSize = float | Callable[[jax.Array], jax.Array]

RATIO_ESTIMATORS = ("classifier", "score_matching")


class GenerativeState(NamedTuple):
    """State of the generative PMA iteration.

    Attributes:
        params: Potential parameters ``theta_k`` (a Flax ``params`` collection).
        projection_state: Optimizer state of the projection's regression.
        estimator_params: Parameters of the classifier (updated every step) or
            of the score network (fixed after ``init``).
        estimator_state: Optimizer state of the classifier; an empty state
            for score matching.
        estimator_loss: Latest loss of the estimator: the classifier's logistic
            loss, or the denoising loss at the end of score matching.
        data: Whitened training samples ``(y - loc) / scale``, shape
            ``(num_samples, dim)``.
        loc: Data mean, shape ``(dim,)``.
        scale: Data standard deviation, shape ``(dim,)``.
        step: Number of mirror steps taken, accepted or not.
        step_size_scale: Multiplier in ``(0, 1]`` on the scheduled step size.
        consecutive_rejections: Rejected steps since the last accepted one.
    """

    params: PyTree
    projection_state: optax.OptState
    estimator_params: PyTree
    estimator_state: optax.OptState
    estimator_loss: jax.Array
    data: jax.Array
    loc: jax.Array
    scale: jax.Array
    step: jax.Array
    step_size_scale: jax.Array
    consecutive_rejections: jax.Array


class GenerativeInfo(NamedTuple):
    """Measurements of one mirror step (each a scalar).

    Attributes:
        step_size: ``eta_k`` used, after the adaptive multiplier; 0 if rejected.
        divergence: Estimate of the divergence of ``q_k`` from the data, on
            fresh model draws: ``KL(q_k || pi) ≈ mean logit(T_k(x))`` for the
            classifier, the relative Fisher divergence ``mean |s - grad log
            q_k|^2 (T_k(x))`` for score matching (whitened coordinates). Both
            are only as good as the estimator behind them.
        divergence_stderr: Its Monte Carlo standard error, ``std / sqrt(n)``.
        displacement: ``mean |T_{k+1}(x) - T_k(x)|^2`` over the batch, in the
            whitened coordinates; 0 if rejected.
        projection_loss: Relative regression error of the projection, the
            final loss over the loss of ``theta_k`` (0 is an exact projection,
            1 no progress); 0 if rejected.
        estimator_loss: The classifier's logistic loss on this step's batch
            (``2 log 2 ≈ 1.386`` when it cannot tell model from data); the
            final denoising loss for score matching.
        accepted: Whether the step produced new parameters.
        num_nonfinite: Number of draws whose estimate is not finite.
    """

    step_size: jax.Array
    divergence: jax.Array
    divergence_stderr: jax.Array
    displacement: jax.Array
    projection_loss: jax.Array
    estimator_loss: jax.Array
    accepted: jax.Array
    num_nonfinite: jax.Array

    # NOTE: ``numpyro_pma.driver.run_chunks`` shows ``elbo`` and ``elbo_stderr``
    # in its progress bar. Minus the divergence is the ELBO against the
    # normalized data density for the classifier; for score matching the bar's
    # "elbo" is minus the Fisher divergence.
    @property
    def elbo(self) -> jax.Array:
        """Minus :attr:`divergence`, the name the progress bar reads."""
        return -self.divergence

    @property
    def elbo_stderr(self) -> jax.Array:
        """:attr:`divergence_stderr`, the name the progress bar reads."""
        return self.divergence_stderr


class GenerativeAlgorithm(NamedTuple):
    """A pair of pure functions, in the style of BlackJAX and optax.

    Attributes:
        init: ``init(rng_key, samples, params=None) -> GenerativeState``.
        step: ``step(rng_key, state) -> (GenerativeState, GenerativeInfo)``.
    """

    init: Callable[..., GenerativeState]
    step: Callable[[jax.Array, GenerativeState], tuple[GenerativeState, GenerativeInfo]]


class _Proposal(NamedTuple):
    """A step proposed by one estimator, before the acceptance check."""

    x: jax.Array
    transport: jax.Array
    params: PyTree
    projection_state: optax.OptState
    projection_loss: jax.Array
    target_spread: jax.Array
    divergences: jax.Array
    num_nonfinite: jax.Array
    estimator_params: PyTree
    estimator_state: optax.OptState
    estimator_loss: jax.Array


def _tree_where(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def _tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def generative_mirror_descent(
    potential: BrenierPotential,
    step_size: StepSize = 0.2,
    *,
    ratio_estimator: str = "classifier",
    num_particles: int = 256,
    projection_optimizer: optax.GradientTransformation | None = None,
    num_projection_steps: int = 10,
    quadratic_projection: str = "auto",
    classifier_hidden_sizes: Sequence[int] = (32, 32),
    classifier_optimizer: optax.GradientTransformation | None = None,
    num_classifier_steps: int = 10,
    score_hidden_sizes: Sequence[int] = (64, 64),
    noise_scale: float = 0.1,
    num_score_steps: int = 3000,
    max_residual: float = 2.0,
    step_size_shrink: float = 0.5,
    step_size_growth: float = 1.25,
) -> GenerativeAlgorithm:
    """Build PMA mirror descent towards the law of a set of samples.

    Args:
        potential: The convex potential family; ``potential.dim`` is ``d``.
        step_size: ``eta``: a positive float, or an optax schedule mapping the
            step count to a step size. The coordinates are whitened, so one
            step size suits every direction. 0.5 converges fastest on Gaussian
            data, but on a two-mode mixture it moved all the mass into one
            mode, where 0.2 did not.
        ratio_estimator: ``"classifier"`` or ``"score_matching"`` (see the
            module docstring).
        num_particles: Model draws per step. The classifier is also trained on
            this many data draws per step.
        projection_optimizer: Optimizer of the projection's regression;
            defaults to ``optax.adam(3e-2)``.
        num_projection_steps: Optimizer steps of the projection per mirror step.
        quadratic_projection: ``"lstsq"``, ``"optimizer"`` or ``"auto"``, as in
            :func:`~numpyro_pma.mirror.mirror_descent`.
        classifier_hidden_sizes: Widths of the classifier's MLP; ``()`` gives
            logistic regression on quadratic features.
        classifier_optimizer: Optimizer of the classifier; defaults to
            ``optax.adam(1e-2)``.
        num_classifier_steps: Classifier steps per mirror step (warm-started).
        score_hidden_sizes: Widths of the score network's MLP.
        noise_scale: Denoising noise ``sigma`` in whitened units. Each
            whitened variance of the fit comes out about ``sigma^2`` too
            large.
        num_score_steps: Adam steps of denoising score matching in ``init``.
        max_residual: The classifier's centered residuals are clipped to
            ``[-max_residual, max_residual]``, so the step's target differs
            from ``u_k`` by at most ``eta * max_residual`` at each draw. The
            clip leaves the fixed point ``q = pi`` unchanged. It matters where
            the data have little mass, such as the gap between two modes,
            where the logit is large and a full step can move all the mass
            into one mode. Score matching ignores it.
        step_size_shrink: Factor applied to the step-size multiplier on a
            rejected step.
        step_size_growth: Factor applied on an accepted step (capped at 1).

    Returns:
        The ``(init, step)`` pair.

    Raises:
        ValueError: If an option is out of range.
    """
    for name, value in (
        ("num_particles", num_particles),
        ("num_projection_steps", num_projection_steps),
        ("num_classifier_steps", num_classifier_steps),
        ("num_score_steps", num_score_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("noise_scale", noise_scale), ("max_residual", max_residual)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if ratio_estimator not in RATIO_ESTIMATORS:
        raise ValueError(
            f"ratio_estimator must be one of {RATIO_ESTIMATORS}, got "
            f"{ratio_estimator!r}"
        )
    dim = potential.dim
    if projection_optimizer is None:
        projection_optimizer = optax.adam(3e-2)
    if classifier_optimizer is None:
        classifier_optimizer = optax.adam(1e-2)
    if quadratic_projection == "auto":
        enough = num_particles >= 2 * quadratic_feature_count(dim)
        quadratic_projection = "lstsq" if enough else "optimizer"
    if quadratic_projection not in ("lstsq", "optimizer"):
        raise ValueError(
            "quadratic_projection must be 'auto', 'lstsq' or 'optimizer', "
            f"got {quadratic_projection!r}"
        )
    use_lstsq = quadratic_projection == "lstsq"
    if use_lstsq:
        projection_optimizer = network_only(projection_optimizer)
    schedule = step_size if callable(step_size) else (lambda count: step_size)
    classifier = RatioClassifier(tuple(classifier_hidden_sizes))
    score_network = ScoreNetwork(tuple(score_hidden_sizes))

    def apply(params, x):
        return potential.apply({"params": params}, x)

    def init(rng_key: jax.Array, samples: jax.Array, params=None) -> GenerativeState:
        samples = jnp.asarray(samples)
        dtype = samples.dtype
        loc = jnp.mean(samples, axis=0)
        scale = jnp.std(samples, axis=0)
        data = (samples - loc) / scale
        potential_key, estimator_key = jax.random.split(rng_key)
        if params is None:
            params = potential.init(potential_key, jnp.zeros(dim, dtype))["params"]
        if ratio_estimator == "classifier":
            estimator_params = classifier.init(estimator_key, data[0])["params"]
            estimator_state = classifier_optimizer.init(estimator_params)
            estimator_loss = jnp.full((), 2 * jnp.log(2.0), dtype)
        else:
            fit = fit_score(
                estimator_key,
                data,
                hidden_sizes=score_network.hidden_sizes,
                noise_scale=noise_scale,
                num_steps=num_score_steps,
            )
            estimator_params = fit.params
            estimator_state = optax.EmptyState()
            # The mean over the last 200 steps averages out minibatch noise.
            estimator_loss = jnp.mean(fit.loss[-min(200, num_score_steps) :])
        return GenerativeState(
            params=params,
            projection_state=projection_optimizer.init(params),
            estimator_params=estimator_params,
            estimator_state=estimator_state,
            estimator_loss=estimator_loss,
            data=data,
            loc=loc,
            scale=scale,
            step=jnp.zeros((), jnp.int32),
            step_size_scale=jnp.ones((), dtype),
            consecutive_rejections=jnp.zeros((), jnp.int32),
        )

    def classifier_step(rng_key, state, eta):
        train_key, data_key, eval_key = jax.random.split(rng_key, 3)
        dtype = state.data.dtype
        x_train = jax.random.normal(train_key, (num_particles, dim), dtype)
        model_draws = jax.vmap(jax.grad(lambda y: apply(state.params, y)))(x_train)
        index = jax.random.randint(data_key, (num_particles,), 0, state.data.shape[0])
        estimator_params, estimator_state, estimator_loss = train_classifier(
            classifier,
            state.estimator_params,
            state.estimator_state,
            model_draws,
            state.data[index],
            optimizer=classifier_optimizer,
            num_steps=num_classifier_steps,
        )

        # Fresh draws for the step, so that the classifier's fit to its own
        # batch does not bias the residuals.
        x = jax.random.normal(eval_key, (num_particles, dim), dtype)
        values, transport = jax.vmap(
            jax.value_and_grad(lambda y: apply(state.params, y))
        )(x)
        residual = jax.vmap(
            lambda w: classifier.apply({"params": estimator_params}, w)
        )(transport)
        finite = jnp.isfinite(residual)
        safe_residual = jnp.where(finite, residual, 0.0)
        centered = safe_residual - jnp.mean(safe_residual)
        targets = values - eta * jnp.clip(centered, -max_residual, max_residual)
        new_params, projection_state, loss = project_values(
            potential,
            state.params,
            state.projection_state,
            x,
            targets,
            optimizer=projection_optimizer,
            num_steps=num_projection_steps,
            fit_quadratic_exactly=use_lstsq,
        )
        return _Proposal(
            x=x,
            transport=transport,
            params=new_params,
            projection_state=projection_state,
            projection_loss=loss,
            target_spread=centered_sum_of_squares(values - targets) / num_particles,
            divergences=residual,
            num_nonfinite=jnp.sum(~finite),
            estimator_params=estimator_params,
            estimator_state=estimator_state,
            estimator_loss=estimator_loss,
        )

    def score_step(rng_key, state, eta):
        dtype = state.data.dtype
        x = jax.random.normal(rng_key, (num_particles, dim), dtype)

        def logdet_and_derivatives(point):
            gradient, hessian = hessian_and_gradient(
                lambda y: apply(state.params, y), point
            )
            return logdet_cholesky(hessian).logdet, (gradient, hessian)

        (_, (transport, hessian)), logdet_gradient = jax.vmap(
            jax.value_and_grad(logdet_and_derivatives, has_aux=True)
        )(x)
        score = jax.vmap(
            lambda w: score_network.apply({"params": state.estimator_params}, w)
        )(transport)
        # Hess u_k(x) grad log q_k(T_k(x)) = -x - grad_x log det Hess u_k(x).
        hessian_model_score = -(x + logdet_gradient)
        velocity = jnp.einsum("nij,nj->ni", hessian, score) - hessian_model_score
        model_score = jnp.linalg.solve(hessian, hessian_model_score[..., None])[..., 0]
        fisher = jnp.sum((score - model_score) ** 2, axis=-1)

        finite = jnp.isfinite(fisher) & jnp.all(jnp.isfinite(velocity), axis=-1)
        safe_velocity = jnp.where(finite[:, None], velocity, 0.0)
        targets = transport + eta * safe_velocity
        new_params, projection_state, loss = project_map(
            potential,
            state.params,
            state.projection_state,
            x,
            targets,
            optimizer=projection_optimizer,
            num_steps=num_projection_steps,
            fit_quadratic_exactly=use_lstsq,
        )
        return _Proposal(
            x=x,
            transport=transport,
            params=new_params,
            projection_state=projection_state,
            projection_loss=loss,
            target_spread=jnp.mean(jnp.sum((transport - targets) ** 2, axis=-1)),
            divergences=fisher,
            num_nonfinite=jnp.sum(~finite),
            estimator_params=state.estimator_params,
            estimator_state=state.estimator_state,
            estimator_loss=state.estimator_loss,
        )

    def step(rng_key: jax.Array, state: GenerativeState):
        dtype = state.data.dtype
        eta = schedule(state.step) * state.step_size_scale
        if ratio_estimator == "classifier":
            proposal = classifier_step(rng_key, state, eta)
        else:
            proposal = score_step(rng_key, state, eta)

        finite = jnp.isfinite(proposal.divergences)
        num_finite = jnp.maximum(num_particles - proposal.num_nonfinite, 1)
        safe = jnp.where(finite, proposal.divergences, 0.0)
        divergence = jnp.sum(safe) / num_finite
        squares = jnp.where(finite, (safe - divergence) ** 2, 0.0)
        divergence_stderr = jnp.sqrt(jnp.sum(squares)) / num_finite

        new_params = proposal.params
        accepted = (
            (proposal.num_nonfinite == 0)
            & _tree_all_finite(new_params)
            & jnp.isfinite(proposal.projection_loss)
            & _tree_all_finite(proposal.estimator_params)
        )
        new_transport = jax.vmap(jax.grad(lambda y: apply(new_params, y)))(proposal.x)
        displacement = jnp.mean(jnp.sum((new_transport - proposal.transport) ** 2, -1))
        relative_loss = proposal.projection_loss / jnp.maximum(
            proposal.target_spread, jnp.finfo(dtype).tiny
        )

        growth = jnp.where(accepted, step_size_growth, step_size_shrink)
        new_state = GenerativeState(
            params=_tree_where(accepted, new_params, state.params),
            projection_state=_tree_where(
                accepted, proposal.projection_state, state.projection_state
            ),
            estimator_params=_tree_where(
                accepted, proposal.estimator_params, state.estimator_params
            ),
            estimator_state=_tree_where(
                accepted, proposal.estimator_state, state.estimator_state
            ),
            estimator_loss=jnp.where(
                accepted, proposal.estimator_loss, state.estimator_loss
            ),
            data=state.data,
            loc=state.loc,
            scale=state.scale,
            step=state.step + 1,
            step_size_scale=jnp.minimum(1.0, state.step_size_scale * growth),
            consecutive_rejections=jnp.where(
                accepted, 0, state.consecutive_rejections + 1
            ),
        )
        zero = jnp.zeros((), dtype)
        info = GenerativeInfo(
            step_size=jnp.where(accepted, eta, zero),
            divergence=divergence,
            divergence_stderr=divergence_stderr,
            displacement=jnp.where(accepted, displacement, zero),
            projection_loss=jnp.where(accepted, relative_loss, zero),
            estimator_loss=proposal.estimator_loss,
            accepted=accepted,
            num_nonfinite=proposal.num_nonfinite,
        )
        return new_state, info

    return GenerativeAlgorithm(init=init, step=step)
