"""numpyro-pma: Brenier-map guides for NumPyro, trained by PMA mirror steps.

The guide :class:`AutoBrenier` represents the posterior as the push-forward of
a standard Gaussian by the gradient of a convex potential; :class:`PMA` fits it
by mirror steps of the parabolic Monge-Ampère flow; :func:`diagnose`,
:func:`to_inference_data` and :func:`compare` say whether to trust the fit.
"""

from numpyro_pma.compare import Comparison, compare
from numpyro_pma.diagnostics import Diagnosis, diagnose, psis_reweighted_summary
from numpyro_pma.driver import PMAFailure
from numpyro_pma.flat_model import FlatModel, flatten_model
from numpyro_pma.guide import AutoBrenier
from numpyro_pma.importance import ImportanceDraws, importance_log_weights
from numpyro_pma.inference_data import to_inference_data
from numpyro_pma.mirror import MirrorInfo, MirrorState, mirror_descent
from numpyro_pma.potential import BrenierPotential, InputConvexNetwork
from numpyro_pma.regret import RegretReport, regret_report
from numpyro_pma.trainer import PMA, PMARunResult, PMAState, RunTiming
from numpyro_pma.transform import BrenierTransform
from numpyro_pma.whitening import fit_diagonal_gaussian

__version__ = "0.1.0"

__all__ = [
    "PMA",
    "AutoBrenier",
    "BrenierPotential",
    "BrenierTransform",
    "Comparison",
    "Diagnosis",
    "FlatModel",
    "ImportanceDraws",
    "InputConvexNetwork",
    "MirrorInfo",
    "MirrorState",
    "PMAFailure",
    "PMARunResult",
    "PMAState",
    "RegretReport",
    "RunTiming",
    "compare",
    "diagnose",
    "fit_diagonal_gaussian",
    "flatten_model",
    "importance_log_weights",
    "mirror_descent",
    "psis_reweighted_summary",
    "regret_report",
    "to_inference_data",
]
