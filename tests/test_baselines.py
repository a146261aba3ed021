import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_pma.baselines import (
    BASELINES,
    MethodResult,
    _CompileClock,
    run_autoguide,
    run_numpyro_nuts,
)

MEAN = np.array([1.0, -2.0, 0.5])
COV = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 0.5]])

NUM_WARMUP = 200
NUM_SAMPLES = 200
NUM_CHAINS = 2

# Small settings that keep every run to a few seconds, with the number of draws
# each setting returns.
FAST_OPTIONS = {
    "numpyro_nuts": {
        "num_warmup": NUM_WARMUP,
        "num_samples": NUM_SAMPLES,
        "num_chains": NUM_CHAINS,
    },
    "blackjax_nuts": {
        "num_warmup": NUM_WARMUP,
        "num_samples": NUM_SAMPLES,
        "num_chains": NUM_CHAINS,
    },
    "blackjax_pathfinder": {"num_samples": 300, "num_draws_per_path": 100},
    "autoguide_mvn": {"num_steps": 50, "num_samples": 100},
    "autoguide_iaf": {"num_steps": 50, "num_samples": 100},
    "autoguide_bnaf": {"num_steps": 50, "num_samples": 100},
}
EXPECTED_DRAWS = {
    "numpyro_nuts": NUM_CHAINS * NUM_SAMPLES,
    "blackjax_nuts": NUM_CHAINS * NUM_SAMPLES,
    "blackjax_pathfinder": 300,
    "autoguide_mvn": 100,
    "autoguide_iaf": 100,
    "autoguide_bnaf": 100,
}


def gaussian_model():
    z = numpyro.sample("z", dist.MultivariateNormal(MEAN, COV))
    numpyro.deterministic("z_sum", z.sum())


@pytest.fixture(scope="module")
def results():
    """Run each baseline once on the Gaussian model, lazily, shared by the tests."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BASELINES[name](
                jax.random.key(0), gaussian_model, (), None, **FAST_OPTIONS[name]
            )
        return cache[name]

    return get


def test_registry_names():
    assert set(BASELINES) == set(FAST_OPTIONS)


@pytest.mark.parametrize("name", sorted(FAST_OPTIONS))
def test_runner_result_layout(results, name):
    result = results(name)
    num_draws = EXPECTED_DRAWS[name]

    assert isinstance(result, MethodResult)
    assert set(result.samples) == {"z", "z_sum"}
    assert result.samples["z"].shape == (num_draws, 3)
    assert result.samples["z_sum"].shape == (num_draws,)
    assert np.all(np.isfinite(result.samples["z"]))
    # z_sum is computed from the same z in every draw, up to rounding.
    np.testing.assert_allclose(
        result.samples["z_sum"], result.samples["z"].sum(axis=1), rtol=1e-5, atol=1e-5
    )
    assert isinstance(result.num_grad_evals, int)
    assert result.num_grad_evals > 0
    assert result.compile_time >= 0
    assert result.run_time >= 0
    assert isinstance(result.info, dict)


@pytest.mark.parametrize("name", ["numpyro_nuts", "blackjax_nuts"])
def test_nuts_gradient_count(results, name):
    result = results(name)
    num_iterations = NUM_CHAINS * (NUM_WARMUP + NUM_SAMPLES)

    # Every NUTS iteration takes at least one leapfrog step, and vectorized
    # chains evaluate at least as many gradients as each chain needs alone.
    assert result.num_grad_evals >= num_iterations
    assert result.info["num_grad_evals_lockstep"] >= result.num_grad_evals
    assert 0 < result.info["num_grad_evals_warmup"] < result.num_grad_evals


@pytest.mark.parametrize(
    ("name", "guide"),
    [("autoguide_mvn", "multivariate_normal"), ("autoguide_iaf", "iaf")],
)
def test_autoguide_registry_and_count(results, name, guide):
    result = results(name)

    assert result.info["guide"] == guide
    assert result.num_grad_evals == FAST_OPTIONS[name]["num_steps"]
    assert result.info["losses"].shape == (FAST_OPTIONS[name]["num_steps"],)
    assert np.isfinite(result.info["final_elbo"])


@pytest.mark.parametrize("name", ["numpyro_nuts", "blackjax_nuts"])
def test_nuts_recovers_mean(results, name):
    draws = np.asarray(results(name).samples["z"])
    by_chain = draws.reshape(NUM_CHAINS, NUM_SAMPLES, 3)
    ess = np.array([az.ess(by_chain[:, :, i]) for i in range(3)])
    sd = np.sqrt(np.diag(COV))

    # The Monte Carlo error of a mean is sd / sqrt(ESS). A 4-sigma bound fails
    # with probability about 6e-5 per coordinate for a correct sampler. With
    # ESS > 100 the bound is below 0.4 sd, so draws centred at the origin, which
    # is 0.7 to 1.4 sd from MEAN in every coordinate, fail.
    assert np.all(ess > 100), ess
    error = np.abs(draws.mean(axis=0) - MEAN)
    np.testing.assert_array_less(error, 4 * sd / np.sqrt(ess))


def test_unknown_guide_raises():
    with pytest.raises(ValueError, match="'iaf'.*got 'planar'"):
        run_autoguide(jax.random.key(0), gaussian_model, guide="planar")


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("num_chains", 0, ValueError),
        ("num_samples", -1, ValueError),
        ("num_warmup", 1.5, TypeError),
        ("num_chains", True, TypeError),
    ],
)
def test_numpyro_nuts_rejects_bad_option(option, value, error):
    with pytest.raises(error, match=option):
        run_numpyro_nuts(jax.random.key(0), gaussian_model, **{option: value})


def test_autoguide_rejects_bad_learning_rate():
    with pytest.raises(ValueError, match="learning_rate"):
        run_autoguide(jax.random.key(0), gaussian_model, learning_rate=0.0)


def test_compile_clock_separates_compile_time():
    matmul = jax.jit(lambda x: jnp.sin(x) @ x.T)
    x = jnp.ones((20, 20))

    with _CompileClock() as first:
        matmul(x).block_until_ready()
    with _CompileClock() as second:
        matmul(x).block_until_ready()

    assert first.compile_time > 0
    assert second.compile_time == 0
    assert second.run_time >= 0
