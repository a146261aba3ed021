"""Compress a set of MCMC draws into a Brenier map, then sample and evaluate it.

The draws are posteriordb's reference draws of a posterior bundled with the
package (10 Stan chains of 1000 draws), by default ``arK-arK``, an
autoregression of order 5 with 7 parameters. The script

- maps the draws to NumPyro's unconstrained space (``sigma`` to ``log
  sigma``), the space where a density on R^d makes sense;
- fits a Brenier map from N(0, I) to chains 0-4 by PMA mirror steps with a
  classifier (:func:`numpyro_pma.generative.fit_samples`). The 5000 draws
  become a potential with a few thousand parameters, which draws any number
  of fresh samples and evaluates its density;
- compares fresh model draws with chains 5-9 (held out) by the energy
  distance and the sliced Wasserstein distance, next to a Gaussian fit and the
  noise level of the held-out draws;
- compares the model's log density with the posterior's own unnormalized log
  density on held-out draws: for an exact fit ``log q - log p`` is constant,
  so its standard deviation measures the error of the density;
- uses the model as an importance sampler for the posterior and reports the
  Pareto k-hat of its weights.

Run from the repository root:

    python examples/compress_mcmc_draws.py
    python examples/compress_mcmc_draws.py --posterior garch-garch11
    python examples/compress_mcmc_draws.py \
        --posterior eight_schools-eight_schools_centered

The tables in docs/generative.md come from these commands.
"""

import argparse
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to
from scipy.stats import multivariate_normal

from numpyro_pma.flat_model import flatten_model
from numpyro_pma.generative import compare_held_out, fit_samples
from numpyro_pma.importance import psis_log_weights
from numpyro_pma.posteriors import load_posterior


def unconstrained_draws(posterior) -> np.ndarray:
    """Map the reference draws to flat unconstrained vectors ``(n, dim)``.

    The flat order is that of ``ravel_pytree`` on a dict of sites (sorted
    names), the order of :func:`numpyro_pma.flat_model.flatten_model`. Each
    site's support is read from one seeded trace of the model, which is right
    only for supports that do not depend on other sites (true of the bundled
    posteriors).
    """
    sites = posterior.from_reference(posterior.reference_draws)
    # Substituting one draw avoids sampling sites with flat (improper) priors.
    first = {name: value[0] for name, value in sites.items()}
    model = handlers.substitute(handlers.seed(posterior.model, 0), data=first)
    trace = handlers.trace(model).get_trace(**posterior.model_kwargs)
    unconstrained = {
        name: biject_to(trace[name]["fn"].support).inv(value)
        for name, value in sites.items()
    }
    return np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(unconstrained))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=1000, help="mirror steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")
    parser.add_argument(
        "--posterior",
        default="arK-arK",
        help="bundled posterior whose reference draws are compressed",
    )
    args = parser.parse_args()

    posterior = load_posterior(args.posterior)
    draws = unconstrained_draws(posterior)
    num_chains, draws_per_chain, _ = posterior.reference_chains.shape
    train = draws[: num_chains // 2 * draws_per_chain]
    held_out = draws[num_chains // 2 * draws_per_chain :]
    flat = flatten_model(
        jax.random.key(0), posterior.model, model_kwargs=posterior.model_kwargs
    )
    log_posterior = jax.jit(jax.vmap(flat.logdensity_fn))

    key = jax.random.key(args.seed)
    fit_key, sample_key, compare_key = jax.random.split(key, 3)
    start = time.perf_counter()
    fit = fit_samples(fit_key, train, num_steps=args.num_steps)
    fit_time = time.perf_counter() - start
    model_draws = np.asarray(fit.model.sample(sample_key, (len(held_out),)))

    comparison = compare_held_out(compare_key, model_draws, train, held_out)
    gaussian = multivariate_normal(train.mean(0), np.cov(train.T))
    log_p = np.asarray(log_posterior(held_out))
    log_q_model = np.asarray(fit.model.log_prob(held_out))
    log_q_gaussian = gaussian.logpdf(held_out)
    model_weights = np.asarray(log_posterior(model_draws)) - np.asarray(
        fit.model.log_prob(model_draws)
    )
    gaussian_draws = gaussian.rvs(len(held_out), random_state=args.seed)
    gaussian_weights = np.asarray(log_posterior(gaussian_draws)) - gaussian.logpdf(
        gaussian_draws
    )
    _, model_khat = psis_log_weights(model_weights)
    _, gaussian_khat = psis_log_weights(gaussian_weights)

    print(
        f"{args.posterior}: {len(train)} training draws, {len(held_out)} held out, "
        f"dim {draws.shape[1]}; fit: {args.num_steps} steps in {fit_time:.1f} s "
        "(compilation included); classifier's KL estimate over the last 100 "
        f"steps: {np.mean(fit.trace.divergence[-100:]):.3f}"
    )
    print()
    print(comparison.to_markdown())
    print()
    print(
        "| density | mean log q (held out) | sd of log q - log p (held out) "
        "| Pareto k-hat as importance sampler |"
    )
    print("|---|---|---|---|")
    for label, log_q, khat in (
        ("model", log_q_model, model_khat),
        ("gaussian fit", log_q_gaussian, gaussian_khat),
    ):
        print(
            f"| {label} | {np.mean(log_q):.3f} | {np.std(log_q - log_p):.3f} "
            f"| {khat:.2f} |"
        )


if __name__ == "__main__":
    main()
