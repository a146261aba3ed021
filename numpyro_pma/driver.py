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
    "aligned_chunk_size",
    "chunk_bounds",
    "concatenate_traces",
    "run_chunks",
    "scan_steps",
]


class PMAFailure(RuntimeError):
    """Training stopped because steps kept failing.

    Attributes:
        state: The state at the stop. For :class:`~numpyro_pma.PMA` it is a
            :class:`~numpyro_pma.PMAState`, and
            ``state.mirror_state.accepted_params`` contains the last potential
            parameters whose ELBO passed the check.
        trace: The per-step trace up to the stop (a :class:`MirrorInfo` of
            arrays), from the start of the run.
    """

    def __init__(self, message: str, state: Any, trace: MirrorInfo):
        super().__init__(message)
        self.state = state
        self.trace = trace


class TrainingOutcome(NamedTuple):
    """Final state and the per-step trace (arrays of shape ``(num_steps,)``)."""

    state: Any
    trace: MirrorInfo


class _Progress(NamedTuple):
    """The last completed chunk's state with the traces up to it.

    Kept as one value so that an interrupt never separates a state from the
    trace of the steps that produced it.
    """

    state: Any
    traces: tuple


def concatenate_traces(traces: list[MirrorInfo] | tuple) -> MirrorInfo:
    """Join per-chunk traces along the step axis (host NumPy arrays)."""
    if not traces:
        return MirrorInfo(*[np.zeros((0,)) for _ in MirrorInfo._fields])
    return jax.tree.map(lambda *parts: np.concatenate(parts), *traces)


def chunk_bounds(first_step: int, num_steps: int, chunk_size: int) -> list:
    """Split steps ``first_step, ..., first_step + num_steps - 1`` into chunks.

    Chunks end at multiples of ``chunk_size`` in the global step count, so a
    run continued from any chunk boundary scans the same chunks as an
    uninterrupted run and compiles the same executables.

    Returns:
        ``[(start, stop), ...]`` with ``stop - start <= chunk_size``.
    """
    bounds = []
    start, end = first_step, first_step + num_steps
    while start < end:
        stop = min((start // chunk_size + 1) * chunk_size, end)
        bounds.append((start, stop))
        start = stop
    return bounds


def aligned_chunk_size(chunk_size: int, checkpoint_every: int | None) -> int:
    """Return the largest divisor of ``checkpoint_every`` not above ``chunk_size``.

    Checkpoints are written between chunks, so the chunk size must divide the
    checkpoint interval; without checkpoints ``chunk_size`` is returned.
    """
    if checkpoint_every is None:
        return chunk_size
    for size in range(min(chunk_size, checkpoint_every), 0, -1):
        if checkpoint_every % size == 0:
            return size
    return 1


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
    initial_trace: MirrorInfo | None = None,
    checkpoint_fn: Callable[[Any, MirrorInfo], None] | None = None,
    checkpoint_every: int | None = None,
) -> TrainingOutcome:
    """Run ``num_steps`` steps as scanned chunks, with a progress bar.

    Args:
        chunk_fn: Compiled ``(state, step_indices) -> (state, infos)`` that scans
            one step per entry of ``step_indices`` (int array of shape
            ``(n,)``); each step derives its key from its index, so a resumed
            run repeats an uninterrupted one exactly.
        state: Initial state.
        num_steps: Number of steps to take (0 returns at once).
        mirror_state_fn: Extracts the :class:`MirrorState` from ``state``.
        chunk_size: Maximum number of steps per chunk. Chunks end at multiples
            of it in the global step count (see :func:`chunk_bounds`).
        progress_bar: Whether to show a tqdm bar with the latest ELBO.
        max_consecutive_rejections: Stop with :class:`PMAFailure` once this
            many steps in a row were rejected.
        description: Label of the progress bar.
        initial_trace: Trace of the steps before ``state`` (a resumed run);
            the returned trace starts with it.
        checkpoint_fn: Called as ``checkpoint_fn(state, trace)`` after each
            chunk that ends at a multiple of ``checkpoint_every``, at the end,
            and before the run stops on :class:`PMAFailure` or
            ``KeyboardInterrupt``; ``trace`` covers the run from its start.
        checkpoint_every: Steps between checkpoints; must be a multiple of
            ``chunk_size``. ``None`` saves only at the end and on a stop.

    Returns:
        The final state and the trace. A ``KeyboardInterrupt`` ends the run
        early with a warning and returns the steps completed so far.

    Raises:
        PMAFailure: Steps kept failing; carries the state and partial trace.
    """
    if checkpoint_every is not None and checkpoint_every % chunk_size != 0:
        raise ValueError(
            f"checkpoint_every ({checkpoint_every}) must be a multiple of "
            f"chunk_size ({chunk_size}); see aligned_chunk_size"
        )
    first_step = int(mirror_state_fn(state).step)
    previous = () if initial_trace is None else (initial_trace,)
    num_previous = sum(len(trace.elbo) for trace in previous)
    progress = _Progress(state, previous)
    saved_at = None

    def save():
        nonlocal saved_at
        step = int(mirror_state_fn(progress.state).step)
        if checkpoint_fn is not None and saved_at != step:
            checkpoint_fn(progress.state, concatenate_traces(progress.traces))
            saved_at = step

    bar = tqdm(
        total=num_previous + num_steps,
        initial=num_previous,
        desc=description,
        disable=not progress_bar,
    )
    try:
        for start, stop in chunk_bounds(first_step, num_steps, chunk_size):
            new_state, info = chunk_fn(progress.state, jnp.arange(start, stop))
            info = jax.device_get(info)
            new_state = jax.block_until_ready(new_state)
            progress = _Progress(new_state, (*progress.traces, info))
            bar.update(stop - start)
            accepted = info.accepted
            if np.any(accepted):
                last = np.flatnonzero(accepted)[-1]
                bar.set_postfix(
                    elbo=f"{info.elbo[last]:.4g}",
                    stderr=f"{info.elbo_stderr[last]:.2g}",
                    step_size=f"{info.step_size[last]:.3g}",
                )
            rejections = int(mirror_state_fn(progress.state).consecutive_rejections)
            if rejections >= max_consecutive_rejections:
                save()
                raise PMAFailure(
                    f"{rejections} PMA steps in a row were rejected (non-finite "
                    f"residuals or a falling ELBO; the last step saw "
                    f"{int(info.num_nonfinite[-1])} non-finite residuals). The "
                    "error's `state` contains the last good parameters (for PMA, "
                    "`state.mirror_state.accepted_params`) and `trace` the steps "
                    "so far. Try a smaller step_size, or check the model's log "
                    "density for regions where it is not finite.",
                    progress.state,
                    concatenate_traces(progress.traces),
                )
            if checkpoint_every is not None and stop % checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        num_done = sum(len(trace.elbo) for trace in progress.traces)
        warnings.warn(
            f"Interrupted: returning the {num_done} completed steps"
            + (" (checkpoint written)." if checkpoint_fn is not None else "."),
            stacklevel=3,
        )
    finally:
        bar.close()
    save()
    return TrainingOutcome(
        state=progress.state, trace=concatenate_traces(progress.traces)
    )


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
    """Return whether a model argument leaf is traced (an array), not static."""
    return isinstance(value, jax.Array | np.ndarray | jnp.ndarray | np.generic)
