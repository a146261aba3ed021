"""Log determinants of Hessians, exact (Cholesky) and stochastic (Lanczos).

The exact low-rank method for a Brenier potential without axis tails lives in
:mod:`numpyro_pma.lowrank`; :func:`choose_logdet_method` chooses among all three.

The guide's density needs ``log det Hess u(x)`` for a strictly convex potential
``u: R^d -> R``. For small ``d`` the Hessian is formed by forward-over-reverse
differentiation and factorized. For large ``d`` the Hessian is touched only
through Hessian-vector products, and the log determinant is estimated by
stochastic Lanczos quadrature (SLQ):

    log det A = tr(log A) ≈ (1 / P) sum_p v_p' log(A) v_p,

with ``P`` Rademacher probes ``v_p`` and each quadratic form approximated by
``m`` steps of Lanczos (Gauss quadrature). For ELBO training at large ``d``,
:func:`logdet_gradient_surrogate` gives a scalar whose gradient is an unbiased
estimate of the gradient of ``log det A``, by conjugate gradients.

References:
    S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic
    Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017.
    C.-W. Huang, R. T. Q. Chen, C. Tsirigotis, A. Courville, "Convex potential
    flows: universal probability distributions with optimal transport and
    convex optimization", ICLR 2021.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

__all__ = [
    "EXACT_LOGDET_MAX_DIM",
    "LOGDET_METHODS",
    "LogdetEstimate",
    "LogdetResult",
    "check_logdet_method",
    "choose_logdet_method",
    "hessian_and_gradient",
    "hessian_vector_product",
    "logdet_cholesky",
    "logdet_gradient_surrogate",
    "logdet_hessian",
    "logdet_slq",
]

# Largest dimension for which method="auto" forms the Hessian and factorizes it.
# Up to here the exact value is also the cheaper one; see choose_logdet_method.
EXACT_LOGDET_MAX_DIM = 256

# Values of logdet_method accepted by mirror_descent and PMA.
LOGDET_METHODS = ("auto", "cholesky", "slq", "low_rank")


def check_logdet_method(method: str, name: str = "logdet_method") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``method`` is a known method."""
    if method not in LOGDET_METHODS:
        choices = ", ".join(map(repr, LOGDET_METHODS))
        raise ValueError(f"{name} must be one of {choices}; got {method!r}")


class LogdetResult(NamedTuple):
    """Exact log determinant of a batch of symmetric matrices.

    Attributes:
        logdet: ``log det A`` of shape ``batch_shape``; NaN where ``A`` is not
            positive definite or has non-finite entries.
        is_positive_definite: Boolean array of shape ``batch_shape``.
    """

    logdet: jax.Array
    is_positive_definite: jax.Array


class LogdetEstimate(NamedTuple):
    """Estimate of ``log det A`` with its Monte Carlo standard error.

    Attributes:
        logdet: The estimate, a scalar.
        standard_error: Standard deviation of the per-probe values divided by
            ``sqrt(num_probes)``, a scalar. It measures the probe noise only,
            not the (deterministic) quadrature error of a finite Lanczos run.
    """

    logdet: jax.Array
    standard_error: jax.Array


def logdet_cholesky(matrix: jax.Array) -> LogdetResult:
    """Compute ``log det A = 2 sum_i log L_ii`` from the Cholesky factor ``L``.

    Only the symmetric part ``(A + A') / 2`` is factorized.

    Args:
        matrix: Symmetric matrices ``A`` of shape ``(..., dim, dim)``.

    Returns:
        A :class:`LogdetResult` with arrays of shape ``(...)``. Where ``A`` is
        not positive definite or contains NaN or infinity, ``logdet`` is NaN and
        ``is_positive_definite`` is False.

    Raises:
        ValueError: If ``matrix`` is not a batch of square matrices.
    """
    shape = jnp.shape(matrix)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"matrix must have shape (..., dim, dim); got shape {shape}.")

    all_finite = jnp.all(jnp.isfinite(matrix), axis=(-2, -1))
    cholesky_factor = jnp.linalg.cholesky(matrix)
    diagonal = jnp.diagonal(cholesky_factor, axis1=-2, axis2=-1)
    # JAX fills the factor with NaN when the factorization fails.
    is_positive_definite = (
        all_finite
        & jnp.all(jnp.isfinite(diagonal), axis=-1)
        & jnp.all(diagonal > 0, axis=-1)
    )

    safe_diagonal = jnp.where(is_positive_definite[..., None], diagonal, 1.0)
    logdet = 2.0 * jnp.sum(jnp.log(safe_diagonal), axis=-1)
    logdet = jnp.where(is_positive_definite, logdet, jnp.nan)
    return LogdetResult(logdet, is_positive_definite)


def hessian_and_gradient(
    fn: Callable[[jax.Array], jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Evaluate ``grad fn(x)`` and ``Hess fn(x)`` in one forward-over-reverse pass.

    The Hessian is ``jax.jacfwd`` of ``jax.grad(fn)``, and the gradient comes
    out of the same pass as auxiliary output.

    Args:
        fn: Scalar function of a point of shape ``(dim,)``.
        x: Point of shape ``(dim,)``.

    Returns:
        ``(gradient, hessian)`` of shapes ``(dim,)`` and ``(dim, dim)``.

    Raises:
        ValueError: If ``x`` is not one-dimensional.
    """
    if jnp.ndim(x) != 1:
        raise ValueError(f"x must have shape (dim,); got shape {jnp.shape(x)}.")

    def gradient_twice(point):
        gradient = jax.grad(fn)(point)
        return gradient, gradient

    hessian, gradient = jax.jacfwd(gradient_twice, has_aux=True)(x)
    return gradient, hessian


def hessian_vector_product(
    fn: Callable[[jax.Array], jax.Array], x: jax.Array
) -> Callable[[jax.Array], jax.Array]:
    """Build the matrix-free operator ``v -> Hess fn(x) v``.

    Each call is one ``jax.jvp`` of ``jax.grad(fn)`` (forward over reverse), at
    a cost of a few gradient evaluations and memory ``O(dim)``. The Hessian is
    never formed. Derivatives with respect to anything ``fn`` closes over flow
    through the product, as :func:`logdet_gradient_surrogate` needs.

    Args:
        fn: Scalar function of a point of shape ``(dim,)``.
        x: Point of shape ``(dim,)``.

    Returns:
        A function mapping ``v`` of shape ``(dim,)`` to ``Hess fn(x) v`` of shape
        ``(dim,)``.

    Raises:
        ValueError: If ``x`` is not one-dimensional.
    """
    if jnp.ndim(x) != 1:
        raise ValueError(f"x must have shape (dim,); got shape {jnp.shape(x)}.")
    gradient_fn = jax.grad(fn)

    def matvec(vector: jax.Array) -> jax.Array:
        return jax.jvp(gradient_fn, (x,), (vector,))[1]

    return matvec


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


def _check_matvec(matvec_fn: Callable, dim: int, dtype) -> None:
    """Trace ``matvec_fn`` once, without running it, to check its output shape."""
    output = jax.eval_shape(matvec_fn, jax.ShapeDtypeStruct((dim,), dtype))
    if getattr(output, "shape", None) != (dim,):
        raise ValueError(
            f"matvec_fn must map a vector of shape ({dim},) to shape ({dim},); "
            f"got output {output}."
        )


def _rademacher_probes(rng_key: jax.Array, num_probes: int, dim: int, dtype):
    """Draw probes of shape ``(num_probes, dim)`` with entries +1 or -1."""
    signs = jax.random.rademacher(rng_key, (num_probes, dim), dtype=jnp.int32)
    return signs.astype(dtype)


def _lanczos_tridiagonal(
    matvec_fn: Callable, start: jax.Array, num_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Run Lanczos with full reorthogonalization from a unit vector.

    Args:
        matvec_fn: ``v -> A v`` for a symmetric ``A`` of shape ``(dim, dim)``.
        start: Unit vector ``q_0`` of shape ``(dim,)``.
        num_steps: Number of steps ``m``, at most ``dim``.

    Returns:
        ``(alphas, betas)`` of shape ``(m,)`` each: the diagonal of the
        tridiagonal matrix ``T = Q' A Q`` and its off-diagonal in
        ``betas[:-1]``. After a breakdown (an invariant Krylov subspace, so
        ``beta ≈ 0``) the remaining steps give ``alpha = 1`` and ``beta = 0``:
        a decoupled identity block whose eigenvectors have zero weight on
        ``q_0``, so it leaves ``e_1' log(T) e_1`` unchanged.
    """
    dim = start.shape[0]
    dtype = start.dtype
    # Dropping an off-diagonal entry beta changes e_1' log(T) e_1 only at order
    # beta^2, so a tolerance of sqrt(eps) times the norm estimate costs about eps.
    breakdown_tolerance = jnp.sqrt(jnp.finfo(dtype).eps)

    def step(carry, index):
        basis, previous, current, previous_beta, active, norm_estimate = carry

        product = matvec_fn(current)
        alpha = jnp.dot(current, product)
        residual = product - alpha * current - previous_beta * previous
        # Two passes of classical Gram-Schmidt against all stored vectors keep
        # the basis orthogonal to working precision. Rows not yet written are 0.
        residual = residual - basis.T @ (basis @ residual)
        residual = residual - basis.T @ (basis @ residual)
        beta = jnp.linalg.norm(residual)

        norm_estimate = jnp.maximum(norm_estimate, jnp.abs(alpha) + previous_beta)
        next_active = active & (beta > breakdown_tolerance * norm_estimate)
        safe_beta = jnp.where(next_active, beta, 1.0)
        following = jnp.where(next_active, residual / safe_beta, 0.0)
        basis = basis.at[index + 1].set(following, mode="drop")

        alpha_out = jnp.where(active, alpha, 1.0)
        beta_out = jnp.where(next_active, beta, 0.0)
        carry = (basis, current, following, beta_out, next_active, norm_estimate)
        return carry, (alpha_out, beta_out)

    basis = jnp.zeros((num_steps, dim), dtype).at[0].set(start)
    init = (
        basis,
        jnp.zeros_like(start),
        start,
        jnp.zeros((), dtype),
        jnp.ones((), bool),
        jnp.zeros((), dtype),
    )
    _, (alphas, betas) = jax.lax.scan(step, init, jnp.arange(num_steps))
    return alphas, betas


def _quadrature_log(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """Compute ``e_1' log(T) e_1 = sum_k U_1k^2 log theta_k``, ``T = U diag(theta) U'``.

    ``alphas`` and ``betas`` of shape ``(m,)`` are the output of
    :func:`_lanczos_tridiagonal`; the result is a scalar.
    """
    tridiagonal = (
        jnp.diag(alphas) + jnp.diag(betas[:-1], k=1) + jnp.diag(betas[:-1], k=-1)
    )
    ritz_values, ritz_vectors = jnp.linalg.eigh(tridiagonal)
    weights = ritz_vectors[0] ** 2
    # A negative Ritz value proves that A is not positive definite, and log
    # returns NaN for it.
    return jnp.sum(weights * jnp.log(ritz_values))


def logdet_slq(
    rng_key: jax.Array,
    matvec_fn: Callable[[jax.Array], jax.Array],
    dim: int,
    *,
    num_probes: int = 16,
    num_lanczos_steps: int = 30,
    dtype=None,
) -> LogdetEstimate:
    """Estimate ``log det A`` by stochastic Lanczos quadrature, given ``v -> A v``.

    For each Rademacher probe ``v_p`` (so ``|v_p|^2 = dim``), ``m`` Lanczos
    steps from ``v_p / |v_p|`` give a tridiagonal ``T_p = U diag(theta) U'``, and

        v_p' log(A) v_p ≈ dim * sum_k U_1k^2 log theta_k.

    The estimate is the mean of these values over probes, and its standard
    error is their standard deviation over ``sqrt(num_probes)``. ``A`` is never
    formed. Each probe stores its Lanczos basis, ``num_lanczos_steps * dim``
    numbers, and probes run together under ``jax.vmap``.

    Bias: for finite ``m`` the Gauss quadrature overestimates ``log det A``
    (the even derivatives of ``log`` are negative), by an amount that falls
    geometrically in ``m / sqrt(cond(A))``. About ``sqrt(cond(A))`` steps make
    it negligible. The probe noise is zero for a diagonal ``A`` and grows with
    the off-diagonal part of ``log A``.

    The function is traceable: call it under ``jax.jit`` (and ``jax.vmap`` over
    a batch of points) to compile the Lanczos loop once. Its outputs carry no
    gradient (``stop_gradient``), because differentiating the Lanczos recursion
    is numerically unstable and the eigendecomposition of ``T`` has no
    derivative at the repeated Ritz values that a breakdown creates. For
    gradients of ``log det A`` use :func:`logdet_gradient_surrogate`.

    Args:
        rng_key: Key for the probes.
        matvec_fn: ``v -> A v`` for a symmetric positive definite ``A``, mapping
            shape ``(dim,)`` to ``(dim,)``; it must work under ``jax.vmap``.
        dim: Dimension of ``A``.
        num_probes: Number of probes ``P``, at least 2 for a standard error.
        num_lanczos_steps: Lanczos steps ``m`` per probe; values above ``dim``
            are reduced to ``dim``, where Lanczos is exact.
        dtype: Floating dtype of the probes; ``None`` picks JAX's default float.

    Returns:
        A :class:`LogdetEstimate`. The estimate is NaN when a Ritz value is
        negative, which proves that ``A`` is not positive definite; a
        non-positive-definite ``A`` can also go undetected.

    Raises:
        ValueError: If an integer argument is out of range or ``matvec_fn`` does
            not map shape ``(dim,)`` to ``(dim,)``.
    """
    _check_positive_int("dim", dim)
    _check_positive_int("num_probes", num_probes, minimum=2)
    _check_positive_int("num_lanczos_steps", num_lanczos_steps)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    _check_matvec(matvec_fn, dim, dtype)
    num_steps = min(num_lanczos_steps, dim)

    probes = _rademacher_probes(rng_key, num_probes, dim, dtype)
    starts = probes / jnp.sqrt(jnp.asarray(dim, dtype))

    def probe_value(start):
        alphas, betas = _lanczos_tridiagonal(matvec_fn, start, num_steps)
        return dim * _quadrature_log(alphas, betas)

    values = jax.lax.stop_gradient(jax.vmap(probe_value)(starts))
    estimate = jnp.mean(values)
    standard_error = jnp.std(values, ddof=1) / jnp.sqrt(num_probes)
    return LogdetEstimate(estimate, standard_error)


def logdet_gradient_surrogate(
    rng_key: jax.Array,
    matvec_fn: Callable[[jax.Array], jax.Array],
    dim: int,
    *,
    num_probes: int = 1,
    max_cg_iterations: int | None = None,
    tolerance: float = 1e-6,
    dtype=None,
) -> jax.Array:
    """Build a scalar whose gradient is an unbiased estimate of ``grad log det A``.

    With Rademacher probes ``v_p`` and ``w_p = A^{-1} v_p`` solved by conjugate
    gradients and held constant (``stop_gradient``), the surrogate is

        s = (1 / P) sum_p w_p' (A v_p),

    so that ``d s = (1 / P) sum_p v_p' A^{-1} (dA) v_p``, whose expectation is
    ``tr(A^{-1} dA) = d log det A``. Differentiate ``s`` with respect to
    whatever ``matvec_fn`` closes over (network parameters, or the point ``x``
    of a Hessian-vector product). Only matrix-vector products with ``A`` are
    used. The gradient is unbiased up to the conjugate-gradient error, which
    ``tolerance`` bounds relative to ``|v_p|``.

    The value of ``s`` carries no information: it is ``v'v = dim`` on average at
    every parameter value. Use only its gradient, e.g. add ``s - stop_gradient(s)``
    to a loss.

    Args:
        rng_key: Key for the probes.
        matvec_fn: ``v -> A v`` for a symmetric positive definite ``A``, mapping
            shape ``(dim,)`` to ``(dim,)``; it must work under ``jax.vmap``.
        dim: Dimension of ``A``.
        num_probes: Number of probes ``P``.
        max_cg_iterations: Cap on conjugate-gradient iterations per probe;
            ``None`` uses ``jax.scipy.sparse.linalg.cg``'s default, ``10 * dim``.
        tolerance: Relative residual ``|A w - v| / |v|`` at which conjugate
            gradients stop.
        dtype: Floating dtype of the probes; ``None`` picks JAX's default float.

    Returns:
        The surrogate ``s``, a scalar.

    Raises:
        ValueError: If an integer argument is out of range, ``tolerance`` is not
            positive, or ``matvec_fn`` does not map shape ``(dim,)`` to
            ``(dim,)``.
    """
    _check_positive_int("dim", dim)
    _check_positive_int("num_probes", num_probes)
    if max_cg_iterations is not None:
        _check_positive_int("max_cg_iterations", max_cg_iterations)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive; got {tolerance!r}.")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    _check_matvec(matvec_fn, dim, dtype)

    probes = _rademacher_probes(rng_key, num_probes, dim, dtype)

    # The solve must not be differentiated. Hoisting the values that matvec_fn
    # closes over and stopping their gradients keeps JAX from tracing a second
    # (tangent) solve through conjugate gradients.
    converted_matvec, closure_values = jax.closure_convert(matvec_fn, probes[0])
    closure_values = jax.lax.stop_gradient(closure_values)

    def constant_matvec(vector):
        return converted_matvec(vector, *closure_values)

    def solve(probe):
        solution, _ = cg(
            constant_matvec, probe, tol=tolerance, atol=0.0, maxiter=max_cg_iterations
        )
        return solution

    solutions = jax.lax.stop_gradient(jax.vmap(solve)(probes))
    products = jax.vmap(matvec_fn)(probes)
    return jnp.mean(jnp.sum(solutions * products, axis=-1))


def choose_logdet_method(
    dim: int, method: str = "auto", *, projection_rank: int | None = None
) -> str:
    """Pick ``"cholesky"``, ``"low_rank"`` or ``"slq"`` for a ``(dim, dim)`` Hessian.

    ``"auto"`` returns ``"cholesky"`` for ``dim <= EXACT_LOGDET_MAX_DIM`` (256).
    Above, it returns ``"low_rank"`` when ``projection_rank`` is given and
    below ``dim``, and ``"slq"`` otherwise. The exact method needs ``dim``
    Hessian-vector products (batched by ``jax.jacfwd``), an ``O(dim^3)``
    factorization and ``dim^2`` memory per point; SLQ needs ``num_probes *
    num_lanczos_steps`` products (480 with the defaults) and returns a noisy
    value. Measured on one thread of a shared 2-core CPU (float64, jit,
    compile excluded) for a convex potential ``sum c_i x_i^2 / 2 + sum of 256
    softplus features``, exact vs SLQ per point: 0.3 vs 2.8 ms at
    ``dim = 100``, 2.1 vs 7.6 ms at 256, 7.1 vs 10.1 ms at 500, 46 vs 20 ms at
    1000. The threshold is about half the measured crossover, because the
    crossover moves with the SLQ settings and with the cost of a
    Hessian-vector product, and the exact Hessian takes ``dim^2`` memory per
    point of a batch. The low-rank method
    (:func:`~numpyro_pma.lowrank.map_and_logdet_low_rank`) is exact and costs
    ``O(r^3 + dim r)`` per point after one ``O(dim^3)`` factorization shared by
    all points, where ``r = projection_rank``; it applies only to a
    :class:`~numpyro_pma.potential.BrenierPotential` without axis tails.

    Args:
        dim: Dimension of the Hessian.
        method: ``"auto"``, ``"cholesky"``, ``"slq"`` or ``"low_rank"``.
        projection_rank: ``r = sum(hidden_sizes)`` of a potential whose Hessian
            has the low-rank form (see
            :func:`~numpyro_pma.lowrank.projection_rank`), or ``None`` when it
            does not (axis tails, or a Hessian of another function).

    Returns:
        ``"cholesky"``, ``"low_rank"`` or ``"slq"``.

    Raises:
        ValueError: If ``method`` is not one of the four names, ``dim`` is not
            a positive integer, or ``method`` is ``"low_rank"`` while
            ``projection_rank`` is ``None``.
    """
    check_logdet_method(method, "method")
    _check_positive_int("dim", dim)
    if projection_rank is not None:
        _check_positive_int("projection_rank", projection_rank, minimum=0)
    if method == "low_rank" and projection_rank is None:
        raise ValueError(
            "method 'low_rank' needs the projection_rank of a potential without "
            "axis tails; got projection_rank=None."
        )
    if method != "auto":
        return method
    if dim <= EXACT_LOGDET_MAX_DIM:
        return "cholesky"
    if projection_rank is not None and projection_rank < dim:
        return "low_rank"
    return "slq"


def logdet_hessian(
    rng_key: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    *,
    method: str = "auto",
    num_probes: int = 16,
    num_lanczos_steps: int = 30,
) -> LogdetEstimate:
    """Compute or estimate ``log det Hess fn(x)`` at one point.

    ``"cholesky"`` forms the Hessian with :func:`hessian_and_gradient` and
    factorizes it (standard error 0, NaN where the Hessian is not positive
    definite), and its value can be differentiated. ``"slq"`` runs
    :func:`logdet_slq` on :func:`hessian_vector_product`, and its value carries
    no gradient. ``"auto"`` chooses between the two by
    :func:`choose_logdet_method`. The low-rank method needs the structure of a
    potential, not just ``fn``: use
    :func:`~numpyro_pma.lowrank.map_and_logdet_low_rank`. Use ``jax.vmap`` for
    a batch of points.

    Args:
        rng_key: Key for the SLQ probes; unused by ``"cholesky"``.
        fn: Scalar function of a point of shape ``(dim,)``, e.g. a convex
            potential ``u``.
        x: Point of shape ``(dim,)``.
        method: ``"auto"``, ``"cholesky"`` or ``"slq"``.
        num_probes: Probes for SLQ.
        num_lanczos_steps: Lanczos steps per probe for SLQ.

    Returns:
        A :class:`LogdetEstimate`.

    Raises:
        ValueError: If ``x`` is not one-dimensional, ``method`` is unknown or
            ``"low_rank"``, or an SLQ setting is out of range.
    """
    if method == "low_rank":
        raise ValueError(
            "logdet_hessian cannot use method 'low_rank', which needs a "
            "potential's structure; call numpyro_pma.lowrank."
            "map_and_logdet_low_rank instead."
        )
    if jnp.ndim(x) != 1:
        raise ValueError(f"x must have shape (dim,); got shape {jnp.shape(x)}.")
    dim = jnp.shape(x)[0]
    chosen = choose_logdet_method(dim, method)

    if chosen == "cholesky":
        _, hessian = hessian_and_gradient(fn, x)
        logdet, _ = logdet_cholesky(hessian)
        return LogdetEstimate(logdet, jnp.zeros_like(logdet))

    return logdet_slq(
        rng_key,
        hessian_vector_product(fn, x),
        dim,
        num_probes=num_probes,
        num_lanczos_steps=num_lanczos_steps,
        dtype=jnp.result_type(x),
    )
