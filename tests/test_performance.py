"""The performance command, and the mirror step in float32 (the fast default)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_pma.logdet import hessian_and_gradient
from numpyro_pma.mirror import mirror_descent
from numpyro_pma.performance import (
    auto_residual_batch_size,
    format_step_cost_table,
    growth_exponent,
    performance_main,
    run_preconditioning_benchmark,
)
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients
from numpyro_pma.projection import quadratic_feature_count
from numpyro_pma.transform import BrenierTransform

TINY = ["--dims", "2,3", "--batch-sizes", "8", "--repeats", "1", "--hidden-sizes", "4"]


@pytest.fixture
def x32():
    """Run one test in float32 whatever other test modules switched on."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


# ------------------------------------------------------------- the command


def test_performance_main_writes_markdown(tmp_path, capsys):
    output = tmp_path / "performance.md"
    code = performance_main([*TINY, "--no-isolate", "--output", str(output)])
    assert code == 0
    report = output.read_text()
    assert report == capsys.readouterr().out
    assert "Load average at start" in report
    assert "Load average at end" in report
    rows = [line for line in report.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1
    assert "cholesky" in rows[0]
    assert "timed out" not in rows[0]
    assert "failed" not in rows[0]
    assert "| 3 | 8 |" in report
    assert "growth exponent" in report


def test_performance_main_isolated_reports_memory(tmp_path):
    output = tmp_path / "performance.md"
    argv = ["--dims", "2", "--batch-sizes", "8", "--repeats", "1"]
    assert (
        performance_main([*argv, "--hidden-sizes", "4", "--output", str(output)]) == 0
    )
    row = next(
        line for line in output.read_text().splitlines() if line.startswith("| 2")
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # Columns: d, particles, then per step: log det, "median (min)" seconds,
    # XLA MB, peak RSS MB.
    pma_seconds, pma_rss = float(cells[3].split()[0]), float(cells[5])
    elbo_seconds, elbo_rss = float(cells[7].split()[0]), float(cells[9])
    assert pma_seconds > 0
    assert elbo_seconds > 0
    # A fresh interpreter with JAX loaded uses at least tens of MB.
    assert pma_rss > 10
    assert elbo_rss > 10


def test_performance_main_rejects_bad_options():
    with pytest.raises(SystemExit) as raised:
        performance_main(["--repeats", "0"])
    assert raised.value.code == 2
    with pytest.raises(SystemExit) as raised:
        performance_main(["--dims", "10,-1"])
    assert raised.value.code == 2


def test_growth_exponent_recovers_power_law():
    dims = [2, 10, 100, 1000]
    seconds = [3e-4 * d**1.5 for d in dims]
    assert growth_exponent(dims, seconds) == pytest.approx(1.5, abs=1e-12)


def test_growth_exponent_ignores_missing_times():
    assert growth_exponent([10, 100, 1000], [1.0, 100.0, math.nan]) == pytest.approx(
        2.0
    )
    assert math.isnan(growth_exponent([10, 100], [1.0, math.nan]))


def test_auto_residual_batch_size_fits_budget():
    assert auto_residual_batch_size(10, 4096, "auto") is None
    budget = 2**30
    size = auto_residual_batch_size(1000, 4096, "auto", budget_bytes=budget)
    assert size is not None
    assert 4096 % size == 0
    # SLQ working set per draw: 3 arrays of 16 probes x 30 steps x 1000 floats.
    assert size * 3 * 16 * 30 * 1000 * 4 <= budget
    assert 2 * size * 3 * 16 * 30 * 1000 * 4 > budget


def test_step_cost_table_notes_timeouts():
    common = dict(dim=1000, num_particles=4096, logdet_method="slq", num_timed_runs=0)
    records = [
        dict(
            kind="pma",
            seconds_per_step=math.nan,
            compiled_megabytes=900.0,
            peak_rss_megabytes=1200.0,
            status="timed out after 600 s",
            **common,
        ),
        dict(
            kind="elbo",
            seconds_per_step=2.0,
            compiled_megabytes=100.0,
            peak_rss_megabytes=700.0,
            status="ok",
            **{**common, "num_timed_runs": 3},
        ),
    ]
    table = format_step_cost_table(records)
    row = next(line for line in table.splitlines() if line.startswith("| 1000"))
    assert "PMA timed out after 600 s" in row
    assert "| – |" in row


@pytest.mark.slow
def test_preconditioning_benchmark_on_gaussian():
    records = run_preconditioning_benchmark(
        jax.random.key(0),
        ["gaussian-ill-conditioned"],
        num_steps=20,
        num_particles=64,
        hidden_sizes=(4,),
    )
    assert len(records) == 6
    assert [r.whitening for r in records] == ["dense"] * 2 + ["diagonal"] * 2 + [
        "none"
    ] * 2
    whitened = [r for r in records if r.whitening != "none"]
    # A diagonal Gaussian is exactly whitened by a diagonal fit (and by the
    # dense fit), so the whitened runs start next to the optimum.
    assert all(r.steps_to_tolerance is not None for r in whitened)
    log_normalizer = float(
        jnp.sum(jnp.log(jnp.geomspace(0.01, 10.0, 8))) + 4 * jnp.log(2 * jnp.pi)
    )
    for record in whitened:
        # 64 draws of an almost exact guide: the ELBO noise is far below 0.05.
        assert record.final_elbo == pytest.approx(log_normalizer, abs=0.05)


# ------------------------------------------------------------------ float32


def gaussian_target(seed=0, dim=3):
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(dim, dim))
    covariance = factor @ factor.T / dim + 0.5 * np.eye(dim)
    mean = rng.normal(size=dim)
    precision = jnp.asarray(np.linalg.inv(covariance), jnp.float32)

    def logdensity_fn(z):
        centered = z - jnp.asarray(mean, z.dtype)
        return -0.5 * centered @ precision @ centered

    return mean, covariance, logdensity_fn


def quadratic_algorithm(logdensity_fn, step_size, dim=3):
    potential = BrenierPotential(dim=dim, hidden_sizes=())
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    algorithm = mirror_descent(
        logdensity_fn,
        potential,
        step_size,
        num_particles=4 * quadratic_feature_count(dim),
        quadratic_projection="lstsq",
        rejection_threshold=math.inf,
    )
    return potential, algorithm, algorithm.init(params)


def test_float32_step_matches_gaussian_recursion(x32):
    mean, covariance, logdensity_fn = gaussian_target()
    precision = np.linalg.inv(covariance)
    potential, algorithm, state = quadratic_algorithm(logdensity_fn, 0.3)
    assert state.loc.dtype == jnp.float32
    step = jax.jit(algorithm.step)

    matrix, shift = np.eye(3), np.zeros(3)
    for k in range(25):
        state, info = step(jax.random.key(k), state)
        assert bool(info.accepted)
        matrix, shift = (
            matrix + 0.3 * (np.eye(3) - matrix @ precision @ matrix),
            shift - 0.3 * matrix @ precision @ (shift - mean),
        )
    fitted_matrix, fitted_shift = quadratic_coefficients(
        state.params, potential.min_eigenvalue
    )
    assert fitted_matrix.dtype == jnp.float32
    # float32 rounding (eps 1.2e-7) through a well-conditioned least-squares
    # solve per step; the recursion contracts, so errors do not build up.
    # Measured: 4e-7.
    np.testing.assert_allclose(fitted_matrix, matrix, atol=2e-5)
    np.testing.assert_allclose(fitted_shift, shift, atol=2e-5)


def test_float32_fixed_point_elbo_is_log_normalizer(x32):
    mean, covariance, logdensity_fn = gaussian_target(seed=2)
    _, algorithm, state = quadratic_algorithm(logdensity_fn, 0.4)
    step = jax.jit(algorithm.step)
    for k in range(200):
        state, info = step(jax.random.key(k), state)
    log_normalizer = 0.5 * (3 * np.log(2 * np.pi) + np.linalg.slogdet(covariance)[1])
    # At q = pi every residual is -log Z; float32 rounding of terms of size
    # about 10 leaves errors near 1e-6. Measured: 4e-7 and 8e-8.
    assert float(info.elbo) == pytest.approx(log_normalizer, abs=1e-4)
    assert float(info.elbo_stderr) < 1e-4


def test_float32_inverse_round_trip(x32):
    dim = 5
    potential = BrenierPotential(dim=dim, hidden_sizes=(16, 16))
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    # Move away from the initialization so the network part is not negligible.
    noise = jax.random.normal(jax.random.key(3), (dim, dim))
    params = {**params, "scale_tril": params["scale_tril"] + 0.3 * noise}
    network = dict(params["network"])
    network["output"] = network["output"] + 6.0
    params = {**params, "network": network}
    transform = BrenierTransform(potential, params)

    x = 2.0 * jax.random.normal(jax.random.key(4), (50, dim))
    y, logdet = transform.call_with_intermediates(x)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logdet)))
    recovered = transform.inv(y)

    # Newton stops once |grad u(x) - y| <= 100 eps (1 + max|y|); the error in
    # x is that residual divided by at most the smallest Hessian eigenvalue.
    eps = float(jnp.finfo(jnp.float32).eps)
    tolerance = 100 * eps * (1.0 + jnp.max(jnp.abs(y), axis=-1))
    smallest_eigenvalue = jax.vmap(
        lambda point: jnp.linalg.eigvalsh(
            hessian_and_gradient(transform.potential_fn, point)[1]
        )[0]
    )(recovered)
    residual = jnp.max(jnp.abs(transform(recovered) - y), axis=-1)
    error = jnp.max(jnp.abs(recovered - x), axis=-1)
    # Up to one more float32 rounding of the gradient itself (factor 2).
    assert bool(jnp.all(residual <= 2 * tolerance))
    assert bool(jnp.all(error <= 2 * tolerance / smallest_eigenvalue))
