"""Plots of fits, training traces, regret and importance weights.

Every function draws with Matplotlib (any backend, Agg included), takes an
optional ``ax`` or ``axes`` to draw into, and returns the ``Figure``. Nothing is
shown or saved, so the caller chooses between ``plt.show()`` and
``fig.savefig(...)``, and closes the figure.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import gaussian_kde

from numpyro_pma.compare import expand_var_names, flatten_draws, select_columns
from numpyro_pma.regret import RegretReport, read_trace

__all__ = [
    "plot_elbo_trace",
    "plot_khat",
    "plot_marginals",
    "plot_pair",
    "plot_regret",
]

_MAX_COLUMNS = 4
_NUM_GRID_POINTS = 200
_MAX_KDE_SAMPLES = 5000


def plot_marginals(
    fits: Mapping[str, Any],
    var_names: Sequence[str] | None = None,
    *,
    axes: Sequence[Axes] | np.ndarray | None = None,
) -> Figure:
    """Overlay the marginal densities of several fits, one panel per parameter.

    Each density is a Gaussian kernel density estimate (``scipy.stats.gaussian_kde``
    with Scott's bandwidth) of the pooled draws. A parameter whose draws are all
    equal is drawn as a vertical line.

    Args:
        fits: ``{label: draws}``, with draws in any form accepted by
            :func:`numpyro_pma.compare.flatten_draws` (``InferenceData``, a dict
            of arrays with a leading sample axis, ...).
        var_names: Variables or columns to plot (``"theta"`` or ``"theta[0]"``);
            ``None`` plots the columns of the first fit. Every fit must have them.
        axes: Axes to draw into, at least one per column; ``None`` creates a grid
            of up to 4 columns and removes the unused axes.

    Returns:
        The figure, with one axis per plotted parameter when ``axes`` is ``None``.
    """
    if not isinstance(fits, Mapping) or len(fits) == 0:
        raise ValueError(
            f"fits must be a non-empty dict {{label: draws}}, got {fits!r}."
        )
    flat_fits = {
        label: flatten_draws(draws, argname=f"fits[{label!r}]")
        for label, draws in fits.items()
    }
    first = next(iter(flat_fits.values()))
    if var_names is None:
        names = first.names
    else:
        names = expand_var_names(first.names, var_names)
    for label, flat in flat_fits.items():
        missing = [name for name in names if name not in flat.names]
        if missing:
            raise ValueError(f"fits[{label!r}] has no columns {missing}.")

    num_panels = len(names)
    if axes is None:
        num_columns = min(_MAX_COLUMNS, num_panels)
        num_rows = math.ceil(num_panels / num_columns)
        fig, grid = plt.subplots(
            num_rows,
            num_columns,
            figsize=(3.2 * num_columns, 2.6 * num_rows),
            squeeze=False,
        )
        panels = list(grid.ravel())
        for unused in panels[num_panels:]:
            fig.delaxes(unused)
        panels = panels[:num_panels]
    else:
        panels = list(np.ravel(axes))
        if len(panels) < num_panels:
            raise ValueError(
                f"axes has {len(panels)} axes but {num_panels} parameters are "
                f"plotted: {list(names)}."
            )
        fig = panels[0].figure

    for i, (label, flat) in enumerate(flat_fits.items()):
        samples = select_columns(flat, names).samples()
        for j, ax in enumerate(panels[:num_panels]):
            _plot_density(ax, samples[:, j], label, color=f"C{i}")
    for ax, name in zip(panels, names, strict=False):
        ax.set_title(name)
        ax.set_yticks([])
    panels[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_pair(
    idata: Any,
    var_names: Sequence[str],
    *,
    ax: Axes | np.ndarray | None = None,
    kind: str = "scatter",
) -> Figure:
    """Draw the pairwise scatter (or KDE) plots of a few parameters.

    A thin wrapper of ``arviz.plot_pair`` that first flattens the draws to named
    columns, so that dicts with a leading sample axis (not ``(chain, draw)``)
    and single elements such as ``"theta[0]"`` are accepted.

    Args:
        idata: Draws in any form accepted by
            :func:`numpyro_pma.compare.flatten_draws`.
        var_names: Variables or columns to plot; at least two columns.
        ax: A ``(k - 1, k - 1)`` array of axes for ``k`` columns (a single axis
            for two), passed to ``arviz.plot_pair``.
        kind: ``"scatter"``, ``"kde"`` or ``"hexbin"``, as in ``arviz.plot_pair``.

    Returns:
        The figure.
    """
    flat = flatten_draws(idata, argname="idata")
    names = expand_var_names(flat.names, var_names)
    if len(names) < 2:
        raise ValueError(
            f"plot_pair needs at least 2 columns, var_names={var_names!r} selects "
            f"{list(names)}."
        )
    flat = select_columns(flat, names)
    data = {name: flat.values[:, :, j] for j, name in enumerate(names)}
    result = az.plot_pair(data, var_names=list(names), kind=kind, ax=ax)
    return np.ravel(result)[0].figure


def plot_elbo_trace(trace: Any, *, ax: Axes | None = None) -> Figure:
    """Plot the ELBO per step with a +-2 standard error band, and the step size.

    The step size is drawn on a twin axis (log scale when all step sizes are
    positive), and rejected steps are marked with crosses on the ELBO.

    Args:
        trace: A trace with fields ``step_size``, ``elbo``, ``elbo_stderr`` and
            optionally ``accepted``, as read by
            :func:`numpyro_pma.regret.regret_report`.
        ax: Axis for the ELBO; ``None`` creates a figure.

    Returns:
        The figure, with the ELBO axis and its twin.
    """
    fields = read_trace(trace)
    fig, ax = _figure_and_axis(ax, figsize=(6.4, 3.6))
    steps = np.arange(fields["step_size"].shape[0])
    elbo = fields["elbo"]
    band = 2.0 * fields["elbo_stderr"]
    accepted = fields["accepted"]

    ax.plot(steps, elbo, color="C0", label="ELBO")
    ax.fill_between(steps, elbo - band, elbo + band, color="C0", alpha=0.25)
    if not accepted.all():
        ax.plot(
            steps[~accepted],
            elbo[~accepted],
            "x",
            color="C3",
            label="rejected step",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (+-2 se)")

    step_axis = ax.twinx()
    step_axis.plot(steps, fields["step_size"], color="C1", label="step size")
    if np.all(fields["step_size"] > 0.0):
        step_axis.set_yscale("log")
    step_axis.set_ylabel("step size", color="C1")

    handles = ax.get_legend_handles_labels()
    step_handles = step_axis.get_legend_handles_labels()
    ax.legend(handles[0] + step_handles[0], handles[1] + step_handles[1], loc="best")
    return fig


def plot_regret(
    report: RegretReport,
    *,
    axes: Sequence[Axes] | np.ndarray | None = None,
) -> Figure:
    """Plot the per-step KL, the average regret and the displacement.

    The top panel shows ``KL_k`` and the average regret ``R_k / W_k`` of
    :func:`numpyro_pma.regret.regret_report`, each with a +-2 standard error
    band. The bottom panel shows the transport displacement
    ``E |T_{k+1}(x) - T_k(x)|^2`` (log scale when positive).

    Args:
        report: The regret report.
        axes: Two axes (KL, displacement); ``None`` creates a figure.

    Returns:
        The figure, with two axes sharing the step axis.
    """
    if axes is None:
        fig, (kl_axis, displacement_axis) = plt.subplots(
            2, 1, sharex=True, figsize=(6.4, 5.6)
        )
    else:
        panels = list(np.ravel(axes))
        if len(panels) != 2:
            raise ValueError(f"axes must contain 2 axes, got {len(panels)}.")
        kl_axis, displacement_axis = panels
        fig = kl_axis.figure
    steps = np.arange(report.num_steps)
    accepted = report.accepted

    kl_band = 2.0 * report.kl_stderr
    kl_axis.plot(steps[accepted], report.kl[accepted], color="C0", label="KL_k")
    kl_axis.fill_between(
        steps,
        report.kl - kl_band,
        report.kl + kl_band,
        where=accepted,
        color="C0",
        alpha=0.2,
    )
    average_band = 2.0 * report.average_regret_stderr
    kl_axis.plot(steps, report.average_regret, color="C1", label="average regret")
    kl_axis.fill_between(
        steps,
        report.average_regret - average_band,
        report.average_regret + average_band,
        color="C1",
        alpha=0.2,
    )
    kl_axis.axhline(0.0, color="gray", linewidth=0.8)
    kl_axis.set_ylabel("KL (+-2 se)")
    kl_axis.legend(loc="best")

    displacement = report.displacement
    displacement_axis.plot(steps, displacement, color="C2")
    finite = displacement[np.isfinite(displacement)]
    if finite.size > 0 and np.all(finite > 0.0):
        displacement_axis.set_yscale("log")
    displacement_axis.set_ylabel("displacement")
    displacement_axis.set_xlabel("step")
    return fig


def plot_khat(
    log_weights: Any,
    *,
    ax: Axes | None = None,
) -> Figure:
    """Plot the sorted importance weights with the PSIS Pareto k-hat in the title.

    Draws the normalized weights ``w_(i) / sum w`` in decreasing order against
    their rank on log-log axes, before and after Pareto smoothing
    (``arviz.psislw``), and marks the tail of ``M = ceil(min(S / 5,
    3 sqrt(S)))`` largest weights that the generalized Pareto fit uses, for
    ``S`` draws. A k-hat above 0.7 means that importance-sampling estimates
    from these weights are unreliable (Vehtari et al., 2024, JMLR 25(72)).

    Args:
        log_weights: Log importance weights of shape ``(num_samples,)``, e.g.
            ``log p(z) - log q(z)`` at draws ``z ~ q``.
        ax: Axis to draw into; ``None`` creates a figure.

    Returns:
        The figure, with one axis.
    """
    log_weights = np.asarray(log_weights, dtype=float)
    if log_weights.ndim != 1 or log_weights.shape[0] < 10:
        raise ValueError(
            "log_weights must have shape (num_samples,) with at least 10 draws, got "
            f"shape {log_weights.shape}."
        )
    if not np.all(np.isfinite(log_weights)):
        raise ValueError(
            f"log_weights has {int(np.sum(~np.isfinite(log_weights)))} non-finite "
            "entries."
        )
    # NOTE: arviz.psislw is the ArviZ 0.x function. This call is untested with 1.x.
    smoothed, khat = az.psislw(log_weights)
    khat = float(khat)

    num_samples = log_weights.shape[0]
    tail_length = math.ceil(min(num_samples / 5.0, 3.0 * math.sqrt(num_samples)))
    ranks = np.arange(1, num_samples + 1)
    raw = np.sort(log_weights - np.logaddexp.reduce(log_weights))[::-1]
    smoothed = np.sort(smoothed - np.logaddexp.reduce(smoothed))[::-1]

    fig, ax = _figure_and_axis(ax, figsize=(6.4, 4.0))
    ax.loglog(ranks, np.exp(raw), color="C0", label="raw")
    ax.loglog(ranks, np.exp(smoothed), color="C1", linestyle="--", label="smoothed")
    ax.axvspan(1, tail_length, color="gray", alpha=0.15, label="Pareto tail")
    ax.axhline(1.0 / num_samples, color="gray", linewidth=0.8, label="1 / S")
    ax.set_xlabel("rank")
    ax.set_ylabel("normalized weight")
    ax.set_title(f"PSIS k-hat = {khat:.2f} (S = {num_samples})")
    ax.legend(loc="best", fontsize="small")
    return fig


def _plot_density(ax: Axes, values: np.ndarray, label: str, color: str) -> None:
    if np.ptp(values) == 0.0:
        ax.axvline(values[0], label=label, color=color)
        return
    low, high = np.quantile(values, [0.001, 0.999])
    padding = 0.1 * (high - low)
    grid = np.linspace(low - padding, high + padding, _NUM_GRID_POINTS)
    # Evenly spaced rows bound the cost of the KDE and keep the plot reproducible.
    step = math.ceil(values.shape[0] / _MAX_KDE_SAMPLES)
    ax.plot(grid, gaussian_kde(values[::step])(grid), label=label, color=color)


def _figure_and_axis(ax: Axes | None, figsize: tuple[float, float]):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax
