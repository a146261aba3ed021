"""Checks of user input that run before any compilation.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the
argument, site or value at fault and states what to do instead. :class:`PMA`
calls the option checks when it is built and the model checks when the guide
is set up, so a bad model fails in a fraction of a second rather than after
the whitening fit and the compilation of the mirror steps.
"""

import importlib.util
import inspect
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer.util import potential_energy

__all__ = [
    "check_hidden_sizes",
    "check_model",
    "check_non_negative_int",
    "check_positive_int",
    "check_rng_key",
    "check_step_size",
    "check_step_size_range",
    "describe_arguments",
    "model_name",
    "raise_for_nonfinite_initial_point",
]

# The model checks trace the model once with this key; its draws only pick
# the point where a failed initialization is diagnosed.
_CHECK_KEY_SEED = 0


# -- options -------------------------------------------------------------------


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an integer ``>= 1`` (``bool`` is rejected).

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` is below 1.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an integer ``>= 0`` (``bool`` is rejected).

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` is negative.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def check_hidden_sizes(hidden_sizes: Any) -> None:
    """Raise unless ``hidden_sizes`` is a sequence of positive integer widths.

    An empty sequence is valid: it gives a purely quadratic potential.

    Raises:
        TypeError: ``hidden_sizes`` is not a sequence of integers.
        ValueError: A width is below 1.
    """
    if not isinstance(hidden_sizes, Sequence) or isinstance(hidden_sizes, str):
        raise TypeError(
            "hidden_sizes must be a sequence of positive integers such as (64, 64), "
            f"got {hidden_sizes!r}"
        )
    for width in hidden_sizes:
        if isinstance(width, bool | np.bool_) or not isinstance(
            width, int | np.integer
        ):
            raise TypeError(
                f"hidden_sizes must hold positive integers, got {hidden_sizes!r} "
                f"(the width {width!r} is not an integer)"
            )
        if width < 1:
            raise ValueError(
                f"hidden_sizes must hold positive integers, got {hidden_sizes!r}; "
                "use hidden_sizes=() for a Gaussian guide without a network"
            )


def check_rng_key(rng_key: Any) -> None:
    """Raise unless ``rng_key`` is a JAX PRNG key (typed or raw ``uint32``).

    Raises:
        TypeError: ``rng_key`` is not a key.
    """
    if isinstance(rng_key, jax.Array):
        if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key) and rng_key.shape == ():
            return
        if rng_key.dtype == jnp.uint32 and rng_key.ndim == 1:
            return
    raise TypeError(
        "rng_key must be a single JAX PRNG key such as jax.random.key(0), got "
        f"{_describe_value(rng_key)}; to continue a run without a key pass "
        "init_state or resume_from"
    )


def _step_size_value(step_size: Any, step: int) -> float:
    """Evaluate a step size or schedule at ``step`` as a Python float."""
    if not callable(step_size):
        return float(step_size)
    try:
        value = step_size(jnp.asarray(step, jnp.int32))
    except Exception as error:
        raise TypeError(
            f"step_size is a callable but calling it with the step count {step} "
            f"raised {type(error).__name__}: {error}; a schedule must map the step "
            "count (an int32 array) to a step size, as optax schedules do"
        ) from error
    if jnp.size(value) != 1 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
        raise TypeError(
            f"step_size schedule must return a scalar, got {_describe_value(value)} "
            f"at step {step}"
        )
    return float(jnp.reshape(value, ()))


def check_step_size(step_size: Any) -> None:
    """Raise unless ``step_size`` is a positive finite number or a schedule.

    A schedule (a callable of the step count, e.g. an optax schedule) is called
    once at step 0, where it must return a positive finite scalar.

    Raises:
        TypeError: ``step_size`` is neither a real number nor a callable, or the
            schedule fails or returns something other than a scalar.
        ValueError: The step size (at step 0 for a schedule) is NaN, infinite,
            zero or negative.
    """
    is_number = isinstance(step_size, numbers.Real) and not isinstance(
        step_size, bool | np.bool_
    )
    is_scalar_array = (
        isinstance(step_size, np.ndarray | jax.Array)
        and step_size.shape == ()
        and jnp.issubdtype(step_size.dtype, jnp.floating)
    )
    if not (callable(step_size) or is_number or is_scalar_array):
        raise TypeError(
            "step_size must be a positive number or an optax schedule (a callable "
            f"of the step count), got {step_size!r}"
        )
    value = _step_size_value(step_size, 0)
    if not np.isfinite(value) or value <= 0:
        where = " at step 0" if callable(step_size) else ""
        raise ValueError(
            f"step_size must be positive and finite, got {value:g}{where}; 0.5 suits "
            "whitened coordinates, e.g. optax.cosine_decay_schedule(0.5, num_steps)"
        )


def check_step_size_range(step_size: Any, first_step: int, last_step: int) -> None:
    """Raise if a schedule is negative or not finite at ``first_step``/``last_step``.

    Schedules that decay to 0 are allowed; a negative step size would move the
    potential away from the target. Constant step sizes were checked when
    :class:`PMA` was built.

    Raises:
        ValueError: The schedule is negative or not finite at either end.
    """
    if not callable(step_size):
        return
    for step in (first_step, last_step):
        value = _step_size_value(step_size, step)
        if not np.isfinite(value) or value < 0:
            raise ValueError(
                f"step_size schedule returns {value:g} at step {step}, which this run "
                "takes; a step size must be finite and non-negative at every step"
            )


# -- the model -----------------------------------------------------------------


def _unwrap_model(model: Callable) -> Callable:
    """Return the function inside NumPyro handlers and ``functools.partial``."""
    for _ in range(20):
        if getattr(model, "__name__", None) is not None:
            return model
        inner = getattr(model, "fn", None) or getattr(model, "func", None)
        if inner is None:
            return model
        model = inner
    return model


def model_name(model: Callable) -> str:
    """Return a readable name of ``model``, unwrapping handlers and partials."""
    inner = _unwrap_model(model)
    return getattr(inner, "__name__", None) or type(inner).__name__


def _describe_value(value: Any) -> str:
    """Return ``dtype[shape]`` for arrays, ``repr`` for small Python values."""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        if isinstance(value, jax.Array) and jnp.issubdtype(
            value.dtype, jax.dtypes.prng_key
        ):
            return f"key{list(value.shape)}"
        return f"{value.dtype}{list(np.shape(value))}"
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, list | tuple | dict):
        leaves = jax.tree.leaves(value)
        if leaves and len(leaves) <= 6:
            shapes = ", ".join(_describe_value(leaf) for leaf in leaves)
            return f"{type(value).__name__} of {shapes}"
        return f"{type(value).__name__} with {len(leaves)} leaves"
    return type(value).__name__


def describe_arguments(model: Callable, args: tuple, kwargs: dict) -> str:
    """Return ``name=dtype[shape], ...`` for the model's arguments.

    Positional arguments are named after the model's parameters where its
    signature can be read, else ``args[i]``. Partials and handlers are not
    unwrapped for this, because they may bind some parameters already.
    """
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    positional = [
        parameter.name
        for parameter in parameters
        if parameter.kind
        in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    names = [
        positional[i] if i < len(positional) else f"args[{i}]" for i in range(len(args))
    ]
    parts = [
        f"{name}={_describe_value(value)}"
        for name, value in zip(names, args, strict=True)
    ]
    parts += [f"{name}={_describe_value(value)}" for name, value in kwargs.items()]
    return ", ".join(parts) if parts else "no arguments"


def _funsor_available() -> bool:
    return importlib.util.find_spec("funsor") is not None


def _site_log_prob(site: dict) -> jax.Array:
    """Return ``sum log p(value)`` of a sample site, times its scale."""
    with warnings.catch_warnings():
        # NumPyro warns about out-of-support values; the caller reports them.
        warnings.filterwarnings("ignore", "Out-of-support values", UserWarning)
        log_prob = site["fn"].log_prob(site["value"])
    if site.get("scale") is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _trace_at_initial_point(
    model: Callable, args: tuple, kwargs: dict, init_strategy: Callable
) -> tuple[dict, dict]:
    """Trace ``model`` at the point ``init_strategy`` picks, as NumPyro does.

    Returns:
        The model trace and the log probability of each sample site (a scalar;
        shape errors between data and distributions surface here).

    Raises:
        ValueError: The model raised while tracing or evaluating its log
            probabilities. A TypeError stays a TypeError. The message names the
            model and the argument shapes, and the original exception is
            chained.
    """
    rng_key = jax.random.key(_CHECK_KEY_SEED)
    substituted = handlers.substitute(
        handlers.seed(model, rng_key), substitute_fn=init_strategy
    )
    try:
        # block() keeps these sites out of any enclosing trace, e.g. SVI's.
        with handlers.block():
            model_trace = handlers.trace(substituted).get_trace(*args, **kwargs)
        log_probs = {
            name: _site_log_prob(site)
            for name, site in model_trace.items()
            if site["type"] == "sample"
        }
    except Exception as error:
        error_type = TypeError if isinstance(error, TypeError) else ValueError
        raise error_type(
            f"model {model_name(model)!r} raised {type(error).__name__} when run with "
            f"{describe_arguments(model, args, kwargs)}: {str(error).rstrip('.')}. "
            "If the message is about shapes, check that each argument has the "
            "shape that the model's plates and distributions expect."
        ) from error
    return model_trace, log_probs


def _latent_sites(model_trace: dict) -> dict:
    return {
        name: site
        for name, site in model_trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def check_model(
    model: Callable, args: tuple, kwargs: dict, init_strategy: Callable
) -> dict:
    """Trace ``model`` once and raise for what AutoBrenier cannot fit.

    Args:
        model: The NumPyro model.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        init_strategy: The guide's ``init_loc_fn``; latent sites take its values.

    Returns:
        The model trace at the initial point.

    Raises:
        ValueError: The model raised while tracing, has discrete latent sites
            that are not summed out, or has no latent sites.
        TypeError: The model raised a TypeError while tracing.
    """
    model_trace, _ = _trace_at_initial_point(model, args, kwargs, init_strategy)
    name = model_name(model)
    latent = _latent_sites(model_trace)

    discrete = {
        site_name: site
        for site_name, site in latent.items()
        if site["fn"].support.is_discrete
    }
    not_enumerated = [
        site_name
        for site_name, site in discrete.items()
        if site["infer"].get("enumerate") != "parallel"
    ]
    if not_enumerated or (discrete and not _funsor_available()):
        listed = ", ".join(
            f"{site_name!r} ({type(discrete[site_name]['fn']).__name__})"
            for site_name in discrete
        )
        hidden = [str(site_name) for site_name in discrete]
        reason = (
            "AutoBrenier and PMA fit continuous latent sites only"
            if not_enumerated
            else "they are marked for enumeration but funsor is not installed"
        )
        raise ValueError(
            f"model {name!r} has discrete latent sites {listed}, and {reason}. "
            "Either sum them out of the log density: mark each with "
            "infer={'enumerate': 'parallel'} and install funsor, which NumPyro uses "
            "through numpyro.contrib.funsor. Or train with numpyro.infer.SVI and an "
            "AutoGuideList that contains AutoBrenier for the continuous sites, built "
            f"on numpyro.handlers.block(model, hide={hidden}), and another guide "
            "for the discrete sites."
        )

    if not latent:
        observed = [
            site_name
            for site_name, site in model_trace.items()
            if site["type"] == "sample"
        ]
        found = (
            f"its sample sites {observed} are all observed"
            if observed
            else "it has no sample sites"
        )
        raise ValueError(
            f"model {name!r} has no latent sample sites ({found}), so there is no "
            "posterior to fit. Add a latent numpyro.sample site, or compute the "
            "likelihood directly with numpyro.infer.util.log_density."
        )
    return model_trace


def _site_problems(model_trace: dict, log_probs: dict) -> list[str]:
    """Describe each site whose log density term is not finite."""
    problems = []
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        kind = "observed site" if site["is_observed"] else "latent site"
        distribution = type(site["fn"]).__name__
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(site["value"], float)))):
            problems.append(f"{kind} {name!r} ({distribution}) has a non-finite value")
            continue
        total = float(log_probs[name])
        if not np.isfinite(total):
            problems.append(
                f"{kind} {name!r} ({distribution}) has log probability {total}"
            )
            continue
        if site["is_observed"] or site["fn"].support.is_discrete:
            continue
        transform = biject_to(site["fn"].support)
        unconstrained = transform.inv(site["value"])
        log_det = jnp.sum(transform.log_abs_det_jacobian(unconstrained, site["value"]))
        if not np.isfinite(float(log_det)):
            problems.append(
                f"latent site {name!r} ({distribution}) lies on the boundary of its "
                "support, where the log Jacobian of the map from unconstrained "
                f"space is {float(log_det)}"
            )
    return problems


def _gradient_problems(
    model: Callable, args: tuple, kwargs: dict, model_trace: dict
) -> list[str]:
    """Name latent sites where the gradient of the log density is not finite."""
    unconstrained = {
        name: biject_to(site["fn"].support).inv(site["value"])
        for name, site in _latent_sites(model_trace).items()
        if not site["fn"].support.is_discrete
    }
    seeded = handlers.seed(model, jax.random.key(_CHECK_KEY_SEED))
    with handlers.block():
        gradient = jax.grad(
            lambda params: potential_energy(seeded, args, kwargs, params)
        )(unconstrained)
    return [
        f"the gradient of the log density with respect to latent site {name!r} is "
        "not finite"
        for name, value in gradient.items()
        if not bool(jnp.all(jnp.isfinite(value)))
    ]


def raise_for_nonfinite_initial_point(
    model: Callable,
    args: tuple,
    kwargs: dict,
    init_strategy: Callable,
    cause: BaseException | None = None,
) -> None:
    """Raise ``ValueError`` naming the sites whose log density is not finite.

    The model is traced at the point that ``init_strategy`` picks. Each sample
    site's ``log_prob`` is evaluated there, plus the log Jacobian of the map
    from unconstrained space for latent sites. If all are finite, the gradient
    of the joint log density is checked. Returns without raising when
    everything is finite.

    Args:
        model: The NumPyro model.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        init_strategy: The init strategy that picks the initial point.
        cause: The error to chain, e.g. NumPyro's failed initialization.

    Raises:
        ValueError: Some site's log density term is not finite.
    """
    model_trace, log_probs = _trace_at_initial_point(model, args, kwargs, init_strategy)
    problems = _site_problems(model_trace, log_probs)
    if not problems:
        problems = _gradient_problems(model, args, kwargs, model_trace)
    if not problems:
        return
    strategy = getattr(init_strategy, "func", init_strategy)
    raise ValueError(
        f"the log density of model {model_name(model)!r} is not finite at the "
        f"initial point from init_loc_fn={getattr(strategy, '__name__', strategy)}: "
        + "; ".join(problems)
        + ". Check that observed values lie in the support of their distribution "
        "and that distribution parameters are valid there; for a latent site, "
        "pass another init_loc_fn to AutoBrenier, e.g. "
        "init_to_value(values={...})."
    ) from cause
