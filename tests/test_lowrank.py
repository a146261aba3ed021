"""The exact low-rank log determinant against the full Hessian and its Cholesky."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_pma.logdet import (
    EXACT_LOGDET_MAX_DIM,
    choose_logdet_method,
    logdet_hessian,
)
from numpyro_pma.lowrank import (
    check_low_rank_potential,
    low_rank_factors,
    map_and_logdet_low_rank,
    network_projection,
    projected_network,
    projection_rank,
)
from numpyro_pma.mirror import mirror_descent
from numpyro_pma.potential import BrenierPotential, InputConvexNetwork
from numpyro_pma.transform import map_and_logdet

DIM = 40
HIDDEN = (8, 8)
# Both sides are exact in float64. The log determinants are O(10) and the
# Hessians have condition numbers below 1e3, so rounding stays near 1e-12.
EXACT = 1e-9


def random_potential(dim, hidden_sizes, output_power=1, seed=0):
    """Return a potential without axis tails and float64 parameters far from init.

    The output weights are raised from softplus(-6) to about 6, so the network's
    curvature is comparable to the quadratic part's, and ``L`` is a random lower
    triangular matrix, so ``A`` is not diagonal.
    """
    potential = BrenierPotential(
        dim=dim,
        hidden_sizes=hidden_sizes,
        output_power=output_power,
        axis_tails=False,
    )
    init_key, tril_key = jax.random.split(jax.random.key(seed))
    params = potential.init(init_key, jnp.zeros(dim))["params"]
    # Flax creates Dense kernels in float32 whatever the input dtype.
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params)
    # Off-diagonal entries of size 1/sqrt(dim) keep A well conditioned: a mirror
    # step must not push A - epsilon I out of the positive-definite cone.
    noise = jax.random.normal(tril_key, (dim, dim)) / jnp.sqrt(dim)
    lower = jnp.eye(dim) + noise
    params["scale_tril"] = jnp.tril(lower)
    if hidden_sizes:
        network = dict(params["network"])
        network["output"] = network["output"] + 12.0
        params["network"] = network
    return potential, params


def sample_points(dim, num_points=5, seed=1):
    return 2.0 * jax.random.normal(jax.random.key(seed), (num_points, dim))


@pytest.mark.parametrize("output_power", [1, 3])
def test_projected_network_equals_network(x64, output_power):
    potential, params = random_potential(DIM, HIDDEN, output_power)
    network = InputConvexNetwork(HIDDEN, output_power, axis_tails=False)
    matrix, offset = network_projection(potential, params)
    assert matrix.shape == (sum(HIDDEN), DIM)
    assert offset.shape == (sum(HIDDEN),)
    for x in sample_points(DIM):
        psi = network.apply({"params": params["network"]}, x)
        g = projected_network(potential, params, matrix @ x + offset)
        assert abs(float(psi - g)) <= 1e-12 * max(1.0, abs(float(psi)))


def test_projected_network_empty_hidden_sizes(x64):
    potential, params = random_potential(DIM, ())
    matrix, offset = network_projection(potential, params)
    assert matrix.shape == (0, DIM)
    assert offset.shape == (0,)
    assert float(projected_network(potential, params, jnp.zeros(0))) == 0.0


@pytest.mark.parametrize(
    ("dim", "hidden_sizes", "output_power"),
    [
        (DIM, HIDDEN, 1),
        (DIM, HIDDEN, 3),
        # r = 50 > d = 20: the coupling K has shape (d, r).
        (20, (30, 20), 1),
        # r = 0: log det Hess u = log det A.
        (DIM, (), 1),
    ],
)
def test_low_rank_matches_cholesky(x64, dim, hidden_sizes, output_power):
    potential, params = random_potential(dim, hidden_sizes, output_power)
    factors = low_rank_factors(potential, params)
    rank = sum(hidden_sizes)
    assert factors.coupling.shape == (min(rank, dim), rank)

    def potential_fn(y):
        return potential.apply({"params": params}, y)

    for x in sample_points(dim):
        transport, logdet = map_and_logdet_low_rank(potential, params, factors, x)
        expected_transport, expected_logdet = map_and_logdet(potential_fn, x)
        np.testing.assert_allclose(transport, expected_transport, rtol=0, atol=EXACT)
        assert abs(float(logdet - expected_logdet)) <= EXACT


def test_low_rank_network_changes_logdet(x64):
    # Guards the test above: the network's curvature must move log det away
    # from log det A, or agreement would not test the lemma.
    potential, params = random_potential(DIM, HIDDEN)
    factors = low_rank_factors(potential, params)
    _, logdet = map_and_logdet_low_rank(potential, params, factors, jnp.zeros(DIM))
    assert float(logdet - factors.quadratic_logdet) > 0.5


def test_low_rank_gradient_matches_cholesky(x64):
    potential, params = random_potential(DIM, HIDDEN)
    x = sample_points(DIM, 1)[0]

    def low_rank_logdet(p):
        factors = low_rank_factors(potential, p)
        return map_and_logdet_low_rank(potential, p, factors, x)[1]

    def cholesky_logdet(p):
        return map_and_logdet(lambda y: potential.apply({"params": p}, y), x)[1]

    gradient = jax.grad(low_rank_logdet)(params)
    expected = jax.grad(cholesky_logdet)(params)
    for leaf, expected_leaf in zip(
        jax.tree.leaves(gradient), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(leaf, expected_leaf, rtol=0, atol=1e-8)


def gaussian_logdensity(dim):
    scales = jnp.geomspace(0.5, 2.0, dim)

    def logdensity_fn(z):
        return -0.5 * jnp.sum((z / scales) ** 2)

    return logdensity_fn


def test_mirror_step_low_rank_equals_cholesky(x64):
    potential, params = random_potential(DIM, HIDDEN)
    results = {}
    for method in ("cholesky", "low_rank"):
        algorithm = mirror_descent(
            gaussian_logdensity(DIM),
            potential,
            # The random potential is far from the target (ELBO about -137), and
            # a step of 0.5 makes the quadratic part indefinite, so the step
            # would be rejected and leave the parameters unchanged.
            0.02,
            num_particles=64,
            num_projection_steps=3,
            # Adam's first steps move each parameter by about lr * sign(g), so
            # they turn 1e-16 differences in near-zero gradients into 1e-8
            # differences in the parameters. SGD is linear in the gradient.
            projection_optimizer=optax.sgd(1e-2),
            logdet_method=method,
        )
        state = algorithm.init(params)
        results[method] = jax.jit(algorithm.step)(jax.random.key(3), state)

    (state, info), (expected_state, expected_info) = (
        results["low_rank"],
        results["cholesky"],
    )
    assert bool(info.accepted)
    assert float(info.logdet_stderr) == 0.0
    assert abs(float(info.elbo - expected_info.elbo)) <= EXACT
    for leaf, expected_leaf in zip(
        jax.tree.leaves(state), jax.tree.leaves(expected_state), strict=True
    ):
        np.testing.assert_allclose(leaf, expected_leaf, rtol=0, atol=1e-8)


def test_mirror_low_rank_rejects_axis_tails():
    potential = BrenierPotential(dim=5, hidden_sizes=(4,), axis_tails=True)
    with pytest.raises(ValueError, match="axis_tails"):
        mirror_descent(gaussian_logdensity(5), potential, logdet_method="low_rank")
    with pytest.raises(ValueError, match="axis_tails"):
        check_low_rank_potential(potential)


def test_projection_rank():
    with_tails = BrenierPotential(dim=5, hidden_sizes=(4, 3), axis_tails=True)
    without_tails = BrenierPotential(dim=5, hidden_sizes=(4, 3), axis_tails=False)
    # The network ignores axis_tails without hidden layers.
    quadratic = BrenierPotential(dim=5, hidden_sizes=(), axis_tails=True)
    assert projection_rank(with_tails) is None
    assert projection_rank(without_tails) == 7
    assert projection_rank(quadratic) == 0


def test_choose_logdet_method_low_rank():
    above = EXACT_LOGDET_MAX_DIM + 1
    assert choose_logdet_method(EXACT_LOGDET_MAX_DIM, projection_rank=16) == (
        "cholesky"
    )
    assert choose_logdet_method(above, projection_rank=16) == "low_rank"
    assert choose_logdet_method(above, projection_rank=0) == "low_rank"
    assert choose_logdet_method(above, projection_rank=above) == "slq"
    assert choose_logdet_method(above, projection_rank=None) == "slq"
    assert choose_logdet_method(5, "low_rank", projection_rank=600) == "low_rank"
    with pytest.raises(ValueError, match="projection_rank"):
        choose_logdet_method(5, "low_rank")
    with pytest.raises(ValueError, match="projection_rank"):
        choose_logdet_method(5, projection_rank=-1)


def test_mirror_auto_uses_low_rank_above_threshold(x64):
    dim = EXACT_LOGDET_MAX_DIM + 4
    potential, params = random_potential(dim, (4,))
    infos = {}
    for method in ("auto", "low_rank"):
        algorithm = mirror_descent(
            gaussian_logdensity(dim),
            potential,
            0.5,
            num_particles=8,
            num_projection_steps=0,
            quadratic_projection="optimizer",
            logdet_method=method,
        )
        _, infos[method] = jax.jit(algorithm.step)(
            jax.random.key(5), algorithm.init(params)
        )
    # SLQ would report a positive standard error and a different ELBO.
    assert float(infos["auto"].logdet_stderr) == 0.0
    assert float(infos["auto"].elbo) == float(infos["low_rank"].elbo)


def test_logdet_hessian_rejects_low_rank():
    with pytest.raises(ValueError, match="low_rank"):
        logdet_hessian(
            jax.random.key(0), lambda x: x @ x, jnp.ones(3), method="low_rank"
        )


def test_low_rank_rejects_bad_shapes(x64):
    potential, params = random_potential(DIM, HIDDEN)
    factors = low_rank_factors(potential, params)
    with pytest.raises(ValueError, match="projections"):
        projected_network(potential, params, jnp.zeros(sum(HIDDEN) + 1))
    with pytest.raises(ValueError, match="x must have shape"):
        map_and_logdet_low_rank(potential, params, factors, jnp.zeros(DIM + 1))
