r"""Exact ``log det Hess u(x)`` in ``O(r^3)`` per point, by the low rank of the network.

The input-convex network of a :class:`~numpyro_pma.potential.BrenierPotential`
depends on ``x`` only through its first-layer projections. Every layer ``k`` adds
``W_k^x x + c_k`` to its pre-activation. Stacking these kernels (transposed)
gives ``P`` of shape ``(r, d)`` with ``r = sum(hidden_sizes)``, and stacking
the biases gives ``c`` of shape ``(r,)``, so that

.. math::

    \psi(x) = g(P x + c)

for a function ``g: R^r -> R`` (:func:`projected_network`), provided the
potential has no axis tails. Then, with ``A = L L^T + \epsilon I`` and
``M(x) = \nabla^2 g(P x + c)`` of shape ``(r, r)``,

.. math::

    \nabla^2 u(x) = A + P^\top M(x) P, \qquad
    \log\det \nabla^2 u(x) = \log\det A + \log\det(I_r + M(x) S),

where ``S = P A^{-1} P^T`` (the matrix determinant lemma). ``A``, its Cholesky
factor and ``S`` are shared by all points, so each point needs only the
``(r, r)`` Hessian of ``g`` and an ``(r, r)`` factorization, ``O(r^3)``,
in place of ``O(d^3)`` for the full Hessian.

The axis tails ``sum_i c_i s(x_i)^3 / 3`` add a diagonal, full-rank term to the
Hessian, which breaks the low-rank structure. The functions here raise
``ValueError`` for a potential that has them.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from numpyro_pma.logdet import hessian_and_gradient, logdet_cholesky
from numpyro_pma.potential import BrenierPotential, quadratic_coefficients

__all__ = [
    "LowRankFactors",
    "NetworkProjection",
    "check_low_rank_potential",
    "low_rank_factors",
    "map_and_logdet_low_rank",
    "network_projection",
    "projected_network",
    "projection_rank",
]


class NetworkProjection(NamedTuple):
    """First-layer projections ``y = P x + c`` of an input-convex network.

    Attributes:
        matrix: ``P`` of shape ``(r, dim)``, the transposed kernels of the
            ``input_k`` layers stacked in layer order.
        offset: ``c`` of shape ``(r,)``, their biases.
    """

    matrix: jax.Array
    offset: jax.Array


class LowRankFactors(NamedTuple):
    """Quantities of the low-rank log determinant that all points share.

    Attributes:
        quadratic: ``A = L L^T + epsilon I`` of shape ``(dim, dim)``.
        shift: ``b`` of shape ``(dim,)``.
        projection: ``P`` of shape ``(r, dim)``.
        offset: ``c`` of shape ``(r,)``.
        coupling: ``K`` of shape ``(min(r, dim), r)`` with ``K^T K = S =
            P A^{-1} P^T``, the triangular factor of a QR decomposition of
            ``C^{-1} P^T`` with ``C C^T = A``.
        quadratic_logdet: ``log det A``, a scalar.
    """

    quadratic: jax.Array
    shift: jax.Array
    projection: jax.Array
    offset: jax.Array
    coupling: jax.Array
    quadratic_logdet: jax.Array


def _has_axis_tails(potential: BrenierPotential) -> bool:
    # The network ignores axis_tails when it has no hidden layers.
    return bool(potential.axis_tails) and len(tuple(potential.hidden_sizes)) > 0


def projection_rank(potential: BrenierPotential) -> int | None:
    """Return ``r = sum(hidden_sizes)`` if the low-rank form applies, else ``None``.

    The form applies to a potential without axis tails (``axis_tails=False``,
    or ``hidden_sizes=()``, where ``r = 0``).
    """
    if _has_axis_tails(potential):
        return None
    return int(sum(potential.hidden_sizes))


def check_low_rank_potential(potential: BrenierPotential) -> None:
    """Raise ``ValueError`` if ``potential`` has axis tails.

    Raises:
        ValueError: If ``potential.axis_tails`` is true and ``hidden_sizes`` is
            not empty: the tails' Hessian is diagonal with full rank ``dim``.
    """
    if _has_axis_tails(potential):
        raise ValueError(
            "the low-rank log determinant needs a potential without axis tails "
            "(the tails add a diagonal term of full rank to the Hessian); got "
            f"axis_tails=True with hidden_sizes={tuple(potential.hidden_sizes)}. "
            "Use axis_tails=False (AutoBrenier's default above 256 latent "
            "dimensions), or logdet_method='cholesky' or 'slq'."
        )


def network_projection(potential: BrenierPotential, params: dict) -> NetworkProjection:
    """Stack the first-layer kernels and biases of the potential's network.

    Args:
        potential: The potential; only ``dim`` and ``hidden_sizes`` are read.
        params: Its ``params`` collection.

    Returns:
        A :class:`NetworkProjection` with ``P`` of shape ``(r, dim)`` and ``c`` of
        shape ``(r,)``, ``r = sum(hidden_sizes)``; both are empty when
        ``hidden_sizes`` is empty.
    """
    widths = tuple(potential.hidden_sizes)
    dtype = params["scale_tril"].dtype
    if not widths:
        empty = jnp.zeros((0, potential.dim), dtype)
        return NetworkProjection(empty, jnp.zeros((0,), dtype))
    network = params["network"]
    layers = [network[f"input_{k}"] for k in range(len(widths))]
    matrix = jnp.concatenate([layer["kernel"].T for layer in layers], axis=0)
    offset = jnp.concatenate([layer["bias"] for layer in layers], axis=0)
    return NetworkProjection(matrix, offset)


def projected_network(
    potential: BrenierPotential, params: dict, projections: jax.Array
) -> jax.Array:
    """Evaluate ``g(y)``, the network as a function of its first-layer projections.

    With ``y = (y_1, ..., y_K)`` split by ``hidden_sizes``, ``g`` runs the layers
    ``h_k = softplus(y_k + W_k^z h_{k-1})`` of
    :class:`~numpyro_pma.potential.InputConvexNetwork` and returns
    ``a^T h_K^p / p`` (``a^T h_K`` for ``p = 1``), so ``psi(x) = g(P x + c)``
    for a potential without axis tails.

    ``g`` is convex on ``R^r``, so ``Hess g`` is positive semi-definite.
    ``h_1 = softplus(y_1)`` is convex because softplus is. If ``h_{k-1}`` is
    convex, then ``y_k + W_k^z h_{k-1}`` is convex (``W_k^z = softplus(V_k) / n
    >= 0``), and softplus of it is convex because softplus is convex and
    non-decreasing. ``h^p / p`` is convex and non-decreasing on ``h > 0`` for
    ``p >= 1``, and ``a = softplus(v) >= 0`` keeps the output a non-negative
    sum of convex functions.

    Args:
        potential: The potential; ``hidden_sizes`` and ``output_power`` are read.
        params: Its ``params`` collection.
        projections: ``y`` of shape ``(r,)``.

    Returns:
        ``g(y)``, a scalar (0 when ``hidden_sizes`` is empty).

    Raises:
        ValueError: If ``projections`` does not have shape ``(r,)``.
    """
    widths = tuple(potential.hidden_sizes)
    rank = sum(widths)
    if jnp.shape(projections) != (rank,):
        raise ValueError(
            f"projections must have shape ({rank},), the sum of hidden_sizes "
            f"{widths}; got shape {jnp.shape(projections)}."
        )
    if not widths:
        return jnp.zeros((), projections.dtype)
    network = params["network"]
    hidden = None
    start = 0
    for k, width in enumerate(widths):
        pre = projections[start : start + width]
        start += width
        if hidden is not None:
            weights = jax.nn.softplus(network[f"hidden_{k}"]) / hidden.shape[-1]
            pre = pre + hidden @ weights
        hidden = jax.nn.softplus(pre)
    power = potential.output_power
    if power != 1:
        hidden = hidden**power / power
    return hidden @ jax.nn.softplus(network["output"])


def low_rank_factors(potential: BrenierPotential, params: dict) -> LowRankFactors:
    """Compute ``A``, ``log det A`` and the factor ``K`` of ``S = P A^{-1} P^T``.

    Cost: a Cholesky factorization of ``A`` (``O(d^3)``), a triangular solve
    with ``r`` right-hand sides (``O(d^2 r)``) and a QR decomposition of a
    ``(d, r)`` matrix, once for all points. The result is differentiable in
    ``params`` when ``r <= dim`` (JAX differentiates QR only for tall or square
    matrices).

    Args:
        potential: A potential without axis tails.
        params: Its ``params`` collection.

    Returns:
        The :class:`LowRankFactors`. ``quadratic_logdet`` is NaN if ``A`` is not
        positive definite (only possible for non-finite parameters).

    Raises:
        ValueError: If the potential has axis tails.
    """
    check_low_rank_potential(potential)
    quadratic, shift = quadratic_coefficients(params, potential.min_eigenvalue)
    cholesky_factor = jnp.linalg.cholesky(quadratic)
    diagonal = jnp.diagonal(cholesky_factor)
    quadratic_logdet = 2.0 * jnp.sum(jnp.log(diagonal))
    projection, offset = network_projection(potential, params)
    # W = C^{-1} P^T has W^T W = P A^{-1} P^T = S. The R factor of W = Q R has
    # R^T R = S too, without forming S: its condition number is that of W, not
    # its square, and R exists whatever the rank of P or the sign of r - d.
    whitened = solve_triangular(cholesky_factor, projection.T, lower=True)
    coupling = jnp.linalg.qr(whitened, mode="r")
    return LowRankFactors(
        quadratic, shift, projection, offset, coupling, quadratic_logdet
    )


def map_and_logdet_low_rank(
    potential: BrenierPotential,
    params: dict,
    factors: LowRankFactors,
    x: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Evaluate ``T(x) = grad u(x)`` and the exact ``log det Hess u(x)`` at one point.

    With ``y = P x + c``, one forward-over-reverse pass over ``g`` gives
    ``grad g(y)`` and ``M = Hess g(y)`` of shape ``(r, r)``; then

        T(x) = A x + b + P^T grad g(y),
        log det Hess u(x) = log det A + log det(I + K M K^T),

    where ``det(I + K M K^T) = det(I + M K^T K) = det(I + M S)``. The matrix
    ``I + K M K^T`` is symmetric with eigenvalues at least 1 (``M`` is
    positive semi-definite), so its Cholesky factorization is stable. That
    form avoids factorizing ``M``, whose eigenvalues fall to ``softplus''`` of
    large projections (``~e^{-|y|}``), and the LU factorization that the
    non-symmetric ``I + M S`` would need. Cost ``O(r^3 + d r + d^2)``.
    Differentiable in ``params`` and ``x``.

    Args:
        potential: A potential without axis tails.
        params: Its ``params`` collection.
        factors: :func:`low_rank_factors` of the same ``params``.
        x: Point of shape ``(dim,)``.

    Returns:
        ``(T(x), log det Hess u(x))`` with shapes ``(dim,)`` and ``()``; the log
        determinant is NaN where ``I + K M K^T`` is not positive definite
        (``M`` non-finite).

    Raises:
        ValueError: If ``x`` does not have shape ``(dim,)``.
    """
    if jnp.shape(x) != (potential.dim,):
        raise ValueError(
            f"x must have shape ({potential.dim},); got shape {jnp.shape(x)}."
        )
    projections = factors.projection @ x + factors.offset
    network_gradient, network_hessian = hessian_and_gradient(
        lambda y: projected_network(potential, params, y), projections
    )
    transport = (
        factors.quadratic @ x + factors.shift + factors.projection.T @ network_gradient
    )
    # Forward-over-reverse Hessians are symmetric only up to rounding.
    network_hessian = 0.5 * (network_hessian + network_hessian.T)
    coupling = factors.coupling
    inner = jnp.eye(coupling.shape[0], dtype=x.dtype) + (
        coupling @ network_hessian @ coupling.T
    )
    inner_logdet, _ = logdet_cholesky(inner)
    return transport, factors.quadratic_logdet + inner_logdet
