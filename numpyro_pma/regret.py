"""Regret of a run of mirror steps, from its recorded trace.

Step ``k`` of a run has the online loss ``KL_k = KL(q_k || pi) = log Z - ELBO_k``.
The comparator is the target ``pi`` itself (loss 0), so the weighted regret after
``K`` steps is ``R_K = sum_k eta_k KL_k``, and the run is no-regret when the
average regret ``R_K / sum_k eta_k`` goes to 0. Because KL is convex, the
mixture of the iterates weighted by ``eta_k`` has a KL at most this average.

This module reports only measured quantities and their Monte Carlo standard
errors; it computes no theoretical bound.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = ["RegretReport", "read_trace", "regret_report"]

_REQUIRED_FIELDS = ("step_size", "elbo", "elbo_stderr")


class RegretReport(NamedTuple):
    """Per-step KL estimates and the weighted regret of a run.

    Arrays have shape ``(num_steps,)``. Cumulative quantities at step ``k``
    include the accepted steps ``0..k`` only. Rejected steps keep their own
    ``kl`` entry (NaN where their ELBO was not finite) but add nothing to the
    sums.

    Attributes:
        log_z: Log normalizing constant ``log Z`` used for ``KL_k``.
        log_z_stderr: Standard error of ``log_z`` (0 for an exact value).
        step_size: Step sizes ``eta_k``.
        accepted: Whether step ``k`` was accepted.
        elbo: ELBO estimates ``ELBO_k``.
        elbo_stderr: Monte Carlo standard errors of ``elbo``.
        kl: ``KL_k = log_z - ELBO_k``.
        kl_stderr: ``sqrt(elbo_stderr_k^2 + log_z_stderr^2)``.
        cumulative_step_size: ``W_k = sum_{j <= k, accepted} eta_j``.
        cumulative_regret: ``R_k = sum_{j <= k, accepted} eta_j KL_j``.
        cumulative_regret_stderr: ``sqrt(sum_{j <= k, accepted} eta_j^2
            elbo_stderr_j^2 + W_k^2 log_z_stderr^2)``.
        average_regret: ``R_k / W_k`` (NaN while ``W_k = 0``).
        average_regret_stderr: ``cumulative_regret_stderr / W_k``.
        displacement: Transport displacement ``E |T_{k+1}(x) - T_k(x)|^2``
            (NaN when the trace has none).
        projection_loss: Final regression loss of the projection (NaN when the
            trace has none).
        num_nonfinite: Number of non-finite values met at step ``k``.
        num_steps: Number of steps in the trace.
        num_accepted: Number of accepted steps.
        num_rejected: Number of rejected steps.
        table: Up to ``max_table_rows`` evenly spaced steps (first and last
            included) of the per-step quantities, for display.
    """

    log_z: float
    log_z_stderr: float
    step_size: np.ndarray
    accepted: np.ndarray
    elbo: np.ndarray
    elbo_stderr: np.ndarray
    kl: np.ndarray
    kl_stderr: np.ndarray
    cumulative_step_size: np.ndarray
    cumulative_regret: np.ndarray
    cumulative_regret_stderr: np.ndarray
    average_regret: np.ndarray
    average_regret_stderr: np.ndarray
    displacement: np.ndarray
    projection_loss: np.ndarray
    num_nonfinite: np.ndarray
    num_steps: int
    num_accepted: int
    num_rejected: int
    table: pd.DataFrame

    def to_text(self) -> str:
        """Format the final regret, the last accepted KL and the table as text."""
        lines = [
            f"{self.num_steps} steps: {self.num_accepted} accepted, "
            f"{self.num_rejected} rejected, "
            f"{int(self.num_nonfinite.sum())} non-finite values",
            f"log Z = {self.log_z:.6g} +- {self.log_z_stderr:.3g}",
        ]
        if self.num_accepted > 0:
            last = int(np.flatnonzero(self.accepted)[-1])
            lines += [
                f"KL at the last accepted step ({last}): "
                f"{self.kl[last]:.4g} +- {self.kl_stderr[last]:.2g}",
                f"weighted regret R_K = sum eta_k KL_k: "
                f"{self.cumulative_regret[-1]:.4g} "
                f"+- {self.cumulative_regret_stderr[-1]:.2g} "
                f"(sum eta_k = {self.cumulative_step_size[-1]:.4g})",
                f"average regret R_K / sum eta_k: {self.average_regret[-1]:.4g} "
                f"+- {self.average_regret_stderr[-1]:.2g}",
            ]
        else:
            lines.append("no accepted steps, so the regret is undefined")
        if self.log_z_stderr > 0.0:
            lines.append(
                f"(+- {self.log_z_stderr:.2g} of every error is the log Z error, "
                "which is shared by all steps and does not average out)"
            )
        lines += ["", self.table.to_string(float_format=lambda v: f"{v:.4g}")]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def regret_report(
    trace: Any,
    log_z: float,
    log_z_stderr: float | None = None,
    *,
    max_table_rows: int = 20,
) -> RegretReport:
    """Compute per-step KL estimates and the weighted regret of a run.

    With ``eta_k`` the step sizes, ``a_k`` the accepted flags and ``s_k`` the
    ELBO standard errors, ``KL_k = log_z - ELBO_k`` and, summing over accepted
    steps ``j <= k``,

    ``W_k = sum a_j eta_j``, ``R_k = sum a_j eta_j KL_j``, and
    ``Var(R_k) = sum a_j eta_j^2 s_j^2 + W_k^2 log_z_stderr^2``.

    The per-step ELBO errors are taken as independent, so their contribution to
    the standard error of the average regret ``R_k / W_k`` shrinks as steps
    accumulate. The error of ``log_z`` enters every ``KL_k`` with the same sign,
    so it does not average out: the standard error of the average regret never
    falls below ``log_z_stderr``.

    Args:
        trace: The run's trace: an object with attributes (or a dict with keys)
            ``step_size``, ``elbo`` and ``elbo_stderr``, and optionally
            ``accepted`` (all steps accepted if absent), ``displacement``,
            ``projection_loss`` and ``num_nonfinite``, each of shape
            ``(num_steps,)``.
        log_z: Log normalizing constant of the target, exact or estimated.
        log_z_stderr: Standard error of ``log_z``; ``None`` means exact (0).
        max_table_rows: Maximum number of rows of ``table``.

    Returns:
        The :class:`RegretReport`.

    Raises:
        ValueError: If a field is missing, the fields differ in shape, a step
            size is negative or not finite, or ``log_z`` or ``log_z_stderr`` is
            invalid.
    """
    log_z = float(log_z)
    if not np.isfinite(log_z):
        raise ValueError(f"log_z must be finite, got {log_z}.")
    log_z_stderr = 0.0 if log_z_stderr is None else float(log_z_stderr)
    if not (np.isfinite(log_z_stderr) and log_z_stderr >= 0.0):
        raise ValueError(f"log_z_stderr must be finite and >= 0, got {log_z_stderr}.")
    if max_table_rows < 2:
        raise ValueError(f"max_table_rows must be at least 2, got {max_table_rows}.")
    fields = read_trace(trace)
    step_size = fields["step_size"]
    accepted = fields["accepted"]
    invalid = np.flatnonzero(~(np.isfinite(step_size) & (step_size >= 0.0)))
    if invalid.size > 0:
        raise ValueError(
            "trace.step_size must be finite and >= 0 at every step, got "
            f"{step_size[invalid[:5]]} at steps {invalid[:5]}."
        )

    elbo = fields["elbo"]
    elbo_stderr = fields["elbo_stderr"]
    kl = log_z - elbo
    kl_stderr = np.sqrt(elbo_stderr**2 + log_z_stderr**2)

    # np.where rather than a product with the mask, so that a NaN ELBO of a
    # rejected step does not reach the sums.
    weight = np.where(accepted, step_size, 0.0)
    cumulative_step_size = np.cumsum(weight)
    cumulative_regret = np.cumsum(np.where(accepted, step_size * kl, 0.0))
    elbo_variance = np.cumsum(np.where(accepted, (step_size * elbo_stderr) ** 2, 0.0))
    cumulative_regret_stderr = np.sqrt(
        elbo_variance + (cumulative_step_size * log_z_stderr) ** 2
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = cumulative_step_size > 0.0
        average_regret = np.where(
            positive, cumulative_regret / cumulative_step_size, np.nan
        )
        average_regret_stderr = np.where(
            positive, cumulative_regret_stderr / cumulative_step_size, np.nan
        )

    num_steps = step_size.shape[0]
    num_accepted = int(accepted.sum())
    per_step = {
        "step_size": step_size,
        "accepted": accepted,
        "elbo": elbo,
        "elbo_stderr": elbo_stderr,
        "kl": kl,
        "kl_stderr": kl_stderr,
        "average_regret": average_regret,
        "average_regret_stderr": average_regret_stderr,
        "displacement": fields["displacement"],
        "projection_loss": fields["projection_loss"],
        "num_nonfinite": fields["num_nonfinite"],
    }
    rows = np.unique(np.linspace(0, num_steps - 1, max_table_rows).round().astype(int))
    table = pd.DataFrame(
        {name: values[rows] for name, values in per_step.items()},
        index=pd.Index(rows, name="step"),
    )
    return RegretReport(
        log_z=log_z,
        log_z_stderr=log_z_stderr,
        step_size=step_size,
        accepted=accepted,
        elbo=elbo,
        elbo_stderr=elbo_stderr,
        kl=kl,
        kl_stderr=kl_stderr,
        cumulative_step_size=cumulative_step_size,
        cumulative_regret=cumulative_regret,
        cumulative_regret_stderr=cumulative_regret_stderr,
        average_regret=average_regret,
        average_regret_stderr=average_regret_stderr,
        displacement=fields["displacement"],
        projection_loss=fields["projection_loss"],
        num_nonfinite=fields["num_nonfinite"],
        num_steps=num_steps,
        num_accepted=num_accepted,
        num_rejected=num_steps - num_accepted,
        table=table,
    )


def read_trace(trace: Any) -> dict[str, np.ndarray]:
    """Read the fields of a trace as 1-d NumPy arrays of one common length.

    Args:
        trace: An object with attributes (or a dict with keys) ``step_size``,
            ``elbo``, ``elbo_stderr`` and optionally ``accepted``,
            ``displacement``, ``projection_loss`` and ``num_nonfinite``.

    Returns:
        A dict with all seven fields, each of shape ``(num_steps,)``; absent
        optional fields are filled with True, NaN, NaN and 0.

    Raises:
        ValueError: If a required field is missing or the shapes differ.
    """

    def get(name: str) -> Any:
        if isinstance(trace, Mapping):
            return trace.get(name)
        return getattr(trace, name, None)

    missing = [name for name in _REQUIRED_FIELDS if get(name) is None]
    if missing:
        raise ValueError(
            f"trace of type {type(trace).__name__} is missing the fields {missing}. "
            f"The required fields are {list(_REQUIRED_FIELDS)}."
        )
    fields = {name: np.asarray(get(name), dtype=float) for name in _REQUIRED_FIELDS}
    num_steps = fields["step_size"].shape[0] if fields["step_size"].ndim == 1 else 0
    if num_steps == 0:
        raise ValueError(
            "trace.step_size must have shape (num_steps,) with num_steps >= 1, got "
            f"shape {fields['step_size'].shape}."
        )

    optional = {
        "accepted": (bool, True),
        "displacement": (float, np.nan),
        "projection_loss": (float, np.nan),
        "num_nonfinite": (int, 0),
    }
    for name, (dtype, default) in optional.items():
        value = get(name)
        if value is None:
            fields[name] = np.full(num_steps, default, dtype=dtype)
        else:
            fields[name] = np.asarray(value).astype(dtype)

    wrong_shape = {
        name: value.shape
        for name, value in fields.items()
        if value.shape != (num_steps,)
    }
    if wrong_shape:
        raise ValueError(
            f"trace fields must all have shape ({num_steps},) like step_size, got "
            f"{wrong_shape}."
        )
    return fields
