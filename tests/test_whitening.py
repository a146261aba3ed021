"""Gaussian fits that whiten the target: the dense Newton refinement."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_pma import PMA, AutoBrenier
from numpyro_pma.whitening import (
    _inverse_scale_tril,
    fit_dense_gaussian,
    fit_diagonal_gaussian,
)


def correlated_covariance(dtype):
    # Standard deviations 0.01 to 100 along rotated axes: condition number 1e8.
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    scales = np.array([0.01, 0.3, 5.0, 100.0])
    return jnp.asarray(rotation @ np.diag(scales**2) @ rotation.T, dtype)


def test_inverse_scale_tril_inverts_ill_conditioned_precision(x64):
    covariance = correlated_covariance(jnp.float64)
    precision = jnp.linalg.inv(covariance)
    scale_tril = _inverse_scale_tril(precision)
    assert np.allclose(np.triu(scale_tril, 1), 0.0)
    np.testing.assert_allclose(scale_tril @ scale_tril.T, covariance, rtol=1e-7)


def test_inverse_scale_tril_flags_indefinite_matrix():
    scale_tril = _inverse_scale_tril(jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    assert not np.all(np.isfinite(scale_tril))


def test_one_newton_step_is_exact_for_a_gaussian(x64):
    # The Hessian of a Gaussian log density is constant, so the first Newton
    # step lands on N(m, S) whatever the start.
    covariance = correlated_covariance(jnp.float64)
    mean = jnp.array([1.0, -2.0, 30.0, 0.5])
    precision = jnp.linalg.inv(covariance)

    def logdensity_fn(z):
        return -0.5 * (z - mean) @ precision @ (z - mean)

    fit = fit_dense_gaussian(
        jax.random.key(0), logdensity_fn, jnp.zeros(4), jnp.ones(4), num_steps=3
    )
    assert int(fit.num_accepted) >= 1
    np.testing.assert_allclose(fit.loc, mean, atol=1e-8 * 100)
    np.testing.assert_allclose(
        fit.scale_tril @ fit.scale_tril.T, covariance, rtol=1e-7, atol=1e-12
    )
    # At N(m, S) the ELBO is log Z = log sqrt(det(2 pi S)). Its estimate
    # averages -|eps|^2 / 2 over 64 draws: standard error sqrt(d / 2) / 8.
    log_z = 0.5 * jnp.linalg.slogdet(2 * jnp.pi * covariance)[1]
    assert float(fit.elbo[1]) == pytest.approx(float(log_z), abs=4 * np.sqrt(2) / 8)


def regression_model(x, y):
    # Unscaled predictor (mean 50) with an intercept: the intercept and the
    # slope are correlated at about -0.999, and the noise scale enters the
    # Hessian, which is indefinite far from the data.
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 100.0))
    slope = numpyro.sample("slope", dist.Normal(0.0, 100.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    numpyro.sample("y", dist.Normal(intercept + slope * x, sigma), obs=y)


def regression_data():
    rng = np.random.default_rng(1)
    x = rng.normal(50.0, 2.0, size=200)
    y = 3.0 + 0.5 * x + rng.normal(0.0, 1.0, size=200)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def test_dense_fit_recovers_least_squares_on_correlated_regression():
    x, y = regression_data()
    guide = AutoBrenier(regression_model, hidden_sizes=(4,), whitening="dense")
    pma = PMA(regression_model, guide, num_whitening_steps=300)
    state = pma.init(jax.random.key(0), x, y)
    loc = state.mirror_state.loc
    scale_tril = state.mirror_state.scale
    assert scale_tril.shape == (3, 3)

    # With priors this wide the posterior of (intercept, slope) is centred at
    # the least-squares estimate with covariance sigma^2 (X'X)^-1.
    design = np.stack([np.ones_like(x), x], axis=1).astype(np.float64)
    coefficients, residual_ss, *_ = np.linalg.lstsq(design, np.asarray(y), rcond=None)
    noise_variance = residual_ss[0] / (len(x) - 2)
    covariance = noise_variance * np.linalg.inv(design.T @ design)
    standard_errors = np.sqrt(np.diag(covariance))
    fitted_covariance = np.asarray(scale_tril @ scale_tril.T)[:2, :2]
    # Means within 0.1 posterior sd; sds and the correlation within 10%
    # (the Gaussian fit of a Student-t-like marginal is slightly narrower).
    np.testing.assert_allclose(
        np.asarray(loc[:2]), coefficients, atol=0.1 * standard_errors.max()
    )
    np.testing.assert_allclose(
        np.sqrt(np.diag(fitted_covariance)), standard_errors, rtol=0.1
    )
    fitted_correlation = fitted_covariance[0, 1] / np.sqrt(
        fitted_covariance[0, 0] * fitted_covariance[1, 1]
    )
    expected_correlation = covariance[0, 1] / np.sqrt(
        covariance[0, 0] * covariance[1, 1]
    )
    assert fitted_correlation == pytest.approx(expected_correlation, abs=1e-3)


def test_dense_fit_improves_a_poor_diagonal_start():
    # 300 Adam steps leave the diagonal fit far from the optimum on this
    # regression; the Newton refinement must raise the ELBO a long way.
    x, y = regression_data()
    guide = AutoBrenier(regression_model, hidden_sizes=(4,), whitening="dense")
    pma = PMA(regression_model, guide)
    pma._setup_guide(jax.random.key(0), (x, y), {})
    logdensity_fn = pma._logdensity_fn(x, y)
    start = fit_diagonal_gaussian(
        jax.random.key(1), logdensity_fn, jnp.zeros(3), num_steps=300
    )
    fit = fit_dense_gaussian(jax.random.key(2), logdensity_fn, start.loc, start.scale)
    finite = np.asarray(fit.elbo)[np.isfinite(fit.elbo)]
    assert int(fit.num_accepted) >= 3
    assert finite[-1] > finite[0] + 100.0
    assert np.all(np.isfinite(fit.loc))
    assert np.all(np.isfinite(fit.scale_tril))


def test_dense_fit_stays_finite_on_cauchy():
    # A Cauchy target: the Hessian is indefinite in the tails and the
    # covariance is infinite. The fit must stay finite and lower triangular.
    def logdensity_fn(z):
        return -jnp.sum(jnp.log1p(z**2))

    fit = fit_dense_gaussian(
        jax.random.key(3), logdensity_fn, jnp.zeros(2), jnp.ones(2)
    )
    assert np.all(np.isfinite(fit.loc))
    assert np.all(np.isfinite(fit.scale_tril))
    assert np.allclose(np.triu(fit.scale_tril, 1), 0.0)
    assert np.all(np.diag(fit.scale_tril) > 0)


def test_whitening_option_sets_parameter_shapes():
    x, y = regression_data()
    for whitening, name, shape in [
        ("dense", "auto_scale_tril", (3, 3)),
        ("diagonal", "auto_scale", (3,)),
        ("auto", "auto_scale_tril", (3, 3)),  # 3 <= DENSE_WHITENING_MAX_DIM
    ]:
        guide = AutoBrenier(regression_model, hidden_sizes=(4,), whitening=whitening)
        params = numpyro.handlers.trace(
            numpyro.handlers.seed(guide, jax.random.key(0))
        ).get_trace(x, y)
        assert guide.scale_name == name
        assert params[name]["value"].shape == shape


def test_auto_whitening_is_diagonal_above_the_threshold():
    def wide_model():
        numpyro.sample("z", dist.Normal(jnp.zeros(257), 1.0).to_event(1))

    guide = AutoBrenier(wide_model, hidden_sizes=(2,))
    with pytest.raises(RuntimeError, match="set up"):
        guide.dense_whitening  # noqa: B018
    numpyro.handlers.seed(guide, jax.random.key(0))()
    assert not guide.dense_whitening
    assert guide.scale_name == "auto_scale"


def test_invalid_whitening_raises():
    with pytest.raises(ValueError, match="whitening"):
        AutoBrenier(regression_model, whitening="full")
