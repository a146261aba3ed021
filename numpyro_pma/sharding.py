"""Sharding a batch of reference draws over devices with ``jax.sharding``.

A PMA step evaluates the residual at ``num_particles`` independent draws, so
the batch splits over devices with no communication until the reductions (the
ELBO mean, the projection's regression). The draws of shape
``(num_particles, dim)`` are split along their first axis over every axis of a
:class:`jax.sharding.Mesh`, and the potential's parameters are replicated. XLA's
SPMD partitioner inserts the collectives, so the sharded step computes the same
numbers as the single-device step up to the order of floating-point sums.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "PARTICLE_AXIS",
    "check_particle_mesh",
    "particle_mesh",
    "replicate",
    "shard_particles",
]

# Axis name of the mesh built by particle_mesh.
PARTICLE_AXIS = "particles"


def particle_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a one-axis mesh named ``"particles"`` over ``devices``.

    Args:
        devices: Devices to shard over; ``None`` takes ``jax.devices()``, which
            after ``jax.distributed.initialize()`` lists the devices of every
            process.

    Returns:
        A :class:`jax.sharding.Mesh` of shape ``(len(devices),)``.

    Raises:
        ValueError: If ``devices`` is empty.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must contain at least one device; got none.")
    return Mesh(np.asarray(devices), (PARTICLE_AXIS,))


def check_particle_mesh(mesh: Any, num_particles: int, name: str = "mesh") -> None:
    """Raise unless ``mesh`` is a ``Mesh`` whose size divides ``num_particles``.

    Args:
        mesh: The value to check.
        num_particles: Size of the axis that is split over the mesh.
        name: Argument name used in the error message.

    Raises:
        TypeError: If ``mesh`` is not a :class:`jax.sharding.Mesh`.
        ValueError: If ``mesh.size`` does not divide ``num_particles``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{name} must be a jax.sharding.Mesh or None; got {type(mesh).__name__}."
        )
    if num_particles % mesh.size != 0:
        raise ValueError(
            f"the number of devices in {name} ({mesh.size}) must divide the "
            f"number of draws sharded over it ({num_particles})."
        )


def _particle_spec(mesh: Mesh, ndim: int, axis: int) -> PartitionSpec:
    """Split ``axis`` over all mesh axes and keep the other axes whole."""
    entries: list[Any] = [None] * ndim
    entries[axis] = tuple(mesh.axis_names)
    return PartitionSpec(*entries)


def shard_particles(x: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Constrain the leaves of ``x`` to be split along ``axis`` over ``mesh``.

    Inside ``jax.jit`` this is ``jax.lax.with_sharding_constraint``; outside it
    moves the arrays to the devices. With ``mesh=None`` it returns ``x``.

    Args:
        x: Array or pytree of arrays whose ``axis`` indexes the draws, e.g.
            shape ``(num_particles, dim)`` or an array of keys of shape
            ``(num_particles,)``.
        mesh: The device mesh, or ``None``.
        axis: Axis split over the devices.

    Returns:
        ``x`` with the sharding constraint applied.
    """
    if mesh is None:
        return x

    def constrain(leaf):
        sharding = NamedSharding(mesh, _particle_spec(mesh, leaf.ndim, axis))
        return jax.lax.with_sharding_constraint(leaf, sharding)

    return jax.tree.map(constrain, x)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Constrain every leaf of ``tree`` to be replicated on all devices of ``mesh``.

    With ``mesh=None`` it returns ``tree``.
    """
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.lax.with_sharding_constraint(leaf, sharding), tree
    )
