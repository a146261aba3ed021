r"""Log density ratio by logistic regression (a GAN-style discriminator).

A classifier ``f`` trained to tell draws of ``p`` (label 1) from an equal
number of draws of ``q`` (label 0) by the logistic loss

.. math::

    L(f) = E_p[\log(1 + e^{-f(w)})] + E_q[\log(1 + e^{f(w)})]

is minimized by ``f(w) = log p(w) - log q(w)``, so its logit estimates the log
density ratio without either density being known. The classifier here is a
quadratic form plus a small MLP: with ``hidden_sizes=()`` it is logistic
regression on quadratic features, which contains the exact log ratio of two
Gaussians.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LogRatioFit",
    "RatioClassifier",
    "classifier_loss",
    "fit_log_ratio",
    "train_classifier",
]


class RatioClassifier(nn.Module):
    """Logit ``f(w) = c + b'w + w'Qw/2 + MLP(w)`` of one point ``w`` ``(dim,)``.

    ``Q`` is the symmetric part of a free ``(dim, dim)`` matrix. Every
    coefficient and the MLP's output layer start at zero, so the initial logit
    is 0 everywhere.

    Attributes:
        hidden_sizes: Widths of the MLP's hidden layers (softplus activations);
            ``()`` leaves only the quadratic form.
    """

    hidden_sizes: Sequence[int] = (32, 32)

    @nn.compact
    def __call__(self, w: jax.Array) -> jax.Array:
        """Evaluate the logit at one point ``w`` of shape ``(dim,)``; a scalar."""
        dim = w.shape[-1]
        linear = nn.Dense(1, kernel_init=nn.initializers.zeros, name="linear")(w)
        raw = self.param("quadratic", nn.initializers.zeros, (dim, dim), w.dtype)
        logit = linear[0] + 0.5 * w @ (0.5 * (raw + raw.T)) @ w
        hidden = w
        for k, width in enumerate(self.hidden_sizes):
            hidden = jax.nn.softplus(nn.Dense(width, name=f"hidden_{k}")(hidden))
        if self.hidden_sizes:
            output = nn.Dense(1, kernel_init=nn.initializers.zeros, name="output")
            logit = logit + output(hidden)[0]
        return logit


def classifier_loss(
    logit_fn: Callable[[jax.Array], jax.Array],
    numerator_draws: jax.Array,
    denominator_draws: jax.Array,
) -> jax.Array:
    """Logistic loss ``mean softplus(-f(a)) + mean softplus(f(b))``.

    Args:
        logit_fn: ``f``, maps a point of shape ``(dim,)`` to a scalar.
        numerator_draws: Draws ``a`` of ``p`` (label 1), shape ``(n, dim)``.
        denominator_draws: Draws ``b`` of ``q`` (label 0), shape ``(n, dim)``.

    Returns:
        The loss, a scalar; ``2 log 2`` for ``f = 0``.
    """
    logit_p = jax.vmap(logit_fn)(numerator_draws)
    logit_q = jax.vmap(logit_fn)(denominator_draws)
    return jnp.mean(jax.nn.softplus(-logit_p)) + jnp.mean(jax.nn.softplus(logit_q))


def train_classifier(
    classifier: RatioClassifier,
    params: dict,
    optimizer_state: optax.OptState,
    numerator_draws: jax.Array,
    denominator_draws: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
):
    """Take ``num_steps`` optimizer steps on :func:`classifier_loss`, full batch.

    Args:
        classifier: The classifier module.
        params: Its starting ``params`` collection (warm start).
        optimizer_state: State of ``optimizer`` for ``params``.
        numerator_draws: Draws of ``p``, shape ``(n, dim)``.
        denominator_draws: Draws of ``q``, shape ``(n, dim)``.
        optimizer: Optax optimizer.
        num_steps: Number of optimizer steps.

    Returns:
        ``(params, optimizer_state, loss)`` with ``loss`` the logistic loss of
        the returned parameters on the batch.
    """

    def loss_fn(trainable):
        def logit_fn(point):
            return classifier.apply({"params": trainable}, point)

        return classifier_loss(logit_fn, numerator_draws, denominator_draws)

    def optimizer_step(carry, _):
        trainable, opt_state = carry
        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), None

    (params, optimizer_state), _ = jax.lax.scan(
        optimizer_step, (params, optimizer_state), None, length=num_steps
    )
    return params, optimizer_state, loss_fn(params)


class LogRatioFit(NamedTuple):
    """Result of :func:`fit_log_ratio`.

    Attributes:
        classifier: The classifier module.
        params: Its fitted ``params`` collection.
        loss: Logistic loss after each optimizer step, shape ``(num_steps,)``.
    """

    classifier: RatioClassifier
    params: dict
    loss: jax.Array

    def log_ratio(self, points: jax.Array) -> jax.Array:
        """Estimate ``log p - log q`` at ``points`` ``(..., dim)``; shape ``(...)``."""
        points = jnp.asarray(points)
        flat = jnp.reshape(points, (-1, points.shape[-1]))
        values = jax.vmap(lambda w: self.classifier.apply({"params": self.params}, w))(
            flat
        )
        return jnp.reshape(values, points.shape[:-1])


def _check_draws(name: str, draws) -> jax.Array:
    array = jnp.asarray(draws)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(
            f"{name} must have shape (num_draws, dim) with num_draws >= 2, got "
            f"shape {array.shape}"
        )
    if not np.all(np.isfinite(np.asarray(array))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return jnp.asarray(array, jnp.result_type(float))


def fit_log_ratio(
    rng_key: jax.Array,
    numerator_draws: jax.Array,
    denominator_draws: jax.Array,
    *,
    hidden_sizes: Sequence[int] = (32, 32),
    num_steps: int = 2000,
    batch_size: int = 512,
    learning_rate: float = 1e-2,
) -> LogRatioFit:
    """Estimate ``log p(w) - log q(w)`` from draws of ``p`` and of ``q``.

    Trains a :class:`RatioClassifier` by Adam on the logistic loss, each step on
    ``batch_size`` draws of each set picked at random (with replacement).

    Args:
        rng_key: Key for the initialization and the minibatches.
        numerator_draws: Draws of ``p``, shape ``(num_p, dim)``.
        denominator_draws: Draws of ``q``, shape ``(num_q, dim)``.
        hidden_sizes: Widths of the classifier's MLP.
        num_steps: Adam steps.
        batch_size: Draws of each set per step.
        learning_rate: Adam learning rate.

    Returns:
        The fitted classifier; ``fit.log_ratio(points)`` evaluates it.
    """
    numerator_draws = _check_draws("numerator_draws", numerator_draws)
    denominator_draws = _check_draws("denominator_draws", denominator_draws)
    if numerator_draws.shape[1] != denominator_draws.shape[1]:
        raise ValueError(
            "numerator_draws and denominator_draws must have the same dim, got "
            f"{numerator_draws.shape[1]} and {denominator_draws.shape[1]}"
        )
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    classifier = RatioClassifier(tuple(hidden_sizes))
    init_key, batch_key = jax.random.split(rng_key)
    params = classifier.init(init_key, numerator_draws[0])["params"]
    optimizer = optax.adam(learning_rate)

    def step(carry, key):
        params, opt_state = carry
        key_p, key_q = jax.random.split(key)
        index_p = jax.random.randint(key_p, (batch_size,), 0, len(numerator_draws))
        index_q = jax.random.randint(key_q, (batch_size,), 0, len(denominator_draws))
        params, opt_state, loss = train_classifier(
            classifier,
            params,
            opt_state,
            numerator_draws[index_p],
            denominator_draws[index_q],
            optimizer=optimizer,
            num_steps=1,
        )
        return (params, opt_state), loss

    keys = jax.random.split(batch_key, num_steps)
    (params, _), loss = jax.jit(lambda carry, keys: jax.lax.scan(step, carry, keys))(
        (params, optimizer.init(params)), keys
    )
    return LogRatioFit(classifier=classifier, params=params, loss=loss)
