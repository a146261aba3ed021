"""Registry of posteriordb reference posteriors with their NumPyro models.

Each posterior bundles a NumPyro model, its data, and posteriordb's gold-standard
reference draws (10 Stan chains of 1000 draws), together with the maps between
the model's latent sites and the reference keys such as ``"beta[3]"``. Reference
keys use Stan's 1-based indices, so ``"beta[3]"`` is ``beta[..., 2]``. The data
and draws come from posteriordb (https://github.com/stan-dev/posteriordb,
BSD 3-Clause licence) and ship with the package.

Example:
    >>> from numpyro_pma.posteriors import load_posterior
    >>> posterior = load_posterior("arK-arK")
    >>> posterior.reference_draws.shape
    (10000, 7)
"""

import json
import re
from collections.abc import Callable, Mapping
from functools import partial
from importlib import resources
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from numpyro_pma.posteriors import models
from numpyro_pma.posteriors.models import gp_cholesky

__all__ = ["Posterior", "list_posteriors", "load_posterior"]

_KEY_PATTERN = re.compile(r"^(\w+)\[(\d+)\]$")


class Posterior(NamedTuple):
    """A reference posterior: model, data and gold-standard draws.

    Attributes:
        name: posteriordb posterior name, ``"<data>-<model>"``.
        model: NumPyro model, called as ``model(**model_kwargs)``.
        model_kwargs: Data of the model built from ``data.json``: jnp arrays, and
            Python ints for sizes that fix array shapes (``K`` of arK).
        dimension: Number of unconstrained latent dimensions.
        reference_keys: Names of the reference columns, in posteriordb order.
        reference_draws: Reference draws of shape ``(num_draws, num_keys)``, the
            10 chains concatenated (chain 0 first).
        reference_chains: The same draws, shape ``(num_chains, num_draws_per_chain,
            num_keys)``.
        to_reference: Maps a dict of constrained samples with a leading sample
            axis (as returned by ``Predictive``, ``guide.sample_posterior`` or
            ``MCMC.get_samples()``) to an array of shape ``(num_samples,
            num_keys)`` in ``reference_keys`` order, computing derived keys
            (such as ``theta = mu + tau * theta_trans``) when the samples lack
            them.
        from_reference: Maps an array of shape ``(num_samples, num_keys)`` to the
            dict of constrained latent sample sites, each with leading axis
            ``num_samples``. Deterministic sites are left out, so the dict can
            be substituted into the model. ``to_reference(from_reference(x))``
            returns ``x``, exactly for keys that are latent sites and up to
            float rounding for derived keys.
    """

    name: str
    model: Callable[..., None]
    model_kwargs: dict[str, Any]
    dimension: int
    reference_keys: list[str]
    reference_draws: np.ndarray
    reference_chains: np.ndarray
    to_reference: Callable[[Mapping[str, Any]], np.ndarray]
    from_reference: Callable[[Any], dict[str, jax.Array]]


# Maps between samples and reference stems. A `derive` function computes the
# reference stems that are not latent sites from the latent sites, and a
# `to_latent` function inverts it. Both take (values, model_kwargs), with
# values a dict of arrays with a leading sample axis.


def _derive_eight_schools(samples, model_kwargs):
    mu, tau = samples["mu"][:, None], samples["tau"][:, None]
    return {"theta": mu + tau * samples["theta_trans"]}


def _latent_eight_schools(values, model_kwargs):
    mu, tau = values["mu"], values["tau"]
    theta_trans = (values["theta"] - mu[:, None]) / tau[:, None]
    return {"mu": mu, "tau": tau, "theta_trans": theta_trans}


def _derive_gp(samples, model_kwargs):
    x = model_kwargs["x"]

    def latent_f(rho, alpha, f_tilde):
        return gp_cholesky(x, rho, alpha) @ f_tilde

    f = jax.vmap(latent_f)(samples["rho"], samples["alpha"], samples["f_tilde"])
    return {"f": f}


def _latent_gp(values, model_kwargs):
    x = model_kwargs["x"]

    def whiten(rho, alpha, f):
        return solve_triangular(gp_cholesky(x, rho, alpha), f, lower=True)

    f_tilde = jax.vmap(whiten)(values["rho"], values["alpha"], values["f"])
    return {"rho": values["rho"], "alpha": values["alpha"], "f_tilde": f_tilde}


def _derive_garch(samples, model_kwargs):
    return {"beta1": (1.0 - samples["alpha1"]) * samples["beta1_raw"]}


def _latent_garch(values, model_kwargs):
    latent = {name: values[name] for name in ("mu", "alpha0", "alpha1")}
    latent["beta1_raw"] = values["beta1"] / (1.0 - values["alpha1"])
    return latent


class _Spec(NamedTuple):
    model: Callable[..., None]
    data_fields: tuple[str, ...]
    int_fields: tuple[str, ...] = ()
    derive: Callable | None = None
    to_latent: Callable | None = None


_REGISTRY: dict[str, _Spec] = {
    "arK-arK": _Spec(models.ark, ("y",), int_fields=("K",)),
    "diamonds-diamonds": _Spec(models.diamonds, ("X", "Y")),
    "earnings-logearn_interaction": _Spec(
        models.logearn_interaction, ("earn", "height", "male")
    ),
    "eight_schools-eight_schools_centered": _Spec(
        models.eight_schools_centered, ("y", "sigma")
    ),
    "eight_schools-eight_schools_noncentered": _Spec(
        models.eight_schools_noncentered,
        ("y", "sigma"),
        derive=_derive_eight_schools,
        to_latent=_latent_eight_schools,
    ),
    "garch-garch11": _Spec(
        models.garch11, ("y", "sigma1"), derive=_derive_garch, to_latent=_latent_garch
    ),
    "gp_pois_regr-gp_pois_regr": _Spec(
        models.gp_pois_regr, ("x", "k"), derive=_derive_gp, to_latent=_latent_gp
    ),
    "kidiq-kidscore_interaction": _Spec(
        models.kidscore_interaction, ("kid_score", "mom_hs", "mom_iq")
    ),
    "mesquite-logmesquite": _Spec(
        models.logmesquite,
        (
            "weight",
            "diam1",
            "diam2",
            "canopy_height",
            "total_height",
            "density",
            "group",
        ),
    ),
    "nes2000-nes": _Spec(
        models.nes,
        (
            "partyid7",
            "real_ideo",
            "race_adj",
            "age_discrete",
            "educ1",
            "gender",
            "income",
        ),
    ),
}


def list_posteriors() -> list[str]:
    """Return the names of all registered posteriors, sorted."""
    return sorted(_REGISTRY)


def load_posterior(name: str) -> Posterior:
    """Load a registered posterior with its data and reference draws.

    Args:
        name: posteriordb posterior name, one of :func:`list_posteriors`.

    Returns:
        The :class:`Posterior`.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: If ``name`` is not a registered posterior.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    if name not in _REGISTRY:
        valid = ", ".join(list_posteriors())
        raise ValueError(f"unknown posterior name {name!r}; valid names: {valid}")
    spec = _REGISTRY[name]

    folder = resources.files(__name__) / "data" / name
    data = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    with (folder / "reference_draws.npz").open("rb") as file:
        with np.load(file) as archive:
            keys = [str(key) for key in archive["__param_names__"]]
            chains = np.stack([archive[key] for key in keys], axis=-1)

    model_kwargs: dict[str, Any] = {
        field: jnp.asarray(np.asarray(data[field])) for field in spec.data_fields
    }
    model_kwargs.update({field: int(data[field]) for field in spec.int_fields})
    stems = _stem_sizes(keys)
    return Posterior(
        name=name,
        model=spec.model,
        model_kwargs=model_kwargs,
        dimension=int(info["dimension"]),
        reference_keys=keys,
        reference_draws=chains.reshape(-1, len(keys)),
        reference_chains=chains,
        to_reference=partial(_to_reference, keys, stems, spec, model_kwargs),
        from_reference=partial(_from_reference, keys, stems, spec, model_kwargs),
    )


def _split_key(key: str) -> tuple[str, int | None]:
    """Split a key into its stem and 0-based index (None for a scalar key).

    ``"beta[3]"`` gives ``("beta", 2)`` and ``"mu"`` gives ``("mu", None)``.
    """
    match = _KEY_PATTERN.match(key)
    if match is None:
        return key, None
    return match.group(1), int(match.group(2)) - 1


def _stem_sizes(keys: list[str]) -> dict[str, int | None]:
    """Map each key stem to its vector length, or None for a scalar stem."""
    sizes: dict[str, int | None] = {}
    for key in keys:
        stem, index = _split_key(key)
        sizes[stem] = None if index is None else max(sizes.get(stem) or 0, index + 1)
    return sizes


def _to_reference(keys, stems, spec, model_kwargs, samples):
    """Map constrained samples to an array of shape ``(num_samples, num_keys)``."""
    if not isinstance(samples, Mapping):
        raise TypeError(f"samples must be a dict of arrays, got {type(samples)}")
    values = dict(samples)
    missing = [stem for stem in stems if stem not in values]
    if missing and spec.derive is not None:
        derived = spec.derive(values, model_kwargs)
        values.update({stem: derived[stem] for stem in missing if stem in derived})
        missing = [stem for stem in stems if stem not in values]
    if missing:
        raise ValueError(
            f"samples lack the sites {missing} needed for the reference keys; "
            f"got sites {sorted(samples)}"
        )

    columns = []
    num_samples = None
    for stem, size in stems.items():
        array = np.asarray(values[stem], dtype=np.float64)
        expected = "(num_samples,)" if size is None else f"(num_samples, {size})"
        wrong_ndim = array.ndim != (1 if size is None else 2)
        if wrong_ndim or (size is not None and array.shape[1] != size):
            raise ValueError(
                f"site {stem!r} must have shape {expected}, got {array.shape}"
            )
        if num_samples is not None and array.shape[0] != num_samples:
            raise ValueError(
                f"site {stem!r} has {array.shape[0]} samples, other sites have "
                f"{num_samples}"
            )
        num_samples = array.shape[0]
        columns.append(array)

    by_stem = dict(zip(stems, columns, strict=True))
    output = np.empty((num_samples, len(keys)), dtype=np.float64)
    for column, key in enumerate(keys):
        stem, index = _split_key(key)
        array = by_stem[stem]
        output[:, column] = array if index is None else array[:, index]
    return output


def _from_reference(keys, stems, spec, model_kwargs, draws):
    """Map reference draws of shape ``(num_samples, num_keys)`` to latent sites."""
    draws = np.asarray(draws)
    if draws.ndim != 2 or draws.shape[1] != len(keys):
        raise ValueError(
            f"draws must have shape (num_samples, {len(keys)}), got {draws.shape}"
        )
    values: dict[str, np.ndarray] = {}
    for stem, size in stems.items():
        if size is not None:
            values[stem] = np.empty((draws.shape[0], size), dtype=draws.dtype)
    for column, key in enumerate(keys):
        stem, index = _split_key(key)
        if index is None:
            values[stem] = draws[:, column]
        else:
            values[stem][:, index] = draws[:, column]

    latent = {stem: jnp.asarray(value) for stem, value in values.items()}
    if spec.to_latent is not None:
        latent = spec.to_latent(latent, model_kwargs)
    return latent
