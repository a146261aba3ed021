import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from scipy import stats
from scipy.special import logsumexp

from numpyro_pma.importance import (
    ImportanceDraws,
    elbo_estimate,
    importance_ess,
    importance_log_weights,
    log_evidence_estimate,
    pareto_khat,
    psis_log_weights,
)


@pytest.fixture(autouse=True, scope="module")
def float64_module():
    """Run this module in float64, then restore the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


NUM_SAMPLES = 4000

# Conjugate normal means: mu_j ~ N(PRIOR_LOC, PRIOR_SCALE^2), y_ij ~ N(mu_j, NOISE^2).
PRIOR_LOC, PRIOR_SCALE, NOISE = 0.5, 2.0, 1.0
Y = np.array(
    [
        [0.3, -1.2, 2.1],
        [1.1, -0.4, 2.9],
        [-0.2, -1.9, 1.7],
        [0.8, -0.7, 3.3],
    ]
)
NUM_OBS, NUM_GROUPS = Y.shape


def conjugate_model(y):
    with numpyro.plate("J", NUM_GROUPS):
        mu = numpyro.sample("mu", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
    with numpyro.plate("J", NUM_GROUPS), numpyro.plate("obs", NUM_OBS, dim=-2):
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def conjugate_posterior():
    """Exact posterior mean, sd (each of shape (J,)) and log evidence."""
    precision = 1 / PRIOR_SCALE**2 + NUM_OBS / NOISE**2
    sd = np.sqrt(1 / precision) * np.ones(NUM_GROUPS)
    mean = (PRIOR_LOC / PRIOR_SCALE**2 + Y.sum(0) / NOISE**2) / precision
    marginal_cov = NOISE**2 * np.eye(NUM_OBS) + PRIOR_SCALE**2
    log_z = sum(
        stats.multivariate_normal.logpdf(
            Y[:, j], np.full(NUM_OBS, PRIOR_LOC), marginal_cov
        )
        for j in range(NUM_GROUPS)
    )
    return mean, sd, log_z


def gaussian_kl(loc, cov, target_mean, target_var):
    """KL(N(loc, cov) || N(target_mean, diag(target_var)))."""
    diff = target_mean - loc
    return 0.5 * (
        np.sum(np.diag(cov) / target_var)
        + np.sum(diff**2 / target_var)
        - len(loc)
        + np.sum(np.log(target_var))
        - np.linalg.slogdet(cov)[1]
    )


def test_exact_guide_weights_equal_log_z():
    mean, sd, log_z = conjugate_posterior()
    guide = AutoNormal(conjugate_model)
    params = {"mu_auto_loc": jnp.asarray(mean), "mu_auto_scale": jnp.asarray(sd)}
    draws = importance_log_weights(
        jax.random.PRNGKey(0), conjugate_model, guide, params, Y, num_samples=500
    )

    # q equals the posterior, so p(y, z) / q(z) = Z at every draw: an identity up
    # to float64 rounding of sums of about fifteen terms.
    np.testing.assert_allclose(draws.log_weights, log_z, rtol=0, atol=1e-10)
    assert draws.num_nonfinite == 0
    assert pareto_khat(draws.log_weights) == -np.inf
    np.testing.assert_allclose(importance_ess(draws.log_weights), 500, rtol=1e-9)
    np.testing.assert_allclose(
        elbo_estimate(draws.log_weights).value, log_z, atol=1e-10
    )


def _normal_guide_params(mean, sd):
    guide = AutoNormal(conjugate_model)
    params = {
        "mu_auto_loc": jnp.asarray(mean + 0.3 * sd),
        "mu_auto_scale": jnp.asarray(1.3 * sd),
    }
    cov = np.diag((1.3 * sd) ** 2)
    return guide, params, mean + 0.3 * sd, cov


def _mvn_guide_params(mean, sd):
    guide = AutoMultivariateNormal(conjugate_model)
    correlation = 0.7 * np.eye(NUM_GROUPS) + 0.3
    cov = 1.3**2 * np.outer(sd, sd) * correlation
    params = {
        "auto_loc": jnp.asarray(mean - 0.2 * sd),
        "auto_scale_tril": jnp.asarray(np.linalg.cholesky(cov)),
    }
    return guide, params, mean - 0.2 * sd, cov


@pytest.mark.parametrize("make_guide", [_normal_guide_params, _mvn_guide_params])
def test_gaussian_target_matches_exact(make_guide):
    mean, sd, log_z = conjugate_posterior()
    guide, params, guide_loc, guide_cov = make_guide(mean, sd)
    kl = gaussian_kl(guide_loc, guide_cov, mean, sd**2)
    elbo = log_z - kl
    draws = importance_log_weights(
        jax.random.PRNGKey(1),
        conjugate_model,
        guide,
        params,
        Y,
        num_samples=NUM_SAMPLES,
    )
    elbo_hat, elbo_se = elbo_estimate(draws.log_weights)
    log_z_hat, log_z_se = log_evidence_estimate(draws.log_weights)

    # Both estimators are averages of 4000 independent terms, so they are close to
    # normal and 4 standard errors bound a two-sided failure rate near 6e-5. The
    # downward bias of log Z, about log_z_se**2 / 2, is below 1e-4 here. The guide's
    # covariance dominates the posterior's, so the weights are bounded and the
    # delta-method standard error is valid.
    assert kl > 0.05
    assert abs(elbo_hat - elbo) < 4 * elbo_se
    assert abs(log_z_hat - log_z) < 4 * log_z_se
    # The two estimates are correlated; the sd of their difference is at most the
    # sum of their sds.
    assert abs((log_z_hat - elbo_hat) - kl) < 4 * (elbo_se + log_z_se)
    assert pareto_khat(draws.log_weights) < 0.5


MIXTURE_LOG_Z = 1.7
MIXTURE_WEIGHTS = np.array([0.3, 0.7])
MIXTURE_LOCS = np.array([-1.0, 1.5])
MIXTURE_SCALES = np.array([0.7, 1.0])


def mixture_log_density(x):
    """Normalized log density of the two-component mixture at ``x``."""
    components = dist.Normal(MIXTURE_LOCS, MIXTURE_SCALES).log_prob(x[..., None])
    return jax.nn.logsumexp(components + jnp.log(MIXTURE_WEIGHTS), axis=-1)


def mixture_model():
    x = numpyro.sample("x", dist.ImproperUniform(constraints.real, (), ()))
    numpyro.factor("target", MIXTURE_LOG_Z + mixture_log_density(x))


def test_mixture_target_matches_exact():
    guide_loc, guide_scale = 0.8, 1.6
    params = {
        "x_auto_loc": jnp.asarray(guide_loc),
        "x_auto_scale": jnp.asarray(guide_scale),
    }
    draws = importance_log_weights(
        jax.random.PRNGKey(2),
        mixture_model,
        AutoNormal(mixture_model),
        params,
        num_samples=NUM_SAMPLES,
    )

    # Exact ELBO = log Z + E_q[log mixture] + entropy of q. The expectation is a
    # smooth 1-d Gaussian integral, and 100 Gauss-Hermite nodes compute it to
    # about machine precision.
    nodes, node_weights = np.polynomial.hermite_e.hermegauss(100)
    x = guide_loc + guide_scale * nodes
    expected_log_mixture = np.sum(
        node_weights * np.asarray(mixture_log_density(jnp.asarray(x)))
    ) / np.sqrt(2 * np.pi)
    entropy = 0.5 * np.log(2 * np.pi * np.e * guide_scale**2)
    elbo = MIXTURE_LOG_Z + expected_log_mixture + entropy
    kl = MIXTURE_LOG_Z - elbo

    elbo_hat, elbo_se = elbo_estimate(draws.log_weights)
    log_z_hat, log_z_se = log_evidence_estimate(draws.log_weights)
    # Tolerances as in the Gaussian test: 4 standard errors of near-normal
    # averages, with bounded weights because q is wider than both components.
    assert kl > 0.05
    assert abs(elbo_hat - elbo) < 4 * elbo_se
    assert abs(log_z_hat - MIXTURE_LOG_Z) < 4 * log_z_se
    assert abs((log_z_hat - elbo_hat) - kl) < 4 * (elbo_se + log_z_se)
    assert pareto_khat(draws.log_weights) < 0.5


def student_t_model():
    numpyro.sample("x", dist.StudentT(2.0))


def test_khat_large_for_narrow_guide():
    params = {"x_auto_loc": jnp.asarray(0.0), "x_auto_scale": jnp.asarray(0.1)}
    draws = importance_log_weights(
        jax.random.PRNGKey(0),
        student_t_model,
        AutoNormal(student_t_model),
        params,
        num_samples=NUM_SAMPLES,
    )

    # Any Gaussian guide on a Student-t(2) target has weights with a Pareto tail
    # of shape k = 1 (up to log factors). Over 20 keys with 4000 draws the
    # estimate ranged from 0.63 to 1.14 (mean 0.88), so one fixed key is checked.
    # Weights with the wrong sign would be bounded and give k-hat below 0.
    assert pareto_khat(draws.log_weights) > 0.7


def scale_model(y):
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("J", NUM_GROUPS):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        numpyro.deterministic("mu_scaled", mu / sigma)
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


Y_GROUPS = np.array([0.4, -1.3, 2.2])


def _scale_model_log_joint(sigma, mu):
    return (
        stats.halfnorm.logpdf(sigma, scale=2.0)
        + stats.norm.logpdf(mu, 0.0, 2.0).sum(-1)
        + stats.norm.logpdf(Y_GROUPS, mu, sigma[:, None]).sum(-1)
    )


def test_log_densities_match_by_hand():
    loc = np.array([0.2, 0.5, -0.8, 1.5])
    scale_tril = np.array(
        [
            [0.4, 0.0, 0.0, 0.0],
            [0.1, 0.9, 0.0, 0.0],
            [-0.2, 0.3, 0.7, 0.0],
            [0.05, 0.0, 0.2, 1.1],
        ]
    )
    params = {"auto_loc": jnp.asarray(loc), "auto_scale_tril": jnp.asarray(scale_tril)}
    draws = importance_log_weights(
        jax.random.PRNGKey(3),
        scale_model,
        AutoMultivariateNormal(scale_model),
        params,
        Y_GROUPS,
        num_samples=200,
    )
    sigma = np.asarray(draws.samples["sigma"])
    mu = np.asarray(draws.samples["mu"])

    # The guide draws u = (log sigma, mu) in model order from N(loc, L L'), so
    # log q(sigma, mu) = log N(u) - log sigma. These are identities; 1e-10 allows
    # for float64 rounding only.
    u = np.concatenate([np.log(sigma)[:, None], mu], axis=1)
    log_q = stats.multivariate_normal.logpdf(u, loc, scale_tril @ scale_tril.T)
    log_q = log_q - np.log(sigma)
    assert set(draws.samples) == {"sigma", "mu", "mu_scaled"}
    assert mu.shape == (200, NUM_GROUPS)
    assert sigma.shape == (200,)
    np.testing.assert_allclose(draws.log_guide, log_q, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        draws.log_joint, _scale_model_log_joint(sigma, mu), rtol=0, atol=1e-10
    )
    np.testing.assert_allclose(
        draws.log_weights, draws.log_joint - draws.log_guide, rtol=0, atol=0
    )
    np.testing.assert_allclose(
        draws.samples["mu_scaled"], mu / sigma[:, None], rtol=1e-14
    )


def test_flow_guide_log_density_matches_inverse():
    # AutoIAFNormal's log density on its own draws comes from the intermediates of
    # the forward pass; recompute it through the inverse transform instead.
    guide = AutoIAFNormal(scale_model, num_flows=2, hidden_dims=[8])
    svi = SVI(scale_model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(4), Y_GROUPS))
    draws = importance_log_weights(
        jax.random.PRNGKey(5), scale_model, guide, params, Y_GROUPS, num_samples=50
    )
    sigma = np.asarray(draws.samples["sigma"])
    mu = np.asarray(draws.samples["mu"])

    u = jnp.concatenate([jnp.log(sigma)[:, None], mu], axis=1)
    log_q = guide.get_posterior(params).log_prob(u) - jnp.log(sigma)
    # The inverse of an autoregressive flow is solved dimension by dimension, so
    # allow for accumulated rounding.
    np.testing.assert_allclose(draws.log_guide, log_q, rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        draws.log_joint, _scale_model_log_joint(sigma, mu), rtol=0, atol=1e-10
    )


def test_chunked_draws_match_unchunked():
    params = {"x_auto_loc": jnp.asarray(0.3), "x_auto_scale": jnp.asarray(0.8)}
    guide = AutoNormal(student_t_model)
    key = jax.random.PRNGKey(8)
    whole = importance_log_weights(key, student_t_model, guide, params, num_samples=50)
    # 50 is not a multiple of 16, so the last chunk is a remainder.
    chunked = importance_log_weights(
        key, student_t_model, guide, params, num_samples=50, chunk_size=16
    )

    # The same keys give the same draws; only the evaluation order differs.
    np.testing.assert_allclose(chunked.samples["x"], whole.samples["x"], rtol=1e-12)
    np.testing.assert_allclose(chunked.log_weights, whole.log_weights, rtol=1e-12)


def truncated_model(fill_value):
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    numpyro.factor("cut", jnp.where(x > 1.0, fill_value, 0.0))


@pytest.mark.parametrize("fill_value", [-jnp.inf, jnp.nan])
def test_nonfinite_weights_counted_not_averaged(fill_value):
    params = {"x_auto_loc": jnp.asarray(0.0), "x_auto_scale": jnp.asarray(1.0)}
    draws = importance_log_weights(
        jax.random.PRNGKey(6),
        truncated_model,
        AutoNormal(truncated_model),
        params,
        fill_value,
        num_samples=400,
    )
    expected = int(np.sum(np.asarray(draws.samples["x"]) > 1.0))

    assert expected > 0
    assert draws.num_nonfinite == expected
    assert draws.log_weights.shape == (400,)
    assert int(np.sum(~np.isfinite(draws.log_weights))) == expected
    for estimator in (
        elbo_estimate,
        log_evidence_estimate,
        importance_ess,
        pareto_khat,
        psis_log_weights,
    ):
        with pytest.raises(ValueError, match=f"contains {expected} non-finite"):
            estimator(draws.log_weights)


def test_estimators_on_known_weights():
    weights = np.array([1.0, 2.0, 3.0, 6.0])
    log_weights = np.log(weights)

    log_z, log_z_se = log_evidence_estimate(log_weights)
    np.testing.assert_allclose(log_z, np.log(3.0), rtol=1e-14)
    np.testing.assert_allclose(log_z_se, np.std(weights, ddof=1) / (2 * 3.0))
    np.testing.assert_allclose(importance_ess(log_weights), 144 / 50, rtol=1e-14)
    elbo, elbo_se = elbo_estimate(log_weights)
    np.testing.assert_allclose(elbo, np.mean(log_weights), rtol=1e-14)
    np.testing.assert_allclose(elbo_se, np.std(log_weights, ddof=1) / 2)
    # Shifting all log weights by a constant changes log Z by that constant only.
    np.testing.assert_allclose(
        log_evidence_estimate(log_weights + 800.0).value, np.log(3.0) + 800.0
    )


def test_khat_of_exact_pareto_quantiles():
    # Log weights at the quantiles (s - 1/2) / S of a Pareto law with shape k are
    # -k log u; the tail fit recovers k to within a few hundredths (measured error
    # below 0.03 for k in 0.3, 0.6, 0.9 with S = 4000).
    u = (np.arange(NUM_SAMPLES) + 0.5) / NUM_SAMPLES
    for khat in (0.3, 0.6, 0.9):
        assert abs(pareto_khat(-khat * np.log(u)) - khat) < 0.05


def test_psis_weights_are_normalized():
    rng = np.random.default_rng(0)
    log_weights = rng.standard_t(3, size=1000)
    smoothed, khat = psis_log_weights(log_weights)

    assert smoothed.shape == (1000,)
    np.testing.assert_allclose(logsumexp(smoothed), 0.0, atol=1e-12)
    assert np.isfinite(khat)


def test_invalid_inputs_rejected():
    params = {"x_auto_loc": jnp.asarray(0.0), "x_auto_scale": jnp.asarray(1.0)}
    guide = AutoNormal(student_t_model)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_samples must be at least 2, got 1"):
        importance_log_weights(key, student_t_model, guide, params, num_samples=1)
    with pytest.raises(TypeError, match="num_samples must be an integer"):
        importance_log_weights(key, student_t_model, guide, params, num_samples=2.5)
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        importance_log_weights(
            key, student_t_model, guide, params, num_samples=10, chunk_size=0
        )
    with pytest.raises(TypeError, match="params must be a mapping"):
        importance_log_weights(key, student_t_model, guide, [1.0], num_samples=10)
    with pytest.raises(ValueError, match=r"shape \(num_samples,\), got shape"):
        elbo_estimate(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        log_evidence_estimate(np.zeros(1))


def test_guide_missing_site_rejected():
    def two_site_model():
        numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("b", dist.Normal(0.0, 1.0))

    def one_site_guide():
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"latent sites \['b'\]"):
        importance_log_weights(
            jax.random.PRNGKey(0), two_site_model, one_site_guide, {}, num_samples=10
        )


def test_draws_are_importance_draws():
    params = {"x_auto_loc": jnp.asarray(0.0), "x_auto_scale": jnp.asarray(1.0)}
    draws = importance_log_weights(
        jax.random.PRNGKey(7),
        student_t_model,
        AutoNormal(student_t_model),
        params,
        num_samples=10,
    )
    assert isinstance(draws, ImportanceDraws)
    assert draws.log_joint.shape == (10,)
    assert draws.log_guide.shape == (10,)
    assert draws.samples["x"].shape == (10,)
