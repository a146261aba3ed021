import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_pma.baselines import MethodResult
from numpyro_pma.benchmark import (
    METHODS,
    REPORT_FILE,
    RESULTS_FILE,
    Method,
    MethodRecord,
    benchmark_main,
    check_targets,
    run_benchmark,
    time_to_reach,
)
from numpyro_pma.posteriors import Posterior

MEAN = np.array([1.0, -2.0])
SD = np.array([0.5, 3.0])
NUM_REFERENCE = 10000
NUM_DRAWS = 1000
COMMAND = "numpyro-pma benchmark --test-run"


def gaussian_model():
    numpyro.sample("x", dist.Normal(MEAN, SD).to_event(1))


def gaussian_posterior() -> Posterior:
    """A posterior N(MEAN, diag(SD^2)) whose reference draws are exact iid draws."""
    draws = MEAN + SD * np.random.default_rng(0).standard_normal((NUM_REFERENCE, 2))
    return Posterior(
        name="gaussian",
        model=gaussian_model,
        model_kwargs={},
        dimension=2,
        reference_keys=["x[1]", "x[2]"],
        reference_draws=draws,
        reference_chains=draws.reshape(10, -1, 2),
        to_reference=lambda samples: np.asarray(samples["x"], dtype=np.float64),
        from_reference=lambda values: {"x": jnp.asarray(values)},
    )


def shifted_runner(rng_key, model, model_args, model_kwargs, *, num_samples):
    """Exact draws of the posterior moved by +1 sd in every coordinate."""
    noise = jax.random.normal(rng_key, (num_samples, 2))
    samples = {"x": MEAN + SD * (noise + 1.0)}
    return MethodResult(samples, 0.5, 1.5, 7, {"pareto_k": 0.25})


def failing_runner(rng_key, model, model_args, model_kwargs, *, num_samples):
    raise RuntimeError("deliberate failure")


TEST_METHODS = {
    "shifted": Method(shifted_runner, "guide"),
    "failing": Method(failing_runner, "guide"),
    "numpyro_nuts": METHODS["numpyro_nuts"],
}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmark")
    result = run_benchmark(
        jax.random.key(0),
        [gaussian_posterior()],
        TEST_METHODS,
        num_draws=NUM_DRAWS,
        output_dir=output_dir,
        progress_bar=False,
        method_options={"numpyro_nuts": {"num_warmup": 300, "num_chains": 2}},
        command=COMMAND,
    )
    return result


def record_of(result, method):
    (record,) = [r for r in result.records if r.method == method]
    return record


def test_records_every_pair_in_order(benchmark):
    assert [r.method for r in benchmark.records] == list(TEST_METHODS)
    assert {r.posterior for r in benchmark.records} == {"gaussian"}


def test_nuts_on_gaussian_is_accurate(benchmark):
    record = record_of(benchmark, "numpyro_nuts")
    assert record.status == "ok"
    assert record.num_draws == NUM_DRAWS
    assert record.num_grad_evals > 0
    assert record.compile_time > 0
    assert record.run_time > 0
    assert math.isnan(record.khat)
    # NUTS on independent Gaussian coordinates gives an ESS of at least half of
    # the 1000 draws, so a mean error has sd <= sqrt(1/500 + 1/10000) = 0.046
    # sd and an sd ratio error about 1/sqrt(2 * 500) = 0.032; 0.25 is more than
    # 5 of these standard errors. The max over the 5%, 50% and 95% quantiles
    # has sd of about 0.07 (the 5% quantile's), so 0.4 is over 5 of them.
    assert record.max_abs_mean_error < 0.25
    assert record.max_abs_sd_rel_error < 0.25
    assert record.max_abs_quantile_error < 0.4
    assert record.max_wasserstein < 0.25
    # For equal laws the energy-distance estimate has mean 0 and a standard
    # error of order 1/num_draws = 0.001 here; a 1-sd shift gives about 0.8.
    assert record.energy_distance < 0.05


def test_shifted_method_is_flagged(benchmark):
    record = record_of(benchmark, "shifted")
    assert record.status == "ok"
    mean_errors = np.array(list(record.parameters["mean_error"].values()))
    # Exact draws shifted by 1 sd: each mean error is 1 with a standard error
    # of sqrt(1/1000 + 1/10000) = 0.033, so 0.15 is 4.5 standard errors.
    np.testing.assert_allclose(mean_errors, 1.0, atol=0.15)
    assert abs(record.max_abs_mean_error - 1.0) < 0.15
    assert abs(record.max_wasserstein - 1.0) < 0.15
    assert record.max_abs_sd_rel_error < 0.15
    # The shift of norm sqrt(2) in standardized units has energy distance 0.83
    # for standard normal laws.
    assert record.energy_distance > 0.5


def test_runner_figures_are_copied(benchmark):
    record = record_of(benchmark, "shifted")
    assert record.compile_time == 0.5
    assert record.run_time == 1.5
    assert record.fit_time == 2.0
    assert record.num_grad_evals == 7
    assert record.khat == 0.25


def test_failure_is_recorded(benchmark):
    record = record_of(benchmark, "failing")
    assert record.status == "failed"
    assert record.error_stage == "fit"
    assert record.error_type == "RuntimeError"
    assert record.error_message == "deliberate failure"
    assert "failing_runner" in record.traceback
    assert math.isnan(record.energy_distance)


def test_results_json_holds_every_record(benchmark):
    data = json.loads((benchmark.output_dir / RESULTS_FILE).read_text())
    assert data["command"] == COMMAND
    assert [r["method"] for r in data["records"]] == list(TEST_METHODS)
    nuts = data["records"][2]
    assert (
        nuts["max_abs_mean_error"]
        == record_of(benchmark, "numpyro_nuts").max_abs_mean_error
    )
    assert set(nuts["parameters"]["mean_error"]) == {"x[1]", "x[2]"}
    assert data["machine"]["jax_backend"] == jax.default_backend()
    assert data["settings"]["method_options"]["numpyro_nuts"]["num_samples"] == 500
    assert len(data["targets"]) == 4


def test_report_states_machine_command_and_failures(benchmark):
    report = (benchmark.output_dir / REPORT_FILE).read_text()
    assert COMMAND in report
    assert f"CPUs: {os.cpu_count()}" in report
    assert f"JAX backend {jax.default_backend()}" in report
    assert "| gaussian | numpyro_nuts | ok |" in report
    assert "gaussian / failing (fit): RuntimeError: deliberate failure" in report
    assert "## Targets" in report


def spy_method(calls):
    def runner(rng_key, model, model_args, model_kwargs, *, num_samples):
        calls.append(num_samples)
        return shifted_runner(rng_key, model, model_args, model_kwargs, num_samples=1)

    return Method(runner, "guide")


def test_unknown_names_rejected_before_fitting(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(METHODS, "spy", spy_method(calls))
    with pytest.raises(ValueError, match="unknown method names.*valid names: pma"):
        run_benchmark(
            jax.random.key(0), [gaussian_posterior()], ["spy", "nuts"], output_dir=None
        )
    with pytest.raises(ValueError, match="unknown posterior.*arK-arK"):
        run_benchmark(jax.random.key(0), ["arK"], ["spy"], output_dir=None)
    with pytest.raises(ValueError, match="bogus"):
        run_benchmark(
            jax.random.key(0),
            [gaussian_posterior()],
            ["spy"],
            output_dir=None,
            method_options={"spy": {"bogus": 1}},
        )
    assert calls == []
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark_main(["--posterior", "arK", "--method", "pma"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "unknown posterior names ['arK']" in error
    assert "eight_schools-eight_schools_noncentered" in error

    with pytest.raises(SystemExit):
        benchmark_main(["--method", "pma", "nuts"])
    assert "unknown method names ['nuts']; valid names: pma," in capsys.readouterr().err


def test_cli_quick_run_writes_outputs(tmp_path, capsys):
    output_dir = tmp_path / "out"
    status = benchmark_main(
        [
            "--posterior",
            "eight_schools-eight_schools_noncentered",
            "--method",
            "numpyro_nuts",
            "--quick",
            "--output-dir",
            str(output_dir),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "eight_schools-eight_schools_noncentered  numpyro_nuts" in printed
    data = json.loads((output_dir / RESULTS_FILE).read_text())
    (record,) = data["records"]
    assert record["status"] == "ok"
    assert record["num_draws"] == 500
    # Quick NUTS still recovers eight schools to within half a posterior sd.
    assert record["max_abs_mean_error"] < 0.5
    assert "Quick mode: yes" in (output_dir / REPORT_FILE).read_text()


def test_time_to_reach_uses_moving_average():
    times = np.arange(1.0, 41.0)
    elbo = np.full(40, -10.0)
    elbo[20:] = 0.0
    # Window of 40 // 20 = 2 steps: the average first reaches 0 at index 21.
    assert time_to_reach(times, elbo, 0.0) == 22.0
    assert time_to_reach(times, elbo, -5.0) == 21.0
    assert time_to_reach(times, elbo, 1.0) == math.inf


def make_record(posterior, method, status="ok", **fields):
    values = {name: math.nan for name in MethodRecord._fields}
    values.update(
        posterior=posterior,
        method=method,
        kind="mcmc" if "nuts" in method else "guide",
        status=status,
        num_draws=100,
        parameters={},
        info={},
    )
    values.update(fields)
    return MethodRecord(**values)


def test_check_targets_counts():
    records = []
    for i in range(5):
        name = f"p{i}"
        # pma beats the best autoguide on p0..p3 and loses on p4.
        records += [
            make_record(
                name,
                "pma",
                energy_distance=0.1 if i < 4 else 0.5,
                max_abs_mean_error=0.05 if i < 2 else 0.2,
                khat=0.5 if i < 4 else 0.9,
                fit_time=10.0,
                run_time=8.0,
            ),
            make_record(
                name, "autoguide_mvn", energy_distance=0.3, max_abs_mean_error=0.1
            ),
            make_record(name, "autoguide_iaf", energy_distance=0.2),
            make_record(name, "numpyro_nuts", fit_time=20.0, run_time=15.0),
        ]

    accuracy, khat, fit_time, elbo_speed = check_targets(records)

    assert accuracy.met is True
    assert "4 of 5 (80%)" in accuracy.measured
    assert "missed on: p4." in accuracy.measured
    # autoguide_iaf's NaN mean error is left out of the minimum.
    assert "By max mean error instead: 2 of 5 (40%)" in accuracy.measured

    assert khat.met is False
    assert "4 of 5 (80%)" in khat.measured
    assert fit_time.met is True
    assert "pma 10.0 s, numpyro_nuts 20.0 s" in fit_time.measured
    assert elbo_speed.met is None


def test_check_targets_elbo_speed():
    steps = np.arange(1.0, 101.0)
    pma_info = {"elbo_times": steps, "elbo": np.where(steps >= 30, 0.0, -5.0)}
    elbo_info = {"elbo_times": steps, "elbo": np.zeros(100), "final_elbo": 0.0}
    records = [
        make_record("p", "pma", info=pma_info),
        make_record("p", "brenier_elbo", info=elbo_info),
    ]
    *_, elbo_speed = check_targets(records)
    # The 5-step moving average of pma reaches 0 at step 34 of brenier's 100.
    assert elbo_speed.met is True
    assert "median ratio 0.34" in elbo_speed.measured

    failed = [make_record("p", "pma", status="failed"), records[1]]
    *_, elbo_speed = check_targets(failed)
    assert elbo_speed.met is False
    assert "p inf" in elbo_speed.measured


@pytest.mark.parametrize(
    "method", [pytest.param("pma", marks=pytest.mark.slow), "brenier_elbo"]
)
def test_brenier_runners_on_gaussian(method):
    result = run_benchmark(
        jax.random.key(1),
        [gaussian_posterior()],
        [method],
        num_draws=NUM_DRAWS,
        output_dir=None,
        progress_bar=False,
        quick=True,
    )
    (record,) = result.records
    assert record.status == "ok", record.traceback
    num_steps = METHODS[method].quick_options["num_steps"]
    assert record.info["elbo"].shape == (num_steps,)
    assert np.all(np.diff(record.info["elbo_times"]) > 0)
    assert record.info["elbo_times"][-1] <= record.run_time
    assert np.isfinite(record.khat)
    # The exact posterior is Gaussian, so a guide near it has a mean error of
    # about the Monte Carlo sd of 1000 draws (0.033); 0.3 leaves room for the
    # few training steps of a quick run.
    assert record.max_abs_mean_error < 0.3
