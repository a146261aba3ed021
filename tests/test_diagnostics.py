import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from scipy import stats

from numpyro_pma.diagnostics import (
    GOOD_KHAT_THRESHOLD,
    USABLE_KHAT_THRESHOLD,
    Diagnosis,
    diagnose,
    diagnose_draws,
    khat_verdict,
    psis_reweighted_summary,
)
from numpyro_pma.importance import ImportanceDraws, importance_log_weights


@pytest.fixture(autouse=True, scope="module")
def float64_module():
    """Run this module in float64, then restore the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# Conjugate normal means: mu_j ~ N(PRIOR_LOC, PRIOR_SCALE^2), y_j ~ N(mu_j, NOISE^2).
PRIOR_LOC, PRIOR_SCALE, NOISE = 0.5, 2.0, 1.0
Y = np.array([0.4, -1.3, 2.2, 0.9])
POST_VAR = 1 / (1 / PRIOR_SCALE**2 + 1 / NOISE**2)
POST_MEAN = POST_VAR * (PRIOR_LOC / PRIOR_SCALE**2 + Y / NOISE**2)
POST_SD = np.sqrt(POST_VAR) * np.ones_like(Y)
LOG_Z = stats.norm.logpdf(Y, PRIOR_LOC, np.sqrt(PRIOR_SCALE**2 + NOISE**2)).sum()


def conjugate_model(y):
    with numpyro.plate("J", len(Y)):
        mu = numpyro.sample("mu", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def student_t_model():
    numpyro.sample("x", dist.StudentT(2.0))


def test_thresholds_and_verdicts():
    assert GOOD_KHAT_THRESHOLD == 0.5
    assert USABLE_KHAT_THRESHOLD == 0.7
    assert khat_verdict(-np.inf) == "good"
    assert khat_verdict(0.49) == "good"
    assert khat_verdict(0.5) == "usable"
    assert khat_verdict(0.7) == "usable"
    assert khat_verdict(0.7001) == "unreliable"
    assert khat_verdict(np.inf) == "unreliable"
    assert khat_verdict(np.nan) == "unreliable"


def test_svi_fit_diagnosed_good():
    guide = AutoMultivariateNormal(conjugate_model)
    svi = SVI(conjugate_model, guide, numpyro.optim.Adam(0.02), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 2000, Y, progress_bar=False)
    diagnosis = diagnose(
        jax.random.PRNGKey(1), conjugate_model, guide, result.params, Y
    )

    # The guide family contains the posterior, so a trained fit has k-hat well
    # below 0.5 and log Z within 4 standard errors of the exact value (the
    # estimator averages 4000 independent weights and is close to normal).
    assert isinstance(diagnosis, Diagnosis)
    assert diagnosis.verdict == "good"
    assert diagnosis.khat < GOOD_KHAT_THRESHOLD
    assert diagnosis.num_samples == 4000
    assert diagnosis.num_nonfinite == 0
    assert abs(diagnosis.log_z - LOG_Z) < 4 * diagnosis.log_z_stderr
    assert diagnosis.elbo < LOG_Z
    assert diagnosis.ess > 0.5 * diagnosis.num_samples
    assert "below 0.5" in diagnosis.message


def test_narrow_guide_on_heavy_tail_unreliable():
    params = {"x_auto_loc": jnp.asarray(0.0), "x_auto_scale": jnp.asarray(0.1)}
    diagnosis = diagnose(
        jax.random.PRNGKey(0), student_t_model, AutoNormal(student_t_model), params
    )

    # Weights of a Gaussian guide on a Student-t(2) target have a Pareto tail of
    # shape 1; over 20 keys the 4000-draw estimate ranged from 0.63 to 1.14, so
    # this checks one fixed key.
    assert diagnosis.khat > USABLE_KHAT_THRESHOLD
    assert diagnosis.verdict == "unreliable"
    assert "above 0.7" in diagnosis.message
    assert "unreliable" in str(diagnosis)


def _synthetic_draws(log_weights):
    log_weights = jnp.asarray(log_weights)
    return ImportanceDraws(
        samples={"x": jnp.zeros_like(log_weights)},
        log_joint=log_weights,
        log_guide=jnp.zeros_like(log_weights),
        log_weights=log_weights,
        num_nonfinite=int(jnp.sum(~jnp.isfinite(log_weights))),
    )


def test_pareto_tail_with_khat_0_6_is_usable():
    # Log weights at the quantiles of a Pareto law of shape 0.6: the tail fit
    # returns k-hat within 0.03 of 0.6, inside the "usable" band.
    u = (np.arange(4000) + 0.5) / 4000
    diagnosis = diagnose_draws(_synthetic_draws(-0.6 * np.log(u)))

    assert diagnosis.verdict == "usable"
    assert abs(diagnosis.khat - 0.6) < 0.05
    assert "between 0.5 and 0.7" in diagnosis.message


def test_nonfinite_weights_reported():
    log_weights = np.zeros(100)
    log_weights[[3, 50, 77]] = [np.nan, -np.inf, np.inf]
    diagnosis = diagnose_draws(_synthetic_draws(log_weights))

    assert diagnosis.num_nonfinite == 3
    assert diagnosis.verdict == "unreliable"
    assert np.isnan(diagnosis.elbo)
    assert np.isnan(diagnosis.log_z)
    assert np.isnan(diagnosis.khat)
    assert diagnosis.message.startswith("3 of 100 importance log weights")
    with pytest.raises(ValueError, match="contains 3 non-finite"):
        psis_reweighted_summary(_synthetic_draws(log_weights))


def test_table_lists_every_estimate():
    u = (np.arange(1000) + 0.5) / 1000
    diagnosis = diagnose_draws(_synthetic_draws(-0.2 * np.log(u)))
    table = str(diagnosis)

    for label in ("verdict", "Pareto k-hat", "ELBO", "log Z", "KL", "ESS"):
        assert label in table
    assert f"{diagnosis.elbo:.4f} ± {diagnosis.elbo_stderr:.4f}" in table
    assert table.endswith(diagnosis.message)
    np.testing.assert_allclose(diagnosis.kl, diagnosis.log_z - diagnosis.elbo)


def test_psis_summary_corrects_shifted_guide():
    params = {
        "mu_auto_loc": jnp.asarray(POST_MEAN + 0.5 * POST_SD),
        "mu_auto_scale": jnp.asarray(1.5 * POST_SD),
    }
    draws = importance_log_weights(
        jax.random.PRNGKey(2),
        conjugate_model,
        AutoNormal(conjugate_model),
        params,
        Y,
        num_samples=4000,
    )
    summary = psis_reweighted_summary(draws)

    # Self-normalized importance estimates of a mean and an sd have standard
    # errors near sd / sqrt(ESS) and sd / sqrt(2 ESS); 4 of them bound a
    # failure. The guide's own moments are off by 0.5 sd in the mean and by a
    # factor 1.5 in the sd, far outside these bounds.
    mean_tolerance = 4 * POST_SD / np.sqrt(summary.ess)
    sd_tolerance = 4 * POST_SD / np.sqrt(2 * summary.ess)
    assert summary.khat < GOOD_KHAT_THRESHOLD
    assert summary.mean["mu"].shape == (len(Y),)
    assert np.all(np.abs(summary.mean["mu"] - POST_MEAN) < mean_tolerance)
    assert np.all(np.abs(summary.sd["mu"] - POST_SD) < sd_tolerance)
    assert np.all(np.abs(summary.guide_mean["mu"] - POST_MEAN) > mean_tolerance)
    assert np.all(np.abs(summary.guide_sd["mu"] - POST_SD) > sd_tolerance)
    assert "mu[3]" in str(summary)


def test_invalid_draws_rejected():
    with pytest.raises(TypeError, match="draws must be an ImportanceDraws, got dict"):
        diagnose_draws({"log_weights": np.zeros(3)})
    with pytest.raises(TypeError, match="draws must be an ImportanceDraws, got list"):
        psis_reweighted_summary([0.0, 1.0])
