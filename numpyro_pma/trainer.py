"""``PMA``: trains an :class:`~numpyro_pma.AutoBrenier` guide with SVI's interface."""

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers

from numpyro_pma.driver import TrainingOutcome, is_array, run_chunks
from numpyro_pma.guide import AutoBrenier
from numpyro_pma.mirror import MirrorInfo, MirrorState, StepSize, mirror_descent
from numpyro_pma.whitening import fit_diagonal_gaussian

__all__ = ["DEFAULT_NUM_STEPS", "PMA", "PMARunResult", "PMAState", "RunTiming"]

# Mirror steps that fit the bundled reference posteriors of dimension up to
# about 30 with a cosine-decayed step size from 0.5.
DEFAULT_NUM_STEPS = 600


class PMAState(NamedTuple):
    """State of :class:`PMA`, like NumPyro's ``SVIState``.

    Attributes:
        mirror_state: The core iteration's state.
        rng_key: Base key; step ``k`` uses ``fold_in(rng_key, k)``.
    """

    mirror_state: MirrorState
    rng_key: jax.Array


class RunTiming(NamedTuple):
    """Wall-clock seconds of a :meth:`PMA.run`, compilation measured apart.

    Attributes:
        init_time: ``init``: guide setup and the whitening fit, compilation
            included (0 when the run continued from ``init_state``).
        compile_time: Ahead-of-time compilation of the scanned steps (0 when a
            compiled executable of the same shapes was reused).
        run_time: Execution of the mirror steps.
    """

    init_time: float
    compile_time: float
    run_time: float


class PMARunResult(NamedTuple):
    """Result of :meth:`PMA.run`.

    Attributes:
        params: Guide parameters, as ``guide.sample_posterior`` expects them.
        state: Final :class:`PMAState`, to continue training.
        trace: Per-step :class:`~numpyro_pma.mirror.MirrorInfo` of NumPy arrays
            of shape ``(num_steps,)``: ``step_size``, ``elbo``,
            ``elbo_stderr``, ``displacement``, ``projection_loss``,
            ``accepted``, ``num_nonfinite``.
        timing: Wall-clock seconds of the run's phases.
    """

    params: dict
    state: PMAState
    trace: MirrorInfo
    timing: RunTiming


def _check_step_size(step_size) -> None:
    if callable(step_size):
        return
    if isinstance(step_size, bool) or not isinstance(step_size, int | float):
        raise TypeError(
            "step_size must be a positive number or an optax schedule (a callable "
            f"of the step count), got {step_size!r}"
        )
    if not np.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be positive and finite, got {step_size}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class PMA:
    """Fit an :class:`~numpyro_pma.AutoBrenier` guide by PMA mirror steps.

    The interface follows ``numpyro.infer.SVI``: ``init``, ``update``, ``run``
    and ``get_params``. ``init`` first fits a diagonal Gaussian (a short ELBO
    ascent) that sets the guide's ``loc`` and ``scale``; the mirror steps then
    train the potential in those whitened coordinates, where one step size
    suits every direction.

    Args:
        model: The NumPyro model.
        guide: An :class:`~numpyro_pma.AutoBrenier` for ``model``.
        step_size: Mirror step size ``eta``: a positive float or an optax
            schedule of the step count. ``0.5`` is near-optimal in whitened
            coordinates for nearly Gaussian posteriors.
        num_particles: Reference draws per step.
        num_projection_steps: Optimizer steps of the projection per step.
        projection_optimizer: Optax optimizer of the projection; defaults to
            ``optax.adam(3e-2)``.
        quadratic_projection: ``"auto"``, ``"lstsq"`` or ``"optimizer"``; see
            :func:`~numpyro_pma.mirror.mirror_descent`.
        num_whitening_steps: Adam steps of the diagonal Gaussian fit; 0 keeps
            the guide's initial ``loc`` and ``scale``.
        max_consecutive_rejections: ``run`` stops with
            :class:`~numpyro_pma.PMAFailure` after this many rejected steps in
            a row.
    """

    def __init__(
        self,
        model: Callable,
        guide: AutoBrenier,
        step_size: StepSize = 0.5,
        *,
        num_particles: int = 512,
        num_projection_steps: int = 10,
        projection_optimizer: optax.GradientTransformation | None = None,
        quadratic_projection: str = "auto",
        num_whitening_steps: int = 1000,
        max_consecutive_rejections: int = 25,
    ):
        if not isinstance(guide, AutoBrenier):
            raise TypeError(
                f"guide must be an AutoBrenier, got {type(guide).__name__}; "
                "train other guides with numpyro.infer.SVI"
            )
        _check_step_size(step_size)
        _check_positive_int("num_particles", num_particles)
        _check_positive_int("num_projection_steps", num_projection_steps)
        _check_positive_int("max_consecutive_rejections", max_consecutive_rejections)
        if isinstance(num_whitening_steps, bool) or num_whitening_steps < 0:
            raise ValueError(
                f"num_whitening_steps must be a non-negative integer, got "
                f"{num_whitening_steps!r}"
            )
        if quadratic_projection not in ("auto", "lstsq", "optimizer"):
            raise ValueError(
                "quadratic_projection must be 'auto', 'lstsq' or 'optimizer', "
                f"got {quadratic_projection!r}"
            )
        self.model = model
        self.guide = guide
        self.step_size = step_size
        self.num_particles = num_particles
        self.num_projection_steps = num_projection_steps
        self.projection_optimizer = projection_optimizer
        self.quadratic_projection = quadratic_projection
        self.num_whitening_steps = num_whitening_steps
        self.max_consecutive_rejections = max_consecutive_rejections
        self._compiled = {}
        self._executables = {}

    # -- the model's log density in the guide's latent coordinates ----------

    def _logdensity_fn(self, *args, **kwargs) -> Callable[[jax.Array], jax.Array]:
        potential_fn = self.guide._potential_fn_gen(*args, **kwargs)
        unpack = self.guide._unpack_latent
        return lambda z: -potential_fn(unpack(z))

    def _algorithm(self, *args, **kwargs):
        return mirror_descent(
            self._logdensity_fn(*args, **kwargs),
            self.guide.potential,
            self.step_size,
            num_particles=self.num_particles,
            projection_optimizer=self.projection_optimizer,
            num_projection_steps=self.num_projection_steps,
            quadratic_projection=self.quadratic_projection,
        )

    def _compile(self, name: str, fn: Callable, args: tuple, kwargs: dict):
        """Jit ``fn(state, keys_or_key, dynamic_args)`` with static leaves baked in.

        Array leaves of the model arguments are traced; other leaves (Python
        numbers, strings, None) are static and key the cache, so a model that
        uses an integer argument as a shape still compiles, and runs with the
        same shapes reuse the compiled function.
        """
        leaves, treedef = jax.tree.flatten((args, kwargs))
        static = tuple((i, leaf) for i, leaf in enumerate(leaves) if not is_array(leaf))
        try:
            cache_key = (name, treedef, static)
            hash(cache_key)
        except TypeError:
            cache_key = None
        if cache_key is not None and cache_key in self._compiled:
            return self._compiled[cache_key]
        static_values = dict(static)

        def with_model_args(state, keys, dynamic):
            dynamic = iter(dynamic)
            merged = [
                static_values[i] if i in static_values else next(dynamic)
                for i in range(len(leaves))
            ]
            model_args, model_kwargs = jax.tree.unflatten(treedef, merged)
            return fn(state, keys, model_args, model_kwargs)

        compiled = jax.jit(with_model_args)
        if cache_key is not None:
            self._compiled[cache_key] = compiled
        return compiled

    @staticmethod
    def _dynamic_leaves(args, kwargs):
        return [leaf for leaf in jax.tree.leaves((args, kwargs)) if is_array(leaf)]

    # -- the SVI-like interface ------------------------------------------------

    def init(self, rng_key: jax.Array, *args, **kwargs) -> PMAState:
        """Set up the guide, whiten the target and return the initial state.

        Args:
            rng_key: Key for the guide's initialization and the whitening fit.
            *args: Positional arguments of the model.
            **kwargs: Keyword arguments of the model.

        Returns:
            The initial :class:`PMAState`.
        """
        setup_key, whitening_key, state_key = jax.random.split(rng_key, 3)
        guide_trace = handlers.trace(handlers.seed(self.guide, setup_key)).get_trace(
            *args, **kwargs
        )
        potential_params = guide_trace[self.guide.potential_name]["value"]
        loc = guide_trace[self.guide.loc_name]["value"]
        scale = guide_trace[self.guide.scale_name]["value"]

        if self.num_whitening_steps > 0:
            # The fit runs once per init, so its compilation is not cached.
            fit = fit_diagonal_gaussian(
                whitening_key,
                self._logdensity_fn(*args, **kwargs),
                loc,
                num_steps=self.num_whitening_steps,
            )
            if bool(jnp.all(jnp.isfinite(fit.loc)) & jnp.all(jnp.isfinite(fit.scale))):
                loc, scale = fit.loc, fit.scale

        algorithm = self._algorithm(*args, **kwargs)
        return PMAState(algorithm.init(potential_params, loc, scale), state_key)

    def _step_fn(self, state, step_index, model_args, model_kwargs):
        algorithm = self._algorithm(*model_args, **model_kwargs)
        step_key = jax.random.fold_in(state.rng_key, step_index)
        mirror_state, info = algorithm.step(step_key, state.mirror_state)
        return PMAState(mirror_state, state.rng_key), info

    def update(self, state: PMAState, *args, **kwargs) -> tuple[PMAState, MirrorInfo]:
        """Take one mirror step; returns the new state and the step's info."""
        compiled = self._compile("update", self._step_fn, args, kwargs)
        step_index = state.mirror_state.step
        return compiled(state, step_index, self._dynamic_leaves(args, kwargs))

    def get_params(self, state: PMAState) -> dict:
        """Return the guide parameters held by ``state``."""
        mirror_state = state.mirror_state
        return {
            self.guide.loc_name: mirror_state.loc,
            self.guide.scale_name: mirror_state.scale,
            self.guide.potential_name: mirror_state.params,
        }

    def run(
        self,
        rng_key: jax.Array,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        init_state: PMAState | None = None,
        chunk_size: int = 100,
        **kwargs,
    ) -> PMARunResult:
        """Run ``num_steps`` mirror steps and return params, state and trace.

        Args:
            rng_key: Key for ``init`` (ignored when ``init_state`` is given).
            num_steps: Number of mirror steps.
            *args: Positional arguments of the model.
            progress_bar: Show a progress bar with the latest ELBO.
            init_state: Continue from this state instead of calling ``init``.
            chunk_size: Steps per compiled call (the bar updates once a chunk).
            **kwargs: Keyword arguments of the model.

        Returns:
            A :class:`PMARunResult`.

        Raises:
            PMAFailure: ``max_consecutive_rejections`` steps in a row failed;
                the error carries the state and the trace so far.
        """
        _check_positive_int("num_steps", num_steps)
        _check_positive_int("chunk_size", chunk_size)
        start = time.perf_counter()
        state = (
            self.init(rng_key, *args, **kwargs) if init_state is None else init_state
        )
        jax.block_until_ready(state)
        init_time = time.perf_counter() - start if init_state is None else 0.0

        def scanned(state, step_indices, model_args, model_kwargs):
            def body(carry, index):
                return self._step_fn(carry, index, model_args, model_kwargs)

            return jax.lax.scan(body, state, step_indices)

        compiled = self._compile("run", scanned, args, kwargs)
        dynamic = self._dynamic_leaves(args, kwargs)
        compile_time = 0.0

        def chunk_fn(state, indices):
            # Compile ahead of time so that compilation is timed apart from the
            # steps; executables are kept per input signature across runs.
            nonlocal compile_time
            inputs = (state, indices, dynamic)
            signature = (
                id(compiled),
                tuple(
                    (jnp.shape(a), str(jnp.result_type(a)))
                    for a in jax.tree.leaves(inputs)
                ),
            )
            executable = self._executables.get(signature)
            if executable is None:
                tic = time.perf_counter()
                executable = compiled.lower(*inputs).compile()
                compile_time += time.perf_counter() - tic
                self._executables[signature] = executable
            return executable(*inputs)

        start = time.perf_counter()
        outcome: TrainingOutcome = run_chunks(
            chunk_fn,
            state,
            num_steps,
            mirror_state_fn=lambda state: state.mirror_state,
            chunk_size=min(chunk_size, num_steps),
            progress_bar=progress_bar,
            max_consecutive_rejections=self.max_consecutive_rejections,
        )
        run_time = time.perf_counter() - start - compile_time
        return PMARunResult(
            params=self.get_params(outcome.state),
            state=outcome.state,
            trace=outcome.trace,
            timing=RunTiming(init_time, compile_time, run_time),
        )
