"""The mirror step in large dimensions: SLQ log determinants and batched residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_shapes import traced_shapes

from numpyro_pma.logdet import EXACT_LOGDET_MAX_DIM
from numpyro_pma.mirror import mirror_descent
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients
from numpyro_pma.projection import fit_quadratic_min_norm, quadratic_feature_count
from numpyro_pma.transform import map_and_logdet, map_and_logdet_slq


def has_batched_square(fn, dim, *args):
    """Whether tracing ``fn`` creates an array of shape ``(..., dim, dim)`` with a
    batch axis, as a Hessian per draw would be.

    The potential's own ``(dim, dim)`` parameter has no batch axis and is allowed.
    """
    shapes = traced_shapes(fn, *args)
    return any(len(shape) >= 3 and shape.count(dim) >= 2 for shape in shapes)


def gaussian_logdensity(scales):
    def logdensity_fn(z):
        return -0.5 * jnp.sum((z / scales) ** 2)

    return logdensity_fn


def trained_state(dim, hidden_sizes, num_steps, **options):
    """Take a few exact steps so that the Hessian is far from the identity."""
    scales = jnp.geomspace(0.3, 3.0, dim)
    potential = BrenierPotential(dim=dim, hidden_sizes=hidden_sizes)
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    algorithm = mirror_descent(
        gaussian_logdensity(scales), potential, 0.5, logdet_method="cholesky", **options
    )
    state = algorithm.init(params)
    step = jax.jit(algorithm.step)
    for k in range(num_steps):
        state, _ = step(jax.random.key(100 + k), state)
    return potential, scales, state


def test_slq_step_agrees_with_cholesky_step(x64):
    dim = 50
    options = dict(num_particles=64, num_projection_steps=2)
    potential, scales, state = trained_state(dim, (8,), 5, **options)

    results = {}
    for method in ("cholesky", "slq"):
        algorithm = mirror_descent(
            gaussian_logdensity(scales),
            potential,
            0.5,
            logdet_method=method,
            num_probes=8,
            num_lanczos_steps=25,
            **options,
        )
        results[method] = jax.jit(algorithm.step)(jax.random.key(7), state)

    exact_info = results["cholesky"][1]
    slq_info = results["slq"][1]
    assert float(exact_info.logdet_stderr) == 0.0
    # SLQ runs on the Hessian preconditioned by the quadratic part; the
    # network's curvature keeps that away from the identity, so probes disagree.
    assert float(slq_info.logdet_stderr) > 1e-4
    # Both steps see the same draws, so the ELBOs differ only by the mean SLQ
    # error over the 64 draws, whose sd is logdet_stderr. The Hessian's
    # condition number is about 10 (target sd from 0.3 to 3), so 25 Lanczos
    # steps leave a quadrature bias far below that; 4 sigma.
    difference = abs(float(slq_info.elbo) - float(exact_info.elbo))
    assert difference < 4 * float(slq_info.logdet_stderr)
    assert int(slq_info.num_nonfinite) == 0


def test_preconditioned_slq_exact_for_quadratic_potential(x64):
    # For u(x) = x'Ax/2 + b'x and C the Cholesky factor of A, C^{-1} A C^{-T} is
    # the identity: every probe returns 0 and the estimate is log det A.
    dim = 40
    potential = BrenierPotential(dim=dim, hidden_sizes=())
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    noise = jax.random.normal(jax.random.key(1), (dim, dim))
    params = {**params, "scale_tril": params["scale_tril"] + 0.2 * jnp.tril(noise)}
    matrix, _ = quadratic_coefficients(params, potential.min_eigenvalue)

    def potential_fn(y):
        return potential.apply({"params": params}, y)

    point = jax.random.normal(jax.random.key(2), (dim,))
    _, exact = map_and_logdet(potential_fn, point)
    _, estimate = map_and_logdet_slq(
        jax.random.key(3),
        potential_fn,
        point,
        num_probes=2,
        num_lanczos_steps=3,
        preconditioner=jnp.linalg.cholesky(matrix),
    )
    assert float(estimate.logdet) == pytest.approx(float(exact), abs=1e-9)
    assert float(estimate.standard_error) < 1e-9

    _, plain = map_and_logdet_slq(
        jax.random.key(3), potential_fn, point, num_probes=2, num_lanczos_steps=3
    )
    # Without the preconditioner, 3 Lanczos steps cannot resolve A's spectrum.
    assert abs(float(plain.logdet) - float(exact)) > 1e-3


def test_slq_step_in_300_dimensions_never_forms_hessian():
    dim = 300
    assert dim > EXACT_LOGDET_MAX_DIM
    scales = jnp.geomspace(0.5, 2.0, dim)
    potential = BrenierPotential(dim=dim, hidden_sizes=(8,))
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    options = dict(num_particles=16, num_probes=4, num_lanczos_steps=10)
    auto = mirror_descent(gaussian_logdensity(scales), potential, 0.5, **options)
    exact = mirror_descent(
        gaussian_logdensity(scales), potential, 0.5, logdet_method="cholesky", **options
    )
    state = auto.init(params)
    key = jax.random.key(1)

    # "auto" picks SLQ above EXACT_LOGDET_MAX_DIM; forcing Cholesky builds the
    # (num_particles, dim, dim) Hessians, which shows the check can fire.
    assert not has_batched_square(auto.step, dim, key, state)
    assert has_batched_square(exact.step, dim, key, state)

    new_state, info = jax.jit(auto.step)(key, state)
    assert int(info.num_nonfinite) == 0
    assert bool(info.accepted)
    assert np.isfinite(float(info.elbo))
    assert float(info.logdet_stderr) > 0.0
    assert int(new_state.step) == 1


def test_residual_batches_match_whole_batch(x64):
    dim = 4
    scales = jnp.asarray([0.5, 1.0, 1.5, 2.0])
    potential = BrenierPotential(dim=dim, hidden_sizes=(8,))
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    outputs = []
    for batch_size in (None, 8):
        algorithm = mirror_descent(
            gaussian_logdensity(scales),
            potential,
            0.5,
            num_particles=32,
            logdet_method="slq",
            num_probes=4,
            num_lanczos_steps=4,
            residual_batch_size=batch_size,
        )
        outputs.append(
            jax.jit(algorithm.step)(jax.random.key(3), algorithm.init(params))
        )
    # Each draw keeps its own probes, so only the order of float64 sums differs;
    # Adam's normalization of tiny gradients amplifies that to about 1e-10.
    for whole, batched in zip(
        jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1]), strict=True
    ):
        np.testing.assert_allclose(whole, batched, rtol=1e-8, atol=1e-10)


def random_quadratic_change(rng, x):
    """Return ``(dA, db, e)`` with ``e_i = x_i' dA x_i / 2 + db' x_i + 0.3``."""
    dim = x.shape[1]
    noise = rng.normal(size=(dim, dim))
    matrix_change = 0.05 * (noise + noise.T)
    shift_change = 0.1 * rng.normal(size=dim)
    values = np.einsum("ni,ij,nj->n", x, matrix_change, x) / 2 + x @ shift_change
    return matrix_change, shift_change, values + 0.3


def fitted_change(x, values, matrix, min_eigenvalue=1e-3):
    """Fit the change from ``A = matrix, b = 0``; return it and the fit error."""
    dim = x.shape[1]
    centered = values - values.mean()
    scale_tril, shift = fit_quadratic_min_norm(
        jnp.asarray(x), jnp.asarray(centered), matrix, jnp.zeros(dim), min_eigenvalue
    )
    new_matrix = scale_tril @ scale_tril.T + min_eigenvalue * np.eye(dim)
    change = np.einsum("ni,ij,nj->n", x, new_matrix - matrix, x) / 2 + x @ shift
    error = np.linalg.norm(change - change.mean() - centered)
    return new_matrix - matrix, shift, error / np.linalg.norm(centered)


def test_min_norm_fit_interpolates_with_few_draws(x64):
    rng = np.random.default_rng(0)
    dim = 12
    x = rng.normal(size=(40, dim))
    assert x.shape[0] < quadratic_feature_count(dim)
    _, _, values = random_quadratic_change(rng, x)
    _, _, relative_error = fitted_change(x, values, 2 * np.eye(dim))
    # Conjugate gradients stop at a relative residual of sqrt(eps) ≈ 1.5e-8,
    # and the ridge (sqrt(eps) times the kernel's diagonal) shrinks the fit by
    # about as much. Measured: 3.5e-8.
    assert relative_error < 1e-6


def test_min_norm_fit_recovers_quadratic_with_many_draws(x64):
    rng = np.random.default_rng(1)
    dim = 6
    x = rng.normal(size=(3 * quadratic_feature_count(dim), dim))
    matrix_change, shift_change, values = random_quadratic_change(rng, x)
    fitted_matrix, fitted_shift, _ = fitted_change(x, values, 2 * np.eye(dim))
    # With more draws than coefficients the change is determined, so the
    # smallest one is the true one. Measured error: 3e-9.
    np.testing.assert_allclose(fitted_matrix, matrix_change, atol=1e-6)
    np.testing.assert_allclose(fitted_shift, shift_change, atol=1e-6)


def test_min_norm_projection_progresses_where_optimizer_stalls(x64):
    # 256 draws cannot determine the 1891 quadratic coefficients of d = 60, so
    # "auto" picks the minimum-norm fit. Adam on the 3600 entries of L moves
    # each by about its learning rate and makes no progress.
    rng = np.random.default_rng(2)
    dim = 60
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    covariance = rotation @ np.diag(np.geomspace(0.3, 3.0, dim) ** 2) @ rotation.T
    precision = jnp.asarray(np.linalg.inv(covariance))
    log_normalizer = 0.5 * np.linalg.slogdet(covariance)[1] + dim / 2 * np.log(
        2 * np.pi
    )

    def logdensity_fn(z):
        return -0.5 * z @ precision @ z

    potential = BrenierPotential(dim=dim, hidden_sizes=())
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    divergence = {}
    for projection in ("auto", "optimizer"):
        algorithm = mirror_descent(
            logdensity_fn,
            potential,
            0.5,
            num_particles=256,
            quadratic_projection=projection,
        )

        def run(state, algorithm=algorithm):
            def body(carry, index):
                return algorithm.step(jax.random.key(index), carry)

            return jax.lax.scan(body, state, jnp.arange(30))

        _, info = jax.jit(run)(algorithm.init(params))
        divergence[projection] = log_normalizer - np.asarray(info.elbo)
    initial = divergence["auto"][0]
    # KL starts near 39.5; the Monte Carlo error of each estimate is below 1.
    # Measured after 30 steps: 9.8 (auto) and 39.7 (optimizer).
    assert divergence["auto"][-1] < 0.5 * initial
    assert divergence["optimizer"][-1] > 0.9 * initial


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(logdet_method="lu"), "logdet_method"),
        (dict(quadratic_projection="svd"), "quadratic_projection"),
        (dict(num_probes=1), "num_probes"),
        (dict(num_lanczos_steps=0), "num_lanczos_steps"),
        (dict(residual_batch_size=5), "residual_batch_size"),
        (dict(residual_batch_size=0), "residual_batch_size"),
        (dict(num_particles=0), "num_particles"),
        (dict(rejection_threshold=-1.0), "rejection_threshold"),
        (dict(step_size_shrink=0.0), "step_size_shrink"),
        (dict(step_size_growth=0.5), "step_size_growth"),
    ],
)
def test_mirror_descent_rejects_bad_options(options, message):
    potential = BrenierPotential(dim=2, hidden_sizes=())
    options = {"num_particles": 16, **options}
    with pytest.raises(ValueError, match=message):
        mirror_descent(gaussian_logdensity(jnp.ones(2)), potential, 0.5, **options)
