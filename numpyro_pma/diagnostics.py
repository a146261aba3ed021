"""Whether a variational fit can be trusted: the PSIS k-hat verdict.

Yao, Vehtari, Simpson and Gelman ("Yes, but did it work?: Evaluating variational
inference", ICML 2018) diagnose a fitted guide ``q`` by the Pareto k-hat of the
importance weights ``w = p(y, z) / q(z)`` of its draws:

- ``k-hat < 0.5``: the weights have finite variance and ``q`` is close to the
  posterior; the fit is good.
- ``0.5 <= k-hat <= 0.7``: ``q`` is a usable approximation, best corrected by
  Pareto smoothed importance sampling (PSIS).
- ``k-hat > 0.7``: ``q`` misses part of the posterior and neither its draws nor
  importance sampling from it can be trusted.

:func:`diagnose` computes the verdict with the ELBO, the log evidence and the
importance effective sample size; :func:`psis_reweighted_summary` computes the
PSIS-corrected posterior means and standard deviations.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from numpyro_pma.importance import (
    ImportanceDraws,
    elbo_estimate,
    importance_ess,
    importance_log_weights,
    log_evidence_estimate,
    psis_log_weights,
)

__all__ = [
    "GOOD_KHAT_THRESHOLD",
    "USABLE_KHAT_THRESHOLD",
    "Diagnosis",
    "ReweightedSummary",
    "diagnose",
    "diagnose_draws",
    "khat_verdict",
    "psis_reweighted_summary",
]

GOOD_KHAT_THRESHOLD = 0.5
"""k-hat below this is "good": the importance weights have finite variance."""

USABLE_KHAT_THRESHOLD = 0.7
"""k-hat above this is "unreliable". Between the two thresholds it is "usable"."""


class Diagnosis(NamedTuple):
    """Importance-sampling diagnosis of a fitted guide.

    Attributes:
        elbo: ELBO estimate, the mean log weight.
        elbo_stderr: Monte Carlo standard error of ``elbo``.
        log_z: Log evidence estimate ``log mean(w)``.
        log_z_stderr: Delta-method standard error of ``log_z``.
        khat: Pareto k-hat of the importance weights.
        ess: Kish effective sample size of the raw importance weights.
        num_samples: Number of guide draws.
        num_nonfinite: Number of non-finite log weights. When it is positive the
            estimates are ``nan`` and the verdict is "unreliable".
        verdict: "good", "usable" or "unreliable".
        message: The verdict explained in plain words.
    """

    elbo: float
    elbo_stderr: float
    log_z: float
    log_z_stderr: float
    khat: float
    ess: float
    num_samples: int
    num_nonfinite: int
    verdict: str
    message: str

    @property
    def kl(self) -> float:
        """Estimate of ``KL(q || p) = log Z - ELBO``."""
        return self.log_z - self.elbo

    def to_table(self) -> str:
        """Format the diagnosis as a plain-text table followed by the message."""
        rows = [
            ("verdict", self.verdict),
            ("Pareto k-hat", f"{self.khat:.3f}"),
            ("ELBO", f"{self.elbo:.4f} ± {self.elbo_stderr:.4f}"),
            ("log Z", f"{self.log_z:.4f} ± {self.log_z_stderr:.4f}"),
            ("KL(q || p) = log Z - ELBO", f"{self.kl:.4f}"),
            ("importance ESS", f"{self.ess:.1f} of {self.num_samples}"),
            ("non-finite log weights", f"{self.num_nonfinite}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join([*lines, "", self.message])

    def __str__(self) -> str:
        return self.to_table()


def khat_verdict(khat: float) -> str:
    """Classify a Pareto k-hat as "good", "usable" or "unreliable".

    Args:
        khat: Pareto k-hat; ``nan`` counts as "unreliable".

    Returns:
        "good" for ``khat < 0.5``, "usable" for ``0.5 <= khat <= 0.7`` and
        "unreliable" otherwise.
    """
    if khat < GOOD_KHAT_THRESHOLD:
        return "good"
    if khat <= USABLE_KHAT_THRESHOLD:
        return "usable"
    return "unreliable"


def _verdict_message(verdict: str, khat: float, ess: float, num_samples: int) -> str:
    ess_text = (
        f"The importance effective sample size is {ess:.0f} of {num_samples} draws."
    )
    if verdict == "good":
        return (
            f"The Pareto k-hat of the importance weights is {khat:.2f}, below "
            f"{GOOD_KHAT_THRESHOLD}. The guide covers the posterior well: its "
            "weights have finite variance, so the ELBO and log Z estimates and "
            "importance-weighted expectations converge at the usual Monte Carlo "
            f"rate. {ess_text}"
        )
    if verdict == "usable":
        return (
            f"The Pareto k-hat of the importance weights is {khat:.2f}, between "
            f"{GOOD_KHAT_THRESHOLD} and {USABLE_KHAT_THRESHOLD}. The guide is a "
            "usable but rough approximation: it is too light in part of the "
            "posterior, so its own means and variances may be off. Prefer the "
            "PSIS-reweighted summaries (psis_reweighted_summary) and check them "
            f"with more draws. {ess_text}"
        )
    return (
        f"The Pareto k-hat of the importance weights is {khat:.2f}, above "
        f"{USABLE_KHAT_THRESHOLD}. The guide misses part of the posterior, "
        "typically a heavy tail, a second mode or a funnel, and a few draws carry "
        "most of the weight. Neither the guide's draws nor importance-sampling "
        "estimates from them (log Z, reweighted means) can be trusted. Fit a more "
        f"flexible guide, train longer, or use MCMC. {ess_text}"
    )


def _nonfinite_message(num_nonfinite: int, num_samples: int) -> str:
    return (
        f"{num_nonfinite} of {num_samples} importance log weights are not finite, "
        "so no estimate was computed and the fit is marked unreliable. A -inf "
        "weight means the guide draws values where the model density is zero "
        "(for example outside a constrained support); nan or +inf means the "
        "model or guide density overflowed. Inspect those draws "
        "(importance_log_weights returns them) before trusting this fit."
    )


def diagnose_draws(draws: ImportanceDraws) -> Diagnosis:
    """Diagnose a guide from draws already weighted by :func:`importance_log_weights`.

    Args:
        draws: Guide draws with their importance log weights.

    Returns:
        The diagnosis. When some log weights are non-finite the estimates are
        ``nan``, the verdict is "unreliable" and the message gives the count.

    Raises:
        TypeError: If ``draws`` is not an :class:`ImportanceDraws`.
    """
    if not isinstance(draws, ImportanceDraws):
        raise TypeError(f"draws must be an ImportanceDraws, got {type(draws).__name__}")
    log_weights = np.asarray(draws.log_weights, dtype=np.float64)
    num_samples = int(log_weights.shape[0])
    num_nonfinite = int(np.sum(~np.isfinite(log_weights)))

    if num_nonfinite:
        nan = float("nan")
        return Diagnosis(
            elbo=nan,
            elbo_stderr=nan,
            log_z=nan,
            log_z_stderr=nan,
            khat=nan,
            ess=nan,
            num_samples=num_samples,
            num_nonfinite=num_nonfinite,
            verdict="unreliable",
            message=_nonfinite_message(num_nonfinite, num_samples),
        )

    elbo, elbo_stderr = elbo_estimate(log_weights)
    log_z, log_z_stderr = log_evidence_estimate(log_weights)
    ess = importance_ess(log_weights)
    _, khat = psis_log_weights(log_weights)
    verdict = khat_verdict(khat)
    return Diagnosis(
        elbo=elbo,
        elbo_stderr=elbo_stderr,
        log_z=log_z,
        log_z_stderr=log_z_stderr,
        khat=khat,
        ess=ess,
        num_samples=num_samples,
        num_nonfinite=0,
        verdict=verdict,
        message=_verdict_message(verdict, khat, ess, num_samples),
    )


def diagnose(
    rng_key: jax.Array,
    model: Callable,
    guide: Callable,
    params: Mapping[str, Any],
    *model_args: Any,
    num_samples: int = 4000,
    chunk_size: int | None = None,
    **model_kwargs: Any,
) -> Diagnosis:
    """Draw from a fitted guide and classify whether it can be trusted.

    Computes the importance log weights ``log p(y, z_s) - log q(z_s)`` of
    ``num_samples`` guide draws (:func:`importance_log_weights`), then the ELBO,
    log Z, the importance ESS and the Pareto k-hat, and classifies the fit by
    k-hat: "good" below 0.5, "usable" up to 0.7, "unreliable" above.

    Args:
        rng_key: PRNG key for the guide draws.
        model: NumPyro model.
        guide: NumPyro guide for ``model``.
        params: Guide parameters in the constrained space (``SVI.get_params``).
        *model_args: Positional arguments of ``model`` and ``guide``.
        num_samples: Number of guide draws. k-hat needs a few hundred at least.
        chunk_size: Number of draws evaluated at once, to bound memory; ``None``
            evaluates all of them together.
        **model_kwargs: Keyword arguments of ``model`` and ``guide``.

    Returns:
        The diagnosis; ``print`` it for a table.
    """
    draws = importance_log_weights(
        rng_key,
        model,
        guide,
        params,
        *model_args,
        num_samples=num_samples,
        chunk_size=chunk_size,
        **model_kwargs,
    )
    return diagnose_draws(draws)


class ReweightedSummary(NamedTuple):
    """Posterior means and standard deviations, raw and PSIS-reweighted.

    Every dict is keyed by site name; each value has the site's shape.

    Attributes:
        mean: PSIS-reweighted posterior mean ``sum_s v_s z_s``.
        sd: PSIS-reweighted posterior standard deviation
            ``sqrt(sum_s v_s (z_s - mean)**2)``.
        guide_mean: Plain mean of the guide draws.
        guide_sd: Plain standard deviation of the guide draws.
        khat: Pareto k-hat of the raw weights; the reweighted values are
            trustworthy only below 0.7.
        ess: Kish effective sample size of the smoothed weights ``v_s``.
    """

    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    guide_mean: dict[str, np.ndarray]
    guide_sd: dict[str, np.ndarray]
    khat: float
    ess: float

    def to_table(self) -> str:
        """Format one row per scalar element of every site."""
        header = ("parameter", "guide mean", "guide sd", "PSIS mean", "PSIS sd")
        rows = []
        for name in self.mean:
            mean = np.asarray(self.mean[name])
            for index in np.ndindex(mean.shape):
                label = name if not index else f"{name}[{','.join(map(str, index))}]"
                values = (
                    self.guide_mean[name][index],
                    self.guide_sd[name][index],
                    self.mean[name][index],
                    self.sd[name][index],
                )
                rows.append((label, *(f"{value:.4g}" for value in values)))
        width = max(len(header[0]), *(len(row[0]) for row in rows))
        lines = [f"{header[0]:<{width}}" + "".join(f"{h:>12}" for h in header[1:])]
        lines += [
            f"{row[0]:<{width}}" + "".join(f"{cell:>12}" for cell in row[1:])
            for row in rows
        ]
        lines.append(f"Pareto k-hat {self.khat:.3f}, PSIS ESS {self.ess:.1f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def psis_reweighted_summary(draws: ImportanceDraws) -> ReweightedSummary:
    """Correct the guide's posterior means and sds by Pareto smoothed weights.

    With ``v_s`` the normalized PSIS-smoothed weights (``arviz.psislw``), the
    estimates are ``mean = sum_s v_s z_s`` and
    ``sd = sqrt(sum_s v_s (z_s - mean)**2)``, element by element, for every
    latent and deterministic site in ``draws.samples``. They improve on the
    guide's own moments when k-hat is below 0.7.

    Args:
        draws: Guide draws from :func:`importance_log_weights`.

    Returns:
        The reweighted and the plain moments of every site.

    Raises:
        TypeError: If ``draws`` is not an :class:`ImportanceDraws`.
        ValueError: If some log weights are non-finite (the message gives the
            count).
    """
    if not isinstance(draws, ImportanceDraws):
        raise TypeError(f"draws must be an ImportanceDraws, got {type(draws).__name__}")
    smoothed_log_weights, khat = psis_log_weights(draws.log_weights)
    weights = np.exp(smoothed_log_weights)
    ess = float(1.0 / np.sum(weights**2))

    mean, sd, guide_mean, guide_sd = {}, {}, {}, {}
    for name, values in draws.samples.items():
        values = np.asarray(values, dtype=np.float64)
        site_weights = weights.reshape((-1,) + (1,) * (values.ndim - 1))
        mean[name] = np.sum(site_weights * values, axis=0)
        sd[name] = np.sqrt(np.sum(site_weights * (values - mean[name]) ** 2, axis=0))
        guide_mean[name] = np.mean(values, axis=0)
        guide_sd[name] = np.std(values, axis=0)
    return ReweightedSummary(
        mean=mean,
        sd=sd,
        guide_mean=guide_mean,
        guide_sd=guide_sd,
        khat=khat,
        ess=ess,
    )
