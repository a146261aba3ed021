import functools
import json
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.distributions import biject_to, constraints
from numpyro.handlers import substitute, trace
from numpyro.infer import Predictive
from numpyro.infer.util import potential_energy

from numpyro_pma.flat_model import flatten_model
from numpyro_pma.posteriors import list_posteriors, load_posterior

# The score checks and the exact round trip need float64.


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Score checks need float64; restore the setting for other test files."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


NAMES = list_posteriors()
DERIVED = {
    "eight_schools-eight_schools_noncentered",
    "garch-garch11",
    "gp_pois_regr-gp_pois_regr",
}

# The score identity E_pi[grad_z l(z)] = 0 is checked with batch means: each
# chain of 1000 draws is cut into 10 batches of 100 consecutive draws, and the
# standard error of the mean score is std(batch means) / sqrt(100). posteriordb
# requires |lag-1 autocorrelation| < 0.05, so batches of 100 draws are close to
# independent. With 99 degrees of freedom, |mean| / se exceeds 5 with
# probability about 3e-6 per coordinate for a correct model. The largest ratio
# measured over all 98 coordinates is 2.6 (float64, numpyro 0.22).
SCORE_Z_LIMIT = 5.0
NUM_BATCHES = 100
SCORE_ABSOLUTE_FLOOR = 1e-10


@functools.cache
def _posterior(name):
    return load_posterior(name)


def _unconstrain(model, model_kwargs, latent):
    """Map constrained latent draws to unconstrained ones, site by site."""
    first = {site: value[0] for site, value in latent.items()}
    model_trace = trace(substitute(model, data=first)).get_trace(**model_kwargs)
    return {
        site: biject_to(model_trace[site]["fn"].support).inv(value)
        for site, value in latent.items()
    }


def _score_ratios(posterior, model):
    """Return |mean score| / se for each coordinate z_i at the reference draws.

    The score is grad_z l(z) with l(z) = -potential_energy(z), the log joint
    density in unconstrained coordinates, Jacobians included.
    """
    model_kwargs = posterior.model_kwargs

    def logdensity(unconstrained):
        return -potential_energy(model, (), model_kwargs, unconstrained)

    latent = posterior.from_reference(posterior.reference_draws)
    unconstrained = _unconstrain(model, model_kwargs, latent)
    score_sites = jax.jit(jax.vmap(jax.grad(logdensity)))(unconstrained)
    scores = np.asarray(jax.vmap(lambda sites: ravel_pytree(sites)[0])(score_sites))
    batch_means = scores.reshape(NUM_BATCHES, -1, scores.shape[-1]).mean(axis=1)
    mean = batch_means.mean(axis=0)
    se = batch_means.std(axis=0, ddof=1) / np.sqrt(NUM_BATCHES)
    return np.abs(mean) / (se + SCORE_ABSOLUTE_FLOOR)


def test_list_posteriors_matches_data_folders():
    data = resources.files("numpyro_pma.posteriors") / "data"
    folders = sorted(entry.name for entry in data.iterdir() if entry.is_dir())
    assert NAMES == folders
    assert len(NAMES) == 10


def test_load_posterior_rejects_unknown_name():
    with pytest.raises(ValueError, match="'radon'.*arK-arK"):
        load_posterior("radon")


def test_load_posterior_rejects_non_string():
    with pytest.raises(TypeError, match="name must be a str"):
        load_posterior(3)


@pytest.mark.parametrize("name", NAMES)
def test_reference_draws_layout(name):
    posterior = _posterior(name)
    data = resources.files("numpyro_pma.posteriors") / "data" / name
    info = json.loads((data / "info.json").read_text())
    num_keys = len(posterior.reference_keys)
    assert posterior.name == name
    assert num_keys == len(info["parameter_keys"]) + len(info["derived_keys"])
    assert posterior.reference_draws.shape == (10000, num_keys)
    assert posterior.reference_chains.shape == (10, 1000, num_keys)
    np.testing.assert_array_equal(
        posterior.reference_draws[1000:2000], posterior.reference_chains[1]
    )
    assert np.all(np.isfinite(posterior.reference_draws))


@pytest.mark.parametrize("name", NAMES)
def test_model_dimension_matches_info(name):
    # Tracing flatten_model abstractly gives its init_position's shape (dim,)
    # without the eager model evaluations of the init search (seconds each).
    posterior = _posterior(name)

    def init_position(rng_key):
        flat = flatten_model(rng_key, posterior.model, (), posterior.model_kwargs)
        return flat.init_position

    shape = jax.eval_shape(init_position, jax.random.key(0)).shape
    assert shape == (posterior.dimension,)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_flatten_model_finds_finite_init(name):
    posterior = _posterior(name)
    flat = flatten_model(jax.random.key(0), posterior.model, (), posterior.model_kwargs)
    assert flat.dim == posterior.dimension
    assert np.isfinite(flat.logdensity_fn(flat.init_position))


@pytest.mark.parametrize("name", NAMES)
def test_reference_round_trip(name):
    posterior = _posterior(name)
    draws = posterior.reference_draws
    latent = posterior.from_reference(draws)
    round_trip = posterior.to_reference(latent)
    assert round_trip.dtype == np.float64
    if name not in DERIVED:
        np.testing.assert_array_equal(round_trip, draws)
        return
    # Derived keys pass through a float computation and its inverse (for gp, a
    # triangular solve), which loses a few ulps: measured error <= 7e-15.
    is_latent = np.array(
        [key.split("[")[0] in latent for key in posterior.reference_keys]
    )
    np.testing.assert_array_equal(round_trip[:, is_latent], draws[:, is_latent])
    np.testing.assert_allclose(round_trip, draws, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_to_reference_reads_deterministic_sites(name):
    # Predictive recomputes the model's deterministic sites (theta, f, beta1)
    # from the latent sites, so this checks that the model and the derived-key
    # maps agree. The tolerance is the round trip's.
    posterior = _posterior(name)
    draws = posterior.reference_draws[:20]
    latent = posterior.from_reference(draws)
    predictive = Predictive(posterior.model, posterior_samples=latent)
    samples = {**latent, **predictive(jax.random.key(1), **posterior.model_kwargs)}
    np.testing.assert_allclose(
        posterior.to_reference(samples), draws, rtol=1e-12, atol=1e-12
    )


def test_to_reference_rejects_missing_site():
    posterior = _posterior("arK-arK")
    latent = posterior.from_reference(posterior.reference_draws[:3])
    del latent["sigma"]
    with pytest.raises(ValueError, match="lack the sites \\['sigma'\\]"):
        posterior.to_reference(latent)


def test_to_reference_rejects_wrong_site_shape():
    posterior = _posterior("arK-arK")
    latent = posterior.from_reference(posterior.reference_draws[:3])
    latent["beta"] = latent["beta"][:, :4]
    with pytest.raises(ValueError, match="'beta' must have shape \\(num_samples, 5\\)"):
        posterior.to_reference(latent)


def test_from_reference_rejects_wrong_shape():
    posterior = _posterior("arK-arK")
    with pytest.raises(ValueError, match="shape \\(num_samples, 7\\), got \\(3, 6\\)"):
        posterior.from_reference(np.zeros((3, 6)))


@pytest.mark.parametrize("name", NAMES)
def test_score_identity_at_reference_draws(name):
    posterior = _posterior(name)
    ratios = _score_ratios(posterior, posterior.model)
    assert np.max(ratios) < SCORE_Z_LIMIT, ratios


def _eight_schools_wrong_prior(y, sigma):
    # mu ~ Normal(0, 4) instead of Normal(0, 5).
    mu = numpyro.sample("mu", dist.Normal(0.0, 4.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", y.shape[0]):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)


def _kidiq_wrong_likelihood(kid_score, mom_hs, mom_iq):
    # Likelihood scale 1.02 * sigma instead of sigma.
    beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real, (), (4,)))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq + beta[3] * mom_hs * mom_iq
    with numpyro.plate("data", kid_score.shape[0]):
        numpyro.sample("kid_score", dist.Normal(mean, 1.02 * sigma), obs=kid_score)


@pytest.mark.parametrize(
    ("name", "wrong_model"),
    [
        ("eight_schools-eight_schools_noncentered", _eight_schools_wrong_prior),
        ("kidiq-kidscore_interaction", _kidiq_wrong_likelihood),
    ],
)
def test_score_identity_detects_wrong_model(name, wrong_model):
    # Measured max ratios: 26 (prior of mu) and 58 (likelihood scale).
    posterior = _posterior(name)
    ratios = _score_ratios(posterior, wrong_model)
    assert np.max(ratios) > SCORE_Z_LIMIT, ratios


def test_from_reference_sites_are_latent():
    posterior = _posterior("garch-garch11")
    latent = posterior.from_reference(posterior.reference_draws[:4])
    assert set(latent) == {"mu", "alpha0", "alpha1", "beta1_raw"}
    assert all(value.shape == (4,) for value in latent.values())
    assert jnp.all((latent["beta1_raw"] > 0) & (latent["beta1_raw"] < 1))
