"""Baseline inference methods that PMA is compared against.

Every runner fits one NumPyro model and returns a :class:`MethodResult`, so the
methods can be compared on equal terms: the same sample layout, the same clock and
the same count of gradient evaluations of the log density.

Timing. Each runner measures itself with one clock. ``compile_time`` is the time
JAX spends tracing to jaxprs, lowering to MLIR and compiling with XLA while the
runner executes: the union of the time spans of JAX's compile events
(``/jax/core/compile/jaxpr_trace_duration``, ``.../jaxpr_to_mlir_module_duration``
and ``.../backend_compile_duration``). ``run_time`` is the rest of the wall time,
up to the moment the samples are ready on the host, so setup work in Python
(building the model's log density, initializing a guide) counts as run time. The
BlackJAX and SVI runners compile their main loop ahead of time with
``jax.jit(f).lower(*args).compile()`` and report that wall time as
``info["aot_compile_time"]``. NumPyro's ``MCMC`` compiles inside ``warmup`` and
``run``, so only the event clock can separate its compile time. A runner called
twice in one process may find some pieces in JAX's caches the second time.
"""

import functools
import numbers
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from blackjax.adaptation.base import get_filter_adapt_info_fn
from blackjax.diagnostics import psis_weights
from blackjax.optimizers.lbfgs import minimize_lbfgs
from blackjax.vi import pathfinder
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoBNAFNormal,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from numpyro_pma.flat_model import FlatModel, flatten_model

__all__ = [
    "BASELINES",
    "MethodResult",
    "run_autoguide",
    "run_blackjax_nuts",
    "run_blackjax_pathfinder",
    "run_numpyro_nuts",
]

_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)

# Initial points are drawn from Uniform(-_INIT_RADIUS, _INIT_RADIUS) in every
# unconstrained coordinate, as NumPyro's default `init_to_uniform` and Stan do.
_INIT_RADIUS = 2.0

_AUTOGUIDES = {
    "multivariate_normal": AutoMultivariateNormal,
    "iaf": AutoIAFNormal,
    "bnaf": AutoBNAFNormal,
    "normal": AutoNormal,
}


class MethodResult(NamedTuple):
    """Output of one baseline run.

    Attributes:
        samples: Constrained value of every latent and deterministic site, each of
            shape ``(num_draws, *site_shape)``. MCMC chains are flattened
            chain-major, so ``x.reshape(num_chains, num_samples, *site_shape)``
            restores them.
        compile_time: Seconds JAX spent tracing, lowering and compiling.
        run_time: Wall-clock seconds of the run, compile time excluded.
        num_grad_evals: Gradient evaluations of the log density, warmup included.
        info: Method-specific diagnostics, documented by each runner.
    """

    samples: dict[str, jax.Array]
    compile_time: float
    run_time: float
    num_grad_evals: int
    info: dict[str, Any]


class _CompileClock:
    """Context manager that splits a block's wall time into compile and run time.

    NOTE: JAX's event listeners are process-wide, so compilation by another thread
    during the block is counted too.
    """

    def __enter__(self) -> "_CompileClock":
        self._spans: list[tuple[float, float]] = []
        jax.monitoring.register_event_time_span_listener(self._record)
        self._start = time.time()
        self._end = None
        return self

    def __exit__(self, *exc_info) -> None:
        self._end = time.time()
        jax.monitoring.unregister_event_time_span_listener(self._record)

    def _record(self, event: str, start_time: float, end_time: float, **kwargs):
        if event in _COMPILE_EVENTS:
            self._spans.append((start_time, end_time))

    @property
    def compile_time(self) -> float:
        """Length of the union of compile spans, so nested traces count once."""
        total = 0.0
        covered_until = self._start
        for start, end in sorted(self._spans):
            start = max(start, covered_until)
            end = min(end, self._end)
            if end > start:
                total += end - start
                covered_until = end
        return total

    @property
    def run_time(self) -> float:
        """Wall time of the block minus :attr:`compile_time`."""
        return max(self._end - self._start - self.compile_time, 0.0)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_model_inputs(model_args: Any, model_kwargs: Any) -> tuple[tuple, dict]:
    if not isinstance(model_args, tuple | list):
        raise TypeError(f"model_args must be a tuple, got {type(model_args)}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(
            f"model_kwargs must be a dict or None, got {type(model_kwargs)}"
        )
    return tuple(model_args), model_kwargs


def _as_int(x: Any) -> int:
    return int(np.sum(np.asarray(x, dtype=np.int64)))


def _lockstep_grad_evals(num_steps: np.ndarray) -> int:
    """Count gradients evaluated when chains run vectorized.

    Vectorized chains advance together, so every chain pays for the longest
    trajectory of each iteration: ``sum_t max_c num_steps[c, t] * num_chains`` for
    ``num_steps`` of shape ``(num_chains, num_iterations)``.
    """
    num_steps = np.asarray(num_steps, dtype=np.int64)
    if num_steps.size == 0:
        return 0
    return int(num_steps.max(axis=0).sum() * num_steps.shape[0])


def _uniform_init(rng_key: jax.Array, flat: FlatModel, num_points: int) -> jax.Array:
    """Draw initial points of shape ``(num_points, dim)`` uniformly in [-2, 2]."""
    return jax.random.uniform(
        rng_key,
        (num_points, flat.dim),
        dtype=flat.init_position.dtype,
        minval=-_INIT_RADIUS,
        maxval=_INIT_RADIUS,
    )


def run_numpyro_nuts(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
) -> MethodResult:
    """Sample ``model`` with NumPyro's NUTS, chains vectorized on one device.

    ``numpyro.infer.MCMC`` runs with ``chain_method="vectorized"``, its default
    step-size and diagonal mass-matrix adaptation and ``init_to_uniform``. The
    gradient count is the total number of leapfrog steps of all chains, warmup
    included (one gradient each). The few gradients of initialization and of the
    initial step-size search are not counted. NumPyro compiles inside ``MCMC``,
    so compile time comes from JAX's compile events (see the module docstring).

    Args:
        rng_key: Key for initialization, warmup and sampling.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        num_warmup: Adaptation iterations per chain.
        num_samples: Kept draws per chain.
        num_chains: Number of chains.

    Returns:
        A :class:`MethodResult` with ``num_chains * num_samples`` draws. Its
        ``info`` contains ``num_divergences`` and ``num_divergences_warmup``,
        ``accept_prob`` (mean acceptance probability while sampling),
        ``step_size`` of shape ``(num_chains,)``, ``num_grad_evals_warmup`` and
        ``num_grad_evals_lockstep``, which charges every chain for the longest
        trajectory of each iteration, as vectorized execution does.
    """
    model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
    _check_int("num_warmup", num_warmup, 1)
    _check_int("num_samples", num_samples, 1)
    _check_int("num_chains", num_chains, 1)

    warmup_key, sample_key = jax.random.split(rng_key)
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    extra_fields = ("num_steps", "diverging", "accept_prob")

    with _CompileClock() as clock:
        mcmc.warmup(
            warmup_key,
            *model_args,
            extra_fields=extra_fields,
            collect_warmup=True,
            **model_kwargs,
        )
        warmup_fields = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))

        mcmc.run(sample_key, *model_args, extra_fields=extra_fields, **model_kwargs)
        sample_fields = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))
        samples = jax.block_until_ready(mcmc.get_samples())

    warmup_steps = np.asarray(warmup_fields["num_steps"])
    sample_steps = np.asarray(sample_fields["num_steps"])
    info = {
        "num_divergences": _as_int(sample_fields["diverging"]),
        "num_divergences_warmup": _as_int(warmup_fields["diverging"]),
        "accept_prob": float(np.mean(sample_fields["accept_prob"])),
        "step_size": np.asarray(mcmc.last_state.adapt_state.step_size),
        "num_grad_evals_warmup": _as_int(warmup_steps),
        "num_grad_evals_lockstep": _lockstep_grad_evals(warmup_steps)
        + _lockstep_grad_evals(sample_steps),
    }
    return MethodResult(
        samples=samples,
        compile_time=clock.compile_time,
        run_time=clock.run_time,
        num_grad_evals=_as_int(warmup_steps) + _as_int(sample_steps),
        info=info,
    )


def run_blackjax_nuts(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
) -> MethodResult:
    """Sample ``model`` with BlackJAX's window adaptation followed by NUTS.

    The target is the flat log density of :func:`flatten_model`. Each chain starts
    from a uniform draw in [-2, 2] per unconstrained coordinate, runs
    ``blackjax.window_adaptation`` (Stan's schedule, diagonal mass matrix) for
    ``num_warmup`` steps and then ``num_samples`` NUTS steps in a ``lax.scan``.
    Chains are independent and ``jax.vmap``-ed, so each adapts its own step size
    and mass matrix. The whole program is compiled ahead of time before it runs.
    The gradient count is the total number of integration steps of all chains,
    warmup included. The one gradient at each chain's initial point is not
    counted.

    Args:
        rng_key: Key for initialization, warmup and sampling.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        num_warmup: Adaptation steps per chain.
        num_samples: Kept draws per chain.
        num_chains: Number of chains.

    Returns:
        A :class:`MethodResult` with ``num_chains * num_samples`` draws. Its
        ``info`` contains ``num_divergences``, ``num_divergences_warmup``,
        ``acceptance_rate`` (mean while sampling), ``step_size`` of shape
        ``(num_chains,)``, ``inverse_mass_matrix`` of shape ``(num_chains, dim)``,
        ``num_grad_evals_warmup``, ``num_grad_evals_lockstep`` (as for
        :func:`run_numpyro_nuts`) and ``aot_compile_time``.
    """
    model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
    _check_int("num_warmup", num_warmup, 1)
    _check_int("num_samples", num_samples, 1)
    _check_int("num_chains", num_chains, 1)

    model_key, init_key, warmup_key, sample_key = jax.random.split(rng_key, 4)
    with _CompileClock() as clock:
        flat = flatten_model(model_key, model, model_args, model_kwargs)
        warmup = blackjax.window_adaptation(
            blackjax.nuts,
            flat.logdensity_fn,
            adaptation_info_fn=get_filter_adapt_info_fn(
                info_keys={"num_integration_steps", "is_divergent"}
            ),
        )

        def run_chain(warmup_key, sample_key, position):
            (state, parameters), warmup_info = warmup.run(
                warmup_key, position, num_warmup
            )
            kernel = blackjax.nuts(flat.logdensity_fn, **parameters)

            def one_step(state, key):
                state, info = kernel.step(key, state)
                return state, (
                    state.position,
                    info.num_integration_steps,
                    info.is_divergent,
                    info.acceptance_rate,
                )

            keys = jax.random.split(sample_key, num_samples)
            _, trace = jax.lax.scan(one_step, state, keys)
            return trace, warmup_info.info, parameters

        def run_all(warmup_keys, sample_keys, positions):
            trace, warmup_info, parameters = jax.vmap(run_chain)(
                warmup_keys, sample_keys, positions
            )
            positions, num_steps, divergent, acceptance_rate = trace
            flat_positions = positions.reshape(num_chains * num_samples, flat.dim)
            samples = jax.vmap(flat.constrain_fn)(flat_positions)
            return (
                samples,
                num_steps,
                divergent,
                acceptance_rate,
                warmup_info,
                parameters,
            )

        args = (
            jax.random.split(warmup_key, num_chains),
            jax.random.split(sample_key, num_chains),
            _uniform_init(init_key, flat, num_chains),
        )
        aot_start = time.time()
        compiled = jax.jit(run_all).lower(*args).compile()
        aot_compile_time = time.time() - aot_start

        outputs = jax.block_until_ready(compiled(*args))
        samples, num_steps, divergent, acceptance_rate, warmup_info, parameters = (
            outputs
        )

    warmup_steps = np.asarray(warmup_info.num_integration_steps)
    sample_steps = np.asarray(num_steps)
    info = {
        "num_divergences": _as_int(divergent),
        "num_divergences_warmup": _as_int(warmup_info.is_divergent),
        "acceptance_rate": float(np.mean(acceptance_rate)),
        "step_size": np.asarray(parameters["step_size"]),
        "inverse_mass_matrix": np.asarray(parameters["inverse_mass_matrix"]),
        "num_grad_evals_warmup": _as_int(warmup_steps),
        "num_grad_evals_lockstep": _lockstep_grad_evals(warmup_steps)
        + _lockstep_grad_evals(sample_steps),
        "aot_compile_time": aot_compile_time,
    }
    return MethodResult(
        samples=samples,
        compile_time=clock.compile_time,
        run_time=clock.run_time,
        num_grad_evals=_as_int(warmup_steps) + _as_int(sample_steps),
        info=info,
    )


def _replay_lbfgs(
    logdensity_fn: Callable[[jax.Array], jax.Array],
    initial_positions: jax.Array,
    maxiter: int,
) -> tuple[int, np.ndarray]:
    """Count the gradients that Pathfinder's L-BFGS runs evaluate.

    BlackJAX does not report this number, so each path's optimization of
    ``-logdensity_fn`` is replayed, one path at a time, with BlackJAX's
    ``minimize_lbfgs`` at the settings ``pathfinder.approximate`` uses, on a log
    density whose backward pass increments a host counter. Line-search
    evaluations are included. ``initial_positions`` has shape
    ``(num_paths, dim)``.

    Returns:
        The total gradient count and the L-BFGS iteration count of each path,
        of shape ``(num_paths,)``.
    """
    count = [0]

    def increment(_):
        count[0] += 1

    @jax.custom_vjp
    def counted_loss(z):
        return -logdensity_fn(z)

    def counted_loss_fwd(z):
        return -logdensity_fn(z), z

    def counted_loss_bwd(z, cotangent):
        jax.debug.callback(increment, cotangent)
        return (-cotangent * jax.grad(logdensity_fn)(z),)

    counted_loss.defvjp(counted_loss_fwd, counted_loss_bwd)

    @jax.jit
    def replay(initial_position):
        last_step, _ = minimize_lbfgs(counted_loss, initial_position, maxiter=maxiter)
        return last_step.state.iter_num

    iterations = [int(replay(position)) for position in initial_positions]
    jax.effects_barrier()
    return count[0], np.asarray(iterations)


def run_blackjax_pathfinder(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    num_samples: int = 4000,
    num_paths: int = 4,
    num_draws_per_path: int = 1000,
    num_elbo_draws: int = 25,
    maxiter: int = 30,
) -> MethodResult:
    """Approximate the posterior of ``model`` with multi-path Pathfinder.

    Each of ``num_paths`` paths starts from a uniform draw in [-2, 2] per
    unconstrained coordinate and runs ``blackjax.vi.pathfinder.approximate``:
    L-BFGS for at most ``maxiter`` iterations, then the Gaussian approximation
    along the path with the largest ELBO, estimated from ``num_elbo_draws``
    draws. Each path's Gaussian gives ``num_draws_per_path`` draws, and
    ``num_samples`` of the pooled draws are resampled with replacement by
    Pareto-smoothed importance weights ``p(z) / q(z)``. The paths are
    ``jax.vmap``-ed and compiled ahead of time.

    ``num_grad_evals`` counts the gradient evaluations of the L-BFGS runs, line
    searches included, from a separate replay of the paths outside the clock
    (see ``_replay_lbfgs``). Evaluations of the log density alone are
    counted in ``info["num_logdensity_evals"]``.

    Args:
        rng_key: Key for the initial points, the ELBO draws and the resampling.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        num_samples: Number of draws returned.
        num_paths: Number of independent Pathfinder runs.
        num_draws_per_path: Draws taken from each path's Gaussian approximation.
        num_elbo_draws: Draws per point of a path used to estimate its ELBO.
        maxiter: Maximum number of L-BFGS iterations per path.

    Returns:
        A :class:`MethodResult` with ``num_samples`` draws. Its ``info`` contains
        ``elbo`` of shape ``(num_paths,)`` (each path's best ELBO estimate),
        ``pareto_k`` of the importance weights (above 0.7 means the pooled
        approximation is unreliable), ``num_lbfgs_iterations`` of shape
        ``(num_paths,)`` (equal to ``maxiter`` where a path hit the cap),
        ``num_logdensity_evals`` and ``aot_compile_time``.
    """
    model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
    _check_int("num_samples", num_samples, 1)
    _check_int("num_paths", num_paths, 1)
    _check_int("num_draws_per_path", num_draws_per_path, 1)
    _check_int("num_elbo_draws", num_elbo_draws, 1)
    _check_int("maxiter", maxiter, 1)

    keys = jax.random.split(rng_key, 5)
    model_key, init_key, path_key, draw_key, resample_key = keys
    with _CompileClock() as clock:
        flat = flatten_model(model_key, model, model_args, model_kwargs)

        def run_path(path_key, draw_key, initial_position):
            state, _ = pathfinder.approximate(
                path_key,
                flat.logdensity_fn,
                initial_position,
                num_elbo_draws,
                maxiter=maxiter,
            )
            draws, log_q = pathfinder.sample(draw_key, state, num_draws_per_path)
            log_p = jax.vmap(flat.logdensity_fn)(draws)
            return draws, log_p, log_q, state.elbo

        def run_all(path_keys, draw_keys, resample_key, initial_positions):
            draws, log_p, log_q, elbo = jax.vmap(run_path)(
                path_keys, draw_keys, initial_positions
            )
            log_weights, pareto_k = psis_weights((log_p - log_q).ravel())
            index = jax.random.choice(
                resample_key,
                num_paths * num_draws_per_path,
                (num_samples,),
                replace=True,
                p=jnp.exp(log_weights),
            )
            positions = draws.reshape(num_paths * num_draws_per_path, flat.dim)
            samples = jax.vmap(flat.constrain_fn)(positions[index])
            return samples, elbo, pareto_k

        initial_positions = _uniform_init(init_key, flat, num_paths)
        args = (
            jax.random.split(path_key, num_paths),
            jax.random.split(draw_key, num_paths),
            resample_key,
            initial_positions,
        )
        aot_start = time.time()
        compiled = jax.jit(run_all).lower(*args).compile()
        aot_compile_time = time.time() - aot_start

        samples, elbo, pareto_k = jax.block_until_ready(compiled(*args))

    num_grad_evals, num_lbfgs_iterations = _replay_lbfgs(
        flat.logdensity_fn, initial_positions, maxiter
    )
    # Per path: one ELBO estimate at each of the maxiter + 1 points of the path,
    # then the log density at every draw from the chosen approximation.
    num_logdensity_evals = num_paths * (
        (maxiter + 1) * num_elbo_draws + num_draws_per_path
    )
    info = {
        "elbo": np.asarray(elbo),
        "pareto_k": float(pareto_k),
        "num_lbfgs_iterations": num_lbfgs_iterations,
        "num_logdensity_evals": num_logdensity_evals,
        "aot_compile_time": aot_compile_time,
    }
    return MethodResult(
        samples=samples,
        compile_time=clock.compile_time,
        run_time=clock.run_time,
        num_grad_evals=num_grad_evals,
        info=info,
    )


def run_autoguide(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    guide: str = "multivariate_normal",
    num_steps: int = 10000,
    learning_rate: float = 1e-3,
    num_particles: int = 1,
    num_samples: int = 4000,
) -> MethodResult:
    """Fit a NumPyro autoguide to ``model`` by maximizing the ELBO with Adam.

    The guide is trained by ``numpyro.infer.SVI`` with ``Trace_ELBO`` and
    ``optax.adam(learning_rate)``. One program that calls ``SVI.run(...,
    progress_bar=False)``, which initializes the guide and then runs all
    ``num_steps`` updates in one ``lax.scan``, is compiled ahead of time and then
    executed. The draws come from the guide's ``sample_posterior`` (jitted), which
    also returns the model's deterministic sites. The gradient count is
    ``num_steps * num_particles``: each step differentiates one ELBO estimate made
    of ``num_particles`` log-density evaluations.

    Args:
        rng_key: Key for guide initialization, the ELBO draws and the final draws.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        guide: Name of the autoguide: ``"multivariate_normal"``
            (``AutoMultivariateNormal``), ``"iaf"`` (``AutoIAFNormal``),
            ``"bnaf"`` (``AutoBNAFNormal``) or ``"normal"`` (``AutoNormal``).
        num_steps: Number of optimizer steps.
        learning_rate: Adam step size.
        num_particles: Draws per ELBO estimate.
        num_samples: Number of draws returned.

    Returns:
        A :class:`MethodResult` with ``num_samples`` draws. Its ``info`` contains
        ``final_elbo`` (minus the mean loss over the last ``max(1, num_steps //
        100)`` steps), ``losses`` of shape ``(num_steps,)``, ``guide`` and
        ``aot_compile_time``.

    Raises:
        ValueError: If ``guide`` is not one of the names above.
    """
    if guide not in _AUTOGUIDES:
        raise ValueError(f"guide must be one of {sorted(_AUTOGUIDES)}, got {guide!r}")
    model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
    _check_int("num_steps", num_steps, 1)
    _check_int("num_particles", num_particles, 1)
    _check_int("num_samples", num_samples, 1)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real):
        raise TypeError(f"learning_rate must be a real number, got {learning_rate!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")

    run_key, sample_key = jax.random.split(rng_key)
    autoguide = _AUTOGUIDES[guide](model)
    svi = SVI(
        model,
        autoguide,
        optax.adam(learning_rate),
        Trace_ELBO(num_particles=num_particles),
    )

    def fit(run_key):
        result = svi.run(
            run_key, num_steps, *model_args, progress_bar=False, **model_kwargs
        )
        return result.params, result.losses

    def sample(sample_key, params):
        return autoguide.sample_posterior(
            sample_key, params, sample_shape=(num_samples,)
        )

    with _CompileClock() as clock:
        aot_start = time.time()
        compiled_fit = jax.jit(fit).lower(run_key).compile()
        aot_compile_time = time.time() - aot_start

        # Block before compiling `sample`, which would otherwise overlap the fit
        # still running in the background and hide its run time.
        params, losses = jax.block_until_ready(compiled_fit(run_key))
        samples = jax.block_until_ready(jax.jit(sample)(sample_key, params))

    losses = np.asarray(losses)
    info = {
        "final_elbo": -float(np.mean(losses[-max(1, num_steps // 100) :])),
        "losses": losses,
        "guide": guide,
        "aot_compile_time": aot_compile_time,
    }
    return MethodResult(
        samples=samples,
        compile_time=clock.compile_time,
        run_time=clock.run_time,
        num_grad_evals=num_steps * num_particles,
        info=info,
    )


BASELINES: dict[str, Callable[..., MethodResult]] = {
    "numpyro_nuts": run_numpyro_nuts,
    "blackjax_nuts": run_blackjax_nuts,
    "blackjax_pathfinder": run_blackjax_pathfinder,
    "autoguide_mvn": functools.partial(run_autoguide, guide="multivariate_normal"),
    "autoguide_iaf": functools.partial(run_autoguide, guide="iaf"),
    "autoguide_bnaf": functools.partial(run_autoguide, guide="bnaf"),
}
"""Baseline runners by name; each takes ``(rng_key, model, model_args,
model_kwargs)`` and the keyword options of the runner it wraps."""
