"""Guide draws as ArviZ ``InferenceData``, with the log densities PSIS needs.

ArviZ's own converters expect MCMC output. :func:`to_inference_data` stores the
draws of a fitted guide as one chain, in the model's constrained space and site
names, with dimensions named after the model's plates. Its ``sample_stats``
group keeps per draw the model log joint ``lp``, the guide log density ``log_q``
and the importance log weight ``log_weight = lp - log_q``.
"""

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import arviz as az
import jax
import numpy as np
import numpyro
import xarray as xr
from numpyro.handlers import seed, substitute, trace, uncondition
from numpyro.infer import Predictive

from numpyro_pma.importance import ImportanceDraws, importance_log_weights

__all__ = ["to_inference_data"]


def _site_dims(name: str, site: Mapping[str, Any], shape: tuple[int, ...]) -> list[str]:
    """Name each axis of a site value of shape ``shape``.

    Batch axes that a plate covers take the plate's name when the plate size
    matches the axis length. Every other axis gets ArviZ's default name
    ``f"{name}_dim_{i}"``.
    """
    dims = [f"{name}_dim_{axis}" for axis in range(len(shape))]
    event_dim = 0
    if site["type"] == "sample":
        event_dim = site["fn"].event_dim
    batch_ndim = len(shape) - event_dim
    for frame in site.get("cond_indep_stack", []):
        # A plate's dim counts from the right of the batch shape, e.g. -1 is the
        # last batch axis.
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and shape[axis] == frame.size:
            dims[axis] = frame.name
    return dims


def _dataset(
    values: Mapping[str, np.ndarray],
    dims: Mapping[str, list[str]],
    leading_dims: list[str],
    attrs: dict[str, Any],
) -> xr.Dataset:
    """Build a Dataset with integer coordinates on every dimension."""
    data_vars = {}
    coords: dict[str, np.ndarray] = {}
    for name, value in values.items():
        value_dims = [*leading_dims, *dims[name]]
        data_vars[name] = (value_dims, value)
        for dim, length in zip(value_dims, value.shape, strict=True):
            coords.setdefault(dim, np.arange(length))
    return xr.Dataset(data_vars=data_vars, coords=coords, attrs=attrs)


def _make_inference_data(groups: dict[str, xr.Dataset]) -> Any:
    if int(az.__version__.split(".")[0]) < 1:
        return az.InferenceData(**groups)
    # NOTE: untested, because Python 3.11 caps ArviZ at 0.23. ArviZ 1.x stores
    # groups in an xarray DataTree instead of InferenceData.
    return xr.DataTree.from_dict(groups)


def to_inference_data(
    guide: Callable,
    params: Mapping[str, Any],
    *model_args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    rng_key: jax.Array | None = None,
    posterior_predictive: bool = False,
    draws: ImportanceDraws | None = None,
    model: Callable | None = None,
    **model_kwargs: Any,
) -> az.InferenceData:
    """Convert draws of a fitted guide to ArviZ ``InferenceData``.

    Groups:

    - ``posterior``: every latent and deterministic site in the constrained
      space, shape ``(1, num_samples, *site_shape)`` with dims ``("chain",
      "draw", ...)``. An axis that a plate covers is named after the plate
      (a site in ``numpyro.plate("J", 8)`` gets dim ``"J"``); other axes get
      ArviZ's default names ``f"{site}_dim_{i}"``.
    - ``sample_stats``: ``lp`` (model log joint ``log p(y, z)``), ``log_q``
      (guide log density ``log q(z)``) and ``log_weight`` (``lp - log_q``),
      each of shape ``(1, num_samples)``.
    - ``observed_data``: the observed sites of the model.
    - ``posterior_predictive`` (when requested): replicated observed sites, one
      per guide draw, from ``numpyro.infer.Predictive``.

    Args:
        guide: Fitted NumPyro guide.
        params: Guide parameters in the constrained space (``SVI.get_params``).
        *model_args: Positional arguments of the model and the guide.
        num_samples: Number of guide draws; ignored when ``draws`` is given.
        chunk_size: Number of draws evaluated at once, to bound memory; ``None``
            evaluates all of them together. Ignored when ``draws`` is given.
        rng_key: PRNG key for the guide draws and the posterior predictive draws.
            Required unless ``draws`` is given and ``posterior_predictive`` is
            False.
        posterior_predictive: Whether to add the ``posterior_predictive`` group.
        draws: Draws from :func:`~numpyro_pma.importance.importance_log_weights`
            for the same model, guide and arguments, to avoid drawing again.
        model: NumPyro model; defaults to ``guide.model``, which every NumPyro
            autoguide has.
        **model_kwargs: Keyword arguments of the model and the guide.

    Returns:
        The ``InferenceData`` (an ``xarray.DataTree`` with ArviZ 1.x). It saves
        with ``idata.to_netcdf(path)`` and loads with ``az.from_netcdf(path)``.

    Raises:
        TypeError: If no model is given and ``guide`` has no ``model`` attribute,
            or ``draws`` is not an ``ImportanceDraws``.
        ValueError: If ``rng_key`` is missing where it is needed.
    """
    if model is None:
        model = getattr(guide, "model", None)
        if model is None:
            raise TypeError(
                f"model is required because the guide {guide!r} has no model "
                "attribute; pass model=your_model"
            )
    if draws is not None and not isinstance(draws, ImportanceDraws):
        raise TypeError(
            f"draws must be an ImportanceDraws or None, got {type(draws).__name__}"
        )
    if rng_key is None and (draws is None or posterior_predictive):
        raise ValueError(
            "rng_key is required to draw from the guide or the posterior predictive "
            f"(draws given: {draws is not None}, posterior_predictive="
            f"{posterior_predictive}); pass rng_key=jax.random.PRNGKey(...)"
        )

    if rng_key is not None:
        draws_key, predictive_key = jax.random.split(rng_key)
    if draws is None:
        draws = importance_log_weights(
            draws_key,
            model,
            guide,
            params,
            *model_args,
            num_samples=num_samples,
            chunk_size=chunk_size,
            **model_kwargs,
        )
    samples = {name: np.asarray(value) for name, value in draws.samples.items()}
    num_draws = int(np.shape(draws.log_weights)[0])
    sample_lengths = {name: value.shape[0] for name, value in samples.items()}
    if not samples or any(length != num_draws for length in sample_lengths.values()):
        raise ValueError(
            f"draws must hold {num_draws} draws of at least one site, matching its "
            f"{num_draws} log weights; got leading lengths {sample_lengths}"
        )

    # One model run at the first draw gives the plates and the observed values.
    first_draw = {name: value[0] for name, value in samples.items()}
    model_trace = trace(seed(substitute(model, data=first_draw), rng_seed=0)).get_trace(
        *model_args, **model_kwargs
    )
    dims = {
        name: _site_dims(name, model_trace[name], value.shape[1:])
        for name, value in samples.items()
    }
    observed = {
        name: np.asarray(site["value"])
        for name, site in model_trace.items()
        if site["type"] == "sample" and site["is_observed"]
    }
    dims.update(
        {
            name: _site_dims(name, model_trace[name], value.shape)
            for name, value in observed.items()
        }
    )

    attrs = {
        "created_at": datetime.now(UTC).isoformat(),
        "arviz_version": az.__version__,
        "inference_library": "numpyro",
        "inference_library_version": numpyro.__version__,
        "guide": type(guide).__name__,
        "num_nonfinite_log_weights": int(draws.num_nonfinite),
    }
    chain_draw = ["chain", "draw"]
    groups = {
        "posterior": _dataset(
            {name: value[None] for name, value in samples.items()},
            dims,
            chain_draw,
            attrs,
        ),
        "sample_stats": _dataset(
            {
                "lp": np.asarray(draws.log_joint)[None],
                "log_q": np.asarray(draws.log_guide)[None],
                "log_weight": np.asarray(draws.log_weights)[None],
            },
            {"lp": [], "log_q": [], "log_weight": []},
            chain_draw,
            attrs,
        ),
    }
    if observed:
        groups["observed_data"] = _dataset(observed, dims, [], attrs)

    if posterior_predictive:
        latent_samples = {
            name: draws.samples[name]
            for name, site in model_trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        predictive = Predictive(
            uncondition(model),
            posterior_samples=latent_samples,
            return_sites=list(observed),
        )
        predictions = predictive(predictive_key, *model_args, **model_kwargs)
        groups["posterior_predictive"] = _dataset(
            {name: np.asarray(predictions[name])[None] for name in observed},
            dims,
            chain_draw,
            attrs,
        )

    return _make_inference_data(groups)
