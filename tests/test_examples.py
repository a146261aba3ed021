"""Smoke tests of the scripts in examples/."""

import importlib.util
import math
from pathlib import Path

import arviz as az
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
NONCENTERED = "eight_schools-eight_schools_noncentered"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module; examples/ is not a package."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# About 2 minutes on a shared 2-core machine. The whitening fit and the
# compilation of the mirror steps and of the importance weights take most of it.
@pytest.mark.slow
def test_diagnose_eight_schools_writes_files(tmp_path):
    script = load_example("diagnose_eight_schools")
    results = script.main(
        [
            "--num-steps",
            "20",
            "--num-samples",
            "200",
            "--num-khat-repeats",
            "2",
            "--output-dir",
            str(tmp_path),
            "--posteriors",
            NONCENTERED,
            "--no-progress-bar",
        ]
    )

    assert list(results) == [NONCENTERED]
    result = results[NONCENTERED]
    prefix = "eight_schools_noncentered"
    expected = [f"{prefix}.nc"] + [
        f"{prefix}_{plot}.png"
        for plot in ("marginals", "pair", "elbo", "regret", "khat")
    ]
    assert sorted(path.name for path in result.files) == sorted(expected)
    for name in expected:
        path = tmp_path / name
        assert path.is_file(), name
        assert path.stat().st_size > 1000, name

    reloaded = az.from_netcdf(str(tmp_path / f"{prefix}.nc"))
    assert reloaded.posterior.sizes["draw"] == 200
    assert reloaded.sample_stats["log_weight"].shape == (1, 200)

    # Twenty steps from the whitened start already give a finite fit on this
    # posterior. A nan here means that a stage of the script lost the draws.
    assert math.isfinite(result.diagnosis.khat)
    assert math.isfinite(result.comparison.energy_distance)
    assert result.psis_errors.shape == (10, 4)
    assert len(result.repeat_khats) == 2
    assert math.isfinite(result.pooled_khat)
    assert result.regret.num_steps == 20


def test_correlated_regression_exact_posterior():
    # log Z = log p(y | b) + log p(b) - log p(b | y) at any b, here the mean.
    import numpy as np
    from scipy import stats

    script = load_example("correlated_regression")
    predictors, responses = script.make_data(5, num_rows=30)
    mean, sd, log_z = script.exact_posterior(predictors, responses)
    covariance = np.linalg.inv(predictors.T @ predictors + np.eye(5))
    identity = (
        stats.norm.logpdf(responses, predictors @ mean, 1.0).sum()
        + stats.norm.logpdf(mean).sum()
        - stats.multivariate_normal.logpdf(mean, mean, covariance)
    )
    assert log_z == pytest.approx(identity, abs=1e-9)
    np.testing.assert_allclose(sd, np.sqrt(np.diag(covariance)))
    # Neighbouring columns of the AR(1) predictors correlate at about 0.8.
    correlation = np.corrcoef(predictors.T)[0, 1]
    assert abs(correlation - 0.8) < 0.2
