from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from numpyro_pma.regret import RegretReport, read_trace, regret_report

LOG_Z = -1.0
LOG_Z_STDERR = 0.03


class Trace(NamedTuple):
    step_size: np.ndarray
    elbo: np.ndarray
    elbo_stderr: np.ndarray
    displacement: np.ndarray
    projection_loss: np.ndarray
    accepted: np.ndarray
    num_nonfinite: np.ndarray


def make_trace(**changes):
    fields = {
        "step_size": np.array([0.5, 0.5, 0.25, 0.25, 0.1]),
        "elbo": np.array([-3.0, -2.0, np.nan, -1.5, -1.2]),
        "elbo_stderr": np.array([0.1, 0.1, 0.2, 0.05, 0.05]),
        "displacement": np.array([1.0, 0.5, np.nan, 0.1, 0.01]),
        "projection_loss": np.array([1e-3, 1e-3, np.nan, 1e-4, 1e-5]),
        "accepted": np.array([True, True, False, True, True]),
        "num_nonfinite": np.array([0, 0, 3, 0, 0]),
    }
    fields.update(changes)
    return Trace(**fields)


# Hand-computed values for make_trace() with log Z = -1 and its error 0.03.
# KL_k = log Z - ELBO_k = [2, 1, nan, 0.5, 0.2], and step 2 is rejected.
EXPECTED_KL = np.array([2.0, 1.0, np.nan, 0.5, 0.2])
EXPECTED_WEIGHT = np.array([0.5, 1.0, 1.0, 1.25, 1.35])
EXPECTED_REGRET = np.array([1.0, 1.5, 1.5, 1.625, 1.645])
# sum of eta_j^2 s_j^2 over accepted steps j <= k
EXPECTED_ELBO_VARIANCE = np.array([0.0025, 0.005, 0.005, 0.00515625, 0.00518125])


def test_report_exact_sums():
    report = regret_report(make_trace(), LOG_Z, LOG_Z_STDERR)
    assert isinstance(report, RegretReport)
    np.testing.assert_allclose(report.kl, EXPECTED_KL, rtol=1e-14)
    np.testing.assert_allclose(report.cumulative_step_size, EXPECTED_WEIGHT, rtol=1e-14)
    np.testing.assert_allclose(report.cumulative_regret, EXPECTED_REGRET, rtol=1e-14)
    np.testing.assert_allclose(
        report.average_regret, EXPECTED_REGRET / EXPECTED_WEIGHT, rtol=1e-14
    )
    assert report.cumulative_regret[-1] == pytest.approx(1.645, rel=1e-14)
    assert report.average_regret[-1] == pytest.approx(1.645 / 1.35, rel=1e-14)


def test_report_counts_steps():
    report = regret_report(make_trace(), LOG_Z, LOG_Z_STDERR)
    assert report.num_steps == 5
    assert report.num_accepted == 4
    assert report.num_rejected == 1
    assert int(report.num_nonfinite.sum()) == 3


def test_report_excludes_rejected_steps():
    # A rejected step with a finite, very good ELBO must not change the sums.
    finite = make_trace(elbo=np.array([-3.0, -2.0, 100.0, -1.5, -1.2]))
    report = regret_report(finite, LOG_Z, LOG_Z_STDERR)
    np.testing.assert_allclose(report.cumulative_regret, EXPECTED_REGRET, rtol=1e-14)
    assert report.kl[2] == pytest.approx(-101.0)

    accepted_steps = np.array([0, 1, 3, 4])
    dropped = make_trace(
        **{
            name: value[accepted_steps]
            for name, value in make_trace()._asdict().items()
        }
    )
    without = regret_report(dropped, LOG_Z, LOG_Z_STDERR)
    assert without.cumulative_regret[-1] == pytest.approx(
        report.cumulative_regret[-1], rel=1e-14
    )
    assert without.average_regret_stderr[-1] == pytest.approx(
        report.average_regret_stderr[-1], rel=1e-14
    )


def test_report_error_propagation_exact():
    report = regret_report(make_trace(), LOG_Z, LOG_Z_STDERR)
    elbo_stderr = make_trace().elbo_stderr
    np.testing.assert_allclose(
        report.kl_stderr, np.sqrt(elbo_stderr**2 + LOG_Z_STDERR**2), rtol=1e-14
    )
    expected_regret_stderr = np.sqrt(
        EXPECTED_ELBO_VARIANCE + (EXPECTED_WEIGHT * LOG_Z_STDERR) ** 2
    )
    np.testing.assert_allclose(
        report.cumulative_regret_stderr, expected_regret_stderr, rtol=1e-14
    )
    np.testing.assert_allclose(
        report.average_regret_stderr,
        expected_regret_stderr / EXPECTED_WEIGHT,
        rtol=1e-14,
    )


def test_log_z_error_does_not_average_out():
    num_steps = 1000
    trace = {
        "step_size": np.full(num_steps, 0.1),
        "elbo": np.full(num_steps, -1.5),
        "elbo_stderr": np.zeros(num_steps),
    }
    report = regret_report(trace, LOG_Z, LOG_Z_STDERR)
    np.testing.assert_allclose(report.average_regret_stderr, LOG_Z_STDERR, rtol=1e-12)

    # Without a log Z error, independent ELBO errors shrink like 1 / sqrt(K).
    trace["elbo_stderr"] = np.full(num_steps, 0.2)
    exact = regret_report(trace, LOG_Z)
    expected = 0.2 / np.sqrt(np.arange(1, num_steps + 1))
    np.testing.assert_allclose(exact.average_regret_stderr, expected, rtol=1e-12)


def test_error_propagation_matches_simulation():
    # Simulate the ELBO estimates and log Z with their stated errors. The spread
    # of the resulting average regret must match the reported standard error.
    # With 20000 replicates the sample sd has relative error 1 / sqrt(2 * 20000)
    # = 0.5%, so a 3% tolerance is 6 of those.
    rng = np.random.default_rng(0)
    trace = make_trace()
    num_replicates = 20000
    accepted = trace.accepted
    true_elbo = np.where(accepted, trace.elbo, 0.0)
    noisy_elbo = true_elbo + trace.elbo_stderr * rng.normal(size=(num_replicates, 5))
    noisy_log_z = LOG_Z + LOG_Z_STDERR * rng.normal(size=(num_replicates, 1))
    weights = np.where(accepted, trace.step_size, 0.0)
    averages = ((noisy_log_z - noisy_elbo) * weights).sum(axis=1) / weights.sum()

    report = regret_report(trace, LOG_Z, LOG_Z_STDERR)
    assert np.std(averages) == pytest.approx(report.average_regret_stderr[-1], rel=0.03)


def test_dict_and_jax_trace_match_namedtuple():
    trace = make_trace()
    from_tuple = regret_report(trace, LOG_Z, LOG_Z_STDERR)
    as_jax = {name: jnp.asarray(value) for name, value in trace._asdict().items()}
    from_dict = regret_report(as_jax, LOG_Z, LOG_Z_STDERR)
    np.testing.assert_allclose(
        from_dict.cumulative_regret, from_tuple.cumulative_regret, rtol=1e-6
    )
    assert from_dict.num_rejected == 1


def test_optional_fields_default():
    trace = {
        "step_size": [0.1, 0.2],
        "elbo": [-2.0, -1.5],
        "elbo_stderr": [0.1, 0.1],
    }
    fields = read_trace(trace)
    assert fields["accepted"].tolist() == [True, True]
    assert np.all(np.isnan(fields["displacement"]))
    assert fields["num_nonfinite"].tolist() == [0, 0]
    report = regret_report(trace, LOG_Z)
    assert report.log_z_stderr == 0.0
    assert report.num_rejected == 0


def test_all_rejected_gives_nan_average():
    trace = make_trace(accepted=np.zeros(5, dtype=bool))
    report = regret_report(trace, LOG_Z)
    assert np.all(np.isnan(report.average_regret))
    assert np.all(report.cumulative_regret == 0.0)
    assert "no accepted steps" in report.to_text()


def test_table_and_text():
    num_steps = 100
    trace = {
        "step_size": np.full(num_steps, 0.5),
        "elbo": -1.0 - np.exp(-np.arange(num_steps) / 10.0),
        "elbo_stderr": np.full(num_steps, 0.01),
        "accepted": np.arange(num_steps) % 7 != 3,
    }
    report = regret_report(trace, LOG_Z, LOG_Z_STDERR, max_table_rows=10)
    assert isinstance(report.table, pd.DataFrame)
    assert len(report.table) == 10
    assert report.table.index[0] == 0
    assert report.table.index[-1] == num_steps - 1
    for column in ["step_size", "kl", "kl_stderr", "average_regret", "displacement"]:
        assert column in report.table.columns
    text = str(report)
    assert "86 accepted, 14 rejected" in text
    assert "does not average out" in text


@pytest.mark.parametrize(
    ("changes", "log_z", "log_z_stderr", "match"),
    [
        ({"step_size": np.array([0.5, -0.5, 0.25, 0.25, 0.1])}, LOG_Z, None, "step"),
        ({"elbo": np.zeros(4)}, LOG_Z, None, "shape"),
        ({}, np.nan, None, "log_z"),
        ({}, LOG_Z, -0.1, "log_z_stderr"),
    ],
)
def test_invalid_inputs_raise(changes, log_z, log_z_stderr, match):
    with pytest.raises(ValueError, match=match):
        regret_report(make_trace(**changes), log_z, log_z_stderr)


def test_missing_field_raises():
    with pytest.raises(ValueError, match="elbo_stderr"):
        regret_report({"step_size": [0.1], "elbo": [-1.0]}, LOG_Z)
