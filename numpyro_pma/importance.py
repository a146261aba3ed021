"""Importance weights of guide draws against the model, and estimates built on them.

For draws ``z_s ~ q`` from a fitted guide, the importance log weight is

    log w_s = log p(y, z_s) - log q(z_s),

with ``log p(y, z)`` the model's log joint density and ``log q`` the guide's log
density, both in the constrained space of the model's sites. These numbers give
the ELBO (their mean), the log evidence ``log Z = log E_q[w]``, the importance
effective sample size and the Pareto k-hat diagnostic of Pareto smoothed
importance sampling (PSIS).

The draws go through NumPyro's trace machinery (``log_density`` on a seeded guide,
then on the model replayed against the guide's trace), so every NumPyro guide
works, including guides whose transformed distributions return log-determinant
intermediates from their forward pass.

Non-finite log weights (``nan``, ``+inf`` or ``-inf``) are kept in
:class:`ImportanceDraws` and counted in ``num_nonfinite``. The estimators in this
module never average them in: they raise ``ValueError`` stating how many there
are.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.util import log_density
from scipy.special import logsumexp

__all__ = [
    "ImportanceDraws",
    "MonteCarloEstimate",
    "elbo_estimate",
    "importance_ess",
    "importance_log_weights",
    "log_evidence_estimate",
    "pareto_khat",
    "psis_log_weights",
]

# Log weights whose range is below this are treated as constant: all weights then
# agree within a factor 1 + 1e-6, so every importance-sampling estimate equals the
# plain average to that relative precision and there is no tail to fit.
_CONSTANT_LOG_WEIGHT_RANGE = 1e-6


class ImportanceDraws(NamedTuple):
    """Guide draws with their importance log weights.

    Attributes:
        samples: Constrained value of every latent sample site and deterministic
            site of the model, keyed by site name, each of shape
            ``(num_samples, *site_shape)``.
        log_joint: Model log joint density ``log p(y, z_s)``, shape
            ``(num_samples,)``.
        log_guide: Guide log density ``log q(z_s)``, shape ``(num_samples,)``.
        log_weights: ``log_joint - log_guide``, shape ``(num_samples,)``.
            Non-finite entries are kept.
        num_nonfinite: Number of non-finite entries of ``log_weights``.
    """

    samples: dict[str, jax.Array]
    log_joint: jax.Array
    log_guide: jax.Array
    log_weights: jax.Array
    num_nonfinite: int


class MonteCarloEstimate(NamedTuple):
    """A Monte Carlo estimate with its standard error.

    Attributes:
        value: The estimate.
        stderr: Its Monte Carlo standard error.
    """

    value: float
    stderr: float


def _is_latent(site: Mapping[str, Any]) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def _trace_guide_and_model(
    rng_key: jax.Array,
    model: Callable,
    guide: Callable,
    params: Mapping[str, Any],
    model_args: tuple,
    model_kwargs: dict,
) -> tuple[dict, dict]:
    """Run the guide once and the model replayed against it, outside of jit."""
    guide_key, model_key = jax.random.split(rng_key)
    guide_trace = trace(seed(substitute(guide, data=params), guide_key)).get_trace(
        *model_args, **model_kwargs
    )
    model_trace = trace(
        seed(substitute(replay(model, guide_trace), data=params), model_key)
    ).get_trace(*model_args, **model_kwargs)
    return guide_trace, model_trace


def _check_integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{name} must be an integer, got {value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def importance_log_weights(
    rng_key: jax.Array,
    model: Callable,
    guide: Callable,
    params: Mapping[str, Any],
    *model_args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    **model_kwargs: Any,
) -> ImportanceDraws:
    """Draw ``z_s ~ q`` from the guide and compute ``log p(y, z_s) - log q(z_s)``.

    Each draw runs the guide under its own seed, takes ``log q(z_s)`` from the
    guide's trace (NumPyro's ``log_density``), replays the model against that
    trace and takes ``log p(y, z_s)`` from the model's trace. The single-draw
    function is vectorized with ``jax.vmap`` over ``num_samples`` keys, or over
    chunks of ``chunk_size`` keys in sequence, and compiled with ``jax.jit``.
    Model arguments enter the compiled function as constants, so every call
    compiles it again.

    Args:
        rng_key: PRNG key for the guide draws.
        model: NumPyro model.
        guide: NumPyro guide for ``model``, e.g. an autoguide; it must sample
            every latent site of the model.
        params: Guide parameters in the constrained space, as returned by
            ``SVI.get_params`` or ``SVIRunResult.params``.
        *model_args: Positional arguments of ``model`` and ``guide``.
        num_samples: Number of draws ``S``, at least 2.
        chunk_size: Number of draws evaluated at once; ``None`` evaluates all of
            them together. A smaller value bounds memory, which grows with
            ``chunk_size`` times the size of the model's per-draw arrays (for
            example the observation log-likelihoods).
        **model_kwargs: Keyword arguments of ``model`` and ``guide``.

    Returns:
        The draws with ``log_joint``, ``log_guide`` and ``log_weights`` of shape
        ``(num_samples,)``. Non-finite log weights are kept and counted.

    Raises:
        TypeError: If ``num_samples`` or ``chunk_size`` is not an integer, or
            ``params`` is not a mapping.
        ValueError: If ``num_samples < 2`` or ``chunk_size < 1``, or if the guide
            does not sample some latent site of the model.
    """
    _check_integer("num_samples", num_samples, minimum=2)
    if chunk_size is not None:
        _check_integer("chunk_size", chunk_size, minimum=1)
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a mapping of guide parameter names to values, got "
            f"{type(params).__name__}"
        )
    params = dict(params)

    # One eager run sets up an autoguide's prototype outside of jit (setting it up
    # inside a traced function would store tracers on the guide). It also checks
    # that the guide covers the model before anything is compiled.
    guide_trace, model_trace = _trace_guide_and_model(
        rng_key, model, guide, params, model_args, model_kwargs
    )
    missing = [
        name
        for name, site in model_trace.items()
        if _is_latent(site) and name not in guide_trace
    ]
    if missing:
        raise ValueError(
            f"The guide does not sample the latent sites {missing} of the model, so "
            "the model would draw them from their priors and the weights would be "
            "wrong. Use a guide that covers every latent site."
        )

    def single_draw(key: jax.Array, params: dict) -> tuple[dict, jax.Array, jax.Array]:
        guide_key, model_key = jax.random.split(key)
        log_guide, guide_trace = log_density(
            seed(guide, guide_key), model_args, model_kwargs, params
        )
        log_joint, model_trace = log_density(
            seed(replay(model, guide_trace), model_key),
            model_args,
            model_kwargs,
            params,
        )
        samples = {
            name: site["value"]
            for name, site in model_trace.items()
            if _is_latent(site) or site["type"] == "deterministic"
        }
        return samples, log_joint, log_guide

    @jax.jit
    def draw_all(keys: jax.Array, params: dict) -> tuple[dict, jax.Array, jax.Array]:
        if chunk_size is None:
            return jax.vmap(single_draw, in_axes=(0, None))(keys, params)
        return jax.lax.map(
            lambda key: single_draw(key, params), keys, batch_size=chunk_size
        )

    keys = jax.random.split(rng_key, num_samples)
    samples, log_joint, log_guide = draw_all(keys, params)

    log_weights = log_joint - log_guide
    num_nonfinite = int(jnp.sum(~jnp.isfinite(log_weights)))
    return ImportanceDraws(
        samples=samples,
        log_joint=log_joint,
        log_guide=log_guide,
        log_weights=log_weights,
        num_nonfinite=num_nonfinite,
    )


def _as_finite_log_weights(log_weights: Any) -> np.ndarray:
    """Convert to a float64 vector, rejecting bad shapes and non-finite values."""
    array = np.asarray(log_weights, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(
            f"log_weights must be a vector of shape (num_samples,), got shape "
            f"{array.shape}"
        )
    if array.shape[0] < 2:
        raise ValueError(
            f"log_weights must contain at least 2 values, got {array.shape[0]}"
        )
    num_nonfinite = int(np.sum(~np.isfinite(array)))
    if num_nonfinite:
        num_nan = int(np.sum(np.isnan(array)))
        raise ValueError(
            f"log_weights contains {num_nonfinite} non-finite values out of "
            f"{array.shape[0]} ({num_nan} nan, {num_nonfinite - num_nan} infinite); "
            "they are not averaged in. A -inf weight marks a guide draw where the "
            "model density is zero, nan or +inf a numerical failure; inspect the "
            "draws at those indices (ImportanceDraws.samples) before trusting any "
            "estimate."
        )
    return array


def elbo_estimate(log_weights: Any) -> MonteCarloEstimate:
    """Estimate the ELBO ``E_q[log p(y, z) - log q(z)]`` by the mean log weight.

    The standard error is ``std(log_weights, ddof=1) / sqrt(S)``.

    Args:
        log_weights: Importance log weights of shape ``(S,)``.

    Returns:
        The ELBO estimate and its standard error.

    Raises:
        ValueError: If ``log_weights`` is not a vector of at least 2 values or
            contains non-finite values (the message gives their count).
    """
    array = _as_finite_log_weights(log_weights)
    num_samples = array.shape[0]
    elbo = float(np.mean(array))
    stderr = float(np.std(array, ddof=1) / np.sqrt(num_samples))
    return MonteCarloEstimate(value=elbo, stderr=stderr)


def log_evidence_estimate(log_weights: Any) -> MonteCarloEstimate:
    """Estimate ``log Z = log E_q[w]`` by ``logsumexp(log_weights) - log S``.

    The standard error is the delta-method one: with ``w_s`` the weights,
    ``se(log Z) = std(w, ddof=1) / (sqrt(S) * mean(w))``, computed on weights
    rescaled by ``exp(-max log_weights)``, which leaves the ratio unchanged.
    The estimate is biased downward by about ``se**2 / 2`` (Jensen's inequality),
    and the standard error itself is unreliable when the Pareto k-hat exceeds 0.7.

    Args:
        log_weights: Importance log weights of shape ``(S,)``.

    Returns:
        The log evidence estimate and its standard error.

    Raises:
        ValueError: If ``log_weights`` is not a vector of at least 2 values or
            contains non-finite values (the message gives their count).
    """
    array = _as_finite_log_weights(log_weights)
    num_samples = array.shape[0]
    log_z = float(logsumexp(array) - np.log(num_samples))

    scaled_weights = np.exp(array - np.max(array))
    stderr = float(
        np.std(scaled_weights, ddof=1)
        / (np.sqrt(num_samples) * np.mean(scaled_weights))
    )
    return MonteCarloEstimate(value=log_z, stderr=stderr)


def importance_ess(log_weights: Any) -> float:
    """Compute Kish's effective sample size ``(sum_s w_s)**2 / sum_s w_s**2``.

    It lies between 1 (one weight dominates) and ``S`` (equal weights).

    Args:
        log_weights: Importance log weights of shape ``(S,)``.

    Returns:
        The effective sample size.

    Raises:
        ValueError: If ``log_weights`` is not a vector of at least 2 values or
            contains non-finite values (the message gives their count).
    """
    array = _as_finite_log_weights(log_weights)
    return float(np.exp(2.0 * logsumexp(array) - logsumexp(2.0 * array)))


def _arviz_major_version() -> int:
    return int(az.__version__.split(".")[0])


def psis_log_weights(log_weights: Any) -> tuple[np.ndarray, float]:
    """Pareto-smooth importance log weights (PSIS) and estimate the tail shape k-hat.

    Uses ``arviz.psislw`` with relative efficiency 1, since guide draws are
    independent. Log weights whose range is below 1e-6 are treated as constant,
    because the guide then matches the target up to a constant factor. In that
    case the smoothed weights are uniform and k-hat is reported as ``-inf``.
    ArviZ 0.23 would report ``inf`` there, because it finds no tail to fit.

    Args:
        log_weights: Importance log weights of shape ``(S,)``.

    Returns:
        A pair: the smoothed log weights of shape ``(S,)``, normalized so that
        their exponentials sum to 1, and the Pareto shape estimate k-hat.

    Raises:
        ValueError: If ``log_weights`` is not a vector of at least 2 values or
            contains non-finite values (the message gives their count).
    """
    array = _as_finite_log_weights(log_weights)
    num_samples = array.shape[0]
    if np.ptp(array) < _CONSTANT_LOG_WEIGHT_RANGE:
        return np.full(num_samples, -np.log(num_samples)), -np.inf

    if _arviz_major_version() < 1:
        smoothed, khat = az.psislw(array, reff=1.0)
    else:
        # NOTE: untested, because Python 3.11 caps ArviZ at 0.23. ArviZ 1.x moved
        # PSIS to arviz-stats, whose array function negates its input (it expects
        # log-likelihood values, as in PSIS-LOO), hence the minus sign.
        from arviz_stats.base import array_stats

        smoothed, khat = array_stats.psislw(-array, r_eff=1.0)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    smoothed = smoothed - logsumexp(smoothed)
    return smoothed, float(khat)


def pareto_khat(log_weights: Any) -> float:
    """Estimate the Pareto k-hat of the importance weights.

    k-hat is the shape parameter of a generalized Pareto distribution fitted to
    the largest weights (Vehtari, Simpson, Gelman, Yao and Gabry, "Pareto
    smoothed importance sampling", JMLR 2024). Below 0.5 the weights have finite
    variance; above 0.7 importance-sampling estimates are unreliable. See
    :func:`psis_log_weights` for the computation and the constant-weight case.

    Args:
        log_weights: Importance log weights of shape ``(S,)``.

    Returns:
        The k-hat estimate; ``inf`` when ArviZ finds too few tail draws to fit.

    Raises:
        ValueError: If ``log_weights`` is not a vector of at least 2 values or
            contains non-finite values (the message gives their count).
    """
    _, khat = psis_log_weights(log_weights)
    return khat
