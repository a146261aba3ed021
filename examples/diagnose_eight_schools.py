"""Diagnose AutoBrenier fits of the centered and non-centered eight-schools models.

For each of posteriordb's ``eight_schools-eight_schools_noncentered`` and
``eight_schools-eight_schools_centered`` (bundled with the package), the script
fits :class:`~numpyro_pma.AutoBrenier` by :class:`~numpyro_pma.PMA` with the
recommended cosine-decayed step size, then

- draws from the guide with importance log weights and prints the diagnosis
  (Pareto k-hat, ELBO, log Z, importance ESS, verdict);
- stores the draws as ArviZ ``InferenceData`` in netCDF and loads them back;
- compares the guide draws with posteriordb's reference draws, parameter by
  parameter, in units of the reference standard deviation;
- corrects the guide's means and sds by Pareto smoothed importance sampling
  (PSIS) and compares both with the reference, and estimates the probability
  of small tau (the neck of the centered model's funnel) three ways;
- computes k-hat on further independent sets of draws, to show its spread;
- prints the regret report of the training trace;
- saves plots of the marginals, the (mu, log tau) pairs, the ELBO trace, the
  regret and the sorted importance weights.

Run from the repository root:

    python examples/diagnose_eight_schools.py

The numbers and plots in docs/diagnostics.md come from that command.
"""

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import arviz as az
import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax

from numpyro_pma.compare import Comparison, compare
from numpyro_pma.diagnostics import (
    Diagnosis,
    ReweightedSummary,
    diagnose_draws,
    psis_reweighted_summary,
)
from numpyro_pma.guide import AutoBrenier
from numpyro_pma.importance import (
    importance_log_weights,
    pareto_khat,
    psis_log_weights,
)
from numpyro_pma.inference_data import to_inference_data
from numpyro_pma.plots import (
    plot_elbo_trace,
    plot_khat,
    plot_marginals,
    plot_pair,
    plot_regret,
)
from numpyro_pma.posteriors import Posterior, load_posterior
from numpyro_pma.regret import RegretReport, regret_report
from numpyro_pma.trainer import DEFAULT_NUM_STEPS, PMA

POSTERIOR_NAMES = (
    "eight_schools-eight_schools_noncentered",
    "eight_schools-eight_schools_centered",
)

# Resolution of the saved PNGs: small enough that the ten plots stay well under
# 1 MB, large enough to read the axis labels.
DPI = 90

# Draws per panel of the pair plot; more points only blacken the scatter.
NUM_PAIR_POINTS = 2000

# The centered model's funnel is narrowest at small tau, so the probability of
# tau below this value shows whether a guide reaches the neck of the funnel.
SMALL_TAU = 1.0


class PosteriorDiagnostics(NamedTuple):
    """Everything the script computed for one posterior.

    Attributes:
        name: posteriordb name of the posterior.
        diagnosis: k-hat, ELBO, log Z and ESS of the guide draws.
        comparison: Guide draws against the reference draws.
        reweighted: Plain and PSIS-reweighted means and sds of every site.
        psis_errors: Per reference key, rows ``(guide mean error, PSIS mean
            error, guide sd relative error, PSIS sd relative error)``, means in
            reference-sd units; shape ``(num_keys, 4)``.
        small_tau: ``P(tau < SMALL_TAU)`` under the guide, the PSIS-reweighted
            guide and the reference draws.
        repeat_khats: k-hat of further independent sets of guide draws of the
            same size as the diagnosis's, to show its sampling spread.
        pooled_khat: k-hat of those sets pooled (NaN when there are none).
        regret: Regret report of the training trace.
        fit_seconds: Wall-clock seconds of ``PMA.run`` (compilation included).
        files: Paths of the netCDF file and the plots that were written.
    """

    name: str
    diagnosis: Diagnosis
    comparison: Comparison
    reweighted: ReweightedSummary
    psis_errors: np.ndarray
    small_tau: tuple[float, float, float]
    repeat_khats: list[float]
    pooled_khat: float
    regret: RegretReport
    fit_seconds: float
    files: list[Path]


def short_name(posterior_name: str) -> str:
    """Return the model part of a posteriordb name, e.g. ``eight_schools_centered``."""
    return posterior_name.split("-", 1)[1]


def psis_error_table(
    posterior: Posterior, reweighted: ReweightedSummary
) -> tuple[str, np.ndarray]:
    """Compare guide and PSIS moments with the reference moments, key by key.

    Mean errors are ``(mean - reference mean) / reference sd`` and sd errors
    ``sd / reference sd - 1``, for every reference key.

    Returns:
        The text table and the errors of shape ``(num_keys, 4)``: guide mean
        error, PSIS mean error, guide sd error, PSIS sd error.
    """

    def as_row(moments: dict) -> np.ndarray:
        # to_reference expects a leading sample axis; one "sample" per moment.
        with_axis = {name: np.asarray(value)[None] for name, value in moments.items()}
        return posterior.to_reference(with_axis)[0]

    reference_mean = posterior.reference_draws.mean(axis=0)
    reference_sd = posterior.reference_draws.std(axis=0, ddof=1)
    errors = np.stack(
        [
            (as_row(reweighted.guide_mean) - reference_mean) / reference_sd,
            (as_row(reweighted.mean) - reference_mean) / reference_sd,
            as_row(reweighted.guide_sd) / reference_sd - 1.0,
            as_row(reweighted.sd) / reference_sd - 1.0,
        ],
        axis=1,
    )
    header = ["parameter", "guide mean err", "PSIS mean err", "guide sd err"]
    header.append("PSIS sd err")
    lines = [f"{header[0]:<10}" + "".join(f"{h:>16}" for h in header[1:])]
    for key, row in zip(posterior.reference_keys, errors, strict=True):
        lines.append(f"{key:<10}" + "".join(f"{value:>+16.3f}" for value in row))
    lines.append(
        "Mean errors are in reference-sd units; sd errors are relative "
        f"(sd / reference sd - 1). PSIS ESS {reweighted.ess:.0f}."
    )
    return "\n".join(lines), errors


def small_tau_probabilities(
    guide_tau: np.ndarray, log_weights: np.ndarray, reference_tau: np.ndarray
) -> tuple[float, float, float]:
    """Estimate ``P(tau < SMALL_TAU)`` three ways.

    Args:
        guide_tau: Guide draws of tau, shape ``(num_samples,)``.
        log_weights: Their importance log weights, shape ``(num_samples,)``.
        reference_tau: Reference draws of tau, shape ``(num_reference,)``.

    Returns:
        The fraction of guide draws below ``SMALL_TAU``, the PSIS-smoothed weight
        of those draws (weights normalized to sum 1), and the fraction of
        reference draws below ``SMALL_TAU``.
    """
    smoothed_log_weights, _ = psis_log_weights(log_weights)
    small = guide_tau < SMALL_TAU
    return (
        float(np.mean(small)),
        float(np.sum(np.exp(smoothed_log_weights[small]))),
        float(np.mean(reference_tau < SMALL_TAU)),
    )


def save_figure(figure: plt.Figure, path: Path) -> Path:
    """Save ``figure`` as a PNG at :data:`DPI` and close it."""
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def save_plots(
    rng_key: jax.Array,
    posterior: Posterior,
    guide_draws: np.ndarray,
    log_weights: np.ndarray,
    trace,
    regret: RegretReport,
    output_dir: Path,
) -> list[Path]:
    """Save the five diagnostic plots of one posterior as PNG files.

    Args:
        rng_key: Key for the subsample of the pair plot.
        posterior: The reference posterior.
        guide_draws: Guide draws in reference-key order, shape
            ``(num_samples, num_keys)``.
        log_weights: Importance log weights of the guide draws, shape
            ``(num_samples,)``.
        trace: Per-step training trace (``PMARunResult.trace``).
        regret: Regret report of ``trace``.
        output_dir: Folder of the files.

    Returns:
        The paths written.
    """
    prefix = short_name(posterior.name)
    keys = posterior.reference_keys
    paths = []

    fits = {
        "guide": (guide_draws, keys),
        "reference": (posterior.reference_draws, keys),
    }
    figure = plot_marginals(fits)
    figure.suptitle(f"{prefix}: marginals, guide vs reference", y=1.02)
    paths.append(save_figure(figure, output_dir / f"{prefix}_marginals.png"))

    # tau spans orders of magnitude. On the log scale, a guide that misses the
    # neck of the centered model's funnel shows a short lower tail.
    figure, axes = plt.subplots(1, 2, figsize=(8.0, 3.6), sharex=True, sharey=True)
    mu_column, tau_column = keys.index("mu"), keys.index("tau")
    for ax, (label, draws), index in zip(
        axes,
        (("guide", guide_draws), ("reference", posterior.reference_draws)),
        jax.random.split(rng_key),
        strict=True,
    ):
        size = min(NUM_PAIR_POINTS, draws.shape[0])
        rows = np.asarray(jax.random.choice(index, draws.shape[0], (size,), False))
        pairs = {
            "mu": draws[rows, mu_column],
            "log_tau": np.log(draws[rows, tau_column]),
        }
        plot_pair(pairs, ["mu", "log_tau"], ax=ax)
        ax.set_title(f"{label} ({size} draws)", fontsize=11)
        # arviz.plot_pair scales its fonts up for small figures.
        ax.xaxis.label.set_fontsize(11)
        ax.yaxis.label.set_fontsize(11)
        ax.tick_params(labelsize=10)
    figure.suptitle(f"{prefix}: mu and log tau", y=1.03)
    paths.append(save_figure(figure, output_dir / f"{prefix}_pair.png"))

    figure = plot_elbo_trace(trace)
    figure.axes[0].set_title(f"{prefix}: ELBO per mirror step")
    paths.append(save_figure(figure, output_dir / f"{prefix}_elbo.png"))

    figure = plot_regret(regret)
    figure.axes[0].set_title(f"{prefix}: KL_k = log Z - ELBO_k and average regret")
    paths.append(save_figure(figure, output_dir / f"{prefix}_regret.png"))

    figure = plot_khat(log_weights)
    title = figure.axes[0].get_title()
    figure.axes[0].set_title(f"{prefix}: {title}")
    paths.append(save_figure(figure, output_dir / f"{prefix}_khat.png"))
    return paths


def diagnose_posterior(
    rng_key: jax.Array,
    posterior_name: str,
    *,
    num_steps: int,
    num_samples: int,
    num_khat_repeats: int,
    output_dir: Path,
    progress_bar: bool = True,
) -> PosteriorDiagnostics:
    """Fit one posterior by PMA, print every diagnostic and save the files.

    Args:
        rng_key: Key for the fit, the guide draws and the plots.
        posterior_name: A name from :data:`POSTERIOR_NAMES`.
        num_steps: PMA mirror steps.
        num_samples: Guide draws behind the diagnosis, the comparison and the
            InferenceData.
        num_khat_repeats: Number of further sets of ``num_samples`` draws whose
            k-hat is computed; 0 skips them.
        output_dir: Folder for the netCDF file and the plots.
        progress_bar: Show PMA's progress bar.

    Returns:
        The computed diagnostics and the paths written.
    """
    keys = jax.random.split(rng_key, 5)
    fit_key, draws_key, repeat_key, compare_key, plot_key = keys
    posterior = load_posterior(posterior_name)
    model, data = posterior.model, posterior.model_kwargs
    prefix = short_name(posterior_name)
    print(f"\n===== {posterior_name} =====")

    # The recommended call: cosine-decayed step size from 0.5 down to 0.01.
    guide = AutoBrenier(model)
    schedule = optax.cosine_decay_schedule(0.5, num_steps, alpha=0.02)
    pma = PMA(model, guide, step_size=schedule)
    start = time.perf_counter()
    result = pma.run(fit_key, num_steps, progress_bar=progress_bar, **data)
    fit_seconds = time.perf_counter() - start
    num_rejected = int(np.sum(~np.asarray(result.trace.accepted)))
    print(
        f"PMA: {num_steps} steps ({num_rejected} rejected) in {fit_seconds:.1f} s, "
        "compilation and whitening included"
    )

    # One set of weighted draws serves the diagnosis, the PSIS correction and
    # the InferenceData. diagnose(key, model, guide, params, **data) computes
    # the same diagnosis in one call.
    draws = importance_log_weights(
        draws_key, model, guide, result.params, num_samples=num_samples, **data
    )
    diagnosis = diagnose_draws(draws)
    print("\n--- diagnosis ---")
    print(diagnosis)

    idata = to_inference_data(guide, result.params, draws=draws, **data)
    netcdf_path = output_dir / f"{prefix}.nc"
    idata.to_netcdf(str(netcdf_path))
    reloaded = az.from_netcdf(str(netcdf_path))
    # The stored log weights give back the same k-hat.
    stored_log_weights = reloaded.sample_stats["log_weight"].values.ravel()
    _, stored_khat = az.psislw(stored_log_weights, reff=1.0)
    print(f"\n--- InferenceData, saved to {netcdf_path} and loaded back ---")
    print(f"groups: {reloaded.groups()}")
    print(f"posterior variables: {dict(reloaded.posterior.sizes)}")
    print(f"k-hat from the stored sample_stats.log_weight: {float(stored_khat):.3f}")

    guide_draws = posterior.to_reference(draws.samples)
    comparison = compare(
        (guide_draws, posterior.reference_keys),
        (posterior.reference_chains, posterior.reference_keys),
        rng_key=compare_key,
    )
    print("\n--- guide draws vs reference draws (errors in reference sd) ---")
    print(comparison.to_markdown())

    reweighted = psis_reweighted_summary(draws)
    psis_text, psis_errors = psis_error_table(posterior, reweighted)
    print("\n--- PSIS correction of the guide's moments, against the reference ---")
    print(psis_text)
    tau = posterior.reference_keys.index("tau")
    print(
        f"tau: guide mean error {psis_errors[tau, 0]:+.3f} sd -> PSIS "
        f"{psis_errors[tau, 1]:+.3f} sd; guide sd error {psis_errors[tau, 2]:+.1%} "
        f"-> PSIS {psis_errors[tau, 3]:+.1%}"
    )

    small_tau = small_tau_probabilities(
        guide_draws[:, tau],
        np.asarray(draws.log_weights),
        posterior.reference_draws[:, tau],
    )
    print(
        f"P(tau < {SMALL_TAU:g}): guide {small_tau[0]:.4f}, PSIS-reweighted guide "
        f"{small_tau[1]:.4f}, reference {small_tau[2]:.4f}"
    )

    repeat_khats, pooled_khat = [], float("nan")
    if num_khat_repeats > 0:
        # One call draws all the sets, so the weights are compiled once.
        more_draws = importance_log_weights(
            repeat_key,
            model,
            guide,
            result.params,
            num_samples=num_khat_repeats * num_samples,
            **data,
        )
        log_weights = np.asarray(more_draws.log_weights)
        blocks = log_weights.reshape(num_khat_repeats, num_samples)
        repeat_khats = [pareto_khat(block) for block in blocks]
        pooled_khat = pareto_khat(log_weights)
        print(f"\n--- k-hat of {num_khat_repeats} more sets of {num_samples} draws ---")
        print(", ".join(f"{khat:.3f}" for khat in repeat_khats))
        print(f"all {log_weights.shape[0]} draws together: {pooled_khat:.3f}")

    regret = regret_report(result.trace, diagnosis.log_z, diagnosis.log_z_stderr)
    print("\n--- regret of the training run ---")
    print(regret)

    files = [netcdf_path]
    files += save_plots(
        plot_key,
        posterior,
        guide_draws,
        np.asarray(draws.log_weights),
        result.trace,
        regret,
        output_dir,
    )
    print(f"\nwrote {', '.join(str(path) for path in files)}")
    return PosteriorDiagnostics(
        name=posterior_name,
        diagnosis=diagnosis,
        comparison=comparison,
        reweighted=reweighted,
        psis_errors=psis_errors,
        small_tau=small_tau,
        repeat_khats=repeat_khats,
        pooled_khat=pooled_khat,
        regret=regret,
        fit_seconds=fit_seconds,
        files=files,
    )


def build_parser() -> argparse.ArgumentParser:
    """Declare the command-line options."""
    parser = argparse.ArgumentParser(
        description="Fit AutoBrenier by PMA to the two eight-schools posteriors "
        "and print and plot every diagnostic against the reference draws."
    )
    parser.add_argument(
        "--num-steps",
        type=int,
        default=DEFAULT_NUM_STEPS,
        help="PMA mirror steps per posterior (default: %(default)s)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=4000,
        help="guide draws behind the diagnostics (default: %(default)s)",
    )
    parser.add_argument(
        "--num-khat-repeats",
        type=int,
        default=4,
        help="further independent sets of --num-samples draws whose k-hat is "
        "printed, to show its spread; 0 skips them (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        default="docs/images",
        help="folder for the netCDF files and PNG plots (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every PRNG key (default: 0)"
    )
    parser.add_argument(
        "--posteriors",
        nargs="+",
        choices=POSTERIOR_NAMES,
        default=list(POSTERIOR_NAMES),
        help="posteriors to fit (default: both)",
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="hide the progress bar"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, PosteriorDiagnostics]:
    """Parse the command line, then diagnose each requested posterior.

    Returns:
        The diagnostics keyed by posterior name.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_steps < 1:
        parser.error(f"--num-steps must be a positive integer, got {args.num_steps}")
    if args.num_samples < 100:
        parser.error(
            "--num-samples must be at least 100 for a k-hat estimate, got "
            f"{args.num_samples}"
        )
    if args.num_khat_repeats < 0:
        parser.error(
            f"--num-khat-repeats must be 0 or more, got {args.num_khat_repeats}"
        )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Plots are only saved, never shown.
    matplotlib.use("Agg")

    results = {}
    seed_key = jax.random.key(args.seed)
    for name in args.posteriors:
        # Each posterior's key depends on its name only, so fitting one of
        # them alone reproduces its numbers from a run of both.
        key = jax.random.fold_in(seed_key, POSTERIOR_NAMES.index(name))
        results[name] = diagnose_posterior(
            key,
            name,
            num_steps=args.num_steps,
            num_samples=args.num_samples,
            num_khat_repeats=args.num_khat_repeats,
            output_dir=output_dir,
            progress_bar=not args.no_progress_bar,
        )
    return results


if __name__ == "__main__":
    main()
