"""NumPyro models of the posteriordb reference posteriors.

Each model takes its data as keyword arguments named after the fields of the
posterior's ``data.json`` and draws latent sites named after the stems of the
reference keys (site ``beta`` of shape ``(K,)`` holds ``beta[1]``..``beta[K]``).
Parameters that the source model leaves without a prior get an improper uniform
prior on their support through :class:`~numpyro.distributions.ImproperUniform`,
so the unconstrained log density keeps the Jacobian of the support transform.
"""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax import lax
from numpyro.distributions import constraints

__all__ = [
    "ark",
    "diamonds",
    "eight_schools_centered",
    "eight_schools_noncentered",
    "garch11",
    "gp_pois_regr",
    "kidscore_interaction",
    "logearn_interaction",
    "logmesquite",
    "nes",
]

# Jitter added to the diagonal of the GP covariance, as in the source model.
GP_JITTER = 1e-10


def _flat(support: constraints.Constraint, size: int | None = None):
    """Return an improper uniform prior on ``support``, scalar or of shape (size,)."""
    event_shape = () if size is None else (size,)
    return dist.ImproperUniform(support, (), event_shape)


def _normal_likelihood(name: str, mean: jax.Array, sigma: jax.Array, obs: jax.Array):
    """Observe ``obs[n] ~ Normal(mean[n], sigma)`` independently, n = 1..N."""
    with numpyro.plate("data", obs.shape[0]):
        numpyro.sample(name, dist.Normal(mean, sigma), obs=obs)


def eight_schools_noncentered(y: jax.Array, sigma: jax.Array) -> None:
    """Eight schools, non-centered: ``theta = mu + tau * theta_trans``.

    mu ~ Normal(0, 5), tau ~ HalfCauchy(5), theta_trans[j] ~ Normal(0, 1),
    y[j] ~ Normal(theta[j], sigma[j]). ``theta`` is a deterministic site.

    Args:
        y: Estimated effects, shape ``(J,)``.
        sigma: Known standard errors of ``y``, shape ``(J,)``.
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", y.shape[0]):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_trans)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_centered(y: jax.Array, sigma: jax.Array) -> None:
    """Eight schools, centered: ``theta[j] ~ Normal(mu, tau)`` sampled directly.

    mu ~ Normal(0, 5), tau ~ HalfCauchy(5), y[j] ~ Normal(theta[j], sigma[j]).

    Args:
        y: Estimated effects, shape ``(J,)``.
        sigma: Known standard errors of ``y``, shape ``(J,)``.
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def diamonds(X: jax.Array, Y: jax.Array) -> None:  # noqa: N803
    """Linear regression on the centered columns of ``X`` without its first column.

    With ``Xc = X[:, 1:] - mean(X[:, 1:], axis=0)``: b[k] ~ Normal(0, 1),
    Intercept ~ StudentT(3, 8, 10), sigma ~ half-StudentT(3, 0, 10),
    Y[n] ~ Normal(Intercept + Xc[n] @ b, sigma).

    Args:
        X: Design matrix of shape ``(N, K)`` whose first column is all ones.
        Y: Response, shape ``(N,)``.
    """
    predictors = X[:, 1:]
    centered = predictors - jnp.mean(predictors, axis=0)
    with numpyro.plate("coefficients", centered.shape[1]):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = numpyro.sample(
        "sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0))
    )
    _normal_likelihood("Y", intercept + centered @ b, sigma, Y)


def ark(y: jax.Array, K: int) -> None:  # noqa: N803
    """Autoregression of order ``K`` conditional on the first ``K`` values.

    alpha ~ Normal(0, 10), beta[k] ~ Normal(0, 10), sigma ~ HalfCauchy(2.5),
    y[t] ~ Normal(alpha + sum_k beta[k] * y[t - k], sigma) for t = K+1..T
    (1-based), so ``beta[k]`` multiplies lag ``k``.

    Args:
        y: Series, shape ``(T,)``.
        K: Order of the autoregression, a Python int (it fixes array shapes).
    """
    num_steps = y.shape[0]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    with numpyro.plate("lags", K):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))

    # lagged[t, k - 1] = y[K + t - k], the value k steps before y[K + t].
    lagged = jnp.stack([y[K - k : num_steps - k] for k in range(1, K + 1)], axis=-1)
    _normal_likelihood("y", alpha + lagged @ beta, sigma, y[K:])


def gp_pois_regr(x: jax.Array, k: jax.Array) -> None:
    """Latent Gaussian process with Poisson counts, in whitened form.

    rho ~ Gamma(25, rate 4), alpha ~ HalfNormal(2), f_tilde[i] ~ Normal(0, 1),
    C[i, j] = alpha^2 exp(-(x[i] - x[j])^2 / (2 rho^2)) + 1e-10 [i = j],
    f = cholesky(C) @ f_tilde (deterministic site ``f``), k[i] ~ Poisson(exp(f[i])).

    NOTE: the 1e-10 jitter is below float32 resolution next to alpha^2. In
    float32 the Cholesky factor is NaN for rho >= 8 (checked on this data's
    x, about 0.01% of the reference draws), so use float64 (``jax_enable_x64``).

    Args:
        x: Inputs, shape ``(N,)``.
        k: Non-negative integer counts, shape ``(N,)``.
    """
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    with numpyro.plate("inputs", x.shape[0]):
        f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0))
    cholesky = gp_cholesky(x, rho, alpha)
    f = numpyro.deterministic("f", cholesky @ f_tilde)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


def gp_cholesky(x: jax.Array, rho: jax.Array, alpha: jax.Array) -> jax.Array:
    """Compute the lower Cholesky factor of the jittered squared-exponential kernel.

    C[i, j] = alpha^2 exp(-(x[i] - x[j])^2 / (2 rho^2)) + 1e-10 [i = j].

    Args:
        x: Inputs, shape ``(N,)``.
        rho: Length scale, a scalar.
        alpha: Marginal standard deviation, a scalar.

    Returns:
        ``L`` of shape ``(N, N)`` with ``L @ L.T = C``.
    """
    squared_distance = (x[:, None] - x[None, :]) ** 2
    covariance = alpha**2 * jnp.exp(-squared_distance / (2.0 * rho**2))
    covariance = covariance + GP_JITTER * jnp.eye(x.shape[0])
    return jnp.linalg.cholesky(covariance)


def kidscore_interaction(
    kid_score: jax.Array, mom_hs: jax.Array, mom_iq: jax.Array
) -> None:
    """Linear regression of ``kid_score`` with a ``mom_hs * mom_iq`` interaction.

    beta flat on R^4, sigma ~ HalfCauchy(2.5), kid_score[n] ~ Normal(beta[1]
    + beta[2] mom_hs[n] + beta[3] mom_iq[n] + beta[4] mom_hs[n] mom_iq[n], sigma).

    Args:
        kid_score: Response, shape ``(N,)``.
        mom_hs: 0/1 indicator, shape ``(N,)``.
        mom_iq: Mother's IQ, shape ``(N,)``.
    """
    beta = numpyro.sample("beta", _flat(constraints.real, 4))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq + beta[3] * mom_hs * mom_iq
    _normal_likelihood("kid_score", mean, sigma, kid_score)


def logearn_interaction(earn: jax.Array, height: jax.Array, male: jax.Array) -> None:
    """Linear regression of ``log(earn)`` with a ``height * male`` interaction.

    beta flat on R^4, sigma flat on (0, inf), log(earn[n]) ~ Normal(beta[1]
    + beta[2] height[n] + beta[3] male[n] + beta[4] height[n] male[n], sigma).

    Args:
        earn: Positive earnings, shape ``(N,)``.
        height: Height in inches, shape ``(N,)``.
        male: 0/1 indicator, shape ``(N,)``.
    """
    beta = numpyro.sample("beta", _flat(constraints.real, 4))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    mean = beta[0] + beta[1] * height + beta[2] * male + beta[3] * height * male
    _normal_likelihood("log_earn", mean, sigma, jnp.log(earn))


def logmesquite(
    weight: jax.Array,
    diam1: jax.Array,
    diam2: jax.Array,
    canopy_height: jax.Array,
    total_height: jax.Array,
    density: jax.Array,
    group: jax.Array,
) -> None:
    """Log-log linear regression of mesquite leaf weight.

    beta flat on R^7, sigma flat on (0, inf), log(weight[n]) ~ Normal(beta[1]
    + beta[2..6] @ log([diam1, diam2, canopy_height, total_height, density][n])
    + beta[7] group[n], sigma).

    Args:
        weight: Positive response, shape ``(N,)``.
        diam1: Positive predictor, shape ``(N,)``.
        diam2: Positive predictor, shape ``(N,)``.
        canopy_height: Positive predictor, shape ``(N,)``.
        total_height: Positive predictor, shape ``(N,)``.
        density: Positive predictor, shape ``(N,)``.
        group: 0/1 indicator, shape ``(N,)``.
    """
    logs = jnp.log(jnp.stack([diam1, diam2, canopy_height, total_height, density]))
    design = jnp.stack([jnp.ones_like(group), *logs, group], axis=-1)
    beta = numpyro.sample("beta", _flat(constraints.real, 7))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    _normal_likelihood("log_weight", design @ beta, sigma, jnp.log(weight))


def nes(
    partyid7: jax.Array,
    real_ideo: jax.Array,
    race_adj: jax.Array,
    age_discrete: jax.Array,
    educ1: jax.Array,
    gender: jax.Array,
    income: jax.Array,
) -> None:
    """Linear regression of party identification with age-category dummies.

    With a_c[n] = [age_discrete[n] = c]: beta flat on R^9, sigma flat on
    (0, inf), partyid7[n] ~ Normal(beta[1] + beta[2] real_ideo[n]
    + beta[3] race_adj[n] + beta[4] a_2[n] + beta[5] a_3[n] + beta[6] a_4[n]
    + beta[7] educ1[n] + beta[8] gender[n] + beta[9] income[n], sigma).

    Args:
        partyid7: Response on a 1-7 scale, shape ``(N,)``.
        real_ideo: Predictor, shape ``(N,)``.
        race_adj: Predictor, shape ``(N,)``.
        age_discrete: Age category in {1, 2, 3, 4}, shape ``(N,)``.
        educ1: Predictor, shape ``(N,)``.
        gender: Predictor, shape ``(N,)``.
        income: Predictor, shape ``(N,)``.
    """
    ones = jnp.ones_like(real_ideo)
    age_dummies = [(age_discrete == c).astype(ones.dtype) for c in (2, 3, 4)]
    columns = [ones, real_ideo, race_adj, *age_dummies, educ1, gender, income]
    design = jnp.stack(columns, axis=-1)
    beta = numpyro.sample("beta", _flat(constraints.real, 9))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    _normal_likelihood("partyid7", design @ beta, sigma, partyid7)


def garch11(y: jax.Array, sigma1: jax.Array) -> None:
    """GARCH(1, 1) with the stationarity bound ``alpha1 + beta1 < 1``.

    The prior is flat on mu in R and alpha0 > 0, and uniform on the triangle
    alpha1 > 0, beta1 > 0, alpha1 + beta1 < 1. It is written as
    alpha1 ~ Beta(1, 2) and beta1_raw ~ Uniform(0, 1) with
    beta1 = (1 - alpha1) beta1_raw (deterministic site ``beta1``); the
    Jacobian 1 / (1 - alpha1) of beta1_raw -> beta1 cancels the Beta(1, 2)
    density 2 (1 - alpha1), leaving the constant 2 on the triangle.
    Volatility: s[1] = sigma1, s[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2
    + beta1 s[t-1]^2, and y[t] ~ Normal(mu, s[t]) for t = 1..T.

    Args:
        y: Series, shape ``(T,)``.
        sigma1: Volatility at t = 1, a scalar.
    """
    mu = numpyro.sample("mu", _flat(constraints.real))
    alpha0 = numpyro.sample("alpha0", _flat(constraints.positive))
    alpha1 = numpyro.sample("alpha1", dist.Beta(1.0, 2.0))
    beta1_raw = numpyro.sample("beta1_raw", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * beta1_raw)

    def volatility_step(variance, y_previous):
        next_variance = alpha0 + alpha1 * (y_previous - mu) ** 2 + beta1 * variance
        return next_variance, next_variance

    initial_variance = jnp.square(sigma1) * jnp.ones_like(mu)
    _, variances = lax.scan(volatility_step, initial_variance, y[:-1])
    scale = jnp.sqrt(jnp.concatenate([initial_variance[None], variances]))
    _normal_likelihood("y", mu, scale, y)
