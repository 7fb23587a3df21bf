"""Per-leaf projection matrices: the plumbing shared by RGO, OWM and GPM.

Each method keeps one ``[*batch, d, d]`` matrix per projected parameter, acting on the
parameter's *input* side: dense kernels ``[in, out]`` over ``in``, HWIO conv kernels over
``kh*kw*cin`` (the im2col patch dimension), exactly as :mod:`rgo_jax.layouts` describes.

Biases differ between the methods. RGO (the reference code) gives a bias its own ``n x n``
P: its spec carries the ``BIAS`` layout. For the input-space baselines (:func:`leaf_specs`)
the "input" of a bias is the constant 1, so a projected 1-D leaf gets a ``[1, 1]`` matrix
acting on the bias viewed as a ``[1, n]`` matrix (its input dimension is 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgo_jax import _layout


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How one projected leaf is viewed as a ``[*batch, d, m]`` matrix."""

    layout: _layout.MatrixLayout | None  # None for a bias (input dimension 1)
    shape: tuple[int, ...]
    batch_shape: tuple[int, ...]
    d: int

    @property
    def is_bias(self) -> bool:
        return self.layout is None

    def to_matrix(self, g: jax.Array) -> jax.Array:
        if self.layout is None:
            return g.reshape(1, -1)
        return self.layout.to_matrix(g)

    def from_matrix(self, g: jax.Array) -> jax.Array:
        if self.layout is None:
            return g.reshape(self.shape)
        return self.layout.from_matrix(g, self.shape)


def leaf_specs(
    tree: Any, layout: _layout.LayoutSpec, project_biases: bool, *, bias_input: bool = False
) -> dict[str, LeafSpec | None]:
    """``path -> LeafSpec`` (or ``None`` for an unprojected leaf), in leaf order.

    Args:
      tree: params (or gradients, or shape-dtype structs).
      layout, project_biases: as for :func:`rgo_jax.scale_by_rgo`.
      bias_input: how a projected 1-D leaf is seen. ``False`` (RGO, the reference code): by
        its layout, a bias gets its own ``n x n`` matrix. ``True`` (OWM, GPM): a bias is a
        kernel row whose input is the constant 1, so it gets a ``[1, 1]`` matrix.
    """
    info = _layout.resolve_layouts(tree, layout, project_biases=project_biases)
    out: dict[str, LeafSpec | None] = {}
    for name, (lay, shape) in info.items():
        if lay is None:
            out[name] = None
        elif bias_input and len(shape) == 1:
            out[name] = LeafSpec(None, shape, (), 1)
        else:
            batch_shape, d, _ = lay.dims(shape)
            if d == 0:
                raise ValueError(
                    f"RGO: parameter '{name}' of shape {tuple(shape)} has no input features "
                    "(its P would be 0 x 0); leave it unprojected with a layout rule "
                    "returning None."
                )
            out[name] = LeafSpec(lay, shape, batch_shape, d)
    return out


def is_params_stand_in(params: Any) -> bool:
    """Whether ``params`` is ``optax.tree_map_params``'s leafless stand-in for the params."""
    return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


class _NotParams:
    """A leaf standing for a params-like tree of matrices that is not params (see
    :func:`init_matrices`)."""

    def __repr__(self) -> str:
        return "NOT_PARAMS"


NOT_PARAMS = _NotParams()


class InputProjected(NamedTuple):
    """A P applied inside its layer's backward pass: the optimizer's update leaves its
    gradient alone (:func:`rgo_jax.nnx.use_input_projection` reads it from the state).

    The field is named ``value`` so that a path through it reads like the parameter's own
    (:func:`rgo_jax.layouts.path_str` drops a trailing ``.value``, as for NNX variables).
    """

    value: jax.Array


PLACEHOLDER = optax.MaskedNode()
"""What an unprojected leaf holds in a state tree: optax's "nothing here" (an empty node),
as in ``optax.masked`` states, so that Orbax, ``flax.serialization`` and sharding tools
handle the state as they handle optax's own (a zero-size array is refused by Orbax)."""


def is_placeholder(x: Any) -> bool:
    """Whether ``x`` stands for "this leaf is not projected" (:data:`PLACEHOLDER`)."""
    return isinstance(x, optax.MaskedNode)


def init_matrices(
    params: Any,
    specs: dict[str, LeafSpec | None],
    make: Callable[[LeafSpec], jax.Array],
    dtype: Any,
) -> Any:
    """A tree like ``params`` with ``make(spec)`` per projected leaf, placeholders elsewhere.

    Under ``optax.tree_map_params`` (which calls ``init`` on a leafless stand-in for the
    params to find the params-shaped parts of a state) the result is a leaf marker instead:
    the matrices are not parameters and must not be handed to the mapped function.
    """
    if is_params_stand_in(params):
        return NOT_PARAMS

    def one(path, _):
        spec = specs[_layout.path_str(path)]
        return PLACEHOLDER if spec is None else make(spec)

    return jax.tree_util.tree_map_with_path(one, params)


def project_tree(
    method: str,
    updates: Any,
    matrices: Any,
    specs: dict[str, LeafSpec | None],
    fn: Callable[[jax.Array, jax.Array], jax.Array],
) -> Any:
    """Applies ``fn(matrix, G)`` to every projected leaf in its ``[*batch, d, m]`` form."""

    def one(path, g, mat):
        name = _layout.path_str(path)
        spec = specs[name]
        if isinstance(mat, InputProjected):  # projected by the layer's backward pass
            return g
        if spec is None or is_placeholder(mat):
            if spec is not None:
                raise ValueError(
                    f"{method}: parameter '{name}' is projected by the layout but its state "
                    "holds no matrix; was the state made with another layout/project_biases?"
                )
            return g
        want = (*spec.batch_shape, spec.d, spec.d)
        if mat.shape != want:
            raise ValueError(
                f"{method}: the matrix for parameter '{name}' has shape {mat.shape}, expected "
                f"{want} for a gradient of shape {spec.shape}."
            )
        out = fn(mat.astype(g.dtype), spec.to_matrix(g))
        return spec.from_matrix(out)

    return jax.tree_util.tree_map_with_path(one, updates, matrices)


def projected(matrices: Any) -> dict[str, Any]:
    """``{path: matrix}`` of the projected leaves of a state tree, in leaf order.

    The one walk over per-leaf matrices that RGO's consolidation, OWM's and GPM's updates
    share: each reads the matrices it updates from here and writes them back with
    :func:`with_projected`. Wrapper nodes (:class:`InputProjected`) are transparent: their
    matrix is returned under the leaf's own path.
    """
    flat = jax.tree_util.tree_flatten_with_path(matrices)[0]
    return {_layout.path_str(p): m for p, m in flat if not is_placeholder(m)}


def with_projected(matrices: Any, new: dict[str, Any]) -> Any:
    """``matrices`` with the projected leaves named in ``new`` replaced (same structure)."""

    def one(path, m):
        return new.get(_layout.path_str(path), m)

    return jax.tree_util.tree_map_with_path(one, matrices)


def path_keyed(table: dict, what: str) -> dict[str, Any]:
    """``table`` with every key as a ``"a/0/kernel"`` string.

    Keys may be strings or tuples of ``str``/``int`` (the ``nnx.to_flat_state`` spelling
    that the models' ``return_inputs`` dictionaries use); ``None`` values are dropped.
    """
    if not isinstance(table, dict):
        raise TypeError(
            f"{what} must be a dict keyed by parameter path, got {type(table).__name__}."
        )
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(key, str):
            name = key
        elif isinstance(key, (tuple, list)):
            name = _layout.path_str(key)
        else:
            raise TypeError(f"{what}: key {key!r} is not a path (a str or a tuple of str/int).")
        if name in out:
            raise ValueError(f"{what}: path '{name}' appears twice.")
        if value is not None:
            out[name] = value
    return out


def per_leaf(value: Any, name: str, what: str, names: list[str]) -> Any:
    """``value`` itself, or ``value[name]`` when it is a dict keyed by parameter path."""
    if isinstance(value, dict):
        if name not in value:
            raise ValueError(
                f"{what} is a dict but has no entry for projected parameter '{name}' "
                f"(projected: {names[:8]}{'...' if len(names) > 8 else ''})."
            )
        return value[name]
    return value


def check_input(method: str, name: str, x: Any, batch_shape: tuple[int, ...], d: int) -> Any:
    """Checks a layer-input matrix ``[*batch, rows, d]`` of a leaf; returns it (JAX or NumPy)."""
    if not isinstance(x, (jax.Array, np.ndarray)):
        x = np.asarray(x)
    want = f"[{', '.join(map(str, (*batch_shape, 'rows', d)))}]"
    if x.ndim != len(batch_shape) + 2 or x.shape[: len(batch_shape)] != batch_shape:
        raise ValueError(
            f"{method}: the input for parameter '{name}' has shape {x.shape}; expected {want}."
        )
    if x.shape[-1] != d:
        raise ValueError(
            f"{method}: the input for parameter '{name}' has {x.shape[-1]} features; its "
            f"matrix acts on {d} (shape {x.shape}, expected {want}; conv inputs are im2col "
            "patches in HWIO-flatten order)."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{method}: the input for parameter '{name}' must be floating, got {x.dtype}."
        )
    return x


def find_states(cls: type, opt_state: Any) -> list[Any]:
    """Every ``cls`` node inside a (chained, partitioned, injected) optimizer state."""

    def is_node(x):
        return isinstance(x, cls)

    return [s for s in jax.tree.leaves(opt_state, is_leaf=is_node) if is_node(s)]


def map_states(cls: type, fn: Callable[[Any], Any], opt_state: Any, method: str) -> Any:
    """Replaces every ``cls`` node inside a (chained) optimizer state by ``fn(node)``."""

    def is_node(x):
        return isinstance(x, cls)

    if isinstance(opt_state, cls):
        return fn(opt_state)
    if not find_states(cls, opt_state):
        raise ValueError(
            f"{method}: no {cls.__name__} found in the optimizer state; is the matching "
            "transformation in the chain?"
        )
    return jax.tree.map(lambda s: fn(s) if is_node(s) else s, opt_state, is_leaf=is_node)


def under_trace(*trees: Any) -> bool:
    """Whether the caller runs inside a JAX trace (``jit``, ``eval_shape``) or any leaf of
    ``trees`` is traced (e.g. by ``grad``): then values cannot be read on the host."""
    if isinstance(jnp.zeros(()), jax.core.Tracer):
        return True
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def check_alpha(alpha: Any, method: str) -> None:
    """Raises ``ValueError`` for a concrete alpha (or dict of them) that is not a finite
    positive scalar; traced values (inside ``jit``) cannot be checked and pass through."""
    values = alpha.values() if isinstance(alpha, dict) else [alpha]
    for a in values:
        if isinstance(a, jax.core.Tracer):
            continue
        try:
            arr = np.asarray(a)
        except Exception:  # noqa: BLE001 - anything that is not an array is a type error
            raise TypeError(f"{method}: alpha must be a number, got {a!r}.") from None
        if arr.shape != ():
            raise ValueError(
                f"{method}: alpha must be a scalar (one regulariser for all vectors), got an "
                f"array of shape {arr.shape}."
            )
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"{method}: alpha must be a real number, got {arr.dtype}.")
        if not (np.isfinite(arr) and arr > 0):
            raise ValueError(f"{method}: alpha must be positive and finite, got {a}.")
