"""Cost of a PMA step against an ELBO-gradient step, and what preconditioning saves.

``numpyro-pma performance`` (:func:`performance_main`) prints two kinds of
markdown tables.

Step cost (the default). The target is ``N(0, diag(s^2))`` on R^d with ``s``
log-spaced in ``[0.5, 2]``. The guide draws ``z = loc + scale * grad u(x)``,
``x ~ N(0, I_d)``, with ``u`` a :class:`~numpyro_pma.potential.BrenierPotential`.
The quadratic part of ``u`` starts at ``diag(s)``, the target's Brenier map, so
the Hessians have the condition number of a fitted guide, not of the identity.
Two steps on the same batch of ``num_particles`` draws are timed:

- PMA: one :func:`~numpyro_pma.mirror.mirror_descent` step with its defaults
  (residuals, 10 projection steps of Adam);
- ELBO: one Adam step on ``loc``, ``log scale`` and the potential's parameters
  along the reparameterized gradient of
  ``-ELBO = -mean_i [l(z_i) + log det Hess u(x_i)] - sum log scale`` (up to a
  constant), the loss that NumPyro's ``Trace_ELBO`` computes for
  :class:`~numpyro_pma.AutoBrenier`, written in plain JAX.

Both choose the log determinant with
:func:`~numpyro_pma.logdet.choose_logdet_method`: exact (Hessian and Cholesky)
up to 256 dimensions. Above, with the default potential (axis tails on), PMA
estimates its value by stochastic Lanczos quadrature and the ELBO step
differentiates the conjugate-gradient surrogate of
:func:`~numpyro_pma.logdet.logdet_gradient_surrogate`, which gives the gradient
and no value. With ``--no-axis-tails`` the potential has no axis tails, and
above 256 dimensions both steps use the exact low-rank log determinant of
:mod:`numpyro_pma.lowrank` (the ELBO step differentiates it). Time per step
is the median over ``--repeats`` runs of the compiled step (compilation
excluded, ``jax.block_until_ready``). Memory is reported twice: XLA's
compiled buffer sizes (arguments, outputs and temporaries) and the peak
resident set size of the process that ran the configuration; each
configuration runs in a fresh Python subprocess unless ``--no-isolate`` is
given. The growth exponent ``b`` of ``time ∝ d^b`` is the least-squares slope
of ``log time`` on ``log d``.

Preconditioning (``--preconditioning``). On ill-conditioned Gaussians and
bundled reference posteriors, PMA runs with three whitenings (dense: the
diagonal Gaussian fit refined by
:func:`~numpyro_pma.whitening.fit_dense_gaussian`; diagonal: the diagonal fit
alone; none: ``loc`` is the model's initial point and ``scale = 1``), each
with and without step-size adaptation (without it no step is rejected for a
falling ELBO and the multiplier stays 1; steps with non-finite residuals are
still rejected). The table gives the steps each variant needs to bring its
ELBO within ``0.05`` nats of the best final ELBO of the six.
"""

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_pma.logdet import (
    choose_logdet_method,
    hessian_vector_product,
    logdet_gradient_surrogate,
)
from numpyro_pma.lowrank import (
    low_rank_factors,
    map_and_logdet_low_rank,
    projection_rank,
)
from numpyro_pma.mirror import mirror_descent
from numpyro_pma.potential import BrenierPotential
from numpyro_pma.transform import map_and_logdet
from numpyro_pma.whitening import fit_dense_gaussian, fit_diagonal_gaussian

__all__ = [
    "PreconditioningRecord",
    "StepCostRecord",
    "auto_residual_batch_size",
    "format_preconditioning_table",
    "format_step_cost_table",
    "growth_exponent",
    "measure_step_cost",
    "performance_main",
    "run_preconditioning_benchmark",
]

DEFAULT_DIMS = (2, 10, 100, 1000)
DEFAULT_BATCH_SIZES = (256, 4096)
DEFAULT_TARGETS = (
    "gaussian-ill-conditioned",
    "gaussian-correlated",
    "eight_schools-eight_schools_noncentered",
    "kidiq-kidscore_interaction",
)
# Tolerance of "reached the final ELBO" in the preconditioning table, in nats.
ELBO_TOLERANCE = 0.05
# Trailing window, in steps, that smooths the Monte Carlo noise of the ELBO
# trace before it is compared with the tolerance.
_SMOOTHING_WINDOW = 10
# Steps at the end of a run whose mean ELBO is its final ELBO.
_FINAL_WINDOW = 20
# The ELBO step's conjugate gradients stop at this relative residual or
# iteration count. 1e-6, the solver's own default, is below what float32
# conjugate gradients reliably reach.
_CG_TOLERANCE = 1e-5
_MAX_CG_ITERATIONS = 100


# ------------------------------------------------------------------ step cost


class StepCostRecord(NamedTuple):
    """Cost of one kind of training step in one configuration.

    Attributes:
        kind: ``"pma"`` or ``"elbo"``.
        dim: Dimension ``d``.
        num_particles: Draws per step.
        logdet_method: ``"cholesky"``, ``"low_rank"`` or ``"slq"`` (for ELBO,
            ``"slq"`` means the conjugate-gradient surrogate).
        seconds_per_step: Median wall time of a step, NaN if not measured.
        min_seconds_per_step: Shortest wall time of a step; on a shared
            machine it is the least disturbed by other processes.
        num_timed_runs: Runs behind the median.
        compiled_megabytes: XLA's argument, output and temporary buffers of the
            compiled step, in MB (1e6 bytes); NaN if not compiled.
        peak_rss_megabytes: Peak resident set size of the measuring process,
            in MB; it includes the Python and JAX runtime (a few hundred MB).
        status: ``"ok"``, ``"timed out after N s"`` or ``"failed: ..."``.
    """

    kind: str
    dim: int
    num_particles: int
    logdet_method: str
    seconds_per_step: float
    min_seconds_per_step: float
    num_timed_runs: int
    compiled_megabytes: float
    peak_rss_megabytes: float
    status: str


def _target_scales(dim: int) -> jax.Array:
    return jnp.geomspace(0.5, 2.0, dim) if dim > 1 else jnp.ones(1)


def _gaussian_logdensity(scales: jax.Array) -> Callable[[jax.Array], jax.Array]:
    def logdensity_fn(z):
        return -0.5 * jnp.sum((z / scales) ** 2)

    return logdensity_fn


def _potential_at_target(
    rng_key: jax.Array,
    dim: int,
    hidden_sizes: Sequence[int],
    scales: jax.Array,
    axis_tails: bool = True,
):
    """Initialize a potential whose quadratic part is ``x' diag(s) x / 2``."""
    potential = BrenierPotential(
        dim=dim, hidden_sizes=tuple(hidden_sizes), axis_tails=axis_tails
    )
    params = potential.init(rng_key, jnp.zeros(dim))["params"]
    diagonal = jnp.sqrt(jnp.maximum(scales - potential.min_eigenvalue, 1e-6))
    params = {**params, "scale_tril": jnp.diag(diagonal).astype(scales.dtype)}
    return potential, params


def auto_residual_batch_size(
    dim: int,
    num_particles: int,
    logdet_method: str,
    *,
    num_probes: int = 16,
    num_lanczos_steps: int = 30,
    itemsize: int = 4,
    budget_bytes: int = 2**30,
    projection_rank: int | None = None,
) -> int | None:
    """Pick a ``residual_batch_size`` whose log-det working set fits a budget.

    The working set of one draw is about three arrays of the size of its
    Hessian (``dim^2`` numbers) for Cholesky, of its Lanczos bases
    (``num_probes * num_lanczos_steps * dim`` numbers) for SLQ, or of the
    network's ``(r, r)`` Hessian and a point (``r^2 + dim`` numbers, with
    ``r = projection_rank``) for the low-rank method.

    Returns:
        ``None`` when the whole batch fits, else the largest divisor of
        ``num_particles`` that fits (at least 1).
    """
    chosen = choose_logdet_method(dim, logdet_method, projection_rank=projection_rank)
    if chosen == "cholesky":
        numbers_per_draw = dim * dim
    elif chosen == "low_rank":
        numbers_per_draw = projection_rank**2 + dim
    else:
        numbers_per_draw = num_probes * min(num_lanczos_steps, dim) * dim
    bytes_per_draw = 3 * numbers_per_draw * itemsize
    if bytes_per_draw * num_particles <= budget_bytes:
        return None
    fitting = max(1, budget_bytes // bytes_per_draw)
    return max(k for k in range(1, fitting + 1) if num_particles % k == 0)


def _config_potential(config: dict):
    """Return ``(potential, params, scales)`` of the configuration's guide."""
    scales = _target_scales(config["dim"])
    potential, params = _potential_at_target(
        jax.random.key(config["seed"]),
        config["dim"],
        config["hidden_sizes"],
        scales,
        axis_tails=config.get("axis_tails", True),
    )
    return potential, params, scales


def _config_logdet_method(config: dict) -> str:
    """Resolve the configuration's ``logdet_method`` for its potential."""
    rank = None
    if not config.get("axis_tails", True):
        rank = int(sum(config["hidden_sizes"]))
    return choose_logdet_method(
        config["dim"], config["logdet_method"], projection_rank=rank
    )


def _pma_step(config: dict):
    """Return ``(step_fn, args, logdet_method)`` of a PMA step for ``config``."""
    dim, num_particles = config["dim"], config["num_particles"]
    potential, params, scales = _config_potential(config)
    method = _config_logdet_method(config)
    batch_size = auto_residual_batch_size(
        dim,
        num_particles,
        method,
        num_probes=config["num_probes"],
        num_lanczos_steps=config["num_lanczos_steps"],
        itemsize=jnp.dtype(scales.dtype).itemsize,
        budget_bytes=config["logdet_memory_budget"],
        projection_rank=projection_rank(potential),
    )
    algorithm = mirror_descent(
        _gaussian_logdensity(scales),
        potential,
        0.5,
        num_particles=num_particles,
        logdet_method=method,
        num_probes=config["num_probes"],
        num_lanczos_steps=config["num_lanczos_steps"],
        residual_batch_size=batch_size,
    )
    return algorithm.step, (algorithm.init(params),), method


def _elbo_step(config: dict):
    """Return ``(step_fn, args, logdet_method)`` of an ELBO-gradient step."""
    dim, num_particles = config["dim"], config["num_particles"]
    potential, params, scales = _config_potential(config)
    logdensity_fn = _gaussian_logdensity(scales)
    method = _config_logdet_method(config)
    optimizer = optax.adam(1e-3)

    def logdet_term(potential_params, point, rng_key, factors):
        """``T(x)`` and a term whose gradient is that of ``log det Hess u(x)``."""

        def potential_fn(y):
            return potential.apply({"params": potential_params}, y)

        if method == "cholesky":
            return map_and_logdet(potential_fn, point)
        if method == "low_rank":
            return map_and_logdet_low_rank(potential, potential_params, factors, point)
        surrogate = logdet_gradient_surrogate(
            rng_key,
            hessian_vector_product(potential_fn, point),
            dim,
            max_cg_iterations=_MAX_CG_ITERATIONS,
            tolerance=_CG_TOLERANCE,
            dtype=point.dtype,
        )
        return jax.grad(potential_fn)(point), surrogate - jax.lax.stop_gradient(
            surrogate
        )

    def negative_elbo(trainable, rng_key):
        loc, log_scale, potential_params = trainable
        draw_key, probe_key = jax.random.split(rng_key)
        x = jax.random.normal(draw_key, (num_particles, dim), loc.dtype)
        probe_keys = jax.random.split(probe_key, num_particles)
        # The low-rank method's factorization of the quadratic part is shared
        # by all draws and differentiated once.
        factors = None
        if method == "low_rank":
            factors = low_rank_factors(potential, potential_params)
        transport, logdet = jax.vmap(
            lambda point, key: logdet_term(potential_params, point, key, factors)
        )(x, probe_keys)
        z = loc + jnp.exp(log_scale) * transport
        log_target = jax.vmap(logdensity_fn)(z)
        return -jnp.mean(log_target + logdet) - jnp.sum(log_scale)

    def step(rng_key, state):
        trainable, optimizer_state = state
        loss, grads = jax.value_and_grad(negative_elbo)(trainable, rng_key)
        updates, optimizer_state = optimizer.update(grads, optimizer_state, trainable)
        return (optax.apply_updates(trainable, updates), optimizer_state), loss

    trainable = (jnp.zeros(dim, scales.dtype), jnp.zeros(dim, scales.dtype), params)
    return step, ((trainable, optimizer.init(trainable)),), method


def _compiled_megabytes(compiled) -> float:
    try:
        stats = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return math.nan
    if stats is None:
        return math.nan
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 1e6


def _peak_rss_megabytes() -> float:
    # Linux reports ru_maxrss in kilobytes, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def measure_step_cost(config: dict, emit: Callable[[dict], None] | None = None):
    """Compile and time one step kind in one configuration.

    Args:
        config: ``kind`` (``"pma"`` or ``"elbo"``), ``dim``, ``num_particles``,
            ``hidden_sizes``, ``axis_tails`` (optional, default true),
            ``logdet_method``, ``num_probes``,
            ``num_lanczos_steps``, ``logdet_memory_budget`` (bytes),
            ``repeats``, ``max_repeat_seconds`` (no further repeats once a run
            took longer) and ``seed``.
        emit: Called with the partial record after compilation, so that a
            parent process learns the memory of a configuration that then
            times out.

    Returns:
        A :class:`StepCostRecord` as a dict.
    """
    build = _pma_step if config["kind"] == "pma" else _elbo_step
    step_fn, args, method = build(config)
    key = jax.random.key(config["seed"] + 1)
    compiled = jax.jit(step_fn).lower(key, *args).compile()
    record = StepCostRecord(
        kind=config["kind"],
        dim=config["dim"],
        num_particles=config["num_particles"],
        logdet_method=method,
        seconds_per_step=math.nan,
        min_seconds_per_step=math.nan,
        num_timed_runs=0,
        compiled_megabytes=_compiled_megabytes(compiled),
        peak_rss_megabytes=_peak_rss_megabytes(),
        status="compiled",
    )
    if emit is not None:
        emit(record._asdict())

    # One untimed run first: it allocates the buffers of the executable.
    jax.block_until_ready(compiled(key, *args))
    seconds = []
    for repeat in range(config["repeats"]):
        run_key = jax.random.fold_in(key, repeat + 1)
        tic = time.perf_counter()
        jax.block_until_ready(compiled(run_key, *args))
        seconds.append(time.perf_counter() - tic)
        if seconds[-1] > config["max_repeat_seconds"]:
            break
    return record._replace(
        seconds_per_step=float(np.median(seconds)),
        min_seconds_per_step=float(np.min(seconds)),
        num_timed_runs=len(seconds),
        peak_rss_megabytes=_peak_rss_megabytes(),
        status="ok",
    )._asdict()


def _run_isolated(config: dict, timeout: float) -> dict:
    """Run :func:`measure_step_cost` in a fresh interpreter; parse its JSON lines."""
    command = [
        sys.executable,
        "-m",
        "numpyro_pma.performance",
        "--worker",
        json.dumps(config),
    ]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        output, error, failed = completed.stdout, completed.stderr, completed.returncode
        status = None if failed == 0 else f"failed: exit code {failed}"
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        output = output.decode() if isinstance(output, bytes) else output
        error = ""
        status = f"timed out after {timeout:g} s"
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    record = records[-1] if records else _empty_record(config)
    if status is not None:
        last_error = error.strip().splitlines()[-1:] if error else []
        record["status"] = status + (f" ({last_error[0]})" if last_error else "")
    return record


def _empty_record(config: dict) -> dict:
    return StepCostRecord(
        kind=config["kind"],
        dim=config["dim"],
        num_particles=config["num_particles"],
        logdet_method=_config_logdet_method(config),
        seconds_per_step=math.nan,
        min_seconds_per_step=math.nan,
        num_timed_runs=0,
        compiled_megabytes=math.nan,
        peak_rss_megabytes=math.nan,
        status="not started",
    )._asdict()


def growth_exponent(dims: Sequence[float], seconds: Sequence[float]) -> float:
    """Fit ``b`` in ``seconds ≈ a * dims^b`` by least squares on the log scale.

    Pairs with a non-finite or non-positive time are ignored.

    Returns:
        The slope ``b``; NaN when fewer than two distinct dimensions remain.
    """
    dims = np.asarray(dims, float)
    seconds = np.asarray(seconds, float)
    keep = np.isfinite(seconds) & (seconds > 0) & (dims > 0)
    if len(np.unique(dims[keep])) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(dims[keep]), np.log(seconds[keep]), 1)
    return float(slope)


def _format_number(value: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def format_step_cost_table(records: Sequence[dict], repeats: int = 1) -> str:
    """Render step-cost records as markdown: one row per (dim, num_particles).

    Args:
        records: Dicts with the fields of :class:`StepCostRecord`.
        repeats: Timed runs requested per step; a step with fewer gets a note.

    Returns:
        Two markdown tables, the costs and the growth exponents.
    """
    by_key = {(r["kind"], r["dim"], r["num_particles"]): r for r in records}
    configurations = sorted({(r["dim"], r["num_particles"]) for r in records})
    lines = [
        "| d | particles | PMA log det | PMA s/step (min) | PMA XLA MB "
        "| PMA peak RSS MB | ELBO log det | ELBO s/step (min) | ELBO XLA MB "
        "| ELBO peak RSS MB | PMA / ELBO | notes |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for dim, num_particles in configurations:
        pma = by_key.get(("pma", dim, num_particles))
        elbo = by_key.get(("elbo", dim, num_particles))
        cells = [str(dim), str(num_particles)]
        notes = []
        for name, record in (("PMA", pma), ("ELBO", elbo)):
            if record is None:
                cells += ["–"] * 4
                continue
            median = _format_number(record["seconds_per_step"])
            shortest = _format_number(record.get("min_seconds_per_step", math.nan))
            cells += [
                record["logdet_method"],
                median if shortest == "–" else f"{median} ({shortest})",
                _format_number(record["compiled_megabytes"], 4),
                _format_number(record["peak_rss_megabytes"], 4),
            ]
            if record["status"] != "ok":
                notes.append(f"{name} {record['status']}")
            elif record["num_timed_runs"] < repeats:
                runs = record["num_timed_runs"]
                notes.append(f"{name} timed {runs} of {repeats} times")
        ratio = math.nan
        if pma is not None and elbo is not None:
            ratio = pma["seconds_per_step"] / elbo["seconds_per_step"]
        cells += [_format_number(ratio, 2), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "| step | particles | growth exponent b (time ∝ d^b) | dims |"]
    lines.append("|---|---:|---:|---|")
    for kind in ("pma", "elbo"):
        for num_particles in sorted({r["num_particles"] for r in records}):
            rows = [
                r
                for r in records
                if r["kind"] == kind
                and r["num_particles"] == num_particles
                and r["status"] == "ok"
            ]
            dims = [r["dim"] for r in rows]
            exponent = growth_exponent(dims, [r["seconds_per_step"] for r in rows])
            lines.append(
                f"| {kind.upper()} | {num_particles} | {_format_number(exponent, 2)} "
                f"| {', '.join(str(d) for d in sorted(dims))} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------ preconditioning


class PreconditioningRecord(NamedTuple):
    """One PMA run of the preconditioning benchmark.

    Attributes:
        target: Target name.
        dim: Its dimension.
        whitening: Where ``loc`` and ``scale`` came from: ``"dense"``,
            ``"diagonal"`` (Gaussian fits) or ``"none"``.
        adaptation: Whether falling-ELBO steps were rejected and the step size
            adapted.
        final_elbo: Mean of the smoothed accepted ELBO over the last 20 steps;
            NaN if no step was acceptable.
        steps_to_tolerance: First step at which the smoothed ELBO is within
            ``ELBO_TOLERANCE`` of the best final ELBO of the target's runs;
            ``None`` if never.
        num_rejected: Steps that did not produce new parameters.
        seconds: Wall time of the mirror steps, compilation included.
    """

    target: str
    dim: int
    whitening: str
    adaptation: bool
    final_elbo: float
    steps_to_tolerance: int | None
    num_rejected: int
    seconds: float


def _preconditioning_target(name: str, rng_key: jax.Array):
    """Return ``(logdensity_fn, init_position)`` of a named target."""
    if name == "gaussian-ill-conditioned":
        # Standard deviations from 0.01 to 10 around a mean of 1: the step size
        # that suits one end of the spectrum is far off for the other.
        scales = jnp.geomspace(0.01, 10.0, 8)
        mean = jnp.ones(8)

        def logdensity_fn(z):
            return -0.5 * jnp.sum(((z - mean) / scales) ** 2)

        return logdensity_fn, jnp.zeros(8)
    if name == "gaussian-correlated":
        # The same standard deviations along rotated axes: a diagonal fit
        # cannot whiten it, a dense one can.
        scales = jnp.geomspace(0.01, 10.0, 8)
        rotation, _ = jnp.linalg.qr(jax.random.normal(rng_key, (8, 8)))
        precision = rotation @ jnp.diag(scales**-2) @ rotation.T
        mean = jnp.ones(8)

        def logdensity_fn(z):
            return -0.5 * (z - mean) @ precision @ (z - mean)

        return logdensity_fn, jnp.zeros(8)

    from numpyro_pma.flat_model import flatten_model
    from numpyro_pma.posteriors import load_posterior

    posterior = load_posterior(name)
    flat = flatten_model(rng_key, posterior.model, (), posterior.model_kwargs)
    return flat.logdensity_fn, flat.init_position


def _smoothed_progress(accepted_elbo: np.ndarray) -> np.ndarray:
    """Trailing mean of the last accepted ELBO over ``_SMOOTHING_WINDOW`` steps.

    ``accepted_elbo`` is the state's ``accepted_elbo`` after each step, shape
    ``(num_steps,)``; it is ``-inf`` before the first acceptable step, and those
    steps count as missing.
    """
    values = np.where(np.isfinite(accepted_elbo), accepted_elbo, np.nan)
    smoothed = np.full_like(values, np.nan)
    for k in range(len(values)):
        window = values[max(0, k + 1 - _SMOOTHING_WINDOW) : k + 1]
        if np.any(np.isfinite(window)):
            smoothed[k] = np.nanmean(window)
    return smoothed


def run_preconditioning_benchmark(
    rng_key: jax.Array,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    num_steps: int = 300,
    num_particles: int = 256,
    hidden_sizes: Sequence[int] = (32, 32),
    step_size: float = 0.5,
) -> list[PreconditioningRecord]:
    """Run PMA with and without whitening and step-size adaptation.

    Every run uses ``optax.cosine_decay_schedule(step_size, num_steps,
    alpha=0.02)``, the same draws (keys) and the same initial potential.

    Args:
        rng_key: Base key.
        targets: ``"gaussian-ill-conditioned"`` or names of
            :func:`~numpyro_pma.posteriors.list_posteriors`.
        num_steps: Mirror steps per run.
        num_particles: Draws per step.
        hidden_sizes: Widths of the potential's network.
        step_size: Initial step size of the cosine schedule.

    Returns:
        Six records per target.
    """
    schedule = optax.cosine_decay_schedule(step_size, num_steps, alpha=0.02)
    records = []
    for target_index, name in enumerate(targets):
        target_key = jax.random.fold_in(rng_key, target_index)
        model_key, whitening_key, init_key, run_key = jax.random.split(target_key, 4)
        logdensity_fn, init_position = _preconditioning_target(name, model_key)
        dim = int(jnp.shape(init_position)[0])
        potential = BrenierPotential(dim=dim, hidden_sizes=tuple(hidden_sizes))
        params = potential.init(init_key, jnp.zeros(dim))["params"]
        fit = fit_diagonal_gaussian(whitening_key, logdensity_fn, init_position)
        dense_fit = fit_dense_gaussian(
            jax.random.fold_in(whitening_key, 1), logdensity_fn, fit.loc, fit.scale
        )
        whitenings = {
            "dense": (dense_fit.loc, dense_fit.scale_tril),
            "diagonal": (fit.loc, fit.scale),
            "none": (init_position, None),
        }

        runs = []
        progress = []
        for whitening, (loc, scale) in whitenings.items():
            for adaptation in (True, False):
                options = {}
                if not adaptation:
                    options = dict(
                        rejection_threshold=math.inf,
                        step_size_shrink=1.0,
                        step_size_growth=1.0,
                    )
                algorithm = mirror_descent(
                    logdensity_fn,
                    potential,
                    schedule,
                    num_particles=num_particles,
                    **options,
                )
                state = algorithm.init(params, loc, scale)

                def run(state, algorithm=algorithm, run_key=run_key):
                    def body(carry, index):
                        step_key = jax.random.fold_in(run_key, index)
                        carry, info = algorithm.step(step_key, carry)
                        return carry, (info, carry.accepted_elbo)

                    return jax.lax.scan(body, state, jnp.arange(num_steps))

                tic = time.perf_counter()
                _, outputs = jax.block_until_ready(jax.jit(run)(state))
                seconds = time.perf_counter() - tic
                info, accepted_elbo = jax.device_get(outputs)
                runs.append((whitening, adaptation, info, seconds))
                progress.append(_smoothed_progress(np.asarray(accepted_elbo, float)))

        finals = []
        for smoothed in progress:
            last = smoothed[-_FINAL_WINDOW:]
            finite = last[np.isfinite(last)]
            finals.append(float(np.mean(finite)) if finite.size else math.nan)
        finite_finals = [f for f in finals if np.isfinite(f)]
        best = max(finite_finals) if finite_finals else math.nan
        for (whitening, adaptation, info, seconds), smooth, final in zip(
            runs, progress, finals, strict=True
        ):
            reached = np.flatnonzero(smooth >= best - ELBO_TOLERANCE)
            records.append(
                PreconditioningRecord(
                    target=name,
                    dim=dim,
                    whitening=whitening,
                    adaptation=adaptation,
                    final_elbo=final,
                    steps_to_tolerance=int(reached[0]) + 1 if reached.size else None,
                    num_rejected=int(np.sum(~np.asarray(info.accepted))),
                    seconds=seconds,
                )
            )
    return records


def format_preconditioning_table(records: Sequence[PreconditioningRecord]) -> str:
    """Render preconditioning records as a markdown table."""
    lines = [
        f"| target | d | whitening | adaptation | final ELBO "
        f"| steps to best − {ELBO_TOLERANCE} | rejected steps | seconds |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        steps = "not reached" if r.steps_to_tolerance is None else r.steps_to_tolerance
        lines.append(
            f"| {r.target} | {r.dim} | {r.whitening} "
            f"| {'yes' if r.adaptation else 'no'} | {_format_number(r.final_elbo, 5)} "
            f"| {steps} | {r.num_rejected} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------- command line


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        )
    return values


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-pma performance",
        description="Time and memory of a PMA step against an ELBO-gradient step "
        "(default), or the steps that whitening and step-size adaptation save "
        "(--preconditioning).",
    )
    parser.add_argument(
        "--dims",
        type=_positive_ints,
        default=list(DEFAULT_DIMS),
        help="dimensions d, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_positive_ints,
        default=list(DEFAULT_BATCH_SIZES),
        help="draws per step, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per step (default: 3)"
    )
    parser.add_argument(
        "--output", default=None, help="also write the markdown report to this file"
    )

    parser.add_argument(
        "--hidden-sizes",
        type=_positive_ints,
        default=[32, 32],
        help="widths of the potential's network (default: 32,32)",
    )
    parser.add_argument(
        "--no-axis-tails",
        action="store_true",
        help="time the guide whose potential has no axis tails, for which auto "
        "picks the exact low-rank log determinant above d = 256",
    )
    parser.add_argument(
        "--logdet-method",
        choices=("auto", "cholesky", "slq", "low_rank"),
        default="auto",
        help="log determinant of both steps (default: auto, SLQ above d = 256, "
        "or low_rank with --no-axis-tails); low_rank needs --no-axis-tails",
    )
    parser.add_argument("--num-probes", type=int, default=16, help="SLQ probes")
    parser.add_argument(
        "--num-lanczos-steps", type=int, default=30, help="Lanczos steps per probe"
    )
    parser.add_argument(
        "--logdet-memory-budget",
        type=float,
        default=1024.0,
        help="MB of log-det working set per batch of draws in the PMA step; "
        "larger batches are evaluated in parts (default: 1024)",
    )

    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds allowed per configuration in its subprocess (default: 600)",
    )
    parser.add_argument(
        "--max-repeat-seconds",
        type=float,
        default=60.0,
        help="stop repeating a step once one run took longer (default: 60)",
    )
    parser.add_argument(
        "--no-isolate",
        action="store_true",
        help="measure in this process (peak RSS is then cumulative)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")

    parser.add_argument(
        "--preconditioning",
        action="store_true",
        help="run the whitening and adaptation benchmark instead",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="targets of --preconditioning: gaussian-ill-conditioned or "
        "posterior names",
    )
    parser.add_argument(
        "--num-steps",
        type=int,
        default=300,
        help="mirror steps per run of --preconditioning (default: 300)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _machine_lines(argv: Sequence[str]) -> list[str]:
    load = os.getloadavg()
    device = jax.devices()[0]
    return [
        f"Command: `numpyro-pma performance {shlex.join(argv)}`",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"default float {jnp.dtype(jnp.result_type(float)).name}",
        f"Load average at start (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}",
    ]


def _check_arguments(parser: argparse.ArgumentParser, args) -> None:
    for name in ("repeats", "num_probes", "num_lanczos_steps", "num_steps"):
        value = getattr(args, name)
        minimum = 2 if name == "num_probes" else 1
        if value < minimum:
            option = "--" + name.replace("_", "-")
            parser.error(f"{option} must be at least {minimum}, got {value}")
    for name in ("timeout", "max_repeat_seconds", "logdet_memory_budget"):
        if not getattr(args, name) > 0:
            option = "--" + name.replace("_", "-")
            parser.error(f"{option} must be positive, got {getattr(args, name)}")


def performance_main(argv: Sequence[str] | None = None) -> int:
    """Run ``numpyro-pma performance`` and print its markdown report.

    Args:
        argv: Command-line arguments after ``performance``; ``None`` reads
            ``sys.argv[1:]``.

    Returns:
        0, or 1 if a configuration failed for a reason other than its timeout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        record = measure_step_cost(
            json.loads(args.worker), emit=lambda r: print(json.dumps(r), flush=True)
        )
        print(json.dumps(record), flush=True)
        return 0
    _check_arguments(parser, args)
    if args.logdet_method == "low_rank" and not args.no_axis_tails:
        parser.error(
            "--logdet-method low_rank needs --no-axis-tails: the axis tails "
            "add a full-rank diagonal to the Hessian"
        )

    header = _machine_lines(argv)
    if args.preconditioning:
        records = run_preconditioning_benchmark(
            jax.random.key(args.seed),
            args.targets,
            num_steps=args.num_steps,
            hidden_sizes=args.hidden_sizes,
        )
        body = format_preconditioning_table(records)
        failed = False
    else:
        records = []
        for dim in args.dims:
            for num_particles in args.batch_sizes:
                for kind in ("pma", "elbo"):
                    config = dict(
                        kind=kind,
                        dim=dim,
                        num_particles=num_particles,
                        hidden_sizes=list(args.hidden_sizes),
                        axis_tails=not args.no_axis_tails,
                        logdet_method=args.logdet_method,
                        num_probes=args.num_probes,
                        num_lanczos_steps=args.num_lanczos_steps,
                        logdet_memory_budget=int(args.logdet_memory_budget * 1e6),
                        repeats=args.repeats,
                        max_repeat_seconds=args.max_repeat_seconds,
                        seed=args.seed,
                    )
                    if args.no_isolate:
                        record = measure_step_cost(config)
                    else:
                        record = _run_isolated(config, args.timeout)
                    records.append(record)
                    print(
                        f"{kind} d={dim} particles={num_particles}: "
                        f"{_format_number(record['seconds_per_step'])} s/step, "
                        f"{record['status']}",
                        file=sys.stderr,
                        flush=True,
                    )
        body = format_step_cost_table(records, repeats=args.repeats)
        failed = any(r["status"].startswith("failed") for r in records)

    load = os.getloadavg()
    header.append(
        f"Load average at end (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}"
    )
    report = "\n\n".join(["\n".join(f"- {line}" for line in header), body]) + "\n"
    print(report, end="")
    if args.output is not None:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(performance_main())
