r"""Projections of a mirror-step target onto the convex potential family.

Two regressions, both warm-started at ``theta_k`` on reference draws ``x``:

- value regression of ``u_theta`` on target values ``t(x)`` (the step
  ``u_k - eta (r_k - mean r_k)``), by
  :func:`~numpyro_pma.projection.project_potential`;
- map regression of ``grad u_theta`` on a target map ``t(x)`` (the step
  ``T_k + eta Hess u_k (grad log pi - grad log q_k) o T_k``) in ``L2(mu)``:
  ``min_theta mean_i |grad u_theta(x_i) - t(x_i)|^2``.

Each first fits the quadratic part exactly by least squares, then takes a few
optimizer steps on the network ``psi``. The least-squares Hessian ``A`` is
projected onto ``{A >= 2 epsilon I}`` by clipping its eigenvalues, where
``epsilon`` is the potential's ``min_eigenvalue``. Without the clip, a data
set whose map needs most of its curvature from the network (two well-separated
modes) drives ``A`` to the boundary ``epsilon I``, and float32 round-off in
the fit then makes ``A - epsilon I`` indefinite at almost every step.
"""

import jax
import jax.numpy as jnp
import optax

from numpyro_pma.potential import BrenierPotential
from numpyro_pma.projection import project_potential, quadratic_features

__all__ = [
    "clipped_scale_tril",
    "fit_linear_map",
    "fit_quadratic_clipped",
    "network_only",
    "project_map",
    "project_values",
]


def clipped_scale_tril(matrix: jax.Array, min_eigenvalue: float) -> jax.Array:
    """Cholesky factor ``L`` with ``L L^T + epsilon I = A_+``.

    ``A_+`` is the symmetric ``matrix`` with its eigenvalues raised to at
    least ``2 epsilon``, the nearest such matrix in Frobenius norm.

    Args:
        matrix: Symmetric ``A`` of shape ``(dim, dim)``.
        min_eigenvalue: ``epsilon``.

    Returns:
        Lower-triangular ``L`` of shape ``(dim, dim)``.
    """
    eigenvalues, vectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    floor = 2.0 * min_eigenvalue
    clipped = (vectors * jnp.maximum(eigenvalues, floor)) @ vectors.T
    identity = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    return jnp.linalg.cholesky(clipped - min_eigenvalue * identity)


def fit_quadratic_clipped(x: jax.Array, targets: jax.Array, min_eigenvalue: float):
    """Least-squares fit of ``x'Ax/2 + b'x + c`` to ``targets``, ``A`` clipped.

    Args:
        x: Points of shape ``(n, dim)``.
        targets: Values of shape ``(n,)``.
        min_eigenvalue: ``epsilon`` of the potential.

    Returns:
        ``(scale_tril, shift)`` of the potential's quadratic part.
    """
    dim = x.shape[1]
    coefficients, *_ = jnp.linalg.lstsq(quadratic_features(x), targets)
    num_products = dim * (dim + 1) // 2
    rows, cols = jnp.triu_indices(dim)
    upper = (
        jnp.zeros((dim, dim), x.dtype).at[rows, cols].set(coefficients[:num_products])
    )
    matrix = upper + jnp.triu(upper, 1).T
    shift = coefficients[num_products : num_products + dim]
    return clipped_scale_tril(matrix, min_eigenvalue), shift


def fit_linear_map(x: jax.Array, targets: jax.Array, min_eigenvalue: float):
    """Least-squares fit of ``A x + b`` (``A`` symmetric) to ``targets``, clipped.

    Solves ``min sum_i |A x_i + b - t_i|^2`` over symmetric ``A`` and ``b``,
    then clips the eigenvalues of ``A`` as :func:`clipped_scale_tril` does.

    Args:
        x: Points of shape ``(n, dim)``.
        targets: ``t_i``, shape ``(n, dim)``.
        min_eigenvalue: ``epsilon`` of the potential.

    Returns:
        ``(scale_tril, shift)`` of the potential's quadratic part.
    """
    n, dim = x.shape
    rows, cols = jnp.triu_indices(dim)
    identity = jnp.eye(dim, dtype=x.dtype)
    # Column m of the design contains d(A x)/dA_jk for (j, k) = (rows[m], cols[m]):
    # the upper entry A_jk enters output j through x_k and, when j < k,
    # output k through x_j.
    first = x[:, cols][:, None, :] * identity[:, rows][None]
    second = x[:, rows][:, None, :] * identity[:, cols][None]
    second = jnp.where(rows == cols, 0.0, second)
    shift_columns = jnp.broadcast_to(identity, (n, dim, dim))
    design = jnp.concatenate([first + second, shift_columns], axis=-1)
    design = jnp.reshape(design, (n * dim, -1))
    coefficients, *_ = jnp.linalg.lstsq(design, jnp.reshape(targets, (-1,)))

    num_entries = rows.shape[0]
    upper = (
        jnp.zeros((dim, dim), x.dtype).at[rows, cols].set(coefficients[:num_entries])
    )
    matrix = upper + jnp.triu(upper, 1).T
    return clipped_scale_tril(matrix, min_eigenvalue), coefficients[num_entries:]


def network_only(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """Wrap ``optimizer`` so that it moves only the ``network`` parameters.

    The quadratic parameters ``scale_tril`` and ``shift`` get zero updates.
    """

    def labels(params):
        return {name: "network" if name == "network" else "frozen" for name in params}

    return optax.multi_transform(
        {"network": optimizer, "frozen": optax.set_to_zero()}, labels
    )


def _network_part(potential: BrenierPotential, params: dict):
    def network(point):
        return potential.apply(
            {"params": params}, point, method=lambda module, y: module.network(y)
        )

    return network


def project_values(
    potential: BrenierPotential,
    params: dict,
    optimizer_state: optax.OptState,
    x: jax.Array,
    targets: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    fit_quadratic_exactly: bool,
):
    """Regress ``u_theta`` on target values at ``x``, warm-started at ``params``.

    With ``fit_quadratic_exactly`` the quadratic part is fitted by
    :func:`fit_quadratic_clipped` to ``t - psi(x)``, and ``optimizer`` should
    be wrapped by :func:`network_only` so that it leaves that fit alone. The
    optimizer steps are those of
    :func:`~numpyro_pma.projection.project_potential`.

    Args:
        potential: The potential family.
        params: Starting parameters ``theta_k``.
        optimizer_state: State of ``optimizer`` for ``params``.
        x: Reference draws, shape ``(n, dim)``.
        targets: ``t(x)``, shape ``(n,)``.
        optimizer: Optax optimizer of the regression.
        num_steps: Optimizer steps.
        fit_quadratic_exactly: Fit the quadratic part by least squares first.

    Returns:
        ``(params, optimizer_state, loss)`` with ``loss`` the final mean
        squared error after removing the mean offset.
    """
    if fit_quadratic_exactly:
        network_at_x = jax.vmap(_network_part(potential, params))(x)
        scale_tril, shift = fit_quadratic_clipped(
            x, targets - network_at_x, potential.min_eigenvalue
        )
        params = {**params, "scale_tril": scale_tril, "shift": shift}
    return project_potential(
        potential,
        params,
        optimizer_state,
        x,
        targets,
        optimizer=optimizer,
        num_steps=num_steps,
        fit_quadratic_exactly=False,
    )


def project_map(
    potential: BrenierPotential,
    params: dict,
    optimizer_state: optax.OptState,
    x: jax.Array,
    targets: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    fit_quadratic_exactly: bool,
):
    """Regress ``grad u_theta`` on a target map at ``x``, warm-started at ``params``.

    With ``fit_quadratic_exactly`` the quadratic part is fitted by
    :func:`fit_linear_map` to ``t - grad psi(x)``, and ``optimizer`` should be
    wrapped by :func:`network_only`.

    Args:
        potential: The potential family.
        params: Starting parameters ``theta_k``.
        optimizer_state: State of ``optimizer`` for ``params``.
        x: Reference draws, shape ``(n, dim)``.
        targets: ``t(x)``, shape ``(n, dim)``.
        optimizer: Optax optimizer of the regression.
        num_steps: Optimizer steps.
        fit_quadratic_exactly: Fit the quadratic part by least squares first.

    Returns:
        ``(params, optimizer_state, loss)`` with ``loss`` the final
        ``mean_i |grad u_theta(x_i) - t_i|^2``.
    """
    if fit_quadratic_exactly:
        network_gradient = jax.vmap(jax.grad(_network_part(potential, params)))(x)
        scale_tril, shift = fit_linear_map(
            x, targets - network_gradient, potential.min_eigenvalue
        )
        params = {**params, "scale_tril": scale_tril, "shift": shift}

    def regression_loss(trainable):
        maps = jax.vmap(jax.grad(lambda y: potential.apply({"params": trainable}, y)))(
            x
        )
        return jnp.mean(jnp.sum((maps - targets) ** 2, axis=-1))

    def optimizer_step(carry, _):
        trainable, opt_state = carry
        grads = jax.grad(regression_loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), None

    if "network" in params:
        (params, optimizer_state), _ = jax.lax.scan(
            optimizer_step, (params, optimizer_state), None, length=num_steps
        )
    return params, optimizer_state, regression_loss(params)
