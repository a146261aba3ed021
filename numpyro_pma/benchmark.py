"""Reference-posterior benchmark: inference methods scored against gold-standard draws.

For every pair (posterior, method), :func:`run_benchmark` fits the posterior's
NumPyro model with the method and compares the draws with the posterior's
reference draws (:func:`numpyro_pma.compare.compare`). All pairs run in one
process, one after the other, on one machine, so their times are comparable.

Timing. Every runner measures itself with the clock of
:mod:`numpyro_pma.baselines`: ``compile_time`` is the union of the time spans of
JAX's tracing, lowering and XLA compilation events while the runner executes,
and ``run_time`` is the rest of its wall time up to the moment the draws are on
the host. ``fit_time`` is their sum. Diagnostics computed after the fit (the
importance weights behind k-hat) are outside the clock.

Metrics, in units of the reference standard deviation of each parameter: max
``|mean error|``, max ``|sd / reference sd - 1|``, max ``|quantile error|``
over the 5%, 50% and 95% quantiles, max Wasserstein-1 distance of the
standardized marginals, and the energy distance of the jointly standardized
draws. Guide methods also report the Pareto k-hat of the importance weights
``log p(y, z) - log q(z)`` of fresh guide draws; MCMC methods report NaN.

Command line: ``numpyro-pma benchmark [--posterior NAME ...] [--method NAME ...]
[--output-dir DIR] [--seed N] [--quick]`` (see :func:`benchmark_main`).
"""

import argparse
import functools
import importlib.metadata
import inspect
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal
from tqdm.auto import tqdm

from numpyro_pma import baselines, trainer
from numpyro_pma.baselines import MethodResult, _CompileClock
from numpyro_pma.compare import compare
from numpyro_pma.guide import AutoBrenier
from numpyro_pma.importance import importance_log_weights, pareto_khat
from numpyro_pma.posteriors import Posterior, list_posteriors, load_posterior
from numpyro_pma.trainer import PMA
from numpyro_pma.whitening import fit_diagonal_gaussian

__all__ = [
    "METHODS",
    "BenchmarkResult",
    "Method",
    "MethodRecord",
    "TargetCheck",
    "benchmark_main",
    "check_targets",
    "run_brenier_elbo",
    "run_guide_baseline",
    "run_benchmark",
    "run_pma",
    "time_to_reach",
]

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "benchmark-output"
DEFAULT_NUM_DRAWS = 4000
QUICK_NUM_DRAWS = 500
RESULTS_FILE = "results.json"
REPORT_FILE = "benchmarks.md"

# Pareto k-hat above this makes importance-sampling estimates unreliable (see
# numpyro_pma.importance.pareto_khat).
KHAT_THRESHOLD = 0.7

# Used when numpyro_pma.trainer defines no DEFAULT_NUM_STEPS.
FALLBACK_PMA_NUM_STEPS = 500

# ELBO training of AutoBrenier: chosen once, not tuned per posterior.
BRENIER_ELBO_NUM_STEPS = 2000
BRENIER_ELBO_LEARNING_RATE = 5e-3

# The final ELBO of a trace is the mean over its last tenth: SVI's single-draw
# estimates are noisy, and the mean is a fair summary of where training ended.
FINAL_ELBO_FRACTION = 0.1

_EMPTY = MappingProxyType({})


class Method(NamedTuple):
    """An inference method of the benchmark.

    Attributes:
        runner: ``runner(rng_key, model, model_args, model_kwargs, **options)``
            returning a :class:`~numpyro_pma.baselines.MethodResult`. It must
            accept ``num_samples``: the number of draws for a guide, draws per
            chain for MCMC. A guide runner reports k-hat in
            ``info["pareto_k"]``.
        kind: ``"guide"`` (independent draws from a fitted approximation) or
            ``"mcmc"`` (Markov chains; then ``options`` must set
            ``num_chains``).
        options: Keyword options of a full run.
        quick_options: Options that replace ``options`` entries for a smoke
            run (``--quick``).
    """

    runner: Callable[..., MethodResult]
    kind: str
    options: Mapping[str, Any] = _EMPTY
    quick_options: Mapping[str, Any] = _EMPTY


class MethodRecord(NamedTuple):
    """Outcome and scores of one method on one posterior.

    The error and distance fields are NaN when the run failed; the time and
    count fields are NaN when it failed before the fit ended.

    Attributes:
        posterior: Posterior name.
        method: Method name.
        kind: ``"guide"`` or ``"mcmc"``.
        status: ``"ok"`` or ``"failed"``.
        error_stage: ``"fit"`` or ``"metrics"`` when failed, else ``None``.
        error_type: Exception class name when failed, else ``None``.
        error_message: Exception message when failed, else ``None``.
        compile_time: Seconds of JAX tracing, lowering and compilation.
        run_time: Wall-clock seconds of the fit, compile time excluded.
        fit_time: ``compile_time + run_time``.
        num_grad_evals: Log-density gradient evaluations, as the runner counts
            them (see each runner's docstring).
        num_draws: Number of draws compared with the reference.
        max_abs_mean_error: Max over parameters of ``|mean - ref mean| / ref sd``.
        max_abs_sd_rel_error: Max over parameters of ``|sd / ref sd - 1|``.
        max_abs_quantile_error: Max of ``|quantile - ref quantile| / ref sd``
            over parameters and the 5%, 50% and 95% quantiles.
        max_wasserstein: Max over parameters of the Wasserstein-1 distance of
            the marginals standardized by the reference mean and sd.
        energy_distance: Squared energy distance of the jointly standardized
            draws (see :func:`numpyro_pma.compare.compare`).
        khat: Pareto k-hat of the guide's importance weights; NaN for MCMC or
            when unavailable (``info["pareto_k_error"]`` then gives the reason).
        parameters: Per-parameter errors, ``{column: {parameter: value}}``, the
            table of :class:`~numpyro_pma.compare.Comparison`; empty if failed.
        info: The runner's ``info`` dict.
        traceback: Formatted traceback of the failure, else ``None``.
    """

    posterior: str
    method: str
    kind: str
    status: str
    error_stage: str | None
    error_type: str | None
    error_message: str | None
    compile_time: float
    run_time: float
    fit_time: float
    num_grad_evals: float
    num_draws: int
    max_abs_mean_error: float
    max_abs_sd_rel_error: float
    max_abs_quantile_error: float
    max_wasserstein: float
    energy_distance: float
    khat: float
    parameters: dict
    info: dict
    traceback: str | None


class TargetCheck(NamedTuple):
    """One target of the benchmark and what was measured against it.

    Attributes:
        name: Short name of the target.
        criterion: The target in words.
        measured: What was measured, in words and numbers.
        met: ``True`` or ``False``; ``None`` when it could not be measured.
    """

    name: str
    criterion: str
    measured: str
    met: bool | None


class BenchmarkResult(NamedTuple):
    """Result of :func:`run_benchmark`.

    Attributes:
        records: One :class:`MethodRecord` per (posterior, method), posterior
            by posterior in the order requested.
        targets: The :class:`TargetCheck` list of :func:`check_targets`.
        machine: Platform, CPU count, JAX backend and package versions.
        settings: Seed, draw count, quick flag and the options of every method.
        command: The process's command line, shell-quoted.
        output_dir: Folder holding ``results.json`` and ``benchmarks.md``, or
            ``None`` when nothing was written.
    """

    records: list[MethodRecord]
    targets: list[TargetCheck]
    machine: dict[str, Any]
    settings: dict[str, Any]
    command: str
    output_dir: Path | None

    def table(self) -> str:
        """Format the records as a fixed-width text table."""
        return _format_table(self.records, markdown=False)


# -- runners of the package's own guide -------------------------------------


def _check_model_inputs(model_args: Any, model_kwargs: Any) -> tuple[tuple, dict]:
    if not isinstance(model_args, tuple | list):
        raise TypeError(f"model_args must be a tuple, got {type(model_args)}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(
            f"model_kwargs must be a dict or None, got {type(model_kwargs)}"
        )
    return tuple(model_args), dict(model_kwargs)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _final_elbo(elbo: np.ndarray) -> float:
    """Mean of the last ``FINAL_ELBO_FRACTION`` of an ELBO trace."""
    tail = max(1, int(len(elbo) * FINAL_ELBO_FRACTION))
    return float(np.mean(elbo[-tail:]))


def _guide_khat(
    rng_key: jax.Array,
    model: Callable,
    guide: Callable,
    params: Mapping,
    model_args: tuple,
    model_kwargs: dict,
    num_importance_samples: int,
) -> dict[str, Any]:
    """Return ``info`` entries with the k-hat of ``num_importance_samples`` weights.

    A guide draw with a non-finite weight makes k-hat undefined: then
    ``pareto_k`` is NaN and ``pareto_k_error`` contains the reason.
    """
    draws = importance_log_weights(
        rng_key,
        model,
        guide,
        params,
        *model_args,
        num_samples=num_importance_samples,
        **model_kwargs,
    )
    log_weights = np.asarray(draws.log_weights, dtype=np.float64)
    entries: dict[str, Any] = {"num_nonfinite_log_weights": draws.num_nonfinite}
    try:
        entries["pareto_k"] = pareto_khat(log_weights)
    except ValueError as error:
        entries["pareto_k"] = math.nan
        entries["pareto_k_error"] = str(error)
    return entries


def _pma_default_num_steps() -> int:
    return int(getattr(trainer, "DEFAULT_NUM_STEPS", FALLBACK_PMA_NUM_STEPS))


def _whitening_num_particles() -> int:
    """Draws per step of the diagonal Gaussian fit that ``PMA.init`` runs."""
    parameter = inspect.signature(fit_diagonal_gaussian).parameters["num_particles"]
    return int(parameter.default)


def run_pma(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    num_steps: int | None = None,
    num_samples: int = 4000,
    num_importance_samples: int = 1000,
    pma_options: Mapping[str, Any] | None = None,
) -> MethodResult:
    """Fit ``AutoBrenier(model)`` by PMA mirror steps with ``PMA``'s defaults.

    ``PMA.init`` (the guide's setup and the diagonal Gaussian whitening fit) and
    ``PMA.run`` from that state are clocked apart, which puts the ELBO trace on
    a time axis. Step ``k`` (0-based) is taken to end at ``init_run_time + (k +
    1) * steps_run_time / num_steps`` seconds, compile time excluded, because
    all steps are assumed to take equally long. The draws come from
    ``guide.sample_posterior`` (jitted, clocked).

    ``num_grad_evals`` is ``num_steps * num_particles + num_whitening_steps *
    whitening_particles``. The first term counts the evaluations of the log
    density at the mirror step's reference draws. The value-regression step
    evaluates the log density without its gradient, so counting these as
    gradient evaluations overstates PMA's cost. The second term counts the
    gradients of the whitening fit.

    Args:
        rng_key: Key for the fit, the draws and the importance weights.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        num_steps: Mirror steps; ``None`` reads ``DEFAULT_NUM_STEPS`` from
            :mod:`numpyro_pma.trainer`, or uses 500 if it is not defined.
        num_samples: Number of draws returned.
        num_importance_samples: Guide draws behind the k-hat estimate.
        pma_options: Keyword options of ``PMA`` (e.g. ``step_size``); ``None``
            keeps all of its defaults.

    Returns:
        A :class:`~numpyro_pma.baselines.MethodResult`. Its ``info`` contains
        ``num_steps``, ``num_particles``, ``num_whitening_steps``,
        ``num_logdensity_evals``, ``init_compile_time``, ``init_run_time``,
        ``steps_run_time``, ``elbo`` (per-step estimates, shape
        ``(num_steps,)``), ``elbo_times`` (seconds at the end of each step, as
        above), ``final_elbo``, ``num_rejected_steps`` and ``pareto_k``.
    """
    model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
    if num_steps is None:
        num_steps = _pma_default_num_steps()
    _check_count("num_steps", num_steps, 1)
    _check_count("num_samples", num_samples, 1)
    _check_count("num_importance_samples", num_importance_samples, 2)
    pma_options = dict(pma_options or {})

    init_key, sample_key, weight_key = jax.random.split(rng_key, 3)
    guide = AutoBrenier(model)
    pma = PMA(model, guide, **pma_options)

    def sample(sample_key, params):
        return guide.sample_posterior(sample_key, params, sample_shape=(num_samples,))

    with _CompileClock() as init_clock:
        state = jax.block_until_ready(pma.init(init_key, *model_args, **model_kwargs))
    with _CompileClock() as steps_clock:
        result = pma.run(
            init_key,
            num_steps,
            *model_args,
            progress_bar=False,
            init_state=state,
            **model_kwargs,
        )
        params = jax.block_until_ready(result.params)
    with _CompileClock() as sample_clock:
        samples = jax.block_until_ready(jax.jit(sample)(sample_key, params))

    clocks = (init_clock, steps_clock, sample_clock)
    elbo = np.asarray(result.trace.elbo, dtype=np.float64)
    num_done = len(elbo)
    step_seconds = steps_clock.run_time / max(num_done, 1)
    num_whitening_steps = pma.num_whitening_steps
    num_logdensity_evals = num_done * pma.num_particles
    info = {
        "num_steps": num_done,
        "num_particles": pma.num_particles,
        "num_whitening_steps": num_whitening_steps,
        "num_logdensity_evals": num_logdensity_evals,
        "init_compile_time": init_clock.compile_time,
        "init_run_time": init_clock.run_time,
        "steps_run_time": steps_clock.run_time,
        "elbo": elbo,
        "elbo_times": init_clock.run_time + step_seconds * np.arange(1, num_done + 1),
        "final_elbo": _final_elbo(elbo) if num_done else math.nan,
        "num_rejected_steps": int(np.sum(~np.asarray(result.trace.accepted))),
    }
    info.update(
        _guide_khat(
            weight_key,
            model,
            guide,
            params,
            model_args,
            model_kwargs,
            num_importance_samples,
        )
    )
    return MethodResult(
        samples=samples,
        compile_time=sum(clock.compile_time for clock in clocks),
        run_time=sum(clock.run_time for clock in clocks),
        num_grad_evals=num_logdensity_evals
        + num_whitening_steps * _whitening_num_particles(),
        info=info,
    )


def run_brenier_elbo(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    num_steps: int = BRENIER_ELBO_NUM_STEPS,
    learning_rate: float = BRENIER_ELBO_LEARNING_RATE,
    num_particles: int = 1,
    num_samples: int = 4000,
    num_importance_samples: int = 1000,
) -> MethodResult:
    """Fit ``AutoBrenier(model)`` by ELBO gradients: SVI, Trace_ELBO and Adam.

    ``SVI.init`` runs eagerly (it sets up the guide outside of any traced
    function), then one program running all ``num_steps`` updates in a
    ``lax.scan`` (``SVI.run`` with ``progress_bar=False``) is compiled ahead of
    time and executed. As for :func:`run_pma`, step ``k`` of the ELBO trace ends
    at ``init_run_time + (k + 1) * steps_run_time / num_steps`` seconds.
    ``num_grad_evals`` is ``num_steps * num_particles``.

    Args:
        rng_key: Key for the fit, the draws and the importance weights.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        num_steps: Adam steps.
        learning_rate: Adam step size.
        num_particles: Draws per ELBO estimate.
        num_samples: Number of draws returned.
        num_importance_samples: Guide draws behind the k-hat estimate.

    Returns:
        A :class:`~numpyro_pma.baselines.MethodResult`. Its ``info`` contains
        ``num_steps``, ``init_run_time``, ``steps_run_time``, ``elbo`` (minus
        the per-step losses, shape ``(num_steps,)``), ``elbo_times``,
        ``final_elbo`` (mean of the last tenth of ``elbo``) and ``pareto_k``.
    """
    model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
    _check_count("num_steps", num_steps, 1)
    _check_count("num_particles", num_particles, 1)
    _check_count("num_samples", num_samples, 1)
    _check_count("num_importance_samples", num_importance_samples, 2)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")

    init_key, run_key, sample_key, weight_key = jax.random.split(rng_key, 4)
    guide = AutoBrenier(model)
    svi = SVI(
        model,
        guide,
        optax.adam(learning_rate),
        Trace_ELBO(num_particles=num_particles),
    )

    def fit(state):
        result = svi.run(
            run_key,
            num_steps,
            *model_args,
            progress_bar=False,
            init_state=state,
            **model_kwargs,
        )
        return result.params, result.losses

    def sample(sample_key, params):
        return guide.sample_posterior(sample_key, params, sample_shape=(num_samples,))

    with _CompileClock() as init_clock:
        state = jax.block_until_ready(svi.init(init_key, *model_args, **model_kwargs))
    with _CompileClock() as steps_clock:
        compiled_fit = jax.jit(fit).lower(state).compile()
        params, losses = jax.block_until_ready(compiled_fit(state))
    with _CompileClock() as sample_clock:
        samples = jax.block_until_ready(jax.jit(sample)(sample_key, params))

    clocks = (init_clock, steps_clock, sample_clock)
    elbo = -np.asarray(losses, dtype=np.float64)
    step_seconds = steps_clock.run_time / num_steps
    info = {
        "num_steps": num_steps,
        "init_run_time": init_clock.run_time,
        "steps_run_time": steps_clock.run_time,
        "elbo": elbo,
        "elbo_times": init_clock.run_time + step_seconds * np.arange(1, num_steps + 1),
        "final_elbo": _final_elbo(elbo),
    }
    info.update(
        _guide_khat(
            weight_key,
            model,
            guide,
            params,
            model_args,
            model_kwargs,
            num_importance_samples,
        )
    )
    return MethodResult(
        samples=samples,
        compile_time=sum(clock.compile_time for clock in clocks),
        run_time=sum(clock.run_time for clock in clocks),
        num_grad_evals=num_steps * num_particles,
        info=info,
    )


_AUTOGUIDE_CLASSES = {
    "multivariate_normal": AutoMultivariateNormal,
    "iaf": AutoIAFNormal,
}


def run_guide_baseline(
    rng_key: jax.Array,
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    guide: str = "multivariate_normal",
    num_importance_samples: int = 1000,
    **options: Any,
) -> MethodResult:
    """Run :func:`~numpyro_pma.baselines.run_autoguide` and add the guide's k-hat.

    k-hat needs the fitted parameters. When ``run_autoguide`` returns them in
    ``info["params"]``, a new autoguide of the same class is built and the
    importance weights of ``num_importance_samples`` of its draws give
    ``info["pareto_k"]``. Otherwise ``pareto_k`` is NaN and
    ``info["pareto_k_error"]`` gives the reason.

    Args:
        rng_key: Key for the fit and the importance weights.
        model: A NumPyro model with continuous latent sites.
        model_args: Positional arguments of ``model``.
        model_kwargs: Keyword arguments of ``model``.
        guide: ``"multivariate_normal"`` or ``"iaf"``.
        num_importance_samples: Guide draws behind the k-hat estimate.
        **options: Options of ``run_autoguide`` (``num_steps``,
            ``learning_rate``, ``num_particles``, ``num_samples``).

    Returns:
        The result of ``run_autoguide`` with ``pareto_k`` (and
        ``final_elbo``, ``losses``, ... as it reports them) in ``info``.
    """
    if guide not in _AUTOGUIDE_CLASSES:
        raise ValueError(
            f"guide must be one of {sorted(_AUTOGUIDE_CLASSES)}, got {guide!r}"
        )
    _check_count("num_importance_samples", num_importance_samples, 2)
    fit_key, weight_key = jax.random.split(rng_key)
    result = baselines.run_autoguide(
        fit_key, model, model_args, model_kwargs, guide=guide, **options
    )
    info = dict(result.info)
    params = info.get("params")
    if params is None:
        info["pareto_k"] = math.nan
        info["pareto_k_error"] = (
            "baselines.run_autoguide returned no fitted parameters "
            "(info['params']), so the importance weights cannot be computed"
        )
    else:
        model_args, model_kwargs = _check_model_inputs(model_args, model_kwargs)
        info.update(
            _guide_khat(
                weight_key,
                model,
                _AUTOGUIDE_CLASSES[guide](model),
                params,
                model_args,
                model_kwargs,
                num_importance_samples,
            )
        )
    return result._replace(info=info)


def _run_guide_baseline_signature() -> inspect.Signature:
    """Signature of ``run_guide_baseline`` with ``run_autoguide``'s options."""
    own = inspect.signature(run_guide_baseline).parameters
    wrapped = inspect.signature(baselines.run_autoguide).parameters
    parameters = [p for p in own.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in parameters}
    parameters += [
        p for p in wrapped.values() if p.kind == p.KEYWORD_ONLY and p.name not in names
    ]
    return inspect.Signature(parameters)


_QUICK_IMPORTANCE = {"num_importance_samples": 256}

METHODS: dict[str, Method] = {
    "pma": Method(
        run_pma,
        "guide",
        quick_options={
            "num_steps": 50,
            "pma_options": {"num_whitening_steps": 100},
            **_QUICK_IMPORTANCE,
        },
    ),
    "brenier_elbo": Method(
        run_brenier_elbo,
        "guide",
        quick_options={"num_steps": 100, **_QUICK_IMPORTANCE},
    ),
    "autoguide_mvn": Method(
        functools.partial(run_guide_baseline, guide="multivariate_normal"),
        "guide",
        quick_options={"num_steps": 200, **_QUICK_IMPORTANCE},
    ),
    "autoguide_iaf": Method(
        functools.partial(run_guide_baseline, guide="iaf"),
        "guide",
        quick_options={"num_steps": 200, **_QUICK_IMPORTANCE},
    ),
    "numpyro_nuts": Method(
        baselines.run_numpyro_nuts,
        "mcmc",
        options={"num_chains": 4},
        quick_options={"num_warmup": 100, "num_chains": 2},
    ),
    "blackjax_nuts": Method(
        baselines.run_blackjax_nuts,
        "mcmc",
        options={"num_chains": 4},
        quick_options={"num_warmup": 100, "num_chains": 2},
    ),
    "blackjax_pathfinder": Method(
        baselines.run_blackjax_pathfinder,
        "guide",
        quick_options={"num_draws_per_path": 250},
    ),
}
"""Benchmark methods by name. ``run_benchmark`` also accepts a dict of its own."""

AUTOGUIDE_METHODS = ("autoguide_mvn", "autoguide_iaf")
NUTS_METHODS = ("numpyro_nuts", "blackjax_nuts")


# -- input checks --------------------------------------------------------------


def _resolve_posteriors(posteriors: Any) -> list[Posterior]:
    """Check names (before loading anything) and return the posteriors."""
    if posteriors is None:
        posteriors = list_posteriors()
    if isinstance(posteriors, str | Posterior):
        posteriors = [posteriors]
    posteriors = list(posteriors)
    if not posteriors:
        raise ValueError("posteriors must name at least one posterior, got none")
    valid = list_posteriors()
    unknown = [p for p in posteriors if isinstance(p, str) and p not in valid]
    if unknown:
        raise ValueError(
            f"unknown posterior names {unknown}; valid names: {', '.join(valid)}"
        )
    wrong_type = [p for p in posteriors if not isinstance(p, str | Posterior)]
    if wrong_type:
        raise TypeError(
            "posteriors must be posterior names or Posterior objects, got "
            f"{wrong_type!r}"
        )

    resolved, seen = [], set()
    for posterior in posteriors:
        name = posterior if isinstance(posterior, str) else posterior.name
        if name in seen:
            continue
        seen.add(name)
        resolved.append(
            load_posterior(posterior) if isinstance(posterior, str) else posterior
        )
    return resolved


def _resolve_methods(methods: Any) -> dict[str, Method]:
    if methods is None:
        return dict(METHODS)
    if isinstance(methods, Mapping):
        bad = {n: m for n, m in methods.items() if not isinstance(m, Method)}
        if bad:
            raise TypeError(f"methods must map names to Method objects, got {bad!r}")
        selected = dict(methods)
    else:
        if isinstance(methods, str):
            methods = [methods]
        names = list(dict.fromkeys(methods))
        unknown = [name for name in names if name not in METHODS]
        if unknown:
            raise ValueError(
                f"unknown method names {unknown}; valid names: {', '.join(METHODS)}"
            )
        selected = {name: METHODS[name] for name in names}
    if not selected:
        raise ValueError("methods must name at least one method, got none")
    for name, method in selected.items():
        if method.kind not in ("guide", "mcmc"):
            raise ValueError(
                f"method {name!r} has kind {method.kind!r}; use 'guide' or 'mcmc'"
            )
    return selected


def _runner_signature(runner: Callable) -> inspect.Signature:
    target = runner.func if isinstance(runner, functools.partial) else runner
    if target is run_guide_baseline:
        return _run_guide_baseline_signature()
    return inspect.signature(runner)


def _method_options(
    name: str,
    method: Method,
    overrides: Mapping[str, Any],
    num_draws: int,
    quick: bool,
) -> dict[str, Any]:
    """Merge defaults, quick options and overrides, and set ``num_samples``.

    Raises:
        ValueError: If the runner does not accept an option, or an MCMC method
            sets no ``num_chains``.
    """
    options = dict(method.options)
    if quick:
        options.update(method.quick_options)
    options.update(overrides)
    if "num_samples" not in options:
        if method.kind == "mcmc":
            if "num_chains" not in options:
                raise ValueError(
                    f"MCMC method {name!r} must set num_chains in its options"
                )
            options["num_samples"] = math.ceil(num_draws / options["num_chains"])
        else:
            options["num_samples"] = num_draws

    signature = _runner_signature(method.runner)
    try:
        signature.bind(None, None, (), {}, **options)
    except TypeError as error:
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind == p.KEYWORD_ONLY or p.default is not p.empty
        ]
        raise ValueError(
            f"invalid options {sorted(options)} for method {name!r} ({error}); "
            f"its runner accepts {accepted}"
        ) from None
    return options


def _key_data(rng_key: jax.Array) -> list[int]:
    """Return the integers of a typed key or of a legacy ``uint32`` key."""
    if jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    return np.asarray(rng_key).tolist()


def _pair_key(rng_key: jax.Array, posterior: str, method: str) -> jax.Array:
    """Key that depends on the names only, so a subset repeats the full run."""
    key = jax.random.fold_in(rng_key, zlib.crc32(posterior.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, zlib.crc32(method.encode()) & 0x7FFFFFFF)


# -- one (posterior, method) pair ---------------------------------------------


def _failed_record(posterior, name, method, stage, error, result=None):
    nan = math.nan
    return MethodRecord(
        posterior=posterior.name,
        method=name,
        kind=method.kind,
        status="failed",
        error_stage=stage,
        error_type=type(error).__name__,
        error_message=str(error),
        compile_time=nan if result is None else float(result.compile_time),
        run_time=nan if result is None else float(result.run_time),
        fit_time=nan
        if result is None
        else float(result.compile_time + result.run_time),
        num_grad_evals=nan if result is None else float(result.num_grad_evals),
        num_draws=0,
        max_abs_mean_error=nan,
        max_abs_sd_rel_error=nan,
        max_abs_quantile_error=nan,
        max_wasserstein=nan,
        energy_distance=nan,
        khat=nan,
        parameters={},
        info={} if result is None else dict(result.info),
        traceback=traceback.format_exc(),
    )


def _run_pair(
    rng_key: jax.Array,
    posterior: Posterior,
    name: str,
    method: Method,
    options: dict[str, Any],
) -> MethodRecord:
    """Fit and score one pair; an exception becomes a failed record."""
    fit_key, compare_key = jax.random.split(rng_key)
    try:
        result = method.runner(
            fit_key, posterior.model, (), posterior.model_kwargs, **options
        )
    except Exception as error:  # Any failure is recorded, and the run goes on.
        logger.warning(
            "method %s failed on posterior %s: %s: %s",
            name,
            posterior.name,
            type(error).__name__,
            error,
        )
        return _failed_record(posterior, name, method, "fit", error)

    try:
        draws = posterior.to_reference(result.samples)
        keys = posterior.reference_keys
        # Chains are kept apart (MCMC draws are chain-major), so that the ArviZ
        # summary inside `compare` can compute R-hat for them.
        num_chains = options["num_chains"] if method.kind == "mcmc" else 1
        comparison = compare(
            (draws.reshape(num_chains, -1, draws.shape[-1]), keys),
            (posterior.reference_chains, keys),
            rng_key=compare_key,
        )
    except Exception as error:  # Any failure is recorded, and the run goes on.
        logger.warning(
            "scoring method %s on posterior %s failed: %s: %s",
            name,
            posterior.name,
            type(error).__name__,
            error,
        )
        return _failed_record(posterior, name, method, "metrics", error, result)

    khat = float(result.info.get("pareto_k", math.nan))
    return MethodRecord(
        posterior=posterior.name,
        method=name,
        kind=method.kind,
        status="ok",
        error_stage=None,
        error_type=None,
        error_message=None,
        compile_time=float(result.compile_time),
        run_time=float(result.run_time),
        fit_time=float(result.compile_time + result.run_time),
        num_grad_evals=float(result.num_grad_evals),
        num_draws=int(draws.shape[0]),
        max_abs_mean_error=comparison.max_abs_mean_error,
        max_abs_sd_rel_error=comparison.max_abs_sd_rel_error,
        max_abs_quantile_error=comparison.max_abs_quantile_error,
        max_wasserstein=comparison.max_wasserstein,
        energy_distance=comparison.energy_distance,
        khat=khat if method.kind == "guide" else math.nan,
        parameters=comparison.table.to_dict(),
        info=dict(result.info),
        traceback=None,
    )


# -- the benchmark ---------------------------------------------------------------


def run_benchmark(
    rng_key: jax.Array,
    posteriors: Sequence[str | Posterior] | None = None,
    methods: Sequence[str] | Mapping[str, Method] | None = None,
    *,
    num_draws: int = DEFAULT_NUM_DRAWS,
    output_dir: str | os.PathLike | None = DEFAULT_OUTPUT_DIR,
    progress_bar: bool = True,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    quick: bool = False,
    command: str | None = None,
) -> BenchmarkResult:
    """Run every method on every posterior and score the draws.

    All names and options are checked before any fitting. A method that raises
    on a posterior (while fitting or while being scored) is recorded with its
    error type and message, logged as a warning, and the run goes on. Each pair
    gets a key folded from ``rng_key`` and the two names, so a run on a subset
    repeats the scores of the full run. Times differ, because JAX's compilation
    caches speed up later runs in the same process.

    Args:
        rng_key: Base key.
        posteriors: Names from :func:`~numpyro_pma.posteriors.list_posteriors`
            or :class:`~numpyro_pma.posteriors.Posterior` objects; ``None``
            runs all registered posteriors.
        methods: Names from :data:`METHODS`, or a dict of :class:`Method`
            objects by name; ``None`` runs all of :data:`METHODS`.
        num_draws: Draws per method compared with the reference: a guide's
            ``num_samples``, and ``ceil(num_draws / num_chains)`` draws per
            chain for MCMC.
        output_dir: Folder for ``results.json`` and ``benchmarks.md``, created
            if missing; ``None`` writes nothing.
        progress_bar: Show a bar over the (posterior, method) pairs.
        method_options: Options by method name, passed to its runner on top of
            the method's defaults (e.g. ``{"pma": {"num_steps": 1000}}``).
        quick: Use each method's ``quick_options`` (few steps and draws), for
            smoke runs. Its figures are not evidence about the methods.
        command: Command line written in the report; ``None`` uses the
            process's ``sys.argv``.

    Returns:
        The :class:`BenchmarkResult`.

    Raises:
        ValueError: For an unknown posterior or method name, an option that a
            runner does not accept, or ``num_draws < 2``.
        TypeError: For arguments of the wrong type.
    """
    _check_count("num_draws", num_draws, 2)
    selected_posteriors = _resolve_posteriors(posteriors)
    selected_methods = _resolve_methods(methods)
    method_options = dict(method_options or {})
    unknown = [name for name in method_options if name not in selected_methods]
    if unknown:
        raise ValueError(
            f"method_options names methods that are not run: {unknown}; "
            f"methods run: {', '.join(selected_methods)}"
        )
    options = {
        name: _method_options(
            name, method, method_options.get(name, {}), num_draws, quick
        )
        for name, method in selected_methods.items()
    }
    if command is None:
        command = shlex.join(sys.argv)
    started = datetime.now(UTC)

    records = []
    pairs = [(p, n) for p in selected_posteriors for n in selected_methods]

    def current_result() -> BenchmarkResult:
        settings = {
            "rng_key_data": _key_data(rng_key),
            "num_draws": num_draws,
            "quick": quick,
            "posteriors": [p.name for p in selected_posteriors],
            "methods": list(selected_methods),
            "method_kinds": {n: m.kind for n, m in selected_methods.items()},
            "method_options": options,
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return BenchmarkResult(
            records=list(records),
            targets=check_targets(records),
            machine=_machine_description(),
            settings=settings,
            command=command,
            output_dir=None if output_dir is None else Path(output_dir),
        )

    bar = tqdm(total=len(pairs), desc="benchmark", disable=not progress_bar)
    try:
        for index, (posterior, name) in enumerate(pairs):
            bar.set_postfix_str(f"{posterior.name} / {name}")
            key = _pair_key(rng_key, posterior.name, name)
            records.append(
                _run_pair(key, posterior, name, selected_methods[name], options[name])
            )
            bar.update()
            posterior_done = (
                index + 1 == len(pairs) or pairs[index + 1][0] is not posterior
            )
            if output_dir is not None and posterior_done:
                # Write after every posterior, so an interrupted run keeps the
                # posteriors it finished.
                _write_outputs(current_result())
    finally:
        bar.close()

    result = current_result()
    if result.output_dir is not None:
        _write_outputs(result)
    return result


# -- targets -------------------------------------------------------------------


def _by_pair(records: Sequence[MethodRecord]) -> dict[tuple[str, str], MethodRecord]:
    return {(r.posterior, r.method): r for r in records}


def _fraction(count: int, total: int) -> str:
    return f"{count} of {total} ({100.0 * count / total:.0f}%)"


def _finite_min(values) -> float:
    """Minimum of the finite values; ``inf`` when there are none."""
    return min((v for v in values if math.isfinite(v)), default=math.inf)


def _check_accuracy(by_pair, posteriors) -> TargetCheck:
    criterion = (
        "pma at least as accurate as the best NumPyro autoguide (autoguide_mvn, "
        "autoguide_iaf), by energy distance, on at least 80% of posteriors"
    )
    losses, mean_error_wins, total = [], 0, 0
    for posterior in posteriors:
        pma = by_pair.get((posterior, "pma"))
        guides = [by_pair.get((posterior, name)) for name in AUTOGUIDE_METHODS]
        guides = [g for g in guides if g is not None and g.status == "ok"]
        if pma is None or not guides:
            continue
        total += 1
        best_energy = _finite_min(g.energy_distance for g in guides)
        if not (pma.status == "ok" and pma.energy_distance <= best_energy):
            losses.append(posterior)
        best_mean_error = _finite_min(g.max_abs_mean_error for g in guides)
        if pma.status == "ok" and pma.max_abs_mean_error <= best_mean_error:
            mean_error_wins += 1
    if total == 0:
        return TargetCheck(
            "accuracy",
            criterion,
            "no posterior with pma and a successful autoguide run",
            None,
        )
    wins = total - len(losses)
    measured = (
        f"pma at least as accurate on {_fraction(wins, total)} posteriors where "
        "pma ran and an autoguide succeeded (pma failures count as misses); "
        f"missed on: {', '.join(losses) or 'none'}. By max mean error instead: "
        f"{_fraction(mean_error_wins, total)}"
    )
    return TargetCheck("accuracy", criterion, measured, wins >= 0.8 * total)


def _check_khat(by_pair, posteriors) -> TargetCheck:
    criterion = f"pma's k-hat below {KHAT_THRESHOLD} on at least 90% of posteriors"
    attempted = [by_pair[(p, "pma")] for p in posteriors if (p, "pma") in by_pair]
    if not attempted:
        return TargetCheck("k-hat", criterion, "pma was not run", None)
    good = [r for r in attempted if r.status == "ok" and r.khat < KHAT_THRESHOLD]
    values = ", ".join(f"{r.posterior} {r.khat:.2f}" for r in attempted)
    measured = (
        f"below {KHAT_THRESHOLD} on {_fraction(len(good), len(attempted))} "
        f"posteriors (failed runs and undefined k-hat count as misses); {values}"
    )
    return TargetCheck("k-hat", criterion, measured, len(good) >= 0.9 * len(attempted))


def _check_fit_time(by_pair, posteriors) -> TargetCheck:
    criterion = (
        "median fit time (compile + run) of pma at most that of NUTS "
        "(numpyro_nuts, else blackjax_nuts), over posteriors where both succeeded"
    )
    for nuts in NUTS_METHODS:
        pairs = [
            (by_pair[(p, "pma")], by_pair[(p, nuts)])
            for p in posteriors
            if (p, "pma") in by_pair and (p, nuts) in by_pair
        ]
        pairs = [(a, b) for a, b in pairs if a.status == "ok" and b.status == "ok"]
        if pairs:
            pma_median = float(np.median([a.fit_time for a, _ in pairs]))
            nuts_median = float(np.median([b.fit_time for _, b in pairs]))
            pma_run = float(np.median([a.run_time for a, _ in pairs]))
            nuts_run = float(np.median([b.run_time for _, b in pairs]))
            measured = (
                f"over {len(pairs)} posteriors: pma {pma_median:.1f} s, {nuts} "
                f"{nuts_median:.1f} s (run time alone: pma {pma_run:.1f} s, "
                f"{nuts} {nuts_run:.1f} s)"
            )
            return TargetCheck(
                "fit time", criterion, measured, pma_median <= nuts_median
            )
    return TargetCheck(
        "fit time",
        criterion,
        "no posterior where pma and NUTS both succeeded",
        None,
    )


def time_to_reach(times: np.ndarray, elbo: np.ndarray, target: float) -> float:
    """Return the first time at which the smoothed ELBO reaches ``target``.

    ``elbo`` has shape ``(num_steps,)`` and ``times`` the end time of each
    step. The trace is smoothed by a trailing moving average over ``max(1,
    num_steps // 20)`` steps, and non-finite estimates are left out of the
    average. Returns ``inf`` if the smoothed trace never reaches ``target``.
    """
    elbo = np.asarray(elbo, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    window = max(1, len(elbo) // 20)
    finite = np.isfinite(elbo)
    sums = np.cumsum(np.where(finite, elbo, 0.0))
    counts = np.cumsum(finite)
    sums = np.concatenate([[0.0], sums])
    counts = np.concatenate([[0], counts])
    ends = np.arange(1, len(elbo) + 1)
    starts = np.maximum(ends - window, 0)
    num = counts[ends] - counts[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = (sums[ends] - sums[starts]) / num
    reached = np.flatnonzero((num > 0) & (smoothed >= target))
    return float(times[reached[0]]) if reached.size else math.inf


def _check_elbo_speed(by_pair, posteriors) -> TargetCheck:
    criterion = (
        "pma reaches brenier_elbo's final ELBO (mean of its last tenth) in at "
        "most half of brenier_elbo's run time, compile time excluded; met when "
        "the median ratio over posteriors is at most 0.5. The time of a step is "
        "estimated as the run time of all steps divided evenly over them"
    )
    ratios = {}
    for posterior in posteriors:
        pma = by_pair.get((posterior, "pma"))
        elbo = by_pair.get((posterior, "brenier_elbo"))
        if pma is None or elbo is None or elbo.status != "ok":
            continue
        if pma.status != "ok" or "elbo_times" not in pma.info:
            ratios[posterior] = math.inf
            continue
        if "elbo_times" not in elbo.info:
            continue
        total = float(elbo.info["elbo_times"][-1])
        reached = time_to_reach(
            pma.info["elbo_times"], pma.info["elbo"], elbo.info["final_elbo"]
        )
        ratios[posterior] = reached / total if total > 0 else math.inf
    if not ratios:
        return TargetCheck(
            "ELBO speed",
            criterion,
            "no posterior where both pma and brenier_elbo ran with ELBO traces",
            None,
        )
    median = float(np.median(list(ratios.values())))
    within = sum(ratio <= 0.5 for ratio in ratios.values())
    values = ", ".join(f"{p} {r:.2f}" for p, r in ratios.items())
    measured = (
        f"median ratio {median:.2f}; at most 0.5 on "
        f"{_fraction(within, len(ratios))} posteriors (inf: never reached, or pma "
        f"failed); {values}"
    )
    return TargetCheck("ELBO speed", criterion, measured, median <= 0.5)


def check_targets(records: Sequence[MethodRecord]) -> list[TargetCheck]:
    """Check the records against the package's four targets.

    The four targets:

    - pma at least as accurate as the best NumPyro autoguide, by energy
      distance, on at least 80% of posteriors;
    - pma's k-hat below 0.7 on at least 90% of posteriors;
    - pma's median fit time at most NUTS's;
    - pma reaching brenier_elbo's final ELBO in at most half of its run time.

    A target whose methods were not run is reported with ``met=None``.

    Args:
        records: Records of a benchmark run.

    Returns:
        One :class:`TargetCheck` per target.
    """
    by_pair = _by_pair(records)
    posteriors = list(dict.fromkeys(r.posterior for r in records))
    return [
        check(by_pair, posteriors)
        for check in (_check_accuracy, _check_khat, _check_fit_time, _check_elbo_speed)
    ]


# -- outputs -------------------------------------------------------------------

_TABLE_COLUMNS = (
    ("posterior", "posterior", None),
    ("method", "method", None),
    ("status", "status", None),
    ("compile_time", "compile s", ".1f"),
    ("run_time", "run s", ".1f"),
    ("num_grad_evals", "grad evals", ".3g"),
    ("max_abs_mean_error", "mean err", ".3f"),
    ("max_abs_sd_rel_error", "sd rel err", ".3f"),
    ("max_abs_quantile_error", "quantile err", ".3f"),
    ("max_wasserstein", "max W1", ".3f"),
    ("energy_distance", "energy", ".4f"),
    ("khat", "k-hat", ".2f"),
)


def _format_cell(value: Any, spec: str | None) -> str:
    if spec is None:
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec)


def _format_table(records: Sequence[MethodRecord], *, markdown: bool) -> str:
    headers = [header for _, header, _ in _TABLE_COLUMNS]
    rows = [
        [_format_cell(getattr(r, field), spec) for field, _, spec in _TABLE_COLUMNS]
        for r in records
    ]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---" for _ in headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(headers[i]), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    return "\n".join(lines)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _machine_description() -> dict[str, Any]:
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    packages = (
        "numpyro-pma",
        "jax",
        "jaxlib",
        "numpyro",
        "flax",
        "optax",
        "blackjax",
        "arviz",
        "numpy",
    )
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpu_count": usable_cpus,
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "versions": {name: _package_version(name) for name in packages},
    }


def _to_json(value: Any) -> Any:
    """Convert arrays, NumPy scalars and tuples to JSON types; others to str."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        return _to_json(np.asarray(value).tolist())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _results_json(result: BenchmarkResult) -> dict[str, Any]:
    return {
        "command": result.command,
        "machine": result.machine,
        "settings": result.settings,
        "targets": [target._asdict() for target in result.targets],
        "records": [record._asdict() for record in result.records],
    }


_MEASUREMENT_NOTES = """\
How the figures were measured:

- compile s: seconds of JAX tracing, lowering and XLA compilation while the
  method ran (the union of JAX's compile-event time spans); run s: the rest of
  the method's wall time until the draws were on the host.
- grad evals: log-density gradient evaluations, warmup included. For pma this
  is steps x particles (log-density evaluations of the mirror steps, which
  need no gradient) plus the gradients of the whitening fit.
- mean err, sd rel err, quantile err: max over parameters of the absolute
  error of the mean, of sd / reference sd - 1, and of the 5%, 50% and 95%
  quantiles. Mean and quantile errors are in units of the reference standard
  deviation. max W1: max over parameters of the Wasserstein-1 distance of the
  marginals standardized by the reference mean and sd.
- energy: squared energy distance of the jointly standardized draws, on
  subsamples of 2000 draws.
- k-hat: Pareto k-hat of the importance weights of fresh guide draws; for
  blackjax_pathfinder, of the weights it resamples its pooled paths' draws
  with. "-" for MCMC or where it could not be computed.
- All pairs ran one after the other in one process; a later run may reuse
  compilations cached by an earlier one.
"""


def _markdown_report(result: BenchmarkResult) -> str:
    machine = result.machine
    settings = result.settings
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    quick = "yes (few steps and draws: a smoke run, not evidence)"
    if not settings["quick"]:
        quick = "no"
    lines = [
        "# Reference-posterior benchmark",
        "",
        f"Run from {settings['started']} to {settings['finished']} (UTC).",
        "",
        "Command:",
        "",
        "```",
        result.command,
        "```",
        "",
        "Machine:",
        "",
        f"- platform: {machine['platform']} ({machine['processor']})",
        f"- CPUs: {machine['cpu_count']} ({machine['usable_cpu_count']} usable by "
        "this process)",
        f"- Python {machine['python']}; JAX backend {machine['jax_backend']}, "
        f"devices {', '.join(machine['jax_devices'])}, x64 "
        f"{'on' if machine['jax_enable_x64'] else 'off'}",
        f"- versions: {versions}",
        "",
        f"Draws per method: {settings['num_draws']}. Quick mode: {quick}.",
        "",
        "Method options:",
        "",
    ]
    for name, options in settings["method_options"].items():
        lines.append(f"- {name}: `{json.dumps(_to_json(options), sort_keys=True)}`")
    lines += ["", "## Results", "", _format_table(result.records, markdown=True), ""]
    lines.append(_MEASUREMENT_NOTES)

    failed = [r for r in result.records if r.status != "ok"]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            message = " ".join(str(r.error_message).split())
            lines.append(
                f"- {r.posterior} / {r.method} ({r.error_stage}): "
                f"{r.error_type}: {message}"
            )
        lines.append("")

    notes = [
        r for r in result.records if r.status == "ok" and "pareto_k_error" in r.info
    ]
    if notes:
        lines += ["k-hat not computed:", ""]
        lines += [
            f"- {r.posterior} / {r.method}: {r.info['pareto_k_error']}" for r in notes
        ]
        lines.append("")

    lines += ["## Targets", ""]
    if settings["quick"]:
        lines += [
            "This was a quick run: the verdicts below come from a few steps and "
            "draws and say nothing about the methods.",
            "",
        ]
    verdicts = {True: "met", False: "not met", None: "not measured"}
    for target in result.targets:
        lines.append(
            f"- **{target.name}: {verdicts[target.met]}.** {target.criterion}. "
            f"Measured: {target.measured}."
        )
    return "\n".join(lines) + "\n"


def _write_outputs(result: BenchmarkResult) -> None:
    folder = result.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    # NaN and infinity are written as NaN and Infinity, as Python's json does.
    (folder / RESULTS_FILE).write_text(
        json.dumps(_to_json(_results_json(result)), indent=1) + "\n",
        encoding="utf-8",
    )
    (folder / REPORT_FILE).write_text(_markdown_report(result), encoding="utf-8")


# -- command line ----------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-pma benchmark",
        description=(
            "Fit reference posteriors with several inference methods and score "
            "the draws against gold-standard reference draws. Writes "
            f"{RESULTS_FILE} and {REPORT_FILE} into the output folder."
        ),
    )
    parser.add_argument(
        "--posterior",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="posteriors to fit (default: all): " + ", ".join(list_posteriors()),
    )
    parser.add_argument(
        "--method",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="methods to run (default: all): " + ", ".join(METHODS),
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help=f"folder for the outputs, created if missing (default: "
        f"{DEFAULT_OUTPUT_DIR})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="PRNG seed (default: 0)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: few steps per method and {QUICK_NUM_DRAWS} draws",
    )
    return parser


def benchmark_main(argv: Sequence[str] | None = None) -> int:
    """Run ``numpyro-pma benchmark`` with the arguments ``argv``.

    Args:
        argv: Arguments after ``benchmark``; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 once the outputs are written, whether or not some methods failed.
        An unknown posterior or method name exits with status 2 and a message
        listing the valid names, before any fitting.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    for label, given, valid in (
        ("posterior", args.posterior, list_posteriors()),
        ("method", args.method, list(METHODS)),
    ):
        unknown = [name for name in given or () if name not in valid]
        if unknown:
            parser.error(
                f"unknown {label} names {unknown}; valid names: {', '.join(valid)}"
            )

    start = time.perf_counter()
    result = run_benchmark(
        jax.random.key(args.seed),
        args.posterior,
        args.method,
        num_draws=QUICK_NUM_DRAWS if args.quick else DEFAULT_NUM_DRAWS,
        output_dir=args.output_dir,
        quick=args.quick,
    )
    print(result.table())
    print()
    verdicts = {True: "met", False: "not met", None: "not measured"}
    for target in result.targets:
        print(f"{target.name}: {verdicts[target.met]}. {target.measured}")
    print()
    print(
        f"Wrote {result.output_dir / RESULTS_FILE} and "
        f"{result.output_dir / REPORT_FILE} in {time.perf_counter() - start:.0f} s."
    )
    return 0
