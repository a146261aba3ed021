import itertools
import re

import arviz as az
import jax
import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special, stats

from numpyro_pma.compare import (
    Comparison,
    compare,
    energy_distance,
    flatten_draws,
    sliced_wasserstein_distance,
)

NUM_SAMPLES = 4000
NUM_CHAINS = 4
QUANTILES = (0.05, 0.5, 0.95)
SHIFT = 0.5  # shift of the fit's "mu", in reference standard deviations

# A correlated Gaussian over (mu, theta[0], theta[1], theta[2]) with unequal
# scales. Standardized errors do not depend on the scales or correlations.
MEAN = np.array([2.0, -1.0, 0.0, 3.0])
SCALE = np.array([0.5, 1.0, 2.0, 0.1])
CORRELATION = np.array(
    [
        [1.0, 0.5, 0.0, 0.2],
        [0.5, 1.0, 0.3, 0.0],
        [0.0, 0.3, 1.0, -0.4],
        [0.2, 0.0, -0.4, 1.0],
    ]
)
NAMES = ["mu", "theta[0]", "theta[1]", "theta[2]"]


def gaussian_draws(seed, num_samples=NUM_SAMPLES):
    rng = np.random.default_rng(seed)
    covariance = CORRELATION * np.outer(SCALE, SCALE)
    return rng.multivariate_normal(MEAN, covariance, size=num_samples)


def as_dict(samples):
    return {"mu": samples[:, 0], "theta": samples[:, 1:]}


def as_inference_data(samples):
    chains = samples.reshape(NUM_CHAINS, -1, samples.shape[1])
    return az.from_dict(posterior={"mu": chains[..., 0], "theta": chains[..., 1:]})


# Monte Carlo tolerances for two independent samples of n draws each from one
# Gaussian, in reference-sd units, set at 4 standard deviations:
# - mean error: (mean_f - mean_r) / sd has variance 2 / n;
# - sd relative error: sd_f / sd_r - 1 has variance 1 / (2n) + 1 / (2n) = 1 / n;
# - quantile error at p: each sample quantile has variance p (1 - p) / (n phi(z_p)^2)
#   for the standard normal density phi, so the difference has twice that.
MEAN_TOL = 4.0 * np.sqrt(2.0 / NUM_SAMPLES)
SD_TOL = 4.0 / np.sqrt(NUM_SAMPLES)


def quantile_tol(p):
    z = stats.norm.ppf(p)
    return 4.0 * np.sqrt(2.0 * p * (1.0 - p) / NUM_SAMPLES) / stats.norm.pdf(z)


def expected_w1_one_sample(n):
    """E W1(F_n, F) for the standard normal, to first order in 1 / sqrt(n).

    F_n(x) - F(x) is about N(0, F (1 - F) / n) and E|N(0, s^2)| = s sqrt(2 / pi),
    so E W1 = E int |F_n - F| dx = sqrt(2 / (pi n)) int sqrt(F (1 - F)) dx.
    """
    integral, _ = integrate.quad(
        lambda x: np.sqrt(stats.norm.cdf(x) * stats.norm.sf(x)), -np.inf, np.inf
    )
    return np.sqrt(2.0 / (np.pi * n)) * integral


def gaussian_shift_energy(dim, shift):
    """Squared energy distance between N(0, I) and N(shift e_1, I) in R^dim.

    X - Y ~ N(shift e_1, 2 I), so E|X - Y| = sqrt(2) E sqrt(chi'^2_dim(shift^2 / 2))
    and E|X - X'| = sqrt(2) E chi_dim = 2 Gamma((dim + 1) / 2) / Gamma(dim / 2).
    """
    noncentral = stats.ncx2(df=dim, nc=shift**2 / 2.0)
    mean_xy = np.sqrt(2.0) * noncentral.expect(np.sqrt)
    mean_xx = 2.0 * special.gamma((dim + 1) / 2) / special.gamma(dim / 2)
    return 2.0 * mean_xy - 2.0 * mean_xx


# Spread of the squared energy distance, measured over 40 seeds (d = 3, n = 4000).
# For two samples of one distribution, with subsamples of 2000 draws, the
# estimates had mean 1e-4, standard deviation 1.1e-3 and maximum |value| 3.8e-3,
# so the bound is about 5 standard deviations. With a shift of 0.5 sd in one
# coordinate and all 4000 draws used, the standard deviation was 6.8e-3, and the
# tolerance is 4 of them.
SAME_ENERGY_TOL = 6e-3
SHIFT_ENERGY_TOL = 0.028


@pytest.fixture(scope="module")
def same_distribution():
    fit = as_inference_data(gaussian_draws(1))
    reference = as_dict(gaussian_draws(2))
    return compare(fit, reference, quantiles=QUANTILES)


@pytest.fixture(scope="module")
def shifted():
    samples = gaussian_draws(3)
    samples[:, 0] += SHIFT * SCALE[0]
    fit = as_inference_data(samples)
    reference = as_dict(gaussian_draws(4))
    return compare(fit, reference, quantiles=QUANTILES)


def test_same_distribution_table_layout(same_distribution):
    assert isinstance(same_distribution, Comparison)
    assert list(same_distribution.table.index) == NAMES
    for column in ["mean_error", "sd_rel_error", "wasserstein"]:
        assert column in same_distribution.table.columns
    for column in ["q5_error", "q50_error", "q95_error"]:
        assert column in same_distribution.table.columns
    assert same_distribution.num_fit_samples == NUM_SAMPLES
    assert same_distribution.num_reference_samples == NUM_SAMPLES


def test_same_distribution_marginal_errors_small(same_distribution):
    table = same_distribution.table
    assert np.all(np.abs(table["mean_error"]) < MEAN_TOL)
    assert np.all(np.abs(table["sd_rel_error"]) < SD_TOL)
    for p in QUANTILES:
        column = f"q{100 * p:g}_error"
        assert np.all(np.abs(table[column]) < quantile_tol(p)), column


def test_same_distribution_wasserstein_small(same_distribution):
    # W1(F_n, G_m) <= W1(F_n, F) + W1(G_m, F), each about expected_w1_one_sample
    # with relative spread well under 50%; 3 times the sum bounds it.
    bound = 3.0 * 2.0 * expected_w1_one_sample(NUM_SAMPLES)
    assert np.all(same_distribution.table["wasserstein"] < bound)
    assert same_distribution.max_wasserstein < bound


def test_same_distribution_energy_small(same_distribution):
    assert abs(same_distribution.energy_distance) < SAME_ENERGY_TOL


def test_max_fields_match_table(same_distribution):
    table = same_distribution.table
    quantile_errors = table[["q5_error", "q50_error", "q95_error"]].abs()
    assert same_distribution.max_abs_mean_error == table["mean_error"].abs().max()
    assert same_distribution.max_abs_sd_rel_error == table["sd_rel_error"].abs().max()
    assert same_distribution.max_abs_quantile_error == quantile_errors.max().max()


def test_shifted_mean_and_quantile_errors(shifted):
    table = shifted.table
    # The estimated reference sd scales the shift by 1 / sd_r, whose relative
    # error has standard deviation 1 / sqrt(2n).
    scale_tol = 4.0 * SHIFT / np.sqrt(2.0 * NUM_SAMPLES)
    assert abs(table.loc["mu", "mean_error"] - SHIFT) < MEAN_TOL + scale_tol
    assert np.all(np.abs(table["mean_error"].iloc[1:]) < MEAN_TOL)
    assert np.all(np.abs(table["sd_rel_error"]) < SD_TOL)
    for p in QUANTILES:
        column = f"q{100 * p:g}_error"
        assert abs(table.loc["mu", column] - SHIFT) < quantile_tol(p) + scale_tol


def test_shifted_wasserstein_equals_shift(shifted):
    # |W1(F_n, G_m) - W1(F, G)| <= W1(F_n, F) + W1(G_m, G), and the estimated
    # reference sd adds the same relative error as for the mean.
    tol = 3.0 * 2.0 * expected_w1_one_sample(NUM_SAMPLES)
    tol += 4.0 * SHIFT / np.sqrt(2.0 * NUM_SAMPLES)
    assert abs(shifted.table.loc["mu", "wasserstein"] - SHIFT) < tol
    assert shifted.max_wasserstein == shifted.table.loc["mu", "wasserstein"]


def test_shifted_energy_exceeds_same(same_distribution, shifted):
    # The correlated target has no closed form, so only a clear margin is checked.
    assert shifted.energy_distance > 5.0 * SAME_ENERGY_TOL
    assert shifted.energy_distance > same_distribution.energy_distance + 0.02
    assert shifted.sliced_wasserstein > same_distribution.sliced_wasserstein


def test_energy_matches_gaussian_closed_form():
    dim = 3
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(NUM_SAMPLES, dim))
    fit = rng.normal(size=(NUM_SAMPLES, dim))
    fit[:, 0] += SHIFT
    result = compare(fit, reference, num_projections=0, max_energy_samples=NUM_SAMPLES)
    expected = gaussian_shift_energy(dim, SHIFT)
    assert abs(result.energy_distance - expected) < SHIFT_ENERGY_TOL
    assert np.isnan(result.sliced_wasserstein)


def test_gaussian_shift_energy_matches_1d_formula():
    # In 1-d, E|N(m, s^2)| = s sqrt(2 / pi) exp(-m^2 / (2 s^2)) + m (1 - 2 Phi(-m / s)).
    s = np.sqrt(2.0)
    mean_xy = s * np.sqrt(2.0 / np.pi) * np.exp(-(SHIFT**2) / (2.0 * s**2))
    mean_xy += SHIFT * (1.0 - 2.0 * stats.norm.cdf(-SHIFT / s))
    expected = 2.0 * mean_xy - 2.0 * 2.0 / np.sqrt(np.pi)
    np.testing.assert_allclose(gaussian_shift_energy(1, SHIFT), expected, rtol=1e-8)


def test_energy_distance_matches_brute_force():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 2))
    y = rng.normal(size=(5, 2)) + 1.0
    pairs_xy = [np.linalg.norm(a - b) for a, b in itertools.product(x, y)]
    pairs_xx = [np.linalg.norm(a - b) for a, b in itertools.permutations(x, 2)]
    pairs_yy = [np.linalg.norm(a - b) for a, b in itertools.permutations(y, 2)]
    expected = 2.0 * np.mean(pairs_xy) - np.mean(pairs_xx) - np.mean(pairs_yy)
    actual = energy_distance(jax.random.key(0), x, y)
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_energy_distance_subsamples_reproducibly():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 2))
    y = rng.normal(size=(300, 2))
    first = energy_distance(jax.random.key(1), x, y, max_samples=50)
    again = energy_distance(jax.random.key(1), x, y, max_samples=50)
    other = energy_distance(jax.random.key(2), x, y, max_samples=50)
    full = energy_distance(jax.random.key(1), x, y, max_samples=300)
    assert first == again
    assert first != other
    assert first != full


def test_sliced_wasserstein_1d_is_w1():
    # In one dimension every unit direction is +-1, and W1 is sign invariant.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(200, 1))
    y = rng.normal(size=(150, 1)) * 2.0
    expected = stats.wasserstein_distance(x[:, 0], y[:, 0])
    actual = sliced_wasserstein_distance(jax.random.key(0), x, y, num_projections=5)
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_summary_side_by_side(same_distribution):
    summary = same_distribution.summary
    assert isinstance(summary, pd.DataFrame)
    assert list(summary.index) == NAMES
    assert ("fit", "mean") in summary.columns
    assert ("reference", "mean") in summary.columns
    np.testing.assert_allclose(
        summary[("fit", "mean")], same_distribution.table["fit_mean"], atol=1e-3
    )


def test_to_markdown_lists_parameters(same_distribution):
    text = same_distribution.to_markdown()
    assert str(same_distribution) == text
    for name in NAMES:
        assert re.search(rf"^\|\s*{re.escape(name)} \|", text, re.MULTILINE), name
    assert "energy distance" in text


def test_array_and_pair_inputs():
    samples = gaussian_draws(9, num_samples=500)
    reference = gaussian_draws(10, num_samples=500)
    by_array = compare(samples, reference, num_projections=0)
    assert list(by_array.table.index) == ["x[0]", "x[1]", "x[2]", "x[3]"]
    by_pair = compare((samples, NAMES), as_dict(reference), num_projections=0)
    assert list(by_pair.table.index) == NAMES
    np.testing.assert_allclose(
        by_pair.table["mean_error"].to_numpy(),
        by_array.table["mean_error"].to_numpy(),
        rtol=1e-12,
    )


def test_flatten_names_matrix_site():
    draws = {"scale": np.ones((10, 2, 3)), "mu": np.zeros(10)}
    flat = flatten_draws(draws)
    assert flat.names[:2] == ("scale[0, 0]", "scale[0, 1]")
    assert flat.names[-1] == "mu"
    assert flat.values.shape == (1, 10, 7)


def test_flatten_pair_with_chains():
    chains = np.zeros((3, 20, 2))
    flat = flatten_draws((chains, ["a[1]", "a[2]"]))
    assert flat.names == ("a[1]", "a[2]")
    assert flat.values.shape == (3, 20, 2)
    with pytest.raises(ValueError, match="got shape"):
        flatten_draws((chains, ["a[1]"]))


def test_flatten_inference_data_keeps_chains():
    flat = flatten_draws(as_inference_data(gaussian_draws(11, num_samples=400)))
    assert flat.names == tuple(NAMES)
    assert flat.values.shape == (NUM_CHAINS, 100, 4)


def test_var_names_selects_subset():
    fit = as_dict(gaussian_draws(12, num_samples=500))
    reference = {**as_dict(gaussian_draws(13, num_samples=500)), "extra": np.ones(500)}
    result = compare(fit, reference, var_names=["theta"], num_projections=0)
    assert list(result.table.index) == NAMES[1:]
    single = compare(fit, reference, var_names=["theta[1]"], num_projections=0)
    assert list(single.table.index) == ["theta[1]"]


def test_mismatched_names_raise():
    fit = as_dict(gaussian_draws(14, num_samples=100))
    reference = {**fit, "extra": np.zeros(100)}
    with pytest.raises(ValueError, match=r"only in reference \['extra'\]"):
        compare(fit, reference)
    with pytest.raises(ValueError, match="sigma"):
        compare(fit, reference, var_names=["mu", "sigma"])


def test_invalid_inputs_raise():
    fit = as_dict(gaussian_draws(15, num_samples=100))
    with pytest.raises(ValueError, match="constant"):
        compare({**fit, "c": np.ones(100)}, {**fit, "c": np.ones(100)})
    with pytest.raises(ValueError, match="quantiles"):
        compare(fit, fit, quantiles=(0.5, 1.0))
    with pytest.raises(TypeError, match="reference"):
        compare(fit, [1.0, 2.0])
    with pytest.raises(ValueError, match="leading sample axis"):
        compare({"mu": np.zeros(3), "theta": np.zeros((4, 2))}, fit)
    bad = {**fit, "mu": np.where(np.arange(100) == 3, np.nan, fit["mu"])}
    with pytest.raises(ValueError, match=r"non-finite draws in columns \['mu'\]"):
        compare(bad, fit)
