"""``AutoBrenier``: a NumPyro autoguide whose posterior is a Brenier map of N(0, I)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import AffineTransform, LowerCholeskyAffine
from numpyro.infer import init_to_median
from numpyro.infer.autoguide import AutoContinuous

from numpyro_pma.logdet import EXACT_LOGDET_MAX_DIM
from numpyro_pma.potential import BrenierPotential
from numpyro_pma.transform import BrenierTransform
from numpyro_pma.validation import (
    check_hidden_sizes,
    check_model,
    check_positive_int,
    raise_for_nonfinite_initial_point,
)

__all__ = ["AutoBrenier"]

# Largest latent dimension at which whitening="auto" is dense. Each Newton
# step of the dense fit evaluates 64 Hessians of the model's log density, of
# size (d, d), whose cost depends on the model. NOTE: the threshold is a
# judgement, not measured; examples/correlated_regression.py shows what a
# diagonal start costs on a correlated posterior at d = 300.
DENSE_WHITENING_MAX_DIM = 256

# Draws behind ``median`` and ``quantiles``, which have no closed form: their
# Monte Carlo error is about 1.25 sd / sqrt(4096) ≈ 0.02 posterior sd.
_NUM_QUANTILE_DRAWS = 4096


class AutoBrenier(AutoContinuous):
    """Autoguide ``q = (loc + scale * grad u) # N(0, I_d)`` over the latent vector.

    ``u`` is a strictly convex :class:`~numpyro_pma.potential.BrenierPotential`
    (quadratic part plus an input-convex network), so ``grad u`` is the optimal
    transport (Brenier) map from the standard Gaussian to the guide's
    distribution in whitened coordinates; ``loc`` and ``scale`` (shape ``(d,)``)
    whiten the model's unconstrained latent space. With dense whitening (the
    default up to ``d = 256``) the guide is ``loc + C grad u`` with a
    lower-triangular ``C`` of shape ``(d, d)``, which suits posteriors with
    strong correlations. The guide is trained
    either by :class:`~numpyro_pma.PMA` (mirror steps, which keep the whitening
    fixed at a Gaussian fit) or, as any autoguide, by ``numpyro.infer.SVI``
    with ``Trace_ELBO`` (all parameters trained).

    Its parameters are ``{prefix}_loc``, ``{prefix}_scale`` (``{prefix}_scale_tril``
    with dense whitening) and ``{prefix}_potential`` (a Flax ``params``
    collection).

    Args:
        model: A NumPyro model with continuous latent sites.
        prefix: Prefix of the guide's parameter names.
        init_loc_fn: Init strategy giving the initial ``loc``.
        hidden_sizes: Widths of the input-convex network; ``()`` gives a
            Gaussian guide with a full covariance.
        min_eigenvalue: Lower bound ``epsilon`` on the eigenvalues of the
            Hessian of ``u``, which keeps the map invertible.
        init_scale: Initial ``scale`` of every coordinate.
        output_power: Power of the network's last layer; 3 lets the map grow
            quadratically (see :class:`~numpyro_pma.InputConvexNetwork`).
        axis_tails: Add per-coordinate terms with cubic growth to the potential,
            so the tails along each whitened axis can be exponential rather
            than Gaussian (on eight schools this brings the sd of ``tau`` from
            about 11% to 8% below the reference). ``None`` (the default) adds
            them up to ``EXACT_LOGDET_MAX_DIM`` (256) latent dimensions. Above
            that the mirror step computes ``log det Hess u`` exactly by the
            low-rank method only for a potential without them (their Hessian
            is diagonal with full rank), and otherwise estimates it by
            stochastic Lanczos quadrature, 100 times slower at ``d = 1000``.
        whitening: ``"diagonal"`` (a scale per coordinate), ``"dense"`` (a
            lower-triangular ``C``; ``PMA`` then refines its diagonal fit by
            :func:`~numpyro_pma.whitening.fit_dense_gaussian`), or ``"auto"``:
            dense up to ``DENSE_WHITENING_MAX_DIM`` (256) latent dimensions.
            Dense whitening suits posteriors whose scales differ along
            directions that are not coordinate axes, such as regressions on
            correlated predictors: on posteriordb's ``diamonds`` and
            ``earnings`` PMA's largest error in a posterior mean fell from 13
            and 11 reference sd to 0.05 and 0.03. It costs ``d^2``
            parameters, and each Newton step of the fit evaluates 64 Hessians
            of the model's log density.
    """

    def __init__(
        self,
        model,
        *,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        hidden_sizes: Sequence[int] = (64, 64),
        min_eigenvalue: float = 1e-3,
        init_scale: float = 0.1,
        output_power: int = 1,
        axis_tails: bool | None = None,
        whitening: str = "auto",
    ):
        check_hidden_sizes(hidden_sizes)
        hidden_sizes = tuple(hidden_sizes)
        check_positive_int("output_power", output_power)
        if not np.isfinite(min_eigenvalue) or not 0 < min_eigenvalue < 1:
            raise ValueError(f"min_eigenvalue must be in (0, 1), got {min_eigenvalue}")
        if not np.isfinite(init_scale) or init_scale <= 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale}")
        self.hidden_sizes = hidden_sizes
        self.min_eigenvalue = float(min_eigenvalue)
        self._init_scale = float(init_scale)
        self.output_power = output_power
        self.axis_tails = axis_tails
        if whitening not in ("auto", "diagonal", "dense"):
            raise ValueError(
                f"whitening must be 'auto', 'diagonal' or 'dense', got {whitening!r}"
            )
        self.whitening = whitening
        self.potential = None
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    @property
    def loc_name(self) -> str:
        """Name of the whitening location parameter."""
        return f"{self.prefix}_loc"

    @property
    def resolved_axis_tails(self) -> bool:
        """Whether the potential has axis tails; known once set up if ``None``."""
        if self.axis_tails is None:
            if not hasattr(self, "latent_dim"):
                raise RuntimeError(
                    "axis_tails=None is resolved when the guide is set up, "
                    "by its first call or by PMA.init"
                )
            return self.latent_dim <= EXACT_LOGDET_MAX_DIM
        return bool(self.axis_tails)

    @property
    def dense_whitening(self) -> bool:
        """Whether the whitening is a ``(d, d)`` factor; known once set up."""
        if self.whitening == "auto":
            if self.potential is None:
                raise RuntimeError(
                    "whitening='auto' is resolved when the guide is set up, "
                    "by its first call or by PMA.init"
                )
            return self.latent_dim <= DENSE_WHITENING_MAX_DIM
        return self.whitening == "dense"

    @property
    def scale_name(self) -> str:
        """Name of the whitening scale: ``(d,)`` scales or a ``(d, d)`` factor."""
        suffix = "scale_tril" if self.dense_whitening else "scale"
        return f"{self.prefix}_{suffix}"

    @property
    def potential_name(self) -> str:
        """Name of the potential's parameter collection."""
        return f"{self.prefix}_potential"

    def _setup_prototype(self, *args, **kwargs):
        check_hidden_sizes(self.hidden_sizes)
        check_model(self.model, args, kwargs, self.init_loc_fn)
        try:
            super()._setup_prototype(*args, **kwargs)
        except RuntimeError as error:
            # NumPyro's "Cannot find valid initial parameters" names no site.
            raise_for_nonfinite_initial_point(
                self.model, args, kwargs, self.init_loc_fn, cause=error
            )
            raise
        self.potential = BrenierPotential(
            dim=self.latent_dim,
            hidden_sizes=self.hidden_sizes,
            min_eigenvalue=self.min_eigenvalue,
            output_power=self.output_power,
            axis_tails=self.resolved_axis_tails,
        )

    def init_potential_params(self, rng_key: jax.Array) -> dict:
        """Return initial potential parameters: ``grad u`` near the identity."""
        zeros = jnp.zeros(self.latent_dim, jnp.result_type(float))
        return self.potential.init(rng_key, zeros)["params"]

    def _get_posterior(self):
        loc = numpyro.param(self.loc_name, self._init_latent)
        if self.dense_whitening:
            scale = numpyro.param(
                self.scale_name,
                jnp.identity(self.latent_dim) * self._init_scale,
                constraint=constraints.scaled_unit_lower_cholesky,
            )
        else:
            scale = numpyro.param(
                self.scale_name,
                jnp.full(self.latent_dim, self._init_scale),
                constraint=constraints.softplus_positive,
            )
        potential_params = numpyro.param(
            self.potential_name, self.init_potential_params
        )
        return dist.TransformedDistribution(
            self.get_base_dist(),
            [
                BrenierTransform(self.potential, potential_params),
                self._whitening_transform(loc, scale),
            ],
        )

    def _whitening_transform(self, loc, scale):
        if self.dense_whitening:
            return LowerCholeskyAffine(loc, scale)
        return AffineTransform(loc, scale)

    def get_base_dist(self):
        """Return the reference distribution ``N(0, I_d)``."""
        return dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1)

    def get_transform(self, params):
        """Return the map ``x -> loc + scale * grad u(x)`` at ``params``."""
        return dist.transforms.ComposeTransform(
            [
                BrenierTransform(self.potential, params[self.potential_name]),
                self._whitening_transform(
                    params[self.loc_name], params[self.scale_name]
                ),
            ]
        )

    def get_posterior(self, params):
        """Return the guide's distribution over the unconstrained latent vector."""
        return dist.TransformedDistribution(
            self.get_base_dist(), self.get_transform(params)
        )

    def quantiles(self, params, quantiles):
        """Estimate posterior quantiles of each latent site.

        Quantiles of a Brenier push-forward have no closed form: they are
        computed from ``4096`` guide draws with a fixed key, so repeated calls
        agree and the Monte Carlo error is about 0.02 posterior sd at the median.

        Args:
            params: Guide parameters.
            quantiles: Probabilities in ``[0, 1]``, a sequence of length ``m``.

        Returns:
            Dict from site name to quantiles of shape ``(m,) + site shape``, in
            the constrained space.
        """
        probabilities = jnp.asarray(quantiles)
        if jnp.any((probabilities < 0) | (probabilities > 1)):
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles}")
        draws = self.sample_posterior(
            jax.random.key(0), params, sample_shape=(_NUM_QUANTILE_DRAWS,)
        )
        latent_names = [
            name
            for name, site in self.prototype_trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        ]
        return {
            name: jnp.quantile(draws[name], probabilities, axis=0)
            for name in latent_names
        }

    def median(self, params):
        """Estimate the posterior median of each latent site (see ``quantiles``)."""
        return {name: q[0] for name, q in self.quantiles(params, [0.5]).items()}
