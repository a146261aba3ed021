"""Random small NumPyro models: each either fits or raises a documented error.

Hypothesis builds models from one to three latent sites with mixed supports
(real, positive, unit interval, simplex, ordered vector), some inside plates,
and an observed site whose mean depends on all of them. Some models add a
discrete latent site (which must raise the discrete-site ValueError naming
it) or observe every site (which must raise the no-latent-site ValueError).
The others must run a few PMA steps in which every accepted step has a finite
ELBO and the final parameters are finite. Any other exception fails the test.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numpyro_pma import PMA, AutoBrenier

KINDS = ("real", "positive", "unit", "simplex", "ordered")
VECTOR_SIZE = 3
DATA = jnp.array([0.3, -0.8, 1.1])


class SiteSpec(NamedTuple):
    kind: str
    plate_size: int | None


class ModelSpec(NamedTuple):
    sites: tuple[SiteSpec, ...]
    discrete: bool
    observe_all: bool


def site_distribution(kind):
    if kind == "real":
        return dist.Normal(0.0, 1.0)
    if kind == "positive":
        return dist.LogNormal(0.0, 0.5)
    if kind == "unit":
        return dist.Beta(2.0, 2.0)
    if kind == "simplex":
        return dist.Dirichlet(jnp.ones(VECTOR_SIZE))
    return dist.TransformedDistribution(
        dist.Normal(jnp.zeros(VECTOR_SIZE), 1.0).to_event(1),
        dist.transforms.OrderedTransform(),
    )


def observed_value(kind, plate_size):
    """A value inside the support of ``kind``, for models that observe it."""
    values = {
        "real": jnp.array(0.2),
        "positive": jnp.array(1.5),
        "unit": jnp.array(0.4),
        "simplex": jnp.ones(VECTOR_SIZE) / VECTOR_SIZE,
        "ordered": jnp.arange(VECTOR_SIZE, dtype=float),
    }
    value = values[kind]
    return value if plate_size is None else jnp.stack([value] * plate_size)


def build_model(spec: ModelSpec):
    def model(y):
        total = 0.0
        for index, site in enumerate(spec.sites):
            name = f"{site.kind}_{index}"
            obs = (
                observed_value(site.kind, site.plate_size) if spec.observe_all else None
            )
            if site.plate_size is None:
                value = numpyro.sample(name, site_distribution(site.kind), obs=obs)
            else:
                with numpyro.plate(f"plate_{index}", site.plate_size):
                    value = numpyro.sample(name, site_distribution(site.kind), obs=obs)
            total = total + jnp.sum(value)
        if spec.discrete:
            total = total + numpyro.sample("switch", dist.Bernoulli(0.3))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(0.1 * total, 1.0), obs=y)

    return model


site_specs = st.builds(SiteSpec, st.sampled_from(KINDS), st.sampled_from([None, 2]))


@st.composite
def model_specs(draw):
    sites = tuple(draw(st.lists(site_specs, min_size=1, max_size=3)))
    # One model in six has a discrete site and one in six observes every site.
    variant = draw(st.integers(0, 5))
    return ModelSpec(sites, discrete=variant == 0, observe_all=variant == 1)


def check_model_fits_or_raises(spec: ModelSpec):
    model = build_model(spec)
    guide = AutoBrenier(model, hidden_sizes=(4,))
    pma = PMA(
        model, guide, num_particles=16, num_projection_steps=2, num_whitening_steps=0
    )

    def run():
        return pma.run(jax.random.key(0), 3, DATA, progress_bar=False, chunk_size=3)

    if spec.discrete:
        with pytest.raises(ValueError, match="discrete latent sites 'switch'"):
            run()
        return
    if spec.observe_all:
        with pytest.raises(ValueError, match="no latent sample sites"):
            run()
        return

    result = run()
    trace = result.trace
    assert trace.elbo.shape == (3,)
    assert bool(trace.accepted[0]), f"first step rejected for {spec}"
    assert np.all(np.isfinite(trace.elbo[trace.accepted]))
    assert np.all(np.isfinite(trace.elbo) | ~trace.accepted)
    for leaf in jax.tree.leaves(result.params):
        assert np.all(np.isfinite(leaf))


@st.composite
def invalid_model_specs(draw):
    sites = tuple(draw(st.lists(site_specs, min_size=1, max_size=3)))
    discrete = draw(st.booleans())
    return ModelSpec(sites, discrete=discrete, observe_all=not discrete)


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(invalid_model_specs())
def test_random_invalid_models_raise(spec):
    # These fail in the guide's setup, before any compilation, so many are cheap.
    check_model_fits_or_raises(spec)


def test_all_supports_fit_in_one_model():
    # Every support kind, scalars in plates, vectors alone: one compilation.
    sites = (
        SiteSpec("real", 2),
        SiteSpec("positive", 2),
        SiteSpec("unit", None),
        SiteSpec("simplex", None),
        SiteSpec("ordered", 2),
    )
    check_model_fits_or_raises(ModelSpec(sites, discrete=False, observe_all=False))


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(model_specs())
def test_random_models_fit_or_raise(spec):
    # About 10 s per fitted model on 2 cores (one compilation each).
    check_model_fits_or_raises(spec)
