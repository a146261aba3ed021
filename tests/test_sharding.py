"""Mirror steps with the draws sharded over devices equal unsharded steps."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_pma.mirror import mirror_descent
from numpyro_pma.potential import BrenierPotential
from numpyro_pma.sharding import (
    PARTICLE_AXIS,
    check_particle_mesh,
    particle_mesh,
    shard_particles,
)

# XLA reads the device count when JAX initializes its CPU backend, so four
# virtual devices need a fresh interpreter.
_FOUR_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json
    import os

    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    from numpyro_pma.mirror import mirror_descent
    from numpyro_pma.potential import BrenierPotential
    from numpyro_pma.sharding import particle_mesh

    dim = 5
    scales = jnp.arange(1.0, dim + 1.0)

    def logdensity_fn(z):
        return -0.5 * jnp.sum((z / scales) ** 2)

    potential = BrenierPotential(dim=dim, hidden_sizes=(8,))
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]
    mesh = particle_mesh()
    report = {"num_devices": len(jax.devices())}
    finals = []
    for name, options in [
        ("single", {}),
        ("sharded", {"mesh": mesh}),
        ("sharded_slq", {"mesh": mesh, "logdet_method": "slq"}),
        ("single_slq", {"logdet_method": "slq"}),
    ]:
        algorithm = mirror_descent(
            logdensity_fn,
            potential,
            0.5,
            num_particles=64,
            residual_batch_size=32,
            num_probes=4,
            num_lanczos_steps=5,
            **options,
        )
        state = algorithm.init(params)
        compiled = jax.jit(algorithm.step).lower(jax.random.key(0), state).compile()
        report[name + "_partitions"] = "num_partitions=4" in compiled.as_text()
        for k in range(3):
            state, info = compiled(jax.random.key(k), state)
        leaves = jax.tree.leaves((state, info))
        finals.append([np.asarray(leaf).tolist() for leaf in leaves])
        report[name + "_accepted"] = bool(info.accepted)
    report["leaves"] = finals
    try:
        mirror_descent(logdensity_fn, potential, 0.5, num_particles=62, mesh=mesh)
    except ValueError as error:
        report["indivisible_error"] = str(error)

    # The same through PMA on a NumPyro model: scanned chunks, compiled ahead.
    import numpyro
    import numpyro.distributions as dist

    from numpyro_pma import PMA, AutoBrenier

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(mu, 0.5).to_event(1), obs=y)

    y = jnp.array([0.3, -1.0, 2.0])
    elbos = []
    for options in ({}, {"mesh": mesh}):
        pma = PMA(
            model,
            AutoBrenier(model, hidden_sizes=(4,)),
            num_particles=64,
            num_whitening_steps=20,
            **options,
        )
        result = pma.run(jax.random.key(0), 6, y, progress_bar=False, chunk_size=3)
        elbos.append(np.asarray(result.trace.elbo).tolist())
    report["pma_elbos"] = elbos
    print(json.dumps(report))
    """
)


def test_four_devices_match_one_device():
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["num_devices"] == 4
    # The compiled step is partitioned over the four devices only with a mesh.
    assert not report["single_partitions"]
    assert report["sharded_partitions"]
    assert report["sharded_slq_partitions"]
    assert report["single_accepted"]
    assert report["sharded_accepted"]
    assert "must divide" in report.get("indivisible_error", "")

    single, sharded, sharded_slq, single_slq = report["leaves"]
    # The same float64 numbers summed in another order: rounding differences
    # of about 1e-16, which three steps of Adam (it divides by the root mean
    # square of tiny gradients) amplify to about 1e-8 relative.
    for reference, other in [(single, sharded), (single_slq, sharded_slq)]:
        for expected, actual in zip(reference, other, strict=True):
            np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-8)
    unsharded_elbo, sharded_elbo = report["pma_elbos"]
    np.testing.assert_allclose(sharded_elbo, unsharded_elbo, rtol=1e-6)


def test_one_device_mesh_matches_no_mesh():
    dim = 3
    potential = BrenierPotential(dim=dim, hidden_sizes=(4,))
    params = potential.init(jax.random.key(0), jnp.zeros(dim))["params"]

    def logdensity_fn(z):
        return -0.5 * jnp.sum(z**2)

    outputs = []
    for mesh in (None, particle_mesh(jax.devices()[:1])):
        algorithm = mirror_descent(
            logdensity_fn, potential, 0.5, num_particles=16, mesh=mesh
        )
        outputs.append(
            jax.jit(algorithm.step)(jax.random.key(1), algorithm.init(params))
        )
    for expected, actual in zip(
        jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1]), strict=True
    ):
        np.testing.assert_array_equal(actual, expected)


def test_particle_mesh_has_one_named_axis():
    mesh = particle_mesh()
    assert mesh.axis_names == (PARTICLE_AXIS,)
    assert mesh.size == len(jax.devices())


def test_shard_particles_without_mesh_is_identity():
    x = jnp.ones((4, 2))
    assert shard_particles(x, None) is x


def test_check_particle_mesh_rejects_bad_values():
    with pytest.raises(TypeError, match="mesh"):
        check_particle_mesh("cpu", 8)
    with pytest.raises(ValueError, match="devices"):
        particle_mesh([])
