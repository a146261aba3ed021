r"""The strictly convex Brenier potential ``u(x)``, written as a Flax module.

.. math::

    u(x) = \tfrac12 x^\top (L L^\top + \epsilon I) x + b^\top x + \psi(x)

where ``L`` is lower triangular, ``epsilon > 0`` keeps the Hessian positive
definite, and ``psi`` is an input-convex neural network (Amos, Xu and Kolter,
"Input Convex Neural Networks", ICML 2017). Convexity of ``psi`` follows from
non-negative weights on the hidden-to-hidden path and softplus activations,
which are convex and non-decreasing. Softplus (not ReLU) keeps the Hessian
non-zero, so the push-forward has a density everywhere.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["BrenierPotential", "InputConvexNetwork", "quadratic_coefficients"]

# softplus(-6) ≈ 2.5e-3: the network's output weights start small, so the map
# starts at the quadratic part, yet their gradients are not negligible.
_OUTPUT_WEIGHT_INIT = -6.0


class InputConvexNetwork(nn.Module):
    """Input-convex network ``psi: R^d -> R``.

    Layer ``k`` computes ``h_k = softplus(W_k^z h_{k-1} + W_k^x x + c_k)`` with
    ``W_k^z = softplus(V_k) >= 0``; the output is ``a^T h_K`` with
    ``a = softplus(v) >= 0``. Each ``h_k`` is convex in ``x``, hence so is psi.

    Attributes:
        hidden_sizes: Widths of the hidden layers; empty means ``psi = 0``.
        output_power: Power ``p`` applied to the last layer, ``h_K^p / p``
            (convex and non-decreasing for ``p >= 1``). With ``p = 1`` the map
            ``grad psi`` is bounded, so the guide's tails are Gaussian; ``p = 3``
            lets ``grad psi`` grow quadratically, which gives exponential tails.
        axis_tails: Add the per-coordinate cubic terms of ``_axis_tails``, which
            let the guide's tails along each whitened axis be heavier than
            Gaussian. Ignored when ``hidden_sizes`` is empty.
    """

    hidden_sizes: Sequence[int] = (32, 32)
    output_power: int = 1
    axis_tails: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Evaluate psi at one point ``x`` of shape ``(dim,)``; returns a scalar."""
        if not self.hidden_sizes:
            return jnp.zeros((), x.dtype)
        input_scale = 1.0 / jnp.sqrt(x.shape[-1])
        hidden = None
        for k, width in enumerate(self.hidden_sizes):
            pre = nn.Dense(
                width,
                kernel_init=nn.initializers.normal(input_scale),
                # Flax's default param_dtype is float32, which would leave the
                # network in float32 under jax_enable_x64.
                param_dtype=x.dtype,
                name=f"input_{k}",
            )(x)
            if hidden is not None:
                raw = self.param(
                    f"hidden_{k}",
                    nn.initializers.normal(0.1),
                    (hidden.shape[-1], width),
                    x.dtype,
                )
                # The mean of softplus(raw) ≈ log 2 per entry: rescale by the fan-in
                # so that hidden activations keep the same size at every depth.
                pre = pre + hidden @ (jax.nn.softplus(raw) / hidden.shape[-1])
            hidden = jax.nn.softplus(pre)
        if self.output_power != 1:
            hidden = hidden**self.output_power / self.output_power
        raw_out = self.param(
            "output",
            nn.initializers.constant(_OUTPUT_WEIGHT_INIT),
            (hidden.shape[-1],),
            x.dtype,
        )
        value = hidden @ jax.nn.softplus(raw_out)
        if self.axis_tails:
            value = value + self._axis_tails(x)
        return value

    def _axis_tails(self, x: jax.Array) -> jax.Array:
        """Per-coordinate cubic growth ``sum_i c+_i s(x_i)^3/3 + c-_i s(-x_i)^3/3``.

        ``s`` is softplus and ``c+, c- >= 0``. Its gradient grows quadratically,
        so a Gaussian pushed through it gets exponential tails along each axis,
        as a log-scale parameter's posterior often has.
        """
        raw = self.param(
            "axis_tails",
            nn.initializers.constant(_OUTPUT_WEIGHT_INIT),
            (2, x.shape[-1]),
            x.dtype,
        )
        weights = jax.nn.softplus(raw)
        right = jax.nn.softplus(x) ** 3 / 3
        left = jax.nn.softplus(-x) ** 3 / 3
        return weights[0] @ right + weights[1] @ left


class BrenierPotential(nn.Module):
    """Strictly convex potential: a quadratic part plus an input-convex network.

    The parameters are ``scale_tril`` (``L``, shape ``(dim, dim)``, only its lower
    triangle is used), ``shift`` (``b``, shape ``(dim,)``) and the network's
    parameters under ``network``. ``grad u`` at ``x = 0`` is ``b + grad psi(0)``
    and ``Hess u >= epsilon I`` everywhere.

    Attributes:
        dim: Dimension ``d`` of the input.
        hidden_sizes: Widths of the network's hidden layers; ``()`` gives a
            purely quadratic potential (a Gaussian guide).
        min_eigenvalue: ``epsilon``, the lower bound on the eigenvalues of the
            Hessian of the quadratic part.
        output_power: See :class:`InputConvexNetwork`.
        axis_tails: See :class:`InputConvexNetwork`.
    """

    dim: int
    hidden_sizes: Sequence[int] = (32, 32)
    min_eigenvalue: float = 1e-3
    output_power: int = 1
    axis_tails: bool = True

    def setup(self):
        """Declare the quadratic coefficients and the network."""
        identity = jnp.sqrt(1.0 - self.min_eigenvalue)
        self.scale_tril = self.param(
            "scale_tril",
            lambda key, shape, dtype: identity * jnp.eye(shape[0], dtype=dtype),
            (self.dim, self.dim),
            jnp.result_type(float),
        )
        self.shift = self.param(
            "shift", nn.initializers.zeros, (self.dim,), jnp.result_type(float)
        )
        self.network = InputConvexNetwork(
            self.hidden_sizes, self.output_power, self.axis_tails
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Evaluate ``u`` at one point ``x`` of shape ``(dim,)``; returns a scalar."""
        lower = jnp.tril(self.scale_tril)
        projected = lower.T @ x
        quadratic = 0.5 * (projected @ projected + self.min_eigenvalue * x @ x)
        return quadratic + self.shift @ x + self.network(x)


def quadratic_coefficients(params: dict, min_eigenvalue: float):
    """Return ``(A, b)`` of the quadratic part ``x'Ax/2 + b'x`` of a potential.

    Args:
        params: The ``params`` collection of a :class:`BrenierPotential`.
        min_eigenvalue: The potential's ``epsilon``.

    Returns:
        ``A = L L^T + epsilon I`` of shape ``(dim, dim)`` and ``b`` of shape
        ``(dim,)``.
    """
    lower = jnp.tril(params["scale_tril"])
    dim = lower.shape[0]
    matrix = lower @ lower.T + min_eigenvalue * jnp.eye(dim, dtype=lower.dtype)
    return matrix, params["shift"]
