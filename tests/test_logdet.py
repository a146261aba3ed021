from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_shapes import traced_shapes

from numpyro_pma.logdet import (
    EXACT_LOGDET_MAX_DIM,
    choose_logdet_method,
    hessian_and_gradient,
    hessian_vector_product,
    logdet_cholesky,
    logdet_gradient_surrogate,
    logdet_hessian,
    logdet_slq,
)


@pytest.fixture(autouse=True, scope="module")
def enable_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def random_spd(rng, dim, condition_number, rotated=True):
    """Return ``Q diag(lambda) Q'`` with log-spaced eigenvalues in [1, kappa]."""
    eigenvalues = np.geomspace(1.0, condition_number, dim)
    if not rotated:
        return np.diag(eigenvalues), np.sum(np.log(eigenvalues))
    gaussian = rng.standard_normal((dim, dim))
    orthogonal, upper = np.linalg.qr(gaussian)
    orthogonal = orthogonal * np.sign(np.diag(upper))
    matrix = (orthogonal * eigenvalues) @ orthogonal.T
    return 0.5 * (matrix + matrix.T), np.sum(np.log(eigenvalues))


@partial(jax.jit, static_argnames=("num_repeats", "num_probes", "num_lanczos_steps"))
def _repeated_slq(key, matrix, num_repeats, num_probes, num_lanczos_steps):
    # The matrix is an argument, not a constant, so that cases of equal shape
    # share one compilation.
    def one_estimate(repeat_key):
        return logdet_slq(
            repeat_key,
            lambda v: matrix @ v,
            matrix.shape[0],
            num_probes=num_probes,
            num_lanczos_steps=num_lanczos_steps,
        )

    return jax.vmap(one_estimate)(jax.random.split(key, num_repeats))


def repeated_slq(matrix, num_repeats, num_probes, num_lanczos_steps, seed):
    """Run ``num_repeats`` independent SLQ estimates on a dense matrix."""
    result = _repeated_slq(
        jax.random.key(seed),
        jnp.asarray(matrix),
        num_repeats=num_repeats,
        num_probes=num_probes,
        num_lanczos_steps=num_lanczos_steps,
    )
    return np.asarray(result.logdet), np.asarray(result.standard_error)


def has_square_array(fn, dim, *args):
    """Whether tracing ``fn(*args)`` creates any array with two axes of size dim."""
    return any(shape.count(dim) >= 2 for shape in traced_shapes(fn, *args))


# ---------------------------------------------------------------- exact methods


def test_cholesky_matches_slogdet():
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((6, 9, 9))
    matrices = factors @ np.swapaxes(factors, -1, -2) + 0.1 * np.eye(9)
    logdet, is_positive_definite = logdet_cholesky(jnp.asarray(matrices))
    sign, expected = np.linalg.slogdet(matrices)
    assert np.all(sign == 1)
    # Exact identity; float64 Cholesky of matrices with condition number < 1e4.
    np.testing.assert_allclose(logdet, expected, rtol=1e-12, atol=1e-12)
    assert logdet.shape == (6,)
    assert np.all(is_positive_definite)


def test_cholesky_one_by_one():
    logdet, is_positive_definite = logdet_cholesky(jnp.array([[3.0]]))
    np.testing.assert_allclose(logdet, np.log(3.0), rtol=1e-14)
    assert bool(is_positive_definite)


def test_cholesky_flags_indefinite_and_nonfinite():
    positive = np.diag([1.0, 2.0, 3.0])
    indefinite = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    nonfinite = positive.copy()
    nonfinite[2, 2] = np.inf
    with_nan = positive.copy()
    with_nan[0, 1] = with_nan[1, 0] = np.nan
    batch = jnp.asarray(np.stack([positive, indefinite, nonfinite, with_nan]))
    logdet, is_positive_definite = logdet_cholesky(batch)
    np.testing.assert_allclose(logdet[0], np.log(6.0), rtol=1e-14)
    assert np.all(np.isnan(logdet[1:]))
    np.testing.assert_array_equal(is_positive_definite, [True, False, False, False])


def test_cholesky_rejects_non_square():
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        logdet_cholesky(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="shape"):
        logdet_cholesky(jnp.ones(3))


def convex_test_function(x):
    weights = jnp.linspace(-1.0, 1.0, x.shape[0])
    return jnp.sum(jnp.exp(0.3 * x)) + jnp.logaddexp(0.0, weights @ x) ** 2


def test_hessian_and_gradient_match_jax():
    x = jnp.linspace(-2.0, 1.5, 7)
    gradient, hessian = jax.jit(hessian_and_gradient, static_argnums=0)(
        convex_test_function, x
    )
    # Same derivatives by another composition of JAX transforms: exact up to
    # floating-point reassociation.
    np.testing.assert_allclose(
        gradient, jax.grad(convex_test_function)(x), rtol=1e-13, atol=1e-14
    )
    np.testing.assert_allclose(
        hessian, jax.jit(jax.hessian(convex_test_function))(x), rtol=1e-13, atol=1e-14
    )


def test_hessian_vector_product_matches_hessian():
    x = jnp.linspace(-2.0, 1.5, 7)
    vector = jnp.arange(7.0) - 3.0
    product = jax.jit(
        lambda point, v: hessian_vector_product(convex_test_function, point)(v)
    )(x, vector)
    expected = jax.jit(jax.hessian(convex_test_function))(x) @ vector
    np.testing.assert_allclose(product, expected, rtol=1e-13, atol=1e-13)


def test_hessian_helpers_reject_matrix_input():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        hessian_and_gradient(convex_test_function, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        hessian_vector_product(convex_test_function, jnp.ones((2, 3)))


# ------------------------------------------------------ stochastic Lanczos (SLQ)

# Rotated matrices: probe noise is the only random error. With 64 repeats of 8
# probes (512 probes in all), the grand mean's standard error is the pooled
# per-probe spread over sqrt(512). The quadrature bias at 40 Lanczos steps,
# measured at 0.25 on the diagonal matrix with the d = 500, cond = 1e3
# spectrum, is about 0.1 of that error. A 4-sigma bound fails by chance with
# probability about 6e-5 per case.
# Variance check: the sample standard deviation of 64 repeats has relative
# error about 1 / sqrt(2 * 63) = 0.09, and the root-mean-square of 64 reported
# standard errors (each from 8 probes) about sqrt(2 / (64 * 7)) = 0.07. Their
# ratio has a relative spread of about 0.11, so a ratio outside [1 / 1.5, 1.5]
# is about a 4-sigma event.
SLQ_CASES = [(50, 10.0), (50, 1e3), (500, 10.0), (500, 1e3)]


@pytest.mark.parametrize("dim, condition_number", SLQ_CASES)
def test_slq_unbiased_rotated(dim, condition_number):
    # Distinct seeds per case: with shared ones, the two condition numbers
    # would give the same estimates up to a factor log(k).
    seed = dim + round(condition_number)
    matrix, true_logdet = random_spd(np.random.default_rng(seed), dim, condition_number)
    estimates, standard_errors = repeated_slq(
        matrix, num_repeats=64, num_probes=8, num_lanczos_steps=40, seed=seed
    )
    grand_mean = np.mean(estimates)
    grand_standard_error = np.sqrt(np.mean(standard_errors**2) / estimates.size)
    assert abs(grand_mean - true_logdet) < 4 * grand_standard_error
    # Guards against a vacuous bound: the probe noise is small next to log det.
    assert grand_standard_error < 0.01 * abs(true_logdet)

    ratio = np.sqrt(np.mean(standard_errors**2)) / np.std(estimates, ddof=1)
    assert 1 / 1.5 < ratio < 1.5


@pytest.mark.parametrize("dim, condition_number", SLQ_CASES)
def test_slq_diagonal_quadrature_error(dim, condition_number):
    # For a diagonal A every Rademacher probe gives the same Lanczos
    # coefficients (they depend on v only through v_i^2 = 1), so the estimate
    # has no probe noise and its error is the Gauss quadrature error. That
    # falls like rho^(-2m), rho = (sqrt(k) + 1) / (sqrt(k) - 1), for log on
    # [1, k]; we allow dim * rho^(-2m), a rate rather than a proven bound.
    # Measured errors at m = 50 are 0.055 (d = 500, k = 1e3) and below 1e-12
    # in the other three cases.
    num_lanczos_steps = 50
    matrix, true_logdet = random_spd(None, dim, condition_number, rotated=False)
    estimates, standard_errors = repeated_slq(
        matrix, num_repeats=2, num_probes=2, num_lanczos_steps=num_lanczos_steps, seed=2
    )
    rho = (np.sqrt(condition_number) + 1) / (np.sqrt(condition_number) - 1)
    tolerance = max(dim * rho ** (-2 * num_lanczos_steps), 1e-10 * true_logdet)
    np.testing.assert_allclose(estimates, true_logdet, rtol=0, atol=tolerance)
    assert np.all(standard_errors < 1e-10 * true_logdet)


def test_slq_few_steps_overestimates():
    # Gauss quadrature overestimates the integral of log (its even derivatives
    # are negative), so a short Lanczos run must show a positive bias. Measured
    # error at m = 10: 4.0 on a log det of 172.7.
    matrix, true_logdet = random_spd(None, 50, 1e3, rotated=False)
    estimates, _ = repeated_slq(
        matrix, num_repeats=1, num_probes=2, num_lanczos_steps=10, seed=3
    )
    assert estimates[0] - true_logdet > 1.0


@pytest.mark.parametrize(
    "eigenvalues", [np.ones(12), np.tile([1.0, 2.0, 3.0], 4), np.arange(1.0, 6.0)]
)
def test_slq_breakdown_is_exact(eigenvalues):
    # Lanczos reaches an invariant subspace (beta = 0) after as many steps as A
    # has distinct eigenvalues; more steps, or more steps than dim, must then
    # return the exact value and no NaN.
    dim = eigenvalues.size
    rng = np.random.default_rng(4)
    orthogonal, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    matrix = jnp.asarray((orthogonal * eigenvalues) @ orthogonal.T)
    result = jax.jit(
        lambda key: logdet_slq(key, lambda v: matrix @ v, dim, num_lanczos_steps=20)
    )(jax.random.key(5))
    assert np.isfinite(result.logdet)
    if np.all(eigenvalues == eigenvalues[0]):
        np.testing.assert_allclose(
            result.logdet, np.sum(np.log(eigenvalues)), atol=1e-12
        )
    else:
        # Probe noise remains for a rotated matrix, but the quadrature is exact.
        assert (
            abs(result.logdet - np.sum(np.log(eigenvalues))) < 4 * result.standard_error
        )


def test_slq_indefinite_gives_nan():
    # With m = dim Lanczos is exact, so the negative eigenvalue shows up as a
    # Ritz value with positive weight 1 / dim.
    matrix = jnp.diag(jnp.array([-1.0, 1.0, 2.0, 3.0]))
    result = jax.jit(
        lambda key: logdet_slq(key, lambda v: matrix @ v, 4, num_lanczos_steps=4)
    )(jax.random.key(6))
    assert np.isnan(result.logdet)


def test_slq_float32_probes():
    matrix = jnp.diag(jnp.array([1.0, 2.0, 4.0], jnp.float32))
    result = jax.jit(
        lambda key: logdet_slq(
            key, lambda v: matrix @ v, 3, num_lanczos_steps=3, dtype="float32"
        )
    )(jax.random.key(7))
    assert result.logdet.dtype == jnp.float32
    np.testing.assert_allclose(result.logdet, np.log(8.0), rtol=1e-5)


def test_slq_value_has_no_gradient():
    # The documented contract: gradients come from the surrogate, so a loss
    # may add the SLQ value without differentiating through Lanczos.
    matrix = jnp.diag(jnp.arange(1.0, 6.0))

    def estimate(scale):
        return logdet_slq(jax.random.key(8), lambda v: scale * (matrix @ v), 5).logdet

    assert jax.jit(jax.grad(estimate))(2.0) == 0.0


def test_slq_rejects_bad_arguments():
    matvec = lambda v: 2.0 * v  # noqa: E731
    with pytest.raises(ValueError, match="num_probes.*1"):
        logdet_slq(jax.random.key(0), matvec, 3, num_probes=1)
    with pytest.raises(ValueError, match="num_lanczos_steps.*0"):
        logdet_slq(jax.random.key(0), matvec, 3, num_lanczos_steps=0)
    with pytest.raises(ValueError, match="dim.*3.0"):
        logdet_slq(jax.random.key(0), matvec, 3.0)
    with pytest.raises(ValueError, match="matvec_fn"):
        logdet_slq(jax.random.key(0), lambda v: v[:2], 3)


def soft_plus_potential(dim, num_features=256, seed=8):
    """Convex ``u(x) = sum c_i x_i^2 / 2 + sum_k softplus(w_k' x + b_k)``.

    Returns ``u`` and its Hessian in closed form,
    ``diag(c) + W' diag(s (1 - s)) W`` with ``s = sigmoid(W x + b)``.
    """
    rng = np.random.default_rng(seed)
    curvature = jnp.asarray(np.linspace(1.0, 10.0, dim))
    weights = jnp.asarray(2.0 * rng.standard_normal((num_features, dim)) / np.sqrt(dim))
    shifts = jnp.asarray(rng.standard_normal(num_features))

    def potential(x):
        quadratic = 0.5 * jnp.sum(curvature * x**2)
        return quadratic + jnp.sum(jax.nn.softplus(weights @ x + shifts))

    def hessian(x):
        slope = jax.nn.sigmoid(weights @ x + shifts)
        return jnp.diag(curvature) + (weights.T * (slope * (1 - slope))) @ weights

    return potential, hessian


def test_slq_hessian_vector_product_large_dim():
    dim = 1000
    potential, hessian_fn = soft_plus_potential(dim)
    x = jnp.asarray(np.random.default_rng(9).standard_normal(dim))

    def estimate(key, point):
        matvec = hessian_vector_product(potential, point)
        return logdet_slq(key, matvec, dim, num_probes=32, num_lanczos_steps=30)

    key = jax.random.key(10)
    # The SLQ path only ever holds (num_probes, num_lanczos_steps, dim) arrays;
    # the exact path builds the (dim, dim) Hessian, which shows that the check
    # would catch one.
    assert not has_square_array(estimate, dim, key, x)
    assert has_square_array(
        lambda point: logdet_hessian(key, potential, point, method="cholesky"), dim, x
    )

    result = jax.jit(estimate)(key, x)
    exact, _ = logdet_cholesky(hessian_fn(x))
    # 4 sigma of probe noise; the Hessian's condition number is about 10, so
    # 30 Lanczos steps leave a quadrature error far below that.
    assert abs(result.logdet - exact) < 4 * result.standard_error
    assert result.standard_error < 0.01 * abs(exact)


# ------------------------------------------------------------ gradient surrogate


def surrogate_gradient(matrix_fn, theta, dim, key, num_probes):
    def surrogate(parameters):
        return logdet_gradient_surrogate(
            key,
            lambda v: matrix_fn(parameters) @ v,
            dim,
            num_probes=num_probes,
            tolerance=1e-12,
        )

    return jax.jit(jax.grad(surrogate))(theta)


def exact_logdet_gradient(matrix_fn, theta):
    return jax.grad(lambda parameters: jnp.linalg.slogdet(matrix_fn(parameters))[1])(
        theta
    )


def test_surrogate_gradient_exact_for_diagonal():
    # tr(A^{-1} dA) of a diagonal A is recovered exactly by any Rademacher
    # probe, so only conjugate-gradient error (tolerance 1e-12) remains.
    def matrix_fn(theta):
        return jnp.diag(jnp.exp(theta) + jnp.arange(1.0, 6.0) * theta[0] ** 2)

    theta = jnp.array([0.3, -0.2, 0.5, 1.0, -1.5])
    gradient = surrogate_gradient(matrix_fn, theta, 5, jax.random.key(11), 1)
    expected = exact_logdet_gradient(matrix_fn, theta)
    np.testing.assert_allclose(gradient, expected, rtol=1e-9, atol=1e-10)


def test_surrogate_gradient_with_respect_to_point():
    # Differentiating through a Hessian-vector product in x, as a map
    # regression on grad_x log det Hess u(x) would. A separable u has a
    # diagonal Hessian, so one probe gives the exact gradient.
    def potential(x):
        return jnp.sum(jnp.exp(x) + x**4)

    def surrogate(point):
        matvec = hessian_vector_product(potential, point)
        return logdet_gradient_surrogate(
            jax.random.key(12), matvec, 4, num_probes=1, tolerance=1e-12
        )

    def exact_logdet(point):
        return logdet_cholesky(jax.hessian(potential)(point)).logdet

    x = jnp.array([0.5, -1.0, 2.0, 0.1])
    gradient = jax.jit(jax.grad(surrogate))(x)
    expected = jax.jit(jax.grad(exact_logdet))(x)
    np.testing.assert_allclose(gradient, expected, rtol=1e-9, atol=1e-10)


def test_surrogate_gradient_unbiased_dense():
    dim = 20
    rng = np.random.default_rng(12)
    base = jnp.asarray(rng.standard_normal((dim, dim)) / np.sqrt(dim))
    directions = jnp.asarray(rng.standard_normal((3, dim, dim)) / np.sqrt(dim))

    def matrix_fn(theta):
        factor = base + jnp.tensordot(theta, directions, axes=1)
        return factor @ factor.T + jnp.eye(dim)

    theta = jnp.array([0.4, -0.3, 0.8])
    keys = jax.random.split(jax.random.key(13), 200)
    gradients = jax.vmap(lambda key: surrogate_gradient(matrix_fn, theta, dim, key, 4))(
        keys
    )
    mean = np.mean(gradients, axis=0)
    standard_error = np.std(gradients, axis=0, ddof=1) / np.sqrt(len(keys))
    expected = exact_logdet_gradient(matrix_fn, theta)
    # 800 probes in 200 independent groups: 4 sigma per component, three
    # components, so a chance failure has probability about 2e-4.
    np.testing.assert_array_less(np.abs(mean - expected), 4 * standard_error)
    np.testing.assert_array_less(standard_error, 0.1 * np.abs(expected))


def test_surrogate_rejects_bad_tolerance():
    with pytest.raises(ValueError, match="tolerance.*0.0"):
        logdet_gradient_surrogate(jax.random.key(0), lambda v: v, 3, tolerance=0.0)


# ------------------------------------------------------------- method selection


def test_choose_logdet_method_threshold():
    assert choose_logdet_method(1) == "cholesky"
    assert choose_logdet_method(EXACT_LOGDET_MAX_DIM) == "cholesky"
    assert choose_logdet_method(EXACT_LOGDET_MAX_DIM + 1) == "slq"
    assert choose_logdet_method(5, "slq") == "slq"
    assert choose_logdet_method(5000, "cholesky") == "cholesky"


def test_choose_logdet_method_rejects_unknown():
    with pytest.raises(ValueError, match="'lanczos'"):
        choose_logdet_method(10, "lanczos")
    with pytest.raises(ValueError, match="dim.*0"):
        choose_logdet_method(0)


def test_logdet_hessian_methods_agree():
    dim = EXACT_LOGDET_MAX_DIM + 1
    potential, hessian_fn = soft_plus_potential(dim, num_features=40)
    x = jnp.linspace(-1.0, 1.0, dim)
    expected, _ = logdet_cholesky(hessian_fn(x))

    def both_methods(key):
        exact = logdet_hessian(key, potential, x, method="cholesky")
        return exact, logdet_hessian(key, potential, x)

    exact, estimate = jax.jit(both_methods)(jax.random.key(14))
    np.testing.assert_allclose(exact.logdet, expected, rtol=1e-12)
    assert exact.standard_error == 0.0
    # "auto" picks SLQ above the threshold: 4 sigma of probe noise.
    assert estimate.standard_error > 0.0
    assert abs(estimate.logdet - expected) < 4 * estimate.standard_error
