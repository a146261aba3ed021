"""``PMA``: trains an :class:`~numpyro_pma.AutoBrenier` guide with SVI's interface."""

import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from numpyro import handlers

from numpyro_pma.checkpoint import (
    check_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from numpyro_pma.driver import (
    TrainingOutcome,
    aligned_chunk_size,
    is_array,
    run_chunks,
)
from numpyro_pma.guide import AutoBrenier
from numpyro_pma.logdet import check_logdet_method
from numpyro_pma.mirror import MirrorInfo, MirrorState, StepSize, mirror_descent
from numpyro_pma.sharding import check_particle_mesh
from numpyro_pma.validation import (
    check_hidden_sizes,
    check_non_negative_int,
    check_positive_int,
    check_rng_key,
    check_step_size,
    check_step_size_range,
)
from numpyro_pma.whitening import fit_dense_gaussian, fit_diagonal_gaussian

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
            included. It is 0 when the run continued from ``init_state``, and
            the guide setup plus the checkpoint reading with ``resume_from``.
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
            ``accepted``, ``num_nonfinite``, ``logdet_stderr``.
        timing: Wall-clock seconds of the run's phases.
    """

    params: dict
    state: PMAState
    trace: MirrorInfo
    timing: RunTiming


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
        quadratic_projection: ``"auto"``, ``"lstsq"``, ``"min_norm"`` or
            ``"optimizer"``; see :func:`~numpyro_pma.mirror.mirror_descent`.
        num_whitening_steps: Adam steps of the diagonal Gaussian fit; 0 keeps
            the guide's initial ``loc`` and ``scale``. A guide with dense
            whitening (the default up to 256 latent dimensions) then refines
            the fit by Newton steps
            (:func:`~numpyro_pma.whitening.fit_dense_gaussian`).
        max_consecutive_rejections: ``run`` stops with
            :class:`~numpyro_pma.PMAFailure` after this many rejected steps in
            a row.
        logdet_method: How ``log det Hess u`` is computed: ``"auto"`` (exact
            up to 256 dimensions), ``"cholesky"`` or a stochastic method for
            large dimensions; see :func:`~numpyro_pma.mirror.mirror_descent`
            and docs/performance.md.
        num_probes: Probes per draw of the stochastic log determinant.
        num_lanczos_steps: Lanczos steps per probe of the stochastic log
            determinant.
        residual_batch_size: Evaluate the residuals this many draws at a time
            to bound memory; must divide ``num_particles``.
        mesh: A :class:`jax.sharding.Mesh` (e.g.
            :func:`~numpyro_pma.sharding.particle_mesh`) over which each step's
            draws are split; its size must divide the number of draws
            evaluated at once.
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
        logdet_method: str = "auto",
        num_probes: int = 16,
        num_lanczos_steps: int = 30,
        residual_batch_size: int | None = None,
        mesh: Mesh | None = None,
    ):
        if not isinstance(guide, AutoBrenier):
            raise TypeError(
                f"guide must be an AutoBrenier, got {type(guide).__name__}; "
                "train other guides with numpyro.infer.SVI"
            )
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model, got {model!r}")
        check_step_size(step_size)
        check_positive_int("num_particles", num_particles)
        check_positive_int("num_projection_steps", num_projection_steps)
        check_positive_int("max_consecutive_rejections", max_consecutive_rejections)
        check_non_negative_int("num_whitening_steps", num_whitening_steps)
        check_hidden_sizes(guide.hidden_sizes)
        if projection_optimizer is not None and not isinstance(
            projection_optimizer, optax.GradientTransformation
        ):
            raise TypeError(
                "projection_optimizer must be an optax.GradientTransformation such "
                f"as optax.adam(3e-2), got {projection_optimizer!r}"
            )
        if quadratic_projection not in ("auto", "lstsq", "min_norm", "optimizer"):
            raise ValueError(
                "quadratic_projection must be 'auto', 'lstsq', 'min_norm' or "
                f"'optimizer', got {quadratic_projection!r}"
            )
        check_logdet_method(logdet_method)
        if logdet_method == "low_rank" and guide.axis_tails:
            raise ValueError(
                "logdet_method='low_rank' needs a guide without axis tails (they "
                "add a diagonal term of full rank to the Hessian); build it with "
                "AutoBrenier(..., axis_tails=False), or leave axis_tails=None "
                "above 256 latent dimensions"
            )
        check_positive_int("num_probes", num_probes)
        if num_probes < 2:
            # One probe gives no spread, hence no standard error of the estimate.
            raise ValueError(f"num_probes must be at least 2, got {num_probes}")
        check_positive_int("num_lanczos_steps", num_lanczos_steps)
        if residual_batch_size is not None:
            check_positive_int("residual_batch_size", residual_batch_size)
            if num_particles % residual_batch_size != 0:
                raise ValueError(
                    f"residual_batch_size ({residual_batch_size}) must divide "
                    f"num_particles ({num_particles})"
                )
        if mesh is not None:
            check_particle_mesh(mesh, residual_batch_size or num_particles)
        self.model = model
        self.guide = guide
        self.step_size = step_size
        self.num_particles = num_particles
        self.num_projection_steps = num_projection_steps
        self.projection_optimizer = projection_optimizer
        self.quadratic_projection = quadratic_projection
        self.num_whitening_steps = num_whitening_steps
        self.max_consecutive_rejections = max_consecutive_rejections
        self.logdet_method = logdet_method
        self.num_probes = num_probes
        self.num_lanczos_steps = num_lanczos_steps
        self.residual_batch_size = residual_batch_size
        self.mesh = mesh
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
            logdet_method=self.logdet_method,
            num_probes=self.num_probes,
            num_lanczos_steps=self.num_lanczos_steps,
            residual_batch_size=self.residual_batch_size,
            mesh=self.mesh,
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

    def _setup_guide(self, setup_key: jax.Array, args: tuple, kwargs: dict):
        """Set up the guide afresh and return its initial parameters.

        The prototype is set up on every call, with a key split from
        ``setup_key``, so the initial state depends on the key alone and not
        on what the guide saw before. The guide's setup checks the model
        (see :mod:`numpyro_pma.validation`) before any compilation.

        Returns:
            ``(potential_params, loc, scale)``; ``loc`` and ``scale`` have shape
            ``(latent_dim,)``.
        """
        prototype_key, params_key = jax.random.split(setup_key)
        handlers.seed(self.guide._setup_prototype, prototype_key)(*args, **kwargs)
        # Only the parameter sites are needed: no draw through the map.
        guide_trace = handlers.trace(
            handlers.seed(self.guide._get_posterior, params_key)
        ).get_trace()
        return (
            guide_trace[self.guide.potential_name]["value"],
            guide_trace[self.guide.loc_name]["value"],
            guide_trace[self.guide.scale_name]["value"],
        )

    def init(self, rng_key: jax.Array, *args, **kwargs) -> PMAState:
        """Set up the guide, whiten the target and return the initial state.

        The same ``rng_key`` and arguments give the same state, whatever the
        guide was used for before.

        Args:
            rng_key: Key for the guide's initialization and the whitening fit.
            *args: Positional arguments of the model.
            **kwargs: Keyword arguments of the model.

        Returns:
            The initial :class:`PMAState`.

        Raises:
            ValueError: The model cannot be fitted because it has discrete or
                no latent sites, rejects its arguments, or has a log density
                that is not finite at the initial point. Raised before any
                compilation.
            TypeError: ``rng_key`` is not a PRNG key, or the model raised a
                TypeError.
        """
        check_rng_key(rng_key)
        setup_key, whitening_key, state_key = jax.random.split(rng_key, 3)
        potential_params, loc, scale = self._setup_guide(setup_key, args, kwargs)
        # Built before the whitening fit, so that its argument checks (which
        # need the latent dimension) fail fast.
        algorithm = self._algorithm(*args, **kwargs)

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
        if self.guide.dense_whitening:
            if scale.ndim == 1:
                scale = jnp.diag(scale)
            if self.num_whitening_steps > 0:
                dense_fit = fit_dense_gaussian(
                    jax.random.fold_in(whitening_key, 1),
                    self._logdensity_fn(*args, **kwargs),
                    loc,
                    scale,
                )
                loc, scale = dense_fit.loc, dense_fit.scale_tril
        return PMAState(algorithm.init(potential_params, loc, scale), state_key)

    def _template_state(self, args: tuple, kwargs: dict) -> PMAState:
        """Return a state of the right structure, shapes and dtypes, cheaply.

        The guide is set up with a fixed key and no whitening fit runs; only
        the structure matters, for restoring a checkpoint onto it.
        """
        potential_params, loc, scale = self._setup_guide(
            jax.random.key(0), args, kwargs
        )
        algorithm = self._algorithm(*args, **kwargs)
        return PMAState(algorithm.init(potential_params, loc, scale), jax.random.key(0))

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
        rng_key: jax.Array | None,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        init_state: PMAState | None = None,
        chunk_size: int = 100,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume_from: str | os.PathLike | None = None,
        **kwargs,
    ) -> PMARunResult:
        """Run ``num_steps`` mirror steps and return params, state and trace.

        Steps run in compiled chunks that end at multiples of ``chunk_size`` in
        the global step count, and step ``k`` draws with the key
        ``fold_in(rng_key, k)``. A run continued from a saved state therefore
        repeats an uninterrupted run exactly (bitwise on CPU).

        Args:
            rng_key: Key for ``init``; ignored (and may be ``None``) when
                ``init_state`` or ``resume_from`` is given.
            num_steps: Number of mirror steps. With ``resume_from`` it counts
                the steps of the whole run, those in the checkpoint included, so
                repeating the call of an interrupted run finishes it.
            *args: Positional arguments of the model.
            progress_bar: Show a progress bar with the latest ELBO.
            init_state: Continue from this state instead of calling ``init``;
                ``num_steps`` more steps are taken.
            chunk_size: Maximum number of steps per compiled call (the bar
                updates once a chunk). With ``checkpoint_every`` it is lowered to the
                largest divisor of ``checkpoint_every`` not above it.
            checkpoint_path: File to which the whole state and the trace so far
                are written atomically (see :mod:`numpyro_pma.checkpoint`):
                every ``checkpoint_every`` steps, at the end, and when the run
                stops on :class:`~numpyro_pma.PMAFailure` or
                ``KeyboardInterrupt``.
            checkpoint_every: Steps between checkpoints, counted from step 0 of
                the run's state; ``None`` writes only at the end and on a stop.
            resume_from: Continue the run saved in this checkpoint file; the
                model arguments and guide must be those of the saved run.
            **kwargs: Keyword arguments of the model.

        Returns:
            A :class:`PMARunResult`. With ``resume_from`` its trace starts with
            the steps stored in the checkpoint.

        Raises:
            PMAFailure: ``max_consecutive_rejections`` steps in a row failed;
                the error carries the state and the trace so far (and the
                checkpoint, if any, holds them too).
            ValueError: An option is invalid, the checkpoint does not match the
                model and guide, or it already holds more than ``num_steps``
                steps.
            FileNotFoundError: ``resume_from`` does not exist.
        """
        check_positive_int("num_steps", num_steps)
        check_positive_int("chunk_size", chunk_size)
        if checkpoint_every is not None:
            check_positive_int("checkpoint_every", checkpoint_every)
            if checkpoint_path is None:
                raise ValueError(
                    f"checkpoint_every={checkpoint_every} needs a checkpoint_path to "
                    "write to"
                )
        if checkpoint_path is not None:
            checkpoint_path = check_checkpoint_path(checkpoint_path)
        if resume_from is not None:
            resume_from = check_checkpoint_path(resume_from, "resume_from")
            if init_state is not None:
                raise ValueError(
                    "pass either init_state or resume_from, not both: both give the "
                    "state to continue from"
                )
            if not os.path.isfile(resume_from):
                raise FileNotFoundError(
                    f"resume_from {resume_from!r} does not exist; run without "
                    "resume_from to start the run"
                )
        elif init_state is None:
            check_rng_key(rng_key)
        chunk_size = aligned_chunk_size(chunk_size, checkpoint_every)

        start = time.perf_counter()
        state = init_state
        previous_trace = None
        remaining = num_steps
        if resume_from is not None:
            template = self._template_state(args, kwargs)
            checkpoint = load_checkpoint(resume_from, template.mirror_state)
            state = PMAState(checkpoint.mirror_state, checkpoint.rng_key)
            previous_trace = checkpoint.trace
            num_done = len(previous_trace.elbo)
            if num_done > num_steps:
                raise ValueError(
                    f"checkpoint {resume_from!r} already contains {num_done} steps, "
                    f"more than num_steps={num_steps}; with resume_from, num_steps "
                    "counts the steps of the whole run"
                )
            remaining = num_steps - num_done
        first_step = 0 if state is None else int(state.mirror_state.step)
        check_step_size_range(
            self.step_size, first_step, first_step + max(remaining, 1) - 1
        )
        if state is None:
            state = self.init(rng_key, *args, **kwargs)
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

        checkpoint_fn = None
        if checkpoint_path is not None:

            def checkpoint_fn(state: PMAState, trace: MirrorInfo) -> None:
                save_checkpoint(
                    checkpoint_path, state.mirror_state, state.rng_key, trace
                )

        start = time.perf_counter()
        outcome: TrainingOutcome = run_chunks(
            chunk_fn,
            state,
            remaining,
            mirror_state_fn=lambda state: state.mirror_state,
            chunk_size=chunk_size,
            progress_bar=progress_bar,
            max_consecutive_rejections=self.max_consecutive_rejections,
            initial_trace=previous_trace,
            checkpoint_fn=checkpoint_fn,
            checkpoint_every=checkpoint_every,
        )
        run_time = time.perf_counter() - start - compile_time
        return PMARunResult(
            params=self.get_params(outcome.state),
            state=outcome.state,
            trace=outcome.trace,
            timing=RunTiming(init_time, compile_time, run_time),
        )

    def resume(
        self,
        checkpoint_path: str | os.PathLike,
        num_steps: int,
        *args,
        checkpoint_every: int | None = None,
        progress_bar: bool = True,
        chunk_size: int = 100,
        **kwargs,
    ) -> PMARunResult:
        """Continue the run saved in ``checkpoint_path`` up to ``num_steps`` steps.

        Equivalent to ``run(None, num_steps, *args, resume_from=checkpoint_path,
        checkpoint_path=checkpoint_path, ...)``: new checkpoints replace the
        file. The result equals that of the uninterrupted run (bitwise on CPU)
        when ``chunk_size`` and ``checkpoint_every`` are those of the original
        run.

        Args:
            checkpoint_path: The checkpoint to continue from and to update.
            num_steps: Steps of the whole run, those already in the checkpoint
                included.
            *args: Positional arguments of the model, as in the saved run.
            checkpoint_every: Steps between checkpoints; ``None`` writes only at
                the end and on a stop.
            progress_bar: Show a progress bar with the latest ELBO.
            chunk_size: Maximum number of steps per compiled call.
            **kwargs: Keyword arguments of the model, as in the saved run.

        Returns:
            A :class:`PMARunResult` whose trace covers the whole run.
        """
        return self.run(
            None,
            num_steps,
            *args,
            progress_bar=progress_bar,
            chunk_size=chunk_size,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
            resume_from=checkpoint_path,
            **kwargs,
        )
