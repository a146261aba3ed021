"""Bad models and options fail before compilation, with messages naming the cause."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO, init_to_value

from numpyro_pma import PMA, AutoBrenier, trainer
from numpyro_pma.validation import (
    check_hidden_sizes,
    check_step_size,
    describe_arguments,
    model_name,
)


def gaussian_model(y):
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


DATA = jnp.array([[0.5, -1.0], [1.5, 0.0], [1.0, -0.5]])


def mixture_model(y):
    component = numpyro.sample("component", dist.Bernoulli(0.5))
    loc = numpyro.sample("loc", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(loc + component, 1.0), obs=y)


def enumerated_model(y):
    component = numpyro.sample(
        "component", dist.Bernoulli(0.5), infer={"enumerate": "parallel"}
    )
    loc = numpyro.sample("loc", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(loc + component, 1.0), obs=y)


def observed_only_model(y):
    numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def gamma_model(y):
    shape = numpyro.sample("shape", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Gamma(shape, 1.0), obs=y)


def kink_model():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    numpyro.factor("kink", jnp.sqrt(jnp.abs(x)))


def sized_model(size):
    numpyro.sample("x", dist.Normal(jnp.zeros(size), 1.0).to_event(1))


@pytest.fixture
def no_compilation(monkeypatch):
    """Fail the test if PMA reaches the whitening fit or compiles the steps."""

    def fail(*args, **kwargs):
        raise AssertionError("reached the whitening fit or compilation")

    monkeypatch.setattr(trainer, "fit_diagonal_gaussian", fail)
    monkeypatch.setattr(PMA, "_compile", fail)


def run_pma(model, *args, guide_options=None, **kwargs):
    guide = AutoBrenier(model, hidden_sizes=(4,), **(guide_options or {}))
    pma = PMA(model, guide, num_particles=16, num_whitening_steps=10)
    return pma.run(jax.random.key(0), 5, *args, progress_bar=False, **kwargs)


# -- model errors --------------------------------------------------------------


def test_discrete_site_is_named(no_compilation):
    with pytest.raises(ValueError, match="discrete latent sites 'component'") as caught:
        run_pma(mixture_model, jnp.array(0.3))
    message = str(caught.value)
    assert "model 'mixture_model'" in message
    assert "infer={'enumerate': 'parallel'}" in message
    assert "numpyro.contrib.funsor" in message
    assert "AutoGuideList" in message
    assert "hide=['component']" in message


@pytest.mark.skipif(
    importlib.util.find_spec("funsor") is not None, reason="funsor is installed"
)
def test_enumerated_site_without_funsor(no_compilation):
    with pytest.raises(ValueError, match="funsor is not installed"):
        run_pma(enumerated_model, jnp.array(0.3))


def test_discrete_site_fails_under_svi_too():
    # The check sits in the guide's setup, so SVI users get it as well.
    guide = AutoBrenier(mixture_model, hidden_sizes=(4,))
    svi = SVI(mixture_model, guide, optax.adam(1e-2), Trace_ELBO())
    with pytest.raises(ValueError, match="discrete latent sites 'component'"):
        svi.init(jax.random.key(0), jnp.array(0.3))


def test_model_without_latent_sites(no_compilation):
    with pytest.raises(ValueError, match="no latent sample sites") as caught:
        run_pma(observed_only_model, jnp.ones(3))
    assert "['y'] are all observed" in str(caught.value)


def test_wrong_argument_shape_names_model_and_shapes(no_compilation):
    # The model's plate has size y.shape[0] = 3 but mu has 2 entries where the
    # data has 3 columns.
    with pytest.raises(ValueError, match="model 'gaussian_model' raised") as caught:
        run_pma(gaussian_model, jnp.ones((3, 3)))
    message = str(caught.value)
    assert "y=float32[3, 3]" in message
    assert "Incompatible shapes for broadcasting" in message
    assert isinstance(caught.value.__cause__, ValueError)


def test_model_type_error_stays_type_error(no_compilation):
    with pytest.raises(TypeError, match="model 'sized_model' raised TypeError") as e:
        run_pma(sized_model, "three")
    assert "size='three'" in str(e.value)
    assert isinstance(e.value.__cause__, TypeError)


@pytest.mark.filterwarnings("ignore:.*Out-of-support values:UserWarning")
def test_nonfinite_observed_site_is_named(no_compilation):
    # A negative observation has probability 0 under any Gamma: NumPyro's own
    # error ("Cannot find valid initial parameters") names no site.
    with pytest.raises(ValueError, match="observed site 'y' \\(Gamma\\)") as caught:
        run_pma(gamma_model, jnp.array([-1.0, 2.0]))
    assert "log probability -inf" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_nonfinite_gradient_is_named(no_compilation):
    # sqrt|x| is finite at x = 0 but its derivative is not.
    options = dict(init_loc_fn=init_to_value(values={"x": jnp.array(0.0)}))
    with pytest.raises(ValueError, match="respect to latent site 'x'"):
        run_pma(kink_model, guide_options=options)


# -- option errors -------------------------------------------------------------


def make_pma(**options):
    guide = AutoBrenier(gaussian_model, hidden_sizes=(4,))
    step_size = options.pop("step_size", 0.5)
    return PMA(gaussian_model, guide, step_size=step_size, **options)


@pytest.mark.parametrize(
    "step_size, error, message",
    [
        (float("nan"), ValueError, "got nan"),
        (float("inf"), ValueError, "got inf"),
        (-0.1, ValueError, "got -0.1"),
        (0, ValueError, "got 0"),
        (True, TypeError, "got True"),
        ("big", TypeError, "got 'big'"),
        (None, TypeError, "got None"),
        (jnp.ones(2), TypeError, "step_size"),
        (lambda step: jnp.nan, ValueError, "got nan at step 0"),
        (lambda step: -0.5, ValueError, "got -0.5 at step 0"),
        (optax.linear_schedule(0.0, 0.5, 10), ValueError, "got 0 at step 0"),
        (lambda step: jnp.ones(3), TypeError, "must return a scalar"),
        (lambda: 0.5, TypeError, "raised TypeError"),
    ],
)
def test_invalid_step_size_raises(step_size, error, message):
    with pytest.raises(error, match=message):
        make_pma(step_size=step_size)


@pytest.mark.parametrize(
    "step_size",
    [0.5, 1, np.float32(0.5), jnp.asarray(0.5), optax.cosine_decay_schedule(0.5, 10)],
)
def test_valid_step_size_passes(step_size):
    check_step_size(step_size)


def test_schedule_negative_during_run_raises(no_compilation):
    # Positive at step 0, negative from step 5 on.
    pma = make_pma(step_size=optax.linear_schedule(0.5, -0.5, 10), num_particles=16)
    with pytest.raises(ValueError, match="at step 9"):
        pma.run(jax.random.key(0), 10, DATA, progress_bar=False)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(num_particles=0), ValueError, "num_particles must be a positive"),
        (dict(num_particles=2.5), TypeError, "num_particles"),
        (dict(num_particles=True), TypeError, "num_particles"),
        (dict(num_projection_steps=-1), ValueError, "num_projection_steps"),
        (dict(max_consecutive_rejections=0), ValueError, "max_consecutive"),
        (dict(num_whitening_steps=-5), ValueError, "num_whitening_steps"),
        (dict(num_whitening_steps="many"), TypeError, "num_whitening_steps"),
        (dict(projection_optimizer="adam"), TypeError, "projection_optimizer"),
        (dict(quadratic_projection="exact"), ValueError, "quadratic_projection"),
    ],
)
def test_invalid_options_raise(options, error, message):
    with pytest.raises(error, match=message):
        make_pma(**options)


@pytest.mark.parametrize(
    "num_steps, chunk_size, error",
    [
        (0, 10, ValueError),
        (-3, 10, ValueError),
        (2.5, 10, TypeError),
        (5, 0, ValueError),
    ],
)
def test_invalid_run_lengths_raise(num_steps, chunk_size, error, no_compilation):
    pma = make_pma()
    with pytest.raises(error, match="num_steps|chunk_size"):
        pma.run(jax.random.key(0), num_steps, DATA, chunk_size=chunk_size)


def test_missing_rng_key_raises(no_compilation):
    with pytest.raises(TypeError, match="init_state or resume_from"):
        make_pma().run(None, 5, DATA, progress_bar=False)


def test_non_callable_model_raises():
    guide = AutoBrenier(gaussian_model)
    with pytest.raises(TypeError, match="model must be a callable"):
        PMA("gaussian_model", guide)


@pytest.mark.parametrize(
    "hidden_sizes, error",
    [(3, TypeError), ((0,), ValueError), ((4, -1), ValueError), ((True,), TypeError)],
)
def test_invalid_hidden_sizes_raise(hidden_sizes, error):
    with pytest.raises(error, match="hidden_sizes"):
        check_hidden_sizes(hidden_sizes)


def test_hidden_sizes_checked_by_guide():
    # bool is an int subclass, so a bool width must be rejected explicitly.
    with pytest.raises(TypeError, match="hidden_sizes"):
        AutoBrenier(gaussian_model, hidden_sizes=(True,))


# -- message helpers -------------------------------------------------------------


def test_model_name_unwraps_handlers_and_partials():
    conditioned = handlers.condition(gaussian_model, data={"mu": jnp.zeros(2)})
    assert model_name(conditioned) == "gaussian_model"
    assert model_name(functools.partial(gaussian_model, DATA)) == "gaussian_model"


def test_describe_arguments_names_parameters():
    text = describe_arguments(gaussian_model, (DATA,), {})
    assert text == "y=float32[3, 2]"
    text = describe_arguments(lambda *values, scale=None: None, (1.5,), {"scale": None})
    assert text == "args[0]=1.5, scale=None"
