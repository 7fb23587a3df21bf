"""Data-parallel RGO across devices with ``jax.sharding``.

The recipe: one 1-D device mesh; the batch sharded along its leading axis; parameters and
optimizer state replicated (or, for large P, P sharded by rows). A ``jax.jit``-ed training
step written for one device then runs data-parallel unchanged: XLA's SPMD partitioner
reduces the gradients (and the batch-summed curvature vectors) across devices where the
loss sums over the sharded batch, and applies the replicated (or row-sharded) P locally.
Nothing in the step needs to name a device or call a collective. With row-sharded P the
projected update comes out row-sharded too, and the parameters would follow it: pin the
step's outputs with ``jax.jit(step, out_shardings=shardings_of((params, opt_state)))``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from rgo_jax import sharding
  >>> mesh = sharding.data_mesh()
  >>> x = sharding.shard_batch(jnp.ones((4 * len(jax.devices()), 3)), mesh)
  >>> x.sharding.spec == jax.sharding.PartitionSpec("data")
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rgo_jax import _layout, _transform

__all__ = [
    "DATA_AXIS",
    "data_mesh",
    "replicate_state",
    "shard_batch",
    "shard_projection_rows",
    "shardings_of",
]

DATA_AXIS = "data"
"""The mesh axis name used by default for the batch (and for P's rows)."""


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) named ``axis_name``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh: no devices given.")
    return Mesh(np.asarray(devices), (axis_name,))


def _check_mesh(mesh: Mesh, axis_name: str) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"Expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"Mesh axes {mesh.axis_names} have no axis named {axis_name!r}.")
    return int(mesh.shape[axis_name])


def replicate_state(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` (params, optimizer state, ...) on all devices of ``mesh``.

    Returns:
      ``tree`` with each leaf ``device_put`` to ``NamedSharding(mesh, PartitionSpec())``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"replicate_state expects a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Splits every array of ``batch`` along its leading axis across ``mesh[axis_name]``.

    Args:
      batch: an array or tree of arrays with a common leading (batch) axis, e.g. ``(x, y)``
        or curvature-vector batches ``[num_batches, batch, ...]``.
      mesh: the device mesh.
      axis_name: the mesh axis to shard over.

    Returns:
      ``batch`` with each leaf sharded as ``PartitionSpec(axis_name)``.

    Raises:
      ValueError: naming the leaf whose leading axis is missing or not divisible by the number
        of devices on ``axis_name``.
    """
    n = _check_mesh(mesh, axis_name)
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(x)
        if not shape or shape[0] % n:
            name = _layout.path_str(path) or "batch"
            raise ValueError(
                f"shard_batch: '{name}' has shape {tuple(shape)}; its leading axis must be "
                f"divisible by the {n} devices of mesh axis {axis_name!r}."
            )
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(axis_name)))


def shard_projection_rows(
    opt_state: Any,
    mesh: Mesh,
    *,
    axis_name: str = DATA_AXIS,
    min_dim: int = 1024,
) -> Any:
    """Shards every large RGO matrix by rows across ``mesh[axis_name]``; replicates the rest.

    A ``[*batch, d, d]`` P with ``d >= min_dim`` and ``d`` divisible by the number of devices
    gets ``PartitionSpec(*[None] * len(batch), axis_name, None)``: each device stores ``d / n``
    rows and computes those rows of ``P @ G`` (and of the RLS update); XLA gathers the result.
    This divides P's memory by ``n`` at the cost of one all-gather of ``P @ G`` per step.
    Everything else in ``opt_state`` is replicated.

    Args:
      opt_state: an optimizer state containing :class:`rgo_jax.RGOState` nodes.
      mesh: the device mesh.
      axis_name: the mesh axis to shard the rows over.
      min_dim: smallest P dimension worth sharding.

    Returns:
      ``opt_state`` with its arrays placed on ``mesh``.
    """
    n = _check_mesh(mesh, axis_name)
    if not _transform.rgo_states(opt_state):
        raise ValueError("shard_projection_rows: no RGOState in the optimizer state.")
    replicated = NamedSharding(mesh, PartitionSpec())

    def place_p(p: jax.Array) -> jax.Array:
        if p.ndim >= 2 and p.shape[-1] >= min_dim and p.shape[-2] % n == 0:
            spec = PartitionSpec(*([None] * (p.ndim - 2)), axis_name, None)
            return jax.device_put(p, NamedSharding(mesh, spec))
        return jax.device_put(p, replicated)

    def place(s: Any) -> Any:
        if isinstance(s, _transform.RGOState):
            return s._replace(
                p=jax.tree.map(place_p, s.p),
                num_vectors=jax.device_put(s.num_vectors, replicated),
                skipped=jax.device_put(s.skipped, replicated),
            )
        return jax.device_put(s, replicated)

    return jax.tree.map(place, opt_state, is_leaf=lambda x: isinstance(x, _transform.RGOState))


def shardings_of(tree: Any) -> Any:
    """The sharding of every array of ``tree``: pass it as a jitted step's ``out_shardings``.

    Keeps replicated parameters replicated and row-sharded P row-sharded across steps (XLA
    would otherwise propagate P's row sharding to the updated parameters).
    """
    return jax.tree.map(lambda x: x.sharding, tree)
