"""Generative modelling: fit a Brenier map to a distribution known by samples.

:func:`fit_samples` whitens the samples, then runs PMA mirror steps whose
residual ``log q_k - log pi`` is estimated from the samples, by a classifier
(:mod:`~numpyro_pma.generative.ratio`) or through the score ``grad log pi``
(:mod:`~numpyro_pma.generative.score`). The fitted
:class:`BrenierGenerativeModel` draws fresh samples and evaluates its density;
:func:`compare_held_out` measures it on held-out data.
"""

from numpyro_pma.generative.algorithm import (
    RATIO_ESTIMATORS,
    GenerativeAlgorithm,
    GenerativeInfo,
    GenerativeState,
    generative_mirror_descent,
)
from numpyro_pma.generative.evaluation import HeldOutComparison, compare_held_out
from numpyro_pma.generative.model import (
    BrenierGenerativeModel,
    GenerativeFit,
    fit_samples,
)
from numpyro_pma.generative.projections import (
    clipped_scale_tril,
    fit_linear_map,
    fit_quadratic_clipped,
    network_only,
    project_map,
    project_values,
)
from numpyro_pma.generative.ratio import LogRatioFit, RatioClassifier, fit_log_ratio
from numpyro_pma.generative.score import ScoreFit, ScoreNetwork, fit_score

__all__ = [
    "RATIO_ESTIMATORS",
    "BrenierGenerativeModel",
    "GenerativeAlgorithm",
    "GenerativeFit",
    "GenerativeInfo",
    "GenerativeState",
    "HeldOutComparison",
    "LogRatioFit",
    "RatioClassifier",
    "ScoreFit",
    "ScoreNetwork",
    "clipped_scale_tril",
    "compare_held_out",
    "fit_linear_map",
    "fit_log_ratio",
    "fit_quadratic_clipped",
    "fit_samples",
    "fit_score",
    "generative_mirror_descent",
    "network_only",
    "project_map",
    "project_values",
]
