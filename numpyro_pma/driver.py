"""The compiled training loop shared by every PMA entry point.

Steps run inside ``jax.lax.scan`` over chunks of ``chunk_size`` steps, so the
host sees one call per chunk; the progress bar and the failure check run
between chunks. The chunk function is compiled once per chunk length, so
repeated runs with the same shapes do not recompile.
"""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from numpyro_pma.mirror import MirrorInfo, MirrorState

__all__ = [
    "PMAFailure",
    "TrainingOutcome",
    "concatenate_traces",
    "run_chunks",
    "scan_steps",
]


class PMAFailure(RuntimeError):
    """Training stopped because steps kept failing.

    Attributes:
        state: The state at the stop; ``state.accepted_params`` holds the last
            parameters whose ELBO passed the check.
        trace: The per-step trace up to the stop (a :class:`MirrorInfo` of
            arrays).
    """

    def __init__(self, message: str, state: Any, trace: MirrorInfo):
        super().__init__(message)
        self.state = state
        self.trace = trace


class TrainingOutcome(NamedTuple):
    """Final state and the per-step trace (arrays of shape ``(num_steps,)``)."""

    state: Any
    trace: MirrorInfo


def concatenate_traces(traces: list[MirrorInfo]) -> MirrorInfo:
    """Join per-chunk traces along the step axis (host NumPy arrays)."""
    if not traces:
        return MirrorInfo(*[np.zeros((0,)) for _ in MirrorInfo._fields])
    return jax.tree.map(lambda *parts: np.concatenate(parts), *traces)


def run_chunks(
    chunk_fn: Callable[[Any, jax.Array], tuple[Any, MirrorInfo]],
    state: Any,
    num_steps: int,
    *,
    mirror_state_fn: Callable[[Any], MirrorState] = lambda state: state,
    chunk_size: int = 100,
    progress_bar: bool = True,
    max_consecutive_rejections: int = 25,
    description: str = "PMA",
) -> TrainingOutcome:
    """Run ``num_steps`` steps as scanned chunks, with a progress bar.

    Args:
        chunk_fn: Compiled ``(state, step_indices) -> (state, infos)`` that scans
            one step per entry of ``step_indices`` (int array of shape
            ``(n,)``); each step derives its key from its index, so a resumed
            run repeats an uninterrupted one exactly.
        state: Initial state.
        num_steps: Number of steps.
        mirror_state_fn: Extracts the :class:`MirrorState` from ``state``.
        chunk_size: Steps per compiled call.
        progress_bar: Whether to show a tqdm bar with the latest ELBO.
        max_consecutive_rejections: Stop with :class:`PMAFailure` once this
            many steps in a row were rejected.
        description: Label of the progress bar.

    Returns:
        The final state and the trace. A ``KeyboardInterrupt`` ends the run
        early with a warning and returns the steps completed so far.

    Raises:
        PMAFailure: Steps kept failing; carries the state and partial trace.
    """
    first_step = int(mirror_state_fn(state).step)
    traces = []
    bar = tqdm(total=num_steps, desc=description, disable=not progress_bar)
    try:
        for start in range(0, num_steps, chunk_size):
            stop = min(start + chunk_size, num_steps)
            indices = jnp.arange(first_step + start, first_step + stop)
            state, info = chunk_fn(state, indices)
            info = jax.device_get(info)
            traces.append(info)
            bar.update(stop - start)
            accepted = info.accepted
            if np.any(accepted):
                last = np.flatnonzero(accepted)[-1]
                bar.set_postfix(
                    elbo=f"{info.elbo[last]:.4g}",
                    stderr=f"{info.elbo_stderr[last]:.2g}",
                    step_size=f"{info.step_size[last]:.3g}",
                )
            rejections = int(mirror_state_fn(state).consecutive_rejections)
            if rejections >= max_consecutive_rejections:
                trace = concatenate_traces(traces)
                raise PMAFailure(
                    f"{rejections} PMA steps in a row were rejected (non-finite "
                    f"residuals or a falling ELBO; the last step saw "
                    f"{int(info.num_nonfinite[-1])} non-finite residuals). The "
                    "error's `state.accepted_params` holds the last good "
                    "parameters and `trace` the steps so far. Try a smaller "
                    "step_size, or check the model's log density for regions "
                    "where it is not finite.",
                    state,
                    trace,
                )
    except KeyboardInterrupt:
        warnings.warn(
            f"Interrupted: returning the {sum(len(t.elbo) for t in traces)} "
            "completed steps.",
            stacklevel=3,
        )
    finally:
        bar.close()
    return TrainingOutcome(state=state, trace=concatenate_traces(traces))


def scan_steps(step_fn: Callable, rng_key: jax.Array) -> Callable:
    """Turn ``step_fn(rng_key, state) -> (state, info)`` into a scanned chunk.

    Step ``k`` uses the key ``fold_in(rng_key, k)``.
    """

    def chunk(state, step_indices):
        def body(carry, index):
            return step_fn(jax.random.fold_in(rng_key, index), carry)

        return jax.lax.scan(body, state, step_indices)

    return chunk


def is_array(value: Any) -> bool:
    """Whether a model argument leaf is traced (an array) rather than static."""
    return isinstance(value, jax.Array | np.ndarray | jnp.ndarray | np.generic)
