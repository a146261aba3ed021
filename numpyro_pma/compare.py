"""Compare posterior draws of a fit with reference draws.

Both sets of draws are flattened to named scalar columns and matched by name.
Each column of the fit is compared with the same column of the reference in
units of the reference's standard deviation. The joint distributions are
compared by the energy distance and a sliced Wasserstein distance, after both
are standardized by the reference's column means and standard deviations.

Column names use 0-based positional indices, as ArviZ's default labeller writes
them for integer coordinates: a scalar site ``mu`` gives the column ``mu``, a
site ``theta`` of shape ``(3,)`` gives ``theta[0]``, ``theta[1]``, ``theta[2]``,
and a site of shape ``(2, 3)`` gives ``theta[0, 0]`` to ``theta[1, 2]``. Named
coordinates of an ``InferenceData`` (such as school names) are not used, so that
draws stored without coordinates match.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import arviz as az
import jax
import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import wasserstein_distance

__all__ = [
    "Comparison",
    "FlatDraws",
    "compare",
    "energy_distance",
    "expand_var_names",
    "flatten_draws",
    "select_columns",
    "sliced_wasserstein_distance",
]


class FlatDraws(NamedTuple):
    """Posterior draws as named scalar columns.

    Attributes:
        names: Column names such as ``"mu"`` or ``"theta[0]"``, of length
            ``num_columns``.
        values: Draws of shape ``(num_chains, num_draws, num_columns)``. Inputs
            without chains have ``num_chains = 1``.
    """

    names: tuple[str, ...]
    values: np.ndarray

    def samples(self) -> np.ndarray:
        """Return the draws with chains pooled, shape ``(num_samples, num_columns)``."""
        return self.values.reshape(-1, self.values.shape[-1])


class Comparison(NamedTuple):
    """Result of :func:`compare`.

    All errors are signed as ``fit - reference``. The per-parameter errors and
    distances are in units of the reference standard deviation of that
    parameter, so ``0.1`` means a tenth of a posterior standard deviation.

    Attributes:
        table: One row per parameter (index: column name) with the columns
            ``reference_mean``, ``reference_sd``, ``fit_mean``, ``fit_sd``,
            ``mean_error`` = (fit mean - reference mean) / reference sd,
            ``sd_rel_error`` = fit sd / reference sd - 1, one ``q{100 p}_error``
            = (fit quantile - reference quantile) / reference sd per requested
            quantile ``p`` (e.g. ``q5_error``), and ``wasserstein``, the
            Wasserstein-1 distance between the two marginals after both are
            standardized by the reference mean and sd.
        summary: ``arviz.summary`` of the fit and of the reference side by side,
            with a two-level column index (``"fit"`` or ``"reference"``, then
            the statistic).
        energy_distance: Squared energy distance ``2 E|X - Y| - E|X - X'| -
            E|Y - Y'|`` between the jointly standardized fit draws ``X`` and
            reference draws ``Y`` (Euclidean norm), estimated by U-statistics on
            subsamples. It is zero only when the two distributions are equal and
            its estimate can be slightly negative when they are close.
        sliced_wasserstein: Mean over random unit directions of the
            Wasserstein-1 distance between the projected standardized draws, or
            NaN when ``num_projections`` is 0.
        max_abs_mean_error: Maximum of ``|mean_error|`` over parameters.
        max_abs_sd_rel_error: Maximum of ``|sd_rel_error|`` over parameters.
        max_abs_quantile_error: Maximum of all ``|q..._error|`` entries.
        max_wasserstein: Maximum of ``wasserstein`` over parameters.
        num_fit_samples: Number of fit draws (all chains).
        num_reference_samples: Number of reference draws (all chains).
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    energy_distance: float
    sliced_wasserstein: float
    max_abs_mean_error: float
    max_abs_sd_rel_error: float
    max_abs_quantile_error: float
    max_wasserstein: float
    num_fit_samples: int
    num_reference_samples: int

    def to_markdown(self, floatfmt: str = ".3f") -> str:
        """Format the per-parameter errors and the joint distances as Markdown."""
        lines = [
            f"fit: {self.num_fit_samples} draws, "
            f"reference: {self.num_reference_samples} draws",
            "",
            _markdown_table(self.table, floatfmt),
            "",
            f"energy distance (standardized): {self.energy_distance:{floatfmt}}",
            f"sliced Wasserstein-1 (standardized): "
            f"{self.sliced_wasserstein:{floatfmt}}",
            f"max |mean error| / sd: {self.max_abs_mean_error:{floatfmt}}",
            f"max |sd relative error|: {self.max_abs_sd_rel_error:{floatfmt}}",
            f"max |quantile error| / sd: {self.max_abs_quantile_error:{floatfmt}}",
            f"max Wasserstein-1 / sd: {self.max_wasserstein:{floatfmt}}",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def compare(
    fit: Any,
    reference: Any,
    *,
    var_names: Sequence[str] | None = None,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
    num_projections: int = 100,
    max_energy_samples: int = 2000,
    rng_key: jax.Array | None = None,
) -> Comparison:
    """Compare the draws of ``fit`` with the draws of ``reference``.

    For each parameter with reference mean ``m`` and standard deviation ``s``
    (over all reference draws), the errors are ``(mean_fit - m) / s``,
    ``sd_fit / s - 1``, ``(Q_fit(p) - Q_ref(p)) / s`` for each ``p`` in
    ``quantiles``, and ``W1((x_fit - m) / s, (x_ref - m) / s)``. The joint
    discrepancies use the draws standardized column by column with the same
    ``m`` and ``s``. The energy distance uses a random subsample of at most
    ``max_energy_samples`` draws of each input, which bounds its cost by
    ``O(max_energy_samples^2 * num_columns)``. The sliced Wasserstein-1
    distance uses all draws.

    Args:
        fit: Draws to check. An ``arviz.InferenceData`` (its ``posterior``
            group), an ``xarray.Dataset`` with ``chain`` and ``draw``
            dimensions, a dict ``{name: array}`` whose arrays have a leading
            sample axis, a 2-d array ``(num_samples, num_columns)`` (columns
            named ``x[0]``, ``x[1]``, ...), or a pair ``(array, names)`` (see
            :func:`flatten_draws`).
        reference: Reference draws, in any of the forms accepted for ``fit``.
        var_names: Variables or columns to compare: an entry selects every
            column of that variable (``"theta"``) or one column
            (``"theta[1]"``). ``None`` compares every column and then requires
            both inputs to have the same columns.
        quantiles: Probabilities in (0, 1) of the central quantiles to compare.
        num_projections: Number of random directions of the sliced
            Wasserstein distance; 0 skips it.
        max_energy_samples: Maximum number of draws of each input used by the
            energy distance.
        rng_key: Key for the energy-distance subsamples and the projection
            directions; ``None`` uses ``jax.random.key(0)``, so that repeated
            calls give the same numbers.

    Returns:
        The :class:`Comparison`.

    Raises:
        ValueError: If the column names do not match, a reference column is
            constant, the draws are not finite, or an option is out of range.
        TypeError: If ``fit`` or ``reference`` has an unsupported type.
    """
    quantiles = tuple(float(p) for p in quantiles)
    for p in quantiles:
        if not 0.0 < p < 1.0:
            raise ValueError(f"quantiles must lie in (0, 1), got {quantiles}.")
    if num_projections < 0:
        raise ValueError(f"num_projections must be >= 0, got {num_projections}.")
    if max_energy_samples < 2:
        raise ValueError(
            f"max_energy_samples must be at least 2, got {max_energy_samples}."
        )
    if rng_key is None:
        rng_key = jax.random.key(0)

    fit_draws = flatten_draws(fit, argname="fit")
    reference_draws = flatten_draws(reference, argname="reference")
    names = _match_columns(fit_draws.names, reference_draws.names, var_names)
    fit_draws = select_columns(fit_draws, names)
    reference_draws = select_columns(reference_draws, names)
    fit_samples = fit_draws.samples()
    reference_samples = reference_draws.samples()
    _check_samples(fit_samples, names, "fit")
    _check_samples(reference_samples, names, "reference")

    reference_mean = reference_samples.mean(axis=0)
    reference_sd = reference_samples.std(axis=0, ddof=1)
    constant = [
        name for name, sd in zip(names, reference_sd, strict=True) if not sd > 0.0
    ]
    if constant:
        raise ValueError(
            f"reference draws are constant in columns {constant}, so errors in "
            "units of the reference sd are undefined; leave these out with "
            "var_names."
        )
    fit_standardized = (fit_samples - reference_mean) / reference_sd
    reference_standardized = (reference_samples - reference_mean) / reference_sd

    table = _marginal_table(
        names, fit_samples, reference_samples, reference_mean, reference_sd, quantiles
    )
    table["wasserstein"] = [
        wasserstein_distance(fit_standardized[:, j], reference_standardized[:, j])
        for j in range(len(names))
    ]

    energy_key, projection_key = jax.random.split(rng_key)
    energy = energy_distance(
        energy_key, fit_standardized, reference_standardized, max_energy_samples
    )
    if num_projections > 0:
        sliced = sliced_wasserstein_distance(
            projection_key, fit_standardized, reference_standardized, num_projections
        )
    else:
        sliced = float("nan")

    quantile_columns = [_quantile_column(p) for p in quantiles]
    summary = pd.concat(
        {
            "fit": _arviz_summary(fit_draws),
            "reference": _arviz_summary(reference_draws),
        },
        axis=1,
    )
    return Comparison(
        table=table,
        summary=summary,
        energy_distance=energy,
        sliced_wasserstein=sliced,
        max_abs_mean_error=float(table["mean_error"].abs().max()),
        max_abs_sd_rel_error=float(table["sd_rel_error"].abs().max()),
        max_abs_quantile_error=float(table[quantile_columns].abs().to_numpy().max()),
        max_wasserstein=float(table["wasserstein"].max()),
        num_fit_samples=fit_samples.shape[0],
        num_reference_samples=reference_samples.shape[0],
    )


def energy_distance(
    rng_key: jax.Array,
    x: np.ndarray,
    y: np.ndarray,
    max_samples: int = 2000,
) -> float:
    """Estimate the squared energy distance between the laws of ``x`` and ``y``.

    ``D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with the Euclidean norm,
    estimated by U-statistics (the within-sample means leave out the zero
    diagonal), so the estimate is unbiased and can be slightly negative.

    Args:
        rng_key: Key for the subsamples.
        x: Draws of shape ``(num_x, dim)``.
        y: Draws of shape ``(num_y, dim)``.
        max_samples: Each input is reduced to a random subsample of at most
            this many rows, so that the cost is ``O(max_samples^2 * dim)``.

    Returns:
        The estimate of ``D^2``.
    """
    x = _subsample(jax.random.fold_in(rng_key, 0), np.asarray(x, float), max_samples)
    y = _subsample(jax.random.fold_in(rng_key, 1), np.asarray(y, float), max_samples)
    num_x, num_y = x.shape[0], y.shape[0]
    distances_xx = _pairwise_distances(x, x)
    distances_yy = _pairwise_distances(y, y)
    np.fill_diagonal(distances_xx, 0.0)
    np.fill_diagonal(distances_yy, 0.0)
    mean_xy = _pairwise_distances(x, y).mean()
    mean_xx = distances_xx.sum() / (num_x * (num_x - 1))
    mean_yy = distances_yy.sum() / (num_y * (num_y - 1))
    return float(2.0 * mean_xy - mean_xx - mean_yy)


def sliced_wasserstein_distance(
    rng_key: jax.Array,
    x: np.ndarray,
    y: np.ndarray,
    num_projections: int = 100,
) -> float:
    """Estimate the sliced Wasserstein-1 distance between the laws of ``x`` and ``y``.

    ``SW1 = E_theta W1(<theta, X>, <theta, Y>)`` with ``theta`` uniform on the
    unit sphere, averaged over ``num_projections`` random directions.

    Args:
        rng_key: Key for the directions.
        x: Draws of shape ``(num_x, dim)``.
        y: Draws of shape ``(num_y, dim)``.
        num_projections: Number of directions.

    Returns:
        The estimate of ``SW1``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    directions = np.asarray(
        jax.random.normal(rng_key, (x.shape[1], num_projections)), dtype=float
    )
    directions = directions / np.linalg.norm(directions, axis=0)
    x_projected = x @ directions
    y_projected = y @ directions
    distances = [
        wasserstein_distance(x_projected[:, i], y_projected[:, i])
        for i in range(num_projections)
    ]
    return float(np.mean(distances))


def flatten_draws(draws: Any, *, argname: str = "draws") -> FlatDraws:
    """Flatten posterior draws into named scalar columns.

    Args:
        draws: An ``arviz.InferenceData`` (or ArviZ 1.x ``DataTree``) with a
            ``posterior`` group, an ``xarray.Dataset`` with ``chain`` and
            ``draw`` dimensions, a dict ``{name: array}`` whose arrays have a
            leading sample axis of one common length, a 2-d array
            ``(num_samples, num_columns)`` named ``x[0]``, ``x[1]``, ..., or a
            pair ``(array, names)`` with ``len(names) == num_columns`` and an
            array of shape ``(num_samples, num_columns)`` or ``(num_chains,
            num_draws, num_columns)``.
        argname: Argument name used in error messages.

    Returns:
        The :class:`FlatDraws`, with columns in the input's variable order and
        row-major order within a variable.

    Raises:
        TypeError: If ``draws`` has none of the supported types.
        ValueError: If shapes are inconsistent or there are no draws.
    """
    if isinstance(draws, tuple) and len(draws) == 2:
        values, names = draws
        values = np.asarray(values)
        names = tuple(str(name) for name in names)
        if values.ndim not in (2, 3) or values.shape[-1] != len(names):
            raise ValueError(
                f"{argname} as (array, names) needs an array of shape "
                f"(num_samples, {len(names)}) or (num_chains, num_draws, "
                f"{len(names)}), got shape {values.shape}."
            )
        if values.ndim == 2:
            values = values[None]
        return _checked_flat_draws(names, values, argname)

    if isinstance(draws, (np.ndarray, jax.Array)):
        values = np.asarray(draws)
        if values.ndim != 2:
            raise ValueError(
                f"{argname} as an array must have shape (num_samples, num_columns), "
                f"got shape {values.shape}."
            )
        names = tuple(f"x[{j}]" for j in range(values.shape[1]))
        return _checked_flat_draws(names, values[None], argname)

    # InferenceData is itself a Mapping of groups, so look for a posterior first.
    dataset = _posterior_dataset(draws)
    if dataset is not None:
        return _flatten_dataset(dataset, argname)
    # getattr, because the ArviZ 1.x namespace may not define InferenceData.
    if isinstance(draws, getattr(az, "InferenceData", ())):
        raise ValueError(
            f"{argname} is an InferenceData without a posterior group. Its groups "
            f"are {list(draws.groups())}."
        )
    if isinstance(draws, Mapping):
        return _flatten_dict(draws, argname)
    raise TypeError(
        f"{argname} must be an arviz.InferenceData, an xarray.Dataset, a dict "
        "of arrays, a 2-d array or a pair (array, names); got "
        f"{type(draws).__name__}."
    )


def select_columns(draws: FlatDraws, names: Sequence[str]) -> FlatDraws:
    """Return the columns ``names`` of ``draws``, in that order."""
    index = {name: j for j, name in enumerate(draws.names)}
    positions = [index[name] for name in names]
    return FlatDraws(tuple(names), draws.values[:, :, positions])


def expand_var_names(
    names: Sequence[str], var_names: Sequence[str], argname: str = "var_names"
) -> tuple[str, ...]:
    """Expand variable names to the matching column names.

    An entry of ``var_names`` selects the column of that exact name, or every
    column ``name[...]`` when it is a variable name.

    Raises:
        ValueError: If an entry matches no column.
    """
    if isinstance(var_names, str):
        var_names = [var_names]
    missing = [v for v in var_names if not _columns_of(names, v)]
    if missing:
        raise ValueError(
            f"{argname} entries {missing} match no column. Available columns: "
            f"{list(names)}."
        )
    selected = []
    for var_name in var_names:
        selected.extend(n for n in _columns_of(names, var_name) if n not in selected)
    return tuple(selected)


def _columns_of(names: Sequence[str], var_name: str) -> list[str]:
    return [n for n in names if n == var_name or n.split("[", 1)[0] == var_name]


def _match_columns(
    fit_names: Sequence[str],
    reference_names: Sequence[str],
    var_names: Sequence[str] | None,
) -> tuple[str, ...]:
    if var_names is None:
        fit_selected = tuple(fit_names)
        reference_selected = tuple(reference_names)
    else:
        if isinstance(var_names, str):
            var_names = [var_names]
        if len(var_names) == 0:
            raise ValueError("var_names is empty. Pass None to compare every column.")
        missing = {
            argname: [v for v in var_names if not _columns_of(names, v)]
            for argname, names in (("fit", fit_names), ("reference", reference_names))
        }
        if missing["fit"] or missing["reference"]:
            raise ValueError(
                f"var_names entries match no column of some inputs: {missing}."
            )
        fit_selected = expand_var_names(fit_names, var_names)
        reference_selected = expand_var_names(reference_names, var_names)

    only_fit = [n for n in fit_selected if n not in reference_selected]
    only_reference = [n for n in reference_selected if n not in fit_selected]
    if only_fit or only_reference:
        raise ValueError(
            "fit and reference columns do not match: only in fit "
            f"{only_fit}, only in reference {only_reference}. Check the shapes of "
            "the variables, or pass var_names to compare a common subset."
        )
    return reference_selected


def _flatten_dict(draws: Mapping, argname: str) -> FlatDraws:
    if len(draws) == 0:
        raise ValueError(f"{argname} is an empty dict.")
    names = []
    columns = []
    num_samples = None
    for var_name, value in draws.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(
                f"{argname}[{var_name!r}] must have a leading sample axis, got a "
                "scalar."
            )
        if num_samples is None:
            num_samples = value.shape[0]
        elif value.shape[0] != num_samples:
            raise ValueError(
                f"{argname} arrays must share the leading sample axis: "
                f"{argname}[{var_name!r}] has {value.shape[0]} draws, earlier "
                f"entries have {num_samples}."
            )
        var_names, var_columns = _flatten_variable(str(var_name), value, 1)
        names.extend(var_names)
        columns.append(var_columns)
    values = np.concatenate(columns, axis=-1)[None]
    return _checked_flat_draws(tuple(names), values, argname)


def _flatten_dataset(dataset: xr.Dataset, argname: str) -> FlatDraws:
    if len(dataset.data_vars) == 0:
        raise ValueError(f"{argname} has no posterior variables.")
    names = []
    columns = []
    for var_name, data_array in dataset.data_vars.items():
        if "chain" not in data_array.dims or "draw" not in data_array.dims:
            raise ValueError(
                f"{argname} variable {var_name!r} must have 'chain' and 'draw' "
                f"dimensions, got dims {data_array.dims}."
            )
        value = data_array.transpose("chain", "draw", ...).to_numpy()
        var_names, var_columns = _flatten_variable(str(var_name), value, 2)
        names.extend(var_names)
        columns.append(var_columns)
    values = np.concatenate(columns, axis=-1)
    if values.ndim == 2:
        values = values[None]
    return _checked_flat_draws(tuple(names), values, argname)


def _flatten_variable(
    var_name: str, value: np.ndarray, num_sample_axes: int
) -> tuple[list[str], np.ndarray]:
    """Flatten ``value`` of shape ``(*sample_shape, *event_shape)`` to columns."""
    sample_shape = value.shape[:num_sample_axes]
    event_shape = value.shape[num_sample_axes:]
    if not event_shape:
        return [var_name], value.reshape(*sample_shape, 1)
    names = [
        f"{var_name}[{', '.join(str(i) for i in index)}]"
        for index in np.ndindex(*event_shape)
    ]
    return names, value.reshape(*sample_shape, -1)


def _checked_flat_draws(
    names: tuple[str, ...], values: np.ndarray, argname: str
) -> FlatDraws:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{argname} has duplicate column names {duplicates}.")
    num_samples = values.shape[0] * values.shape[1]
    if num_samples < 2:
        raise ValueError(f"{argname} needs at least 2 draws, got {num_samples}.")
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise TypeError(f"{argname} draws must be real numbers, got {values.dtype}.")
    return FlatDraws(names, values.astype(float))


def _posterior_dataset(draws: Any) -> xr.Dataset | None:
    if isinstance(draws, xr.Dataset):
        return draws
    posterior = getattr(draws, "posterior", None)
    if posterior is None:
        return None
    if isinstance(posterior, xr.Dataset):
        return posterior
    if hasattr(posterior, "to_dataset"):
        return posterior.to_dataset()
    return None


def _check_samples(samples: np.ndarray, names: Sequence[str], argname: str) -> None:
    finite = np.isfinite(samples).all(axis=0)
    bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
    if bad:
        raise ValueError(f"{argname} has non-finite draws in columns {bad}.")


def _marginal_table(
    names: Sequence[str],
    fit_samples: np.ndarray,
    reference_samples: np.ndarray,
    reference_mean: np.ndarray,
    reference_sd: np.ndarray,
    quantiles: Sequence[float],
) -> pd.DataFrame:
    fit_mean = fit_samples.mean(axis=0)
    fit_sd = fit_samples.std(axis=0, ddof=1)
    table = pd.DataFrame(
        {
            "reference_mean": reference_mean,
            "reference_sd": reference_sd,
            "fit_mean": fit_mean,
            "fit_sd": fit_sd,
            "mean_error": (fit_mean - reference_mean) / reference_sd,
            "sd_rel_error": fit_sd / reference_sd - 1.0,
        },
        index=pd.Index(names, name="parameter"),
    )
    fit_quantiles = np.quantile(fit_samples, quantiles, axis=0)
    reference_quantiles = np.quantile(reference_samples, quantiles, axis=0)
    for i, p in enumerate(quantiles):
        table[_quantile_column(p)] = (
            fit_quantiles[i] - reference_quantiles[i]
        ) / reference_sd
    return table


def _quantile_column(p: float) -> str:
    return f"q{100.0 * p:g}_error"


def _arviz_summary(draws: FlatDraws) -> pd.DataFrame:
    data = {name: draws.values[:, :, j] for j, name in enumerate(draws.names)}
    return az.summary(data)


def _subsample(rng_key: jax.Array, x: np.ndarray, max_samples: int) -> np.ndarray:
    if x.shape[0] <= max_samples:
        return x
    rows = np.asarray(jax.random.choice(rng_key, x.shape[0], (max_samples,), False))
    return x[rows]


def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances ``|x_i - y_j|`` of shape ``(num_x, num_y)``."""
    squared = (
        np.sum(x**2, axis=1)[:, None] + np.sum(y**2, axis=1)[None, :] - 2.0 * x @ y.T
    )
    return np.sqrt(np.maximum(squared, 0.0))


def _markdown_table(table: pd.DataFrame, floatfmt: str) -> str:
    header = [str(table.index.name or "")] + [str(c) for c in table.columns]
    rows = [
        [str(index)] + [f"{value:{floatfmt}}" for value in row]
        for index, row in zip(table.index, table.to_numpy(), strict=True)
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "| "
        + " | ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))
        + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
            + " |"
        )
    return "\n".join(lines)
