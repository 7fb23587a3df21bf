"""Matrix layouts: how each parameter tensor is viewed as a matrix that P acts on."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp

__all__ = [
    "BIAS",
    "CONV",
    "DENSE",
    "MatrixLayout",
    "TRANSFORMER_RULES",
    "LayoutRules",
    "LayoutSpec",
    "default_layout",
    "layout_rules",
    "path_str",
    "resolve_layouts",
    "stacked",
]


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """Which axes of a parameter P acts on.

    A parameter ``W`` is viewed as ``batch x (in, out)``: ``in_axes`` are flattened into the
    rows that P (of size ``prod(in) x prod(in)``) multiplies, ``batch_axes`` index independent
    matrices (stacked layers, one P each), every other axis is an output axis (columns of G,
    averaged when a curvature vector is reduced to the P dimension).

    Attributes:
      in_axes: the input (reduction) axes, in the order they are flattened.
      batch_axes: axes with one independent P per index (e.g. the layer axis of ``nnx.scan``).
    """

    in_axes: tuple[int, ...]
    batch_axes: tuple[int, ...] = ()

    def normalize(self, ndim: int, name: str = "parameter") -> MatrixLayout:
        """Returns the layout with non-negative axes, checked against ``ndim``."""
        axes = []
        for a in (*self.in_axes, *self.batch_axes):
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"RGO layout {self} has axis {a} out of range for {name} "
                    f"with {ndim} dimensions."
                )
            axes.append(a % ndim)
        if len(set(axes)) != len(axes):
            raise ValueError(f"RGO layout {self} repeats an axis for {name}.")
        if not self.in_axes:
            raise ValueError(f"RGO layout {self} for {name} has no input axes.")
        n_in = len(self.in_axes)
        return MatrixLayout(tuple(axes[:n_in]), tuple(axes[n_in:]))

    def out_axes(self, ndim: int) -> tuple[int, ...]:
        """The output axes (all axes that are neither input nor batch), in order."""
        used = set(self.in_axes) | set(self.batch_axes)
        return tuple(a for a in range(ndim) if a not in used)

    def dims(self, shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
        """``(batch_shape, d, m)``: the P's batch shape, P's size and the number of columns."""
        batch_shape = tuple(shape[a] for a in self.batch_axes)
        d = math.prod(shape[a] for a in self.in_axes)
        m = math.prod(shape[a] for a in self.out_axes(len(shape)))
        return batch_shape, d, m

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """Moves ``x`` into the ``[*batch, d, m]`` matrix form."""
        batch_shape, d, m = self.dims(x.shape)
        order = (*self.batch_axes, *self.in_axes, *self.out_axes(x.ndim))
        return jnp.transpose(x, order).reshape(*batch_shape, d, m)

    def from_matrix(self, g: jax.Array, shape: Sequence[int]) -> jax.Array:
        """Inverse of :meth:`to_matrix` for a parameter of ``shape``."""
        order = (*self.batch_axes, *self.in_axes, *self.out_axes(len(shape)))
        g = g.reshape(tuple(shape[a] for a in order))
        return jnp.transpose(g, tuple(order.index(a) for a in range(len(shape))))

    def reduce_vector(self, x: jax.Array) -> jax.Array:
        """Reduces a parameter-shaped gradient to P's dimension: mean over the output axes.

        This is the reference code's reduction: a dense kernel ``[in, out]`` gives ``[in]``, a
        HWIO conv kernel gives ``[kh*kw*cin]``, a bias gives itself.
        """
        return jnp.mean(self.to_matrix(x), axis=-1)


DENSE = MatrixLayout(in_axes=(0,))
"""Dense kernel ``[in, out]``: P over ``in``."""
CONV = MatrixLayout(in_axes=(0, 1, 2))
"""2-D conv kernel HWIO ``[kh, kw, cin, cout]``: P over ``kh*kw*cin``."""
BIAS = MatrixLayout(in_axes=(0,))
"""Bias ``[n]``: its own ``n x n`` P (the reference code's behaviour)."""


def stacked(layout: MatrixLayout, num_stack_axes: int = 1) -> MatrixLayout:
    """The layout of ``layout``-shaped layers stacked along ``num_stack_axes`` leading axes.

    One independent P is kept per stacked layer (e.g. the layer axis of ``nnx.scan``).

    Examples:
      >>> from rgo_jax import layouts
      >>> layouts.stacked(layouts.DENSE)
      MatrixLayout(in_axes=(1,), batch_axes=(0,))
    """
    if any(a < 0 for a in (*layout.in_axes, *layout.batch_axes)):
        raise ValueError(f"stacked() needs a layout with non-negative axes, got {layout}.")
    k = num_stack_axes
    return MatrixLayout(
        in_axes=tuple(a + k for a in layout.in_axes),
        batch_axes=(*range(k), *(a + k for a in layout.batch_axes)),
    )


_NAMED = {"dense": DENSE, "conv": CONV, "bias": BIAS}

LayoutLike: TypeAlias = MatrixLayout | str | None
LayoutSpec: TypeAlias = Callable[[str, Any], LayoutLike] | Any | None
"""``None`` (default rules), :func:`layout_rules`, a callable ``(path, leaf) -> layout``,
or a tree of layouts."""


def _as_layout(x: LayoutLike, name: str) -> MatrixLayout | None:
    if x is None or isinstance(x, MatrixLayout):
        return x
    if isinstance(x, str) and x in _NAMED:
        return _NAMED[x]
    raise TypeError(
        f"RGO layout for {name} must be a MatrixLayout, one of {sorted(_NAMED)} or None, got {x!r}."
    )


def path_str(path: Sequence[Any]) -> str:
    """A ``"layer/kernel"`` string for a pytree key path (or a tuple of ``str``/``int``, as
    ``nnx`` paths are): the one spelling of a parameter's path in the package.

    NNX ``Variable`` wrappers (a trailing ``.value`` attribute) add no component, so a
    model's ``nnx.state`` and its pure-array form give the same strings.
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def default_layout(path: str, leaf: Any, *, project_biases: bool = True) -> MatrixLayout | None:
    """The default rule: 1-D bias, 2-D dense ``[in, out]``, 4-D conv HWIO, scalars none.

    A scalar leaf is left unprojected: its P would be ``1 x 1`` and, trace-normalised, the
    identity. Any other rank is ambiguous (a 3-D leaf may be a 1-D conv, stacked dense
    layers or an attention kernel ``[in, heads, head_dim]``) and raises an error naming the
    leaf: pass ``layout=`` for it (see :data:`TRANSFORMER_RULES`). The rule decides by rank
    alone: an embedding table ``[vocab, dim]`` is 2-D and would get a ``vocab x vocab`` P
    (the memory guard of :func:`rgo_jax.scale_by_rgo` stops a large one at ``init``).
    """
    shape = jnp.shape(leaf)
    if len(shape) == 0:
        return None
    if len(shape) == 1:
        return BIAS if project_biases else None
    if len(shape) == 2:
        return DENSE
    if len(shape) == 4:
        return CONV
    raise ValueError(
        f"RGO cannot infer a matrix layout for parameter '{path}' of shape {tuple(shape)}: "
        "the default rule knows 1-D biases, 2-D dense kernels [in, out] and 4-D HWIO conv "
        "kernels. Pass layout= (e.g. layout_rules([(r'...', stacked(DENSE))]) or a callable) "
        "giving a MatrixLayout or None for this leaf."
    )


@dataclasses.dataclass(frozen=True)
class LayoutRules:
    """``(regex, layout)`` rules over parameter paths; see :func:`layout_rules`.

    Deliberately not callable: ``optax.inject_hyperparams`` takes every callable argument
    for a schedule, so ``inject_hyperparams(rgo)(learning_rate=..., layout=rules)`` keeps a
    rules object as a static argument (a plain layout function there needs
    ``static_args=("layout",)``).
    """

    rules: tuple[tuple[re.Pattern, MatrixLayout | None], ...]
    project_biases: bool = True

    def layout_of(self, path: str, leaf: Any) -> MatrixLayout | None:
        """The layout of the leaf at ``path``: the first matching rule's, else the default."""
        for rx, lay in self.rules:
            if rx.search(path):
                return lay
        return default_layout(path, leaf, project_biases=self.project_biases)


def layout_rules(
    rules: Sequence[tuple[str, LayoutLike]], *, project_biases: bool = True
) -> LayoutRules:
    """Layouts from ``(regex, layout)`` rules over parameter paths.

    The first rule whose regex ``re.search``-es the path wins; leaves matching no rule use
    :func:`default_layout`. ``None`` as the layout leaves the leaf unprojected.

    Examples:
      >>> from rgo_jax import layouts
      >>> rules = layouts.layout_rules([(r"^head/", None), (r"blocks/.*kernel", "dense")])
      >>> rules.layout_of("head/kernel", jnp.zeros((4, 2))) is None
      True
    """
    compiled = tuple((re.compile(rx), _as_layout(lay, f"rule {rx!r}")) for rx, lay in rules)
    return LayoutRules(compiled, project_biases)


TRANSFORMER_RULES: tuple[tuple[str, LayoutLike], ...] = (
    (r"(^|/)embedding$", None),
    (r"(^|/)(query|key|value)/kernel$", MatrixLayout(in_axes=(0,))),
    (r"(^|/)(query|key|value)/bias$", None),
    (r"(^|/)out/kernel$", MatrixLayout(in_axes=(0, 1))),
    (r"(^|/)scale$", None),
    (r"norm[^/]*/bias$", None),
)
"""The layout policy for Flax transformer blocks, for :func:`layout_rules`.

- Embedding tables (``nnx.Embed``'s ``embedding [vocab, dim]``): no P. Their input is a
  one-hot token, so a ``vocab x vocab`` P would be enormous and nearly diagonal; protect
  the blocks on top instead (or give a custom layout over ``dim``).
- Attention (``nnx.MultiHeadAttention``): ``query``/``key``/``value`` kernels
  ``[d_model, heads, head_dim]`` get a P over ``d_model``; the ``out`` kernel
  ``[heads, head_dim, d_model]`` a P over ``heads * head_dim``; their ``[heads,
  head_dim]`` biases none.
- Normalisation (``nnx.LayerNorm``/``nnx.RMSNorm``): the ``scale`` and the biases of
  modules whose name contains ``norm`` get no P (per-feature gains, not layer inputs).
- Everything else by :func:`default_layout`: MLP kernels are dense, their biases get
  their own P (``project_biases=False`` frees them).

Examples:
  >>> from rgo_jax import layouts
  >>> rules = layouts.layout_rules([*layouts.TRANSFORMER_RULES])
  >>> rules.layout_of("blocks/0/attn/query/kernel", jnp.zeros((8, 2, 4)))
  MatrixLayout(in_axes=(0,), batch_axes=())
"""


def _is_layout_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (MatrixLayout, str))


def resolve_layouts(
    params: Any, layout: LayoutSpec = None, *, project_biases: bool = True
) -> dict[str, tuple[MatrixLayout | None, tuple[int, ...]]]:
    """Maps each leaf's path string to ``(normalised layout or None, shape)``.

    Args:
      params: a pytree of arrays (or shape-dtype structs).
      layout: ``None`` for :func:`default_layout`; a callable ``(path, leaf) -> layout``; or a
        tree with the structure of ``params`` whose leaves are ``MatrixLayout``, ``"dense"``,
        ``"conv"``, ``"bias"`` or ``None`` (unprojected).
      project_biases: with the default rule, whether 1-D leaves get a P.

    Returns:
      A dict ``path -> (layout, shape)`` in the order of ``jax.tree.leaves(params)``.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if isinstance(layout, LayoutRules):
        layout = layout.layout_of
    if layout is None or callable(layout):
        fn = layout or (lambda p, x: default_layout(p, x, project_biases=project_biases))
        chosen = {path_str(p): fn(path_str(p), x) for p, x in flat}
    else:
        spec = jax.tree_util.tree_flatten_with_path(layout, is_leaf=_is_layout_leaf)[0]
        by_path = {path_str(p): v for p, v in spec}
        chosen = {}
        for p, _ in flat:
            name = path_str(p)
            if name not in by_path:
                raise ValueError(
                    f"RGO layout tree has no entry for parameter '{name}'; it has "
                    f"{sorted(by_path)[:8]}{'...' if len(by_path) > 8 else ''}."
                )
            chosen[name] = by_path[name]
    out = {}
    for p, x in flat:
        name = path_str(p)
        shape = tuple(jnp.shape(x))
        lay = _as_layout(chosen[name], f"parameter '{name}'")
        out[name] = (None if lay is None else lay.normalize(len(shape), f"'{name}'"), shape)
    return out
