r"""Score ``grad log pi`` of a data distribution by denoising score matching.

Denoising score matching (Vincent, "A connection between score matching and
denoising autoencoders", Neural Computation 23(7), 2011) trains ``s(w)`` to
minimize

.. math::

    E_{w \sim \pi,\ e \sim N(0, I)} \,\big|\sigma\, s(w + \sigma e) + e\big|^2,

whose minimizer is the score of the smoothed law ``pi * N(0, sigma^2 I)``. The
estimate is therefore biased by the smoothing: a model fitted to it has its
covariance inflated by ``sigma^2 I`` (in the coordinates of ``w``).
"""

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["ScoreFit", "ScoreNetwork", "denoising_loss", "fit_score"]


class ScoreNetwork(nn.Module):
    """Score ``s(w) = B w + c + MLP(w)`` of one point ``w`` ``(dim,)``.

    ``B`` starts at ``-I`` and ``c`` and the MLP's output layer at zero, so the
    initial score is that of ``N(0, I)``, the law of whitened data to first
    order.

    Attributes:
        hidden_sizes: Widths of the MLP's hidden layers (SiLU activations).
    """

    hidden_sizes: Sequence[int] = (64, 64)

    @nn.compact
    def __call__(self, w: jax.Array) -> jax.Array:
        """Evaluate ``s(w)`` at one point of shape ``(dim,)``; shape ``(dim,)``."""
        dim = w.shape[-1]

        def minus_identity(key, shape, dtype):
            return -jnp.eye(shape[0], shape[1], dtype=dtype)

        score = nn.Dense(dim, kernel_init=minus_identity, name="linear")(w)
        hidden = w
        for k, width in enumerate(self.hidden_sizes):
            hidden = jax.nn.silu(nn.Dense(width, name=f"hidden_{k}")(hidden))
        if self.hidden_sizes:
            output = nn.Dense(dim, kernel_init=nn.initializers.zeros, name="output")
            score = score + output(hidden)
        return score


def denoising_loss(
    network: ScoreNetwork,
    params: dict,
    rng_key: jax.Array,
    draws: jax.Array,
    noise_scale: float,
) -> jax.Array:
    """Denoising loss ``mean |sigma s(w + sigma e) + e|^2`` over ``draws`` ``(n, d)``.

    Args:
        network: The score network.
        params: Its ``params`` collection.
        rng_key: Key for the noise ``e``.
        draws: Data draws ``w``, shape ``(n, dim)``.
        noise_scale: ``sigma``.

    Returns:
        The loss, a scalar.
    """
    noise = jax.random.normal(rng_key, draws.shape, draws.dtype)
    noisy = draws + noise_scale * noise
    scores = jax.vmap(lambda w: network.apply({"params": params}, w))(noisy)
    return jnp.mean(jnp.sum((noise_scale * scores + noise) ** 2, axis=-1))


class ScoreFit(NamedTuple):
    """Result of :func:`fit_score`.

    Attributes:
        network: The score network.
        params: Its fitted ``params`` collection.
        loss: Denoising loss of each Adam step, shape ``(num_steps,)``.
    """

    network: ScoreNetwork
    params: dict
    loss: jax.Array


def fit_score(
    rng_key: jax.Array,
    draws: jax.Array,
    *,
    hidden_sizes: Sequence[int] = (64, 64),
    noise_scale: float = 0.1,
    num_steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
) -> ScoreFit:
    """Fit a :class:`ScoreNetwork` to ``draws`` by denoising score matching.

    Each Adam step uses ``batch_size`` draws picked at random (with
    replacement) and fresh noise. The draws should be roughly standardized,
    because ``noise_scale`` is in their units.

    Args:
        rng_key: Key for the initialization, the minibatches and the noise.
        draws: Data draws, shape ``(num_draws, dim)``.
        hidden_sizes: Widths of the network's MLP.
        noise_scale: ``sigma``, the standard deviation of the added noise.
        num_steps: Adam steps.
        batch_size: Draws per step.
        learning_rate: Adam learning rate.

    Returns:
        The fitted network and its loss trace.

    Raises:
        ValueError: If ``draws`` is not 2-d, or a count or ``noise_scale`` is
            not positive.
    """
    if jnp.ndim(draws) != 2:
        raise ValueError(
            f"draws must have shape (num_draws, dim), got shape {jnp.shape(draws)}"
        )
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale!r}")
    network = ScoreNetwork(tuple(hidden_sizes))
    init_key, loop_key = jax.random.split(rng_key)
    params = network.init(init_key, draws[0])["params"]
    optimizer = optax.adam(learning_rate)

    def step(carry, key):
        params, opt_state = carry
        batch_key, noise_key = jax.random.split(key)
        index = jax.random.randint(batch_key, (batch_size,), 0, draws.shape[0])
        loss, grads = jax.value_and_grad(
            lambda p: denoising_loss(network, p, noise_key, draws[index], noise_scale)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    keys = jax.random.split(loop_key, num_steps)
    (params, _), loss = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return ScoreFit(network=network, params=params, loss=loss)
