"""AutoBrenier as a NumPyro autoguide: SVI drop-in, Predictive, summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Predictive, Trace_ELBO

from numpyro_pma import AutoBrenier

# Conjugate model: mu ~ N(0, 1), y_i ~ N(mu, 1), so mu | y ~ N(sum y / (n + 1),
# 1 / (n + 1)); a positive site checks that constraints are applied.
OBSERVATIONS = jnp.array([0.3, 1.1, 0.7, -0.2, 0.9])
POSTERIOR_MEAN = float(OBSERVATIONS.sum() / (len(OBSERVATIONS) + 1))
POSTERIOR_SD = float(1 / np.sqrt(len(OBSERVATIONS) + 1))


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    noise = numpyro.sample("noise", dist.LogNormal(0.0, 0.5))
    numpyro.deterministic("mu_squared", mu**2)
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    return noise


@pytest.fixture(scope="module")
def svi_fit():
    guide = AutoBrenier(model, hidden_sizes=(8,))
    learning_rate = optax.cosine_decay_schedule(3e-2, 1500, alpha=0.01)
    svi = SVI(model, guide, optax.adam(learning_rate), Trace_ELBO(num_particles=4))
    result = svi.run(jax.random.key(0), 1500, OBSERVATIONS, progress_bar=False)
    return guide, result


def test_svi_trains_guide(svi_fit):
    guide, result = svi_fit
    draws = guide.sample_posterior(
        jax.random.key(1), result.params, sample_shape=(4000,)
    )
    # Monte Carlo error of the mean of 4000 draws is 0.4 / sqrt(4000) = 0.006;
    # the tolerance also allows for the SVI optimum's own error.
    assert float(draws["mu"].mean()) == pytest.approx(POSTERIOR_MEAN, abs=0.05)
    assert float(draws["mu"].std()) == pytest.approx(POSTERIOR_SD, rel=0.1)
    # noise is independent of the data: its posterior is its LogNormal prior.
    assert float(jnp.log(draws["noise"]).std()) == pytest.approx(0.5, rel=0.1)
    assert bool(jnp.all(draws["noise"] > 0))
    np.testing.assert_allclose(draws["mu_squared"], draws["mu"] ** 2, rtol=1e-5)
    assert float(result.losses[-100:].mean()) < float(result.losses[:10].mean())


def test_predictive_with_guide(svi_fit):
    guide, result = svi_fit
    predictive = Predictive(model, guide=guide, params=result.params, num_samples=50)
    samples = predictive(jax.random.key(2), OBSERVATIONS)
    assert samples["y"].shape == (50, len(OBSERVATIONS))
    assert samples["mu_squared"].shape == (50,)


def test_median_and_quantiles(svi_fit):
    guide, result = svi_fit
    median = guide.median(result.params)
    quantiles = guide.quantiles(result.params, [0.1, 0.5, 0.9])
    assert set(median) == {"mu", "noise"}
    assert quantiles["mu"].shape == (3,)
    np.testing.assert_allclose(quantiles["mu"][1], median["mu"])
    assert float(quantiles["mu"][0]) < float(median["mu"]) < float(quantiles["mu"][2])
    # N(m, s) quantiles: m -+ 1.2816 s; tolerance as in test_svi_trains_guide.
    expected = POSTERIOR_MEAN + 1.2816 * POSTERIOR_SD * np.array([-1, 0, 1])
    np.testing.assert_allclose(quantiles["mu"], expected, atol=0.07)
    # The median of LogNormal(0, 0.5) is 1.
    assert float(median["noise"]) == pytest.approx(1.0, abs=0.06)
    # Repeated calls agree: the draws use a fixed key.
    np.testing.assert_array_equal(guide.median(result.params)["mu"], median["mu"])


def test_posterior_log_prob_matches_intermediates(svi_fit):
    guide, result = svi_fit
    posterior = guide.get_posterior(result.params)
    draws, intermediates = posterior.sample_with_intermediates(jax.random.key(3), (20,))
    cached = posterior.log_prob(draws, intermediates)
    inverted = posterior.log_prob(draws)
    np.testing.assert_allclose(cached, inverted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(hidden_sizes=(8, 0)), "hidden_sizes"),
        (dict(hidden_sizes=(8, -2)), "hidden_sizes"),
        (dict(min_eigenvalue=0.0), "min_eigenvalue"),
        (dict(min_eigenvalue=float("nan")), "min_eigenvalue"),
        (dict(init_scale=-1.0), "init_scale"),
    ],
)
def test_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        AutoBrenier(model, **options)


@pytest.mark.parametrize("hidden_sizes", [3, (8.5,), (True,), "64"])
def test_hidden_sizes_of_wrong_type_raise(hidden_sizes):
    with pytest.raises(TypeError, match="hidden_sizes"):
        AutoBrenier(model, hidden_sizes=hidden_sizes)


def test_axis_tails_default_depends_on_dimension():
    # Above EXACT_LOGDET_MAX_DIM the default potential has no axis tails, so
    # the mirror step can use the exact low-rank log determinant.
    def model(dim):
        numpyro.sample("z", dist.Normal(jnp.zeros(dim), 1.0).to_event(1))

    for dim, expected in [(256, True), (257, False)]:
        guide = AutoBrenier(model, hidden_sizes=(2,))
        numpyro.handlers.seed(guide, jax.random.key(0))(dim)
        assert guide.resolved_axis_tails is expected
        assert guide.potential.axis_tails is expected
    forced = AutoBrenier(model, hidden_sizes=(2,), axis_tails=True)
    numpyro.handlers.seed(forced, jax.random.key(0))(257)
    assert forced.potential.axis_tails


def test_trace_elbo_in_large_dimension():
    # At d = 257 the default guide has no axis tails, so Trace_ELBO takes the
    # low-rank log determinant and its gradient, and no (d, d) Hessian per draw.
    def model():
        numpyro.sample("z", dist.Normal(jnp.zeros(257), 2.0).to_event(1))

    guide = AutoBrenier(model, hidden_sizes=(4,))
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO(num_particles=4))
    state = svi.init(jax.random.key(0))
    state, loss = svi.update(state)
    assert np.isfinite(float(loss))
    params = svi.get_params(state)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    assert guide.scale_name == "auto_scale"
