"""Learn the two-moons distribution from samples with a Brenier map.

Two moons is a 2-d data set whose density is not log-concave: two interleaved
half-circles with Gaussian noise, generated here. The script

- draws training and held-out samples;
- fits a Brenier map from N(0, I) to the training samples by PMA mirror steps
  whose log density ratio comes from a classifier
  (:func:`numpyro_pma.generative.fit_samples`);
- compares fresh model draws with held-out data by the energy distance and
  the sliced Wasserstein distance, next to a Gaussian fit and to the noise
  level of the held-out data, and compares held-out log densities;
- saves a figure of data, model draws, the model's density and the trace.

Run from the repository root:

    python examples/two_moons.py

The table and figure in docs/generative.md come from that command.
"""

import argparse
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np
from scipy.stats import multivariate_normal

from numpyro_pma.generative import compare_held_out, fit_samples

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def two_moons(rng: np.random.Generator, num_samples: int, noise: float = 0.08):
    """Draw from two interleaved half-circles with Gaussian noise ``(n, 2)``."""
    upper = rng.random(num_samples) < 0.5
    angle = np.pi * rng.random(num_samples)
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return np.stack([x, y], axis=1) + noise * rng.normal(size=(num_samples, 2))


def two_moons_log_density(points: np.ndarray, noise: float = 0.08) -> np.ndarray:
    """Evaluate the exact log density of :func:`two_moons` at ``points`` ``(n, 2)``.

    The density is the average over both arcs and over the angle (uniform on
    ``[0, pi]``) of ``N(point; arc(angle), noise^2 I)``, computed by the
    midpoint rule on 2000 angles, far finer than the noise.
    """
    angle = np.pi * (np.arange(2000) + 0.5) / 2000
    arcs = np.concatenate(
        [
            np.stack([np.cos(angle), np.sin(angle)], 1),
            np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], 1),
        ]
    )
    squared = np.sum((points[:, None, :] - arcs[None]) ** 2, axis=-1)
    log_kernel = -0.5 * squared / noise**2 - np.log(2 * np.pi * noise**2)
    peak = log_kernel.max(axis=1, keepdims=True)
    mean_kernel = np.mean(np.exp(log_kernel - peak), axis=1)
    return peak[:, 0] + np.log(mean_kernel)


def plot_fit(train, draws, fit, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    limits = (-1.6, 2.6), (-1.1, 1.6)
    for ax, points, title in (
        (axes[0], train, "training data"),
        (axes[1], draws, "model draws"),
    ):
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.set(title=title, xlim=limits[0], ylim=limits[1], aspect="equal")

    grid_x = np.linspace(*limits[0], 121)
    grid_y = np.linspace(*limits[1], 91)
    mesh = np.stack(np.meshgrid(grid_x, grid_y), axis=-1)
    log_density = np.asarray(fit.model.log_prob(mesh))
    # Log scale, cut 8 nats below the peak, so the low-density gaps show.
    floor = log_density.max() - 8.0
    contour = axes[2].contourf(
        grid_x,
        grid_y,
        np.maximum(log_density, floor),
        levels=np.linspace(floor, log_density.max(), 17),
        cmap="viridis",
    )
    fig.colorbar(contour, ax=axes[2], shrink=0.8)
    axes[2].set(title="model log density", aspect="equal")

    steps = np.arange(len(fit.trace.divergence))
    axes[3].plot(steps, fit.trace.divergence, lw=0.5, label="KL estimate")
    axes[3].plot(steps, fit.trace.step_size, label="step size")
    axes[3].set(title="trace", xlabel="mirror step", ylim=(-0.5, 2.0))
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=2000, help="mirror steps")
    parser.add_argument("--num-samples", type=int, default=4000, help="per split")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")
    parser.add_argument(
        "--figure",
        type=Path,
        default=Path("docs/images/generative_two_moons.png"),
        help="where to save the figure",
    )
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    train = two_moons(rng, args.num_samples)
    held_out = two_moons(rng, args.num_samples)
    key = jax.random.key(args.seed)
    fit_key, sample_key, compare_key = jax.random.split(key, 3)

    start = time.perf_counter()
    fit = fit_samples(
        fit_key,
        train,
        num_steps=args.num_steps,
        hidden_sizes=(64, 64),
        classifier_hidden_sizes=(64, 64),
        num_classifier_steps=20,
        num_projection_steps=20,
        min_eigenvalue=0.03,
    )
    fit_time = time.perf_counter() - start
    draws = np.asarray(fit.model.sample(sample_key, (args.num_samples,)))

    comparison = compare_held_out(compare_key, draws, train, held_out)
    gaussian = multivariate_normal(train.mean(0), np.cov(train.T))
    model_log_density = float(np.mean(fit.model.log_prob(held_out)))
    print(f"fit: {args.num_steps} steps in {fit_time:.1f} s (compilation included)")
    print()
    print(comparison.to_markdown())
    print()
    print("| mean log density of held-out data | value |")
    print("|---|---|")
    print(f"| model | {model_log_density:.3f} |")
    print(f"| gaussian fit | {np.mean(gaussian.logpdf(held_out)):.3f} |")
    print(f"| exact density | {np.mean(two_moons_log_density(held_out)):.3f} |")

    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_fit(train, draws, fit, args.figure)
    print(f"\nsaved {args.figure}")


if __name__ == "__main__":
    main()
