"""Feature encoding layer (FEL): a fixed permutation of the feature axis chosen by task id."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

__all__ = [
    "FEL",
    "FELKey",
    "LinenFEL",
    "fel_permutation",
    "permute_features",
]


def _as_key(key: jax.Array | int) -> jax.Array:
    """Accepts a typed key, a legacy uint32 key, or an integer seed."""
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"FEL key must be a single key, got a key array of shape {key.shape}.")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        f"FEL key must be an integer seed or a key from jax.random.key, got {key.dtype}{key.shape}."
    )


def _check_index(name: str, value) -> jax.Array:
    """Validates a layer or task index: integer dtype, scalar, non-negative when concrete."""
    if isinstance(value, (bool, float, str)):
        raise TypeError(f"FEL {name} id must be an integer, got {value!r}.")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f"FEL {name} id must be non-negative, got {value}.")
        if value >= 2**31:  # int32: a larger id would wrap to another task's permutation
            raise ValueError(f"FEL {name} id must be below 2**31, got {value}.")
        return jnp.asarray(value, jnp.int32)
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"FEL {name} id must have an integer dtype, got {arr.dtype}.")
    if arr.shape != ():
        raise ValueError(f"FEL {name} id must be a scalar, got shape {arr.shape}.")
    if not isinstance(arr, jax.core.Tracer) and int(arr) < 0:
        raise ValueError(f"FEL {name} id must be non-negative, got {int(arr)}.")
    return arr.astype(jnp.int32)


def fel_permutation(
    key: jax.Array | int,
    layer: int | jax.Array,
    task: int | jax.Array,
    num_features: int,
    *,
    identity_first_task: bool = True,
) -> jax.Array:
    """The permutation of ``num_features`` features for ``(key, layer, task)``.

    The permutation is ``jax.random.permutation(fold_in(fold_in(key, layer), task), n)``:
    a pure function of its arguments, never of a call counter, so the same task always sees
    the same virtual network. ``task`` (and ``layer``) may be traced under ``jit``.

    Args:
      key: a typed key from ``jax.random.key(seed)`` (an ``int`` seed is accepted too).
      layer: index of the FEL site in the network (distinct sites get distinct permutations).
      task: task id, a non-negative integer.
      num_features: length of the feature axis.
      identity_first_task: if True (the reference code's behaviour), task 0 uses the identity.

    Returns:
      An ``int32`` array of shape ``[num_features]`` holding a permutation of
      ``0..num_features-1``.

    Examples:
      >>> import jax
      >>> from rgo_jax import fel_permutation
      >>> perm = fel_permutation(jax.random.key(0), layer=1, task=3, num_features=6)
      >>> sorted(perm.tolist())
      [0, 1, 2, 3, 4, 5]
      >>> fel_permutation(jax.random.key(0), layer=1, task=0, num_features=6).tolist()
      [0, 1, 2, 3, 4, 5]
    """
    if not isinstance(num_features, (int, np.integer)) or num_features < 1:
        raise ValueError(f"FEL num_features must be a positive integer, got {num_features!r}.")
    key = _as_key(key)
    layer = _check_index("layer", layer)
    task = _check_index("task", task)
    sub = jax.random.fold_in(jax.random.fold_in(key, layer), task)
    perm = jax.random.permutation(sub, num_features).astype(jnp.int32)
    if identity_first_task:
        perm = jnp.where(task == 0, jnp.arange(num_features, dtype=jnp.int32), perm)
    return perm


def permute_features(
    x: jax.Array,
    key: jax.Array | int,
    layer: int | jax.Array,
    task: int | jax.Array,
    *,
    inverse: bool = False,
    identity_first_task: bool = True,
) -> jax.Array:
    """Permutes the last axis of ``x`` (units, or channels of an NHWC map) for a task.

    ``permute_features(permute_features(x, ...), ..., inverse=True)`` is ``x``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from rgo_jax import permute_features
      >>> x = jnp.arange(8.0).reshape(2, 4)
      >>> y = permute_features(x, jax.random.key(0), layer=0, task=2)
      >>> bool((permute_features(y, jax.random.key(0), 0, 2, inverse=True) == x).all())
      True
    """
    if x.ndim < 1:
        raise ValueError("FEL needs an array with a feature axis, got a scalar.")
    perm = fel_permutation(key, layer, task, x.shape[-1], identity_first_task=identity_first_task)
    if inverse:
        perm = jnp.argsort(perm)
    return jnp.take(x, perm, axis=-1)


class FELKey(nnx.Variable):
    """Non-trainable variable holding a FEL's typed PRNG key (not seen by ``nnx.Param`` filters)."""


class FEL(nnx.Module):
    """Flax NNX feature encoding layer: permutes the last axis by task id. No parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from rgo_jax import FEL
      >>> fel = FEL(layer=0, seed=0)
      >>> len(jax.tree.leaves(nnx.state(fel, nnx.Param)))
      0
      >>> fel(jnp.ones((2, 5)), task=1).shape
      (2, 5)
    """

    def __init__(
        self,
        layer: int,
        *,
        seed: int | jax.Array = 0,
        identity_first_task: bool = True,
    ):
        _check_index("layer", layer)  # a clear error for "a", 1.5 or -1
        self.layer = int(layer)
        self.identity_first_task = identity_first_task
        self.key = FELKey(_as_key(seed))

    def __call__(self, x: jax.Array, task: int | jax.Array) -> jax.Array:
        return permute_features(
            x, self.key[...], self.layer, task, identity_first_task=self.identity_first_task
        )


class LinenFEL(linen.Module):
    """Flax Linen feature encoding layer (same permutation as :class:`FEL`)."""

    layer: int
    seed: int = 0
    identity_first_task: bool = True

    @linen.compact
    def __call__(self, x: jax.Array, task: int | jax.Array) -> jax.Array:
        return permute_features(
            x,
            jax.random.key(self.seed),
            self.layer,
            task,
            identity_first_task=self.identity_first_task,
        )
