"""Data-parallel RGO across devices with ``jax.sharding``.

The recipe: one 1-D device mesh; the batch sharded along its leading axis; parameters and
optimizer state replicated (or, for large P, P sharded by rows; :func:`state_shardings`
gives every leaf of the state its sharding). A ``jax.jit``-ed training step written for one
device then runs data-parallel unchanged: XLA's SPMD partitioner reduces the gradients
(and the batch-summed curvature vectors) across devices where the loss sums over the
sharded batch, and applies the replicated (or row-sharded) P locally. Nothing in the step
needs to name a device or call a collective.

Meshes with Explicit axes (``jax.make_mesh``'s default, and :func:`data_mesh`'s), Auto
meshes and ``shard_map`` all work: the projection, the consolidation kernels and the FEL
gather pass through :func:`sharding_boundary`. On an Explicit mesh the projected update
keeps the gradient's sharding; on an Auto mesh it comes out row-sharded with row-sharded
P, so pin the step's outputs with
``jax.jit(step, out_shardings=shardings_of((params, opt_state)))``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from rgo_jax import sharding
  >>> mesh = sharding.data_mesh()
  >>> x = sharding.shard_batch(jnp.ones((4 * len(jax.devices()), 3)), mesh)
  >>> x.sharding.spec == jax.sharding.PartitionSpec("data")
  True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rgo_jax import _layout

__all__ = [
    "DATA_AXIS",
    "data_mesh",
    "replicate_state",
    "shard_batch",
    "shard_projection_rows",
    "shardings_of",
    "state_shardings",
]

DATA_AXIS = "data"
"""The mesh axis name used by default for the batch (and for P's rows)."""


def data_mesh(
    devices: Sequence[jax.Device] | None = None,
    axis_name: str = DATA_AXIS,
    *,
    axis_type: AxisType | None = None,
) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) named ``axis_name``.

    Built by ``jax.make_mesh``, so its axis type is the one the JAX documentation's meshes
    get (Explicit in current JAX) unless ``axis_type`` (e.g. ``jax.sharding.AxisType.Auto``)
    says otherwise. Every rgo_jax function works on both kinds and inside ``shard_map``.

    Examples:
      >>> import jax
      >>> from rgo_jax import sharding
      >>> mesh = sharding.data_mesh(axis_type=jax.sharding.AxisType.Auto)
      >>> mesh.axis_names, mesh.axis_types == (jax.sharding.AxisType.Auto,)
      (('data',), True)
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh: no devices given.")
    types = None if axis_type is None else (axis_type,)
    return jax.make_mesh((len(devices),), (axis_name,), axis_types=types, devices=devices)


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
    Everything else in ``opt_state`` is replicated. This is ``jax.device_put(opt_state,
    state_shardings(opt_state, mesh, row_axis=axis_name, min_dim=min_dim))``.

    Args:
      opt_state: an optimizer state containing :class:`rgo_jax.RGOState` nodes.
      mesh: the device mesh.
      axis_name: the mesh axis to shard the rows over.
      min_dim: smallest P dimension worth sharding.

    Returns:
      ``opt_state`` with its arrays placed on ``mesh``.
    """
    from rgo_jax import _transform

    _check_mesh(mesh, axis_name)
    if not _transform.rgo_states(opt_state):
        raise ValueError("shard_projection_rows: no RGOState in the optimizer state.")
    return jax.device_put(
        opt_state, state_shardings(opt_state, mesh, row_axis=axis_name, min_dim=min_dim)
    )


def state_shardings(
    opt_state: Any,
    mesh: Mesh,
    *,
    tx: Any = None,
    param_shardings: Any = None,
    row_axis: str | None = None,
    min_dim: int = 1024,
) -> Any:
    """The sharding of every array of an optimizer state holding RGO matrices.

    A P is a ``d x d`` matrix acting on its parameter's input side, so it never takes its
    parameter's spec: each ``[*batch, d, d]`` P is replicated, or sharded by rows along
    ``row_axis`` when ``d >= min_dim`` and ``d`` divides evenly (see
    :func:`shard_projection_rows`). Params-shaped state of the other transformations in
    the chain (Adam's ``mu`` and ``nu``) follows ``param_shardings`` when ``tx`` and
    ``param_shardings`` are given (``optax.tree_map_params``); everything else (step
    counts, placeholders of unprojected leaves) is replicated.

    Args:
      opt_state: the state, or its ``jax.eval_shape(tx.init, params)``.
      mesh: the device mesh.
      tx: the optimizer that made ``opt_state`` (needed with ``param_shardings``).
      param_shardings: a ``NamedSharding`` per parameter leaf (like params).
      row_axis: a mesh axis to shard large P by rows over, or ``None`` to replicate all P.
      min_dim: smallest P dimension sharded by rows.

    Returns:
      A tree of ``NamedSharding`` like ``opt_state``: pass it to ``jax.device_put`` or as
      the ``out_shardings`` of ``jax.jit(tx.init)`` and of the training step.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import rgo_jax
      >>> from rgo_jax import sharding
      >>> mesh = sharding.data_mesh()
      >>> params = {"w": jnp.ones((8, 4))}
      >>> tx = optax.chain(rgo_jax.scale_by_rgo(), optax.adam(1e-3))
      >>> specs = {"w": NamedSharding(mesh, P(None, "data"))}
      >>> out = sharding.state_shardings(
      ...     jax.eval_shape(tx.init, params), mesh, tx=tx, param_shardings=specs)
      >>> out[0].p["w"].spec == P(), out[1][0].mu["w"].spec == P(None, "data")
      (True, True)
    """
    from rgo_jax import _transform

    if not isinstance(mesh, Mesh):
        raise TypeError(f"state_shardings expects a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if (tx is None) != (param_shardings is None):
        raise ValueError("state_shardings: pass tx and param_shardings together (or neither).")
    n = None if row_axis is None else _check_mesh(mesh, row_axis)
    replicated = NamedSharding(mesh, PartitionSpec())

    def p_sharding(p: Any) -> NamedSharding:
        shape = np.shape(p)
        if n is not None and len(shape) >= 2 and shape[-1] >= min_dim and shape[-2] % n == 0:
            return NamedSharding(mesh, PartitionSpec(*[None] * (len(shape) - 2), row_axis, None))
        return replicated

    def rgo_node(s: Any) -> Any:
        return jax.tree.map(lambda _: replicated, s)._replace(p=jax.tree.map(p_sharding, s.p))

    is_rgo = lambda x: isinstance(x, _transform.RGOState)  # noqa: E731
    if tx is None:
        base = jax.tree.map(lambda _: replicated, opt_state)
    else:
        base = optax.tree_map_params(
            tx,
            lambda _, s: s,
            opt_state,
            param_shardings,
            transform_non_params=lambda _: replicated,
        )
    return jax.tree.map(
        lambda s, b: rgo_node(s) if is_rgo(s) else b, opt_state, base, is_leaf=is_rgo
    )


def shardings_of(tree: Any) -> Any:
    """The sharding of every array of ``tree``: pass it as a jitted step's ``out_shardings``.

    Keeps replicated parameters replicated and row-sharded P row-sharded across steps (XLA
    would otherwise propagate P's row sharding to the updated parameters).
    """
    return jax.tree.map(lambda x: x.sharding, tree)


def _leaf_mesh(x: Any):
    """The (abstract) mesh in ``x``'s type when it has Explicit axes, else ``None``."""
    try:
        s = jax.typeof(x).sharding
    except TypeError:
        return None
    mesh = getattr(s, "mesh", None)
    if mesh is None or mesh.empty or not mesh.explicit_axes:
        return None
    return mesh


def _explicit_mesh(tree: Any):
    """The mesh whose Explicit axes type ``tree``'s arrays (context mesh first), or ``None``."""
    current = jax.sharding.get_abstract_mesh()
    if not current.empty:
        return current if current.explicit_axes else None
    for leaf in jax.tree.leaves(tree):
        mesh = _leaf_mesh(leaf)
        if mesh is not None:
            return mesh
    return None


def _vma(x: Any) -> frozenset:
    """The Manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # newer jax; older ones call it ``vma``
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", None) or ())


def _vary(x: jax.Array, axes: frozenset) -> jax.Array:
    """``x`` cast to vary over the Manual ``axes`` too (``pcast``; ``pvary`` on older jax)."""
    if not axes:
        return x
    axes = tuple(sorted(axes))
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)


def sharding_boundary(like: int) -> Callable:
    """Makes a kernel sharding-agnostic at its boundary (Auto, Explicit, ``shard_map``).

    * With Explicit mesh axes (``jax.make_mesh``'s default) the kernel runs with those axes
      turned Auto (``jax.sharding.auto_axes``): XLA's partitioner places its gathers,
      diagonals and scans as it does on an Auto mesh, and each output takes the type of the
      matching leaf of argument ``like`` (the gradient for an update, P for a consolidation).
    * Inside ``shard_map`` (Manual axes) the leaves of argument ``like`` are cast to vary
      over the axes the other arguments vary over (``jax.lax.pcast``), so that a scan over
      per-device vectors carries a consistently typed P.
    * Otherwise (one device, Auto meshes) the kernel runs unchanged.

    Arguments that are not arrays (static options) are passed through.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args):
            is_array = lambda x: isinstance(x, (jax.Array, np.ndarray))  # noqa: E731
            leaves, treedef = jax.tree.flatten(args)
            where = [i for i, x in enumerate(leaves) if is_array(x)]
            mesh = _explicit_mesh([leaves[i] for i in where])
            if mesh is None:
                varying = frozenset().union(*(_vma(leaves[i]) for i in where))
                if not varying:
                    return fn(*args)
                args = list(args)
                args[like] = jax.tree.map(lambda x: _vary(x, varying - _vma(x)), args[like])
                return fn(*args)

            def spec(x):
                s = jax.typeof(x).sharding
                return s.spec if _leaf_mesh(x) == mesh else PartitionSpec()

            out = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), args[like])

            def inner(*arrays):
                full = list(leaves)
                for i, a in zip(where, arrays, strict=True):
                    full[i] = a
                return fn(*jax.tree.unflatten(treedef, full))

            auto = jax.sharding.auto_axes(inner, axes=mesh.explicit_axes, out_sharding=out)
            return auto(*[leaves[i] for i in where])

        return wrapped

    return decorate
