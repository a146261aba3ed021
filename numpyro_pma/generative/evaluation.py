"""Held-out two-sample comparison of a generative model with two yardsticks.

A distance between model draws and held-out data means little alone. It is
put between two yardsticks computed the same way:

- a Gaussian fitted to the training data (mean and full covariance), which the
  model should beat on data that is not Gaussian;
- a second half of the held-out data itself, the noise level of the estimate:
  a perfect model cannot do better than this on average.

Every set is compared with the first half of the held-out data, after all are
standardized by the training data's column means and standard deviations.
The same number of draws is used for every row, because the sliced
Wasserstein estimate is biased upwards by an amount that depends on it.
"""

from typing import NamedTuple

import jax
import numpy as np

from numpyro_pma.compare import energy_distance, sliced_wasserstein_distance

__all__ = ["HeldOutComparison", "compare_held_out"]


class HeldOutComparison(NamedTuple):
    """Result of :func:`compare_held_out`.

    Attributes:
        labels: Row labels: ``"model"``, ``"gaussian fit"``, ``"held-out
            half"``.
        energy_distance: Squared energy distance of each row to the first
            held-out half (standardized coordinates), shape ``(3,)``.
        sliced_wasserstein: Sliced Wasserstein-1 distance of each row, shape
            ``(3,)``.
        num_draws: Draws per row.
    """

    labels: tuple[str, ...]
    energy_distance: np.ndarray
    sliced_wasserstein: np.ndarray
    num_draws: int

    def to_markdown(self) -> str:
        """Format the comparison as a Markdown table."""
        lines = [
            f"| compared with held-out data ({self.num_draws} draws each) "
            "| energy distance | sliced Wasserstein-1 |",
            "|---|---|---|",
        ]
        for label, energy, sliced in zip(
            self.labels, self.energy_distance, self.sliced_wasserstein, strict=True
        ):
            lines.append(f"| {label} | {energy:.4f} | {sliced:.4f} |")
        return "\n".join(lines)


def compare_held_out(
    rng_key: jax.Array,
    model_draws: np.ndarray,
    train: np.ndarray,
    held_out: np.ndarray,
    *,
    num_projections: int = 200,
) -> HeldOutComparison:
    """Compare model draws, a Gaussian fit and held-out data with held-out data.

    Args:
        rng_key: Key for the Gaussian draws, the subsamples and the directions.
        model_draws: Draws of the model, shape ``(num_model, dim)``.
        train: Training data, shape ``(num_train, dim)``.
        held_out: Held-out data, shape ``(num_held_out, dim)``; split into two
            halves of ``num_held_out // 2`` rows.
        num_projections: Directions of the sliced Wasserstein estimate.

    Returns:
        The distances of the three rows to the first held-out half, each row
        with ``min(num_model, num_held_out // 2)`` draws.

    Raises:
        ValueError: If the arrays are not 2-d with the same number of columns,
            or ``held_out`` has fewer than 4 rows.
    """
    model_draws, train, held_out = (
        np.asarray(a, float) for a in (model_draws, train, held_out)
    )
    for name, array in (
        ("model_draws", model_draws),
        ("train", train),
        ("held_out", held_out),
    ):
        if array.ndim != 2 or array.shape[1] != train.shape[-1]:
            raise ValueError(
                f"{name} must have shape (n, {train.shape[-1]}), got {array.shape}"
            )
    if held_out.shape[0] < 4:
        raise ValueError(f"held_out needs at least 4 rows, got {held_out.shape[0]}")

    num_draws = min(model_draws.shape[0], held_out.shape[0] // 2)
    mean, sd = train.mean(0), train.std(0)
    gaussian_key, distance_key = jax.random.split(rng_key)
    seed = int(jax.random.randint(gaussian_key, (), 0, 2**31 - 1))
    gaussian = np.random.default_rng(seed).multivariate_normal(
        mean, np.cov(train.T).reshape(train.shape[1], train.shape[1]), num_draws
    )
    half = held_out.shape[0] // 2
    reference = (held_out[:num_draws] - mean) / sd
    rows = {
        "model": model_draws[:num_draws],
        "gaussian fit": gaussian,
        "held-out half": held_out[half : half + num_draws],
    }
    energies, sliced = [], []
    for index, draws in enumerate(rows.values()):
        standardized = (draws - mean) / sd
        key = jax.random.fold_in(distance_key, index)
        energies.append(
            energy_distance(key, standardized, reference, max_samples=num_draws)
        )
        # The same directions for every row, so the rows differ only in draws.
        sliced.append(
            sliced_wasserstein_distance(
                distance_key, standardized, reference, num_projections
            )
        )
    return HeldOutComparison(
        labels=tuple(rows),
        energy_distance=np.asarray(energies),
        sliced_wasserstein=np.asarray(sliced),
        num_draws=num_draws,
    )
