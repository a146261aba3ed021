import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from numpyro_pma.importance import importance_log_weights
from numpyro_pma.inference_data import to_inference_data


@pytest.fixture(autouse=True, scope="module")
def float64_module():
    """Run this module in float64, then restore the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


NUM_GROUPS, NUM_OBS, NUM_DRAWS = 3, 4, 300
Y = np.array(
    [
        [0.3, -1.2, 2.1],
        [1.1, -0.4, 2.9],
        [-0.2, -1.9, 1.7],
        [0.8, -0.7, 3.3],
    ]
)
NOISE = 1.0


def model(y):
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("J", NUM_GROUPS):
        mu = numpyro.sample("mu", dist.Normal(0.0, tau))
        # An event axis of the same length as plate J, which must not be named J.
        numpyro.sample("w", dist.Dirichlet(jnp.ones(NUM_GROUPS)))
        numpyro.deterministic("mu_over_tau", mu / tau)
    with numpyro.plate("J", NUM_GROUPS), numpyro.plate("obs", NUM_OBS, dim=-2):
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def _guide_and_params():
    guide = AutoNormal(model, init_scale=0.3)
    params = {
        "tau_auto_loc": jnp.asarray(0.3),
        "tau_auto_scale": jnp.asarray(0.3),
        "mu_auto_loc": jnp.asarray(Y.mean(0)),
        "mu_auto_scale": jnp.full(NUM_GROUPS, 0.4),
        "w_auto_loc": jnp.zeros((NUM_GROUPS, NUM_GROUPS - 1)),
        "w_auto_scale": jnp.full((NUM_GROUPS, NUM_GROUPS - 1), 0.5),
    }
    return guide, params


@pytest.fixture(scope="module")
def idata(float64_module):
    guide, params = _guide_and_params()
    return to_inference_data(
        guide,
        params,
        Y,
        num_samples=NUM_DRAWS,
        rng_key=jax.random.PRNGKey(0),
        posterior_predictive=True,
    )


def test_posterior_names_and_dims(idata):
    posterior = idata.posterior

    assert set(posterior.data_vars) == {"tau", "mu", "w", "mu_over_tau"}
    assert posterior["tau"].dims == ("chain", "draw")
    assert posterior["mu"].dims == ("chain", "draw", "J")
    assert posterior["mu_over_tau"].dims == ("chain", "draw", "J")
    assert posterior["w"].dims == ("chain", "draw", "J", "w_dim_1")
    assert posterior["mu"].shape == (1, NUM_DRAWS, NUM_GROUPS)
    np.testing.assert_array_equal(posterior["J"], np.arange(NUM_GROUPS))
    # Values are in the constrained space.
    assert np.all(posterior["tau"].values > 0)
    np.testing.assert_allclose(posterior["w"].values.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(
        posterior["mu_over_tau"], posterior["mu"] / posterior["tau"], rtol=1e-14
    )


def test_sample_stats_hold_log_densities(idata):
    stats = idata.sample_stats

    assert set(stats.data_vars) == {"lp", "log_q", "log_weight"}
    for name in ("lp", "log_q", "log_weight"):
        assert stats[name].dims == ("chain", "draw")
        assert stats[name].shape == (1, NUM_DRAWS)
    np.testing.assert_array_equal(stats["log_weight"], stats["lp"] - stats["log_q"])
    assert np.all(np.isfinite(stats["log_weight"]))


def test_observed_data_and_predictive(idata):
    observed = idata.observed_data["y"]
    predictive = idata.posterior_predictive["y"]

    assert observed.dims == ("obs", "J")
    np.testing.assert_array_equal(observed, Y)
    assert predictive.dims == ("chain", "draw", "obs", "J")
    assert predictive.shape == (1, NUM_DRAWS, NUM_OBS, NUM_GROUPS)
    assert not np.any(predictive.values == Y)
    # Replicated y given mu has mean mu, so the group means of the replicates
    # match the posterior group means of mu. Each mean averages 1200 values with
    # sd at most sqrt(NOISE**2 + var(mu)); 4 standard errors bound a failure.
    replicate_mean = predictive.mean(("chain", "draw", "obs")).values
    mu_mean = idata.posterior["mu"].mean(("chain", "draw")).values
    spread = np.sqrt(NOISE**2 + idata.posterior["mu"].var(("chain", "draw")).values)
    assert np.all(
        np.abs(replicate_mean - mu_mean) < 4 * spread / np.sqrt(NUM_DRAWS * NUM_OBS)
    )


def test_netcdf_round_trip(idata, tmp_path):
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))

    assert set(loaded.groups()) == set(idata.groups())
    for group in idata.groups():
        original, restored = idata[group], loaded[group]
        assert set(restored.data_vars) == set(original.data_vars)
        for name in original.data_vars:
            assert restored[name].dims == original[name].dims
            np.testing.assert_array_equal(restored[name].values, original[name].values)
        for dim in original.dims:
            np.testing.assert_array_equal(restored[dim].values, original[dim].values)
        assert restored.attrs["inference_library"] == "numpyro"


def test_precomputed_draws_reused():
    guide = AutoMultivariateNormal(model)
    params = {
        "auto_loc": jnp.zeros(1 + NUM_GROUPS + NUM_GROUPS * (NUM_GROUPS - 1)),
        "auto_scale_tril": 0.3
        * jnp.eye(1 + NUM_GROUPS + NUM_GROUPS * (NUM_GROUPS - 1)),
    }
    draws = importance_log_weights(
        jax.random.PRNGKey(1), model, guide, params, Y, num_samples=50
    )
    idata = to_inference_data(guide, params, Y, draws=draws)

    assert "posterior_predictive" not in idata.groups()
    assert idata.posterior["mu"].dims == ("chain", "draw", "J")
    np.testing.assert_array_equal(
        idata.sample_stats["log_weight"].values[0], draws.log_weights
    )
    np.testing.assert_array_equal(
        idata.posterior["tau"].values[0], draws.samples["tau"]
    )


def test_missing_arguments_rejected():
    guide, params = _guide_and_params()
    with pytest.raises(ValueError, match="rng_key is required"):
        to_inference_data(guide, params, Y)

    def plain_guide(y):
        numpyro.sample("tau", dist.HalfNormal(1.0))

    with pytest.raises(TypeError, match="model is required"):
        to_inference_data(plain_guide, {}, Y, rng_key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="draws must be an ImportanceDraws or None"):
        to_inference_data(guide, params, Y, draws={"tau": 1.0})
