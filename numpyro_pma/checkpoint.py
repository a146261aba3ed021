"""Checkpoints of a PMA run: the whole training state and the trace so far.

A checkpoint is one msgpack file written by ``flax.serialization``: the
:class:`~numpyro_pma.mirror.MirrorState` (potential parameters, last accepted
parameters, projection optimizer state, whitening ``loc`` and ``scale``, step
counters) as a state dict, the base PRNG key as raw key data
(``jax.random.key_data``) with its implementation name, and the per-step
trace. Reading restores the state onto a template built for the same model and
guide, so the file contains only arrays and names, never pickled code.

Files are written atomically: the bytes go to a temporary file in the same
folder, which ``os.replace`` then renames over the old checkpoint, so an
interruption mid-write leaves the previous checkpoint intact.
"""

import contextlib
import os
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from numpyro_pma.mirror import MirrorInfo, MirrorState

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "check_checkpoint_path",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "numpyro_pma.checkpoint"
_FORMAT_VERSION = 1
# Marks a raw ``uint32`` key (``jax.random.PRNGKey``) rather than a typed one.
_RAW_KEY = "raw"


class Checkpoint(NamedTuple):
    """Contents of a checkpoint file.

    Attributes:
        mirror_state: The :class:`~numpyro_pma.mirror.MirrorState` at the save.
        rng_key: The run's base key; step ``k`` uses ``fold_in(rng_key, k)``.
        trace: Per-step :class:`~numpyro_pma.mirror.MirrorInfo` of NumPy arrays
            of shape ``(num_steps_done,)``, from the start of the run.
    """

    mirror_state: MirrorState
    rng_key: jax.Array
    trace: MirrorInfo


def check_checkpoint_path(path: Any, name: str = "checkpoint_path") -> str:
    """Raise unless ``path`` names a file that can be written; return it as str.

    Raises:
        TypeError: ``path`` is not a string or ``os.PathLike``.
        ValueError: ``path`` is a folder, or its folder does not exist.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"{name} must be a file path (str or os.PathLike), got {path!r}"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{name} must name a file, but {path!r} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"{name} {path!r} is in the folder {folder!r}, which does not exist; "
            "create it first"
        )
    return path


def _key_to_data(rng_key: jax.Array) -> tuple[np.ndarray, str]:
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(rng_key)), str(
            jax.random.key_impl(rng_key)
        )
    return np.asarray(rng_key), _RAW_KEY


def _data_to_key(data: np.ndarray, impl: str) -> jax.Array:
    if impl == _RAW_KEY:
        return jnp.asarray(data, jnp.uint32)
    return jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32), impl=impl)


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def save_checkpoint(
    path: str | os.PathLike,
    mirror_state: MirrorState,
    rng_key: jax.Array,
    trace: MirrorInfo,
) -> None:
    """Write the state of a run and its trace to ``path``, atomically.

    Args:
        path: File to write; an existing file is replaced only once the new one
            is complete.
        mirror_state: The :class:`~numpyro_pma.mirror.MirrorState` to save.
        rng_key: The run's base key (typed or raw ``uint32``).
        trace: Per-step :class:`~numpyro_pma.mirror.MirrorInfo`, arrays of shape
            ``(num_steps_done,)``.
    """
    key_data, key_impl = _key_to_data(rng_key)
    contents = {
        "format": CHECKPOINT_FORMAT,
        "version": _FORMAT_VERSION,
        "mirror_state": serialization.to_state_dict(jax.device_get(mirror_state)),
        "rng_key_data": key_data,
        "rng_key_impl": key_impl,
        "trace": {field: np.asarray(value) for field, value in trace._asdict().items()},
    }
    _write_atomically(os.fspath(path), serialization.msgpack_serialize(contents))


def _check_leaves_match(path: str, template: Any, restored: Any) -> None:
    """Raise if a restored leaf's shape or dtype differs from the template's."""
    template_leaves = jax.tree_util.tree_leaves_with_path(template)
    restored_leaves = jax.tree.leaves(restored)
    for (key_path, expected), found in zip(
        template_leaves, restored_leaves, strict=True
    ):
        name = jax.tree_util.keystr(key_path)
        # NumPy dtypes: JAX would report float64 as float32 when x64 is off.
        expected_type = (np.shape(expected), np.asarray(expected).dtype)
        found_type = (np.shape(found), np.asarray(found).dtype)
        if expected_type != found_type:
            raise ValueError(
                f"checkpoint {path!r} does not match this model and guide: "
                f"mirror_state{name} is {found_type[1]}{list(found_type[0])} in the "
                f"file but {expected_type[1]}{list(expected_type[0])} here. Resume "
                "with the model arguments, guide options and jax_enable_x64 setting "
                "of the run that wrote it."
            )


def load_checkpoint(path: str | os.PathLike, template: MirrorState) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: The checkpoint file.
        template: A :class:`~numpyro_pma.mirror.MirrorState` for the same model
            and guide (its values are ignored); fixes the structure, shapes
            and dtypes the file must have.

    Returns:
        The :class:`Checkpoint`, with arrays on the default device.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a checkpoint of this format, or its state
            does not match ``template``.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        contents = serialization.msgpack_restore(data)
    except Exception as error:
        raise ValueError(
            f"{path!r} is not a readable checkpoint (msgpack decoding failed: "
            f"{error}); it may be truncated or another kind of file"
        ) from error
    if not isinstance(contents, dict) or contents.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a numpyro_pma checkpoint")
    if contents.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path!r} has format version {contents.get('version')!r}; "
            f"this version of numpyro_pma reads version {_FORMAT_VERSION}"
        )

    try:
        restored = serialization.from_state_dict(
            jax.device_get(template), contents["mirror_state"]
        )
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"checkpoint {path!r} does not match this model and guide: {error}"
        ) from error
    _check_leaves_match(path, template, restored)
    mirror_state = jax.tree.map(jnp.asarray, restored)

    stored_trace = dict(contents["trace"])
    if "logdet_stderr" not in stored_trace and "elbo" in stored_trace:
        # Checkpoints written before the stochastic log determinant existed
        # used the exact one, whose standard error is zero.
        stored_trace["logdet_stderr"] = np.zeros_like(np.asarray(stored_trace["elbo"]))
    missing = [field for field in MirrorInfo._fields if field not in stored_trace]
    if missing:
        raise ValueError(
            f"checkpoint {path!r} has no trace fields {missing}; it was written by "
            "another version of numpyro_pma"
        )
    trace = MirrorInfo(
        *[np.asarray(stored_trace[field]) for field in MirrorInfo._fields]
    )
    rng_key = _data_to_key(contents["rng_key_data"], contents["rng_key_impl"])
    return Checkpoint(mirror_state=mirror_state, rng_key=rng_key, trace=trace)
