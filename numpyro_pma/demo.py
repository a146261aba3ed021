"""The main job: eight schools by PMA and by NUTS, checked against reference draws.

``numpyro-pma demo`` fits the non-centered eight-schools model (posteriordb's
``eight_schools-eight_schools_noncentered``, bundled with the package) with
:class:`~numpyro_pma.AutoBrenier` trained by :class:`~numpyro_pma.PMA`, and
with NumPyro's NUTS, in one run. It prints, per parameter, the posterior mean
and sd of both methods and of posteriordb's gold-standard reference draws, the
wall time of each method with compilation shown apart, the final ELBO, and
the Pareto k-hat verdict; it saves plots of the marginals and the ELBO trace.
"""

import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np
import optax

from numpyro_pma.trainer import DEFAULT_NUM_STEPS

POSTERIOR_NAME = "eight_schools-eight_schools_noncentered"


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        )
    return "\n".join(lines)


def run_demo(
    *,
    num_steps: int = DEFAULT_NUM_STEPS,
    seed: int = 0,
    output_dir: str | os.PathLike = "demo-output",
    progress_bar: bool = True,
    num_draws: int = 40000,
) -> dict:
    """Fit eight schools with PMA and NUTS, print the comparison, save plots.

    Args:
        num_steps: PMA mirror steps (cosine-decayed step size from 0.5).
        seed: Seed of every random key.
        output_dir: Folder for ``marginals.png`` and ``elbo_trace.png``.
        progress_bar: Show progress bars.
        num_draws: Guide draws used for the summaries.

    Returns:
        A dict with the table rows and timings, for scripts and tests.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from numpyro_pma.baselines import run_numpyro_nuts
    from numpyro_pma.diagnostics import diagnose
    from numpyro_pma.guide import AutoBrenier
    from numpyro_pma.plots import plot_elbo_trace, plot_marginals
    from numpyro_pma.posteriors import load_posterior
    from numpyro_pma.trainer import PMA

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    posterior = load_posterior(POSTERIOR_NAME)
    model, data = posterior.model, posterior.model_kwargs
    pma_key, draw_key, nuts_key, diagnose_key = jax.random.split(
        jax.random.key(seed), 4
    )

    print(f"Fitting {POSTERIOR_NAME} with AutoBrenier + PMA ({num_steps} steps)")
    guide = AutoBrenier(model)
    schedule = optax.cosine_decay_schedule(0.5, num_steps, alpha=0.02)
    pma = PMA(model, guide, step_size=schedule)
    result = pma.run(pma_key, num_steps, progress_bar=progress_bar, **data)
    start = time.perf_counter()
    pma_samples = guide.sample_posterior(
        draw_key, result.params, sample_shape=(num_draws,)
    )
    pma_draws = posterior.to_reference(jax.device_get(pma_samples))
    sampling_time = time.perf_counter() - start

    print("Sampling with NumPyro NUTS (4 chains, 1000 warmup, 1000 draws)")
    nuts = run_numpyro_nuts(nuts_key, model, (), data)
    nuts_draws = posterior.to_reference(jax.device_get(nuts.samples))

    reference = posterior.reference_draws
    ref_mean, ref_sd = reference.mean(0), reference.std(0)
    rows = []
    records = []
    for i, key in enumerate(posterior.reference_keys):
        pma_mean, pma_sd = pma_draws[:, i].mean(), pma_draws[:, i].std()
        nuts_mean, nuts_sd = nuts_draws[:, i].mean(), nuts_draws[:, i].std()
        mean_error = (pma_mean - ref_mean[i]) / ref_sd[i]
        sd_error = pma_sd / ref_sd[i] - 1
        records.append(
            dict(
                parameter=key,
                reference_mean=float(ref_mean[i]),
                reference_sd=float(ref_sd[i]),
                pma_mean=float(pma_mean),
                pma_sd=float(pma_sd),
                nuts_mean=float(nuts_mean),
                nuts_sd=float(nuts_sd),
                pma_mean_error=float(mean_error),
                pma_sd_error=float(sd_error),
            )
        )
        rows.append(
            [
                key,
                f"{ref_mean[i]:.2f}",
                f"{ref_sd[i]:.2f}",
                f"{pma_mean:.2f}",
                f"{pma_sd:.2f}",
                f"{nuts_mean:.2f}",
                f"{nuts_sd:.2f}",
                f"{mean_error:+.3f}",
                f"{100 * sd_error:+.1f}%",
            ]
        )
    header = [
        "parameter",
        "ref mean",
        "ref sd",
        "PMA mean",
        "PMA sd",
        "NUTS mean",
        "NUTS sd",
        "PMA mean err (ref sd)",
        "PMA sd err",
    ]
    print()
    print(_format_table(header, rows))

    timing = result.timing
    final = np.flatnonzero(result.trace.accepted)[-1]
    elbo, elbo_stderr = result.trace.elbo[final], result.trace.elbo_stderr[final]
    pma_total = timing.init_time + timing.compile_time + timing.run_time
    print()
    print(
        _format_table(
            ["method", "compile + setup (s)", "run (s)", "total (s)"],
            [
                [
                    "PMA",
                    f"{timing.init_time + timing.compile_time:.1f}",
                    f"{timing.run_time + sampling_time:.1f}",
                    f"{pma_total + sampling_time:.1f}",
                ],
                [
                    "NUTS",
                    f"{nuts.compile_time:.1f}",
                    f"{nuts.run_time:.1f}",
                    f"{nuts.compile_time + nuts.run_time:.1f}",
                ],
            ],
        )
    )
    print(
        "PMA setup includes the whitening fit; its run includes drawing "
        f"{num_draws} posterior samples."
    )
    print(f"Final PMA ELBO: {elbo:.3f} ± {elbo_stderr:.3f} (Monte Carlo se)")

    diagnosis = diagnose(diagnose_key, model, guide, result.params, **data)
    print()
    print(diagnosis)

    labels = {"reference": reference, "PMA": pma_draws, "NUTS": nuts_draws}
    fits = {label: (draws, posterior.reference_keys) for label, draws in labels.items()}
    figure = plot_marginals(fits)
    figure.savefig(output_dir / "marginals.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    figure = plot_elbo_trace(result.trace)
    figure.savefig(output_dir / "elbo_trace.png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    print(f"\nPlots saved in {output_dir}/: marginals.png, elbo_trace.png")

    return dict(
        rows=records,
        pma_timing=timing._asdict(),
        nuts_timing=dict(compile_time=nuts.compile_time, run_time=nuts.run_time),
        elbo=float(elbo),
        elbo_stderr=float(elbo_stderr),
        khat=float(diagnosis.khat),
        verdict=diagnosis.verdict,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the demo's command-line options."""
    parser.add_argument(
        "--num-steps",
        type=int,
        default=DEFAULT_NUM_STEPS,
        help="PMA mirror steps (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--output-dir",
        default="demo-output",
        help="folder for the plots (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="hide progress bars"
    )
