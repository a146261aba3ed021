"""A NumPyro model seen as a log density on the flat unconstrained space R^d.

Every inference method in this package (PMA, ELBO training, NUTS baselines,
diagnostics) works with the same object: the log joint density ``l(z)`` of the
model at a flat vector ``z`` of unconstrained latent values, Jacobians of the
support transforms included, so that ``pi(z) ∝ exp(l(z))``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model

__all__ = ["FlatModel", "flatten_model"]


class FlatModel(NamedTuple):
    """A NumPyro model with its latent sites packed into one vector.

    Attributes:
        logdensity_fn: ``z -> l(z)``, the unnormalized log posterior density at a
            flat unconstrained vector ``z`` of shape ``(dim,)``; NumPyro's
            ``potential_fn`` is ``-l``.
        dim: Number of unconstrained latent dimensions ``d``.
        init_position: Initial point of shape ``(dim,)`` from the init strategy.
        unravel_fn: Maps ``z`` of shape ``(dim,)`` to a dict of unconstrained
            site values.
        constrain_fn: Maps ``z`` of shape ``(dim,)`` to a dict of constrained
            site values, deterministic sites included.
        site_shapes: Shape of each latent site's constrained value.
    """

    logdensity_fn: Callable[[jax.Array], jax.Array]
    dim: int
    init_position: jax.Array
    unravel_fn: Callable[[jax.Array], dict]
    constrain_fn: Callable[[jax.Array], dict]
    site_shapes: dict[str, tuple[int, ...]]


def flatten_model(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    *,
    init_strategy: Callable = init_to_median,
) -> FlatModel:
    """Build the flat log density ``l(z)`` of ``model`` at the given arguments.

    Args:
        rng_key: Key for the init strategy (and for any subsampling in the model).
        model: A NumPyro model with continuous latent sites only.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        init_strategy: NumPyro init strategy that picks ``init_position``.

    Returns:
        The model's :class:`FlatModel`.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    model_info = initialize_model(
        rng_key,
        model,
        init_strategy=init_strategy,
        model_args=model_args,
        model_kwargs=model_kwargs,
    )
    init_params = model_info.param_info.z
    init_position, unravel_fn = ravel_pytree(init_params)
    potential_fn = model_info.potential_fn
    postprocess_fn = model_info.postprocess_fn

    def logdensity_fn(z):
        return -potential_fn(unravel_fn(z))

    def constrain_fn(z):
        return postprocess_fn(unravel_fn(z))

    site_shapes = {
        name: tuple(jnp.shape(site["value"]))
        for name, site in model_info.model_trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    return FlatModel(
        logdensity_fn=logdensity_fn,
        dim=int(init_position.shape[0]),
        init_position=init_position,
        unravel_fn=unravel_fn,
        constrain_fn=constrain_fn,
        site_shapes=site_shapes,
    )
