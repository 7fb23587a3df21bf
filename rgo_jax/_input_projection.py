"""Input-side RGO projection for dense layers: ``(P X^T) D`` instead of ``P (X^T D)``.

A dense layer ``y = x W`` with inputs ``X [n, d]`` and output cotangents ``D [n, m]`` has the
kernel gradient ``G = X^T D``, and RGO applies ``(d / tr P) P G``. Formed as written this
costs ``d^2 m`` multiply-adds per step for the projection alone. Associated the other way,
``(P X^T) D`` costs ``d^2 n + d n m``: when the batch ``n`` is much smaller than the layer's
width ``m`` (the paper's MLP: ``n = 10``, ``m = 256``) it is an order of magnitude cheaper.
The product needs ``X`` and ``D`` separately, so it happens inside the layer's backward pass
(:func:`projected_matmul`, a ``jax.custom_vjp``); the optimizer then leaves those leaves
alone (:func:`scale_by_rgo_input_projected`, whose state is exactly
:func:`rgo_jax.scale_by_rgo`'s, so :func:`rgo_jax.consolidate` and checkpoints are unchanged).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rgo_jax import _layout, _matrices, _transform

__all__ = [
    "input_projection_matrices",
    "projected_matmul",
    "rgo_input_projected",
    "scale_by_rgo_input_projected",
    "use_input_projection",
]

InputProjectedSpec = str | Callable[[str], bool]
"""A regex ``re.search``-ed against parameter paths (``"hidden/0/kernel"``) or a predicate."""


def _matcher(spec: InputProjectedSpec) -> Callable[[str], bool]:
    if isinstance(spec, str):
        rx = re.compile(spec)
        return lambda path: rx.search(path) is not None
    if callable(spec):
        return lambda path: bool(spec(path))
    raise TypeError(
        f"input_projected must be a regex string or a callable (path) -> bool, got {spec!r}."
    )


def _trace_scale(p: jax.Array) -> jax.Array:
    """``d / tr P`` from P's diagonal (``O(d)``; ``jnp.trace`` reads all of P)."""
    return p.shape[-1] / jnp.sum(jnp.diagonal(p, axis1=-2, axis2=-1), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _projected_matmul(x, kernel, p, precision):
    return jnp.matmul(x, kernel, precision=precision)


def _pm_fwd(x, kernel, p, precision):
    return jnp.matmul(x, kernel, precision=precision), (x, kernel, p)


def _pm_bwd(precision, res, dy):
    x, kernel, p = res
    d, m = kernel.shape
    xs = x.reshape(-1, d)
    dys = dy.reshape(-1, m)
    n = xs.shape[0]
    dx = jnp.matmul(dy, kernel.T, precision=precision)
    pm = p.astype(xs.dtype)
    scale = _trace_scale(pm).astype(xs.dtype)
    if n < m:  # input side: (s P X^T) D = (s X P^T)^T D, d^2 n + d n m multiply-adds
        # X P^T rather than P X^T: the same numbers, and measured faster on CPU.
        xp = jnp.matmul(xs * scale, pm.T, precision=precision)
        dk = jnp.matmul(xp.T, dys, precision=precision)
    else:  # output side: s P (X^T D), d n m + d^2 m
        dk = jnp.matmul(pm, jnp.matmul(xs.T, dys, precision=precision), precision=precision)
        dk = dk * scale
    return dx.astype(x.dtype), dk.astype(kernel.dtype), jnp.zeros_like(p)


_projected_matmul.defvjp(_pm_fwd, _pm_bwd)


def projected_matmul(
    x: jax.Array,
    kernel: jax.Array,
    p: jax.Array,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    r"""``x @ kernel`` whose kernel gradient comes out RGO-projected.

    The forward value is ``x @ kernel``. In the backward pass the kernel's cotangent is

    .. math::  \frac{d}{\operatorname{tr} P}\, P X^\top D

    (``X = x`` reshaped to ``[n, d]``, ``D`` the output cotangent ``[n, m]``), computed as
    ``(P X^T) D`` when ``n < m`` and as ``P (X^T D)`` otherwise, whichever is cheaper; the
    cotangent of ``x`` is the ordinary ``D kernel^T``. ``P`` is a constant: its cotangent is
    zero (it changes only by consolidation). The trace is taken from ``P`` itself on every
    call (``O(d)``), so it can never be stale.

    Args:
      x: inputs ``[..., d]``.
      kernel: ``[d, m]``.
      p: the layer's RGO matrix ``[d, d]`` (any float dtype; used in ``x``'s dtype).
      precision: passed to the matrix products.

    Returns:
      ``x @ kernel``, shape ``[..., m]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from rgo_jax._input_projection import projected_matmul
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> p = jnp.diag(jnp.array([2.0, 1.0, 0.0]))  # d / tr P = 1
      >>> jax.grad(lambda w: projected_matmul(x, w, p).sum())(w)[:, 0].tolist()
      [4.0, 2.0, 0.0]
    """
    x, kernel, p = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(p)
    if kernel.ndim != 2:
        raise ValueError(f"projected_matmul: kernel must be [d, m], got shape {kernel.shape}.")
    d = kernel.shape[0]
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(
            f"projected_matmul: x of shape {x.shape} does not end in the kernel's input size {d}."
        )
    if p.shape != (d, d):
        raise ValueError(
            f"projected_matmul: P has shape {p.shape}, expected ({d}, {d}) for a kernel of "
            f"shape {kernel.shape}."
        )
    return _projected_matmul(x, kernel, jax.lax.stop_gradient(p), precision)


def _check_input_projected(info, match) -> list[str]:
    """The matched leaves; each must be a plain 2-D dense kernel with a P."""
    names = []
    for name, (lay, shape) in info.items():
        if not match(name):
            continue
        if lay is None:
            raise ValueError(
                f"RGO input projection: parameter '{name}' is selected for input-side "
                "projection but its layout gives it no P."
            )
        if len(shape) != 2 or lay != _layout.DENSE:
            raise ValueError(
                f"RGO input projection: parameter '{name}' of shape {shape} has layout {lay}; "
                "only dense kernels [in, out] (layouts.DENSE) can be projected on the input side."
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"RGO input projection: the selection matches none of the parameters {sorted(info)}."
        )
    return names


def scale_by_rgo_input_projected(
    input_projected: InputProjectedSpec,
    layout: _layout.LayoutSpec = None,
    *,
    project_biases: bool = True,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """:func:`rgo_jax.scale_by_rgo` that leaves input-projected dense kernels untouched.

    The state is exactly ``scale_by_rgo(layout, ...)``'s (a P for every projected leaf, so
    :func:`rgo_jax.consolidate` works unchanged), but the update passes the leaves selected by
    ``input_projected`` through as they are: their gradients must already be projected by the
    model's backward pass, i.e. the forward pass must run under :func:`use_input_projection`
    (or call :func:`projected_matmul`) with the matrices of :func:`input_projection_matrices`.
    Forgetting that leaves those leaves unprojected.

    Args:
      input_projected: regex over parameter paths (``re.search``) or a predicate choosing
        the dense kernels projected on the input side; each must have the ``DENSE`` layout.
      layout, project_biases, dtype: as for :func:`rgo_jax.scale_by_rgo`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax._input_projection import scale_by_rgo_input_projected
      >>> tx = scale_by_rgo_input_projected(r"kernel$")
      >>> params = {"w": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
      >>> state = tx.init(params)
      >>> state.p["w"]["kernel"].shape  # P is kept for the kernel ...
      (3, 3)
      >>> g = {"w": {"kernel": jnp.full((3, 2), 7.0), "bias": jnp.ones(2)}}
      >>> tx.update(g, state)[0]["w"]["kernel"][0].tolist()  # ... but not applied here
      [7.0, 7.0]
    """
    match = _matcher(input_projected)
    full = _transform.scale_by_rgo(layout, project_biases=project_biases, dtype=dtype)

    def init_fn(params):
        _check_input_projected(
            _layout.resolve_layouts(params, layout, project_biases=project_biases), match
        )
        return full.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        info = _layout.resolve_layouts(updates, layout, project_biases=project_biases)
        _check_input_projected(info, match)
        rest = {name: (None if match(name) else lay) for name, (lay, _) in info.items()}
        skipping = _transform.scale_by_rgo(
            lambda path, leaf: rest[path], project_biases=project_biases, dtype=dtype
        )
        return skipping.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rgo_input_projected(
    learning_rate: optax.ScalarOrSchedule,
    input_projected: InputProjectedSpec = r"kernel$",
    layout: _layout.LayoutSpec = None,
    *,
    project_biases: bool = True,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """:func:`rgo_jax.rgo` (projection, then plain SGD) with input-side dense kernels.

    ``optax.chain(scale_by_rgo_input_projected(...), optax.sgd(learning_rate))``. Use it with
    :func:`use_input_projection` in the loss; see the module docs.
    """
    return optax.chain(
        scale_by_rgo_input_projected(
            input_projected, layout, project_biases=project_biases, dtype=dtype
        ),
        optax.sgd(learning_rate),
    )


def input_projection_matrices(
    opt_state: Any, input_projected: InputProjectedSpec = r"kernel$"
) -> dict[str, jax.Array]:
    """The P of each input-projected dense kernel, by path, from an optimizer state.

    Args:
      opt_state: a state holding exactly one :class:`rgo_jax.RGOState` (e.g. of
        :func:`rgo_input_projected`).
      input_projected: the same selection as given to the transformation.

    Returns:
      ``{"hidden/0/kernel": P, ...}`` for the selected leaves, ready for
      :func:`use_input_projection`.
    """
    states = _transform.rgo_states(opt_state)
    if len(states) != 1:
        raise ValueError(
            f"input_projection_matrices needs an optimizer state with exactly one RGOState, "
            f"found {len(states)}."
        )
    match = _matcher(input_projected)
    out = {}
    for path, p in jax.tree_util.tree_flatten_with_path(states[0].p)[0]:
        name = _layout.path_str(path)
        if match(name) and not _matrices.is_placeholder(p):
            if p.ndim != 2:
                raise ValueError(
                    f"input_projection_matrices: P of '{name}' has shape {p.shape}; only a "
                    "plain dense kernel's [d, d] P can be used on the input side."
                )
            out[name] = p
    if not out:
        raise ValueError("input_projection_matrices: the selection matches no P in the state.")
    return out


def _projected_dot_general(p: jax.Array, name: str) -> Callable[..., jax.Array]:
    def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        (lc, rc), (lb, rb) = dimension_numbers
        if lb or rb or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,) or rhs.ndim != 2:
            raise ValueError(
                f"use_input_projection: layer '{name}' contracts {dimension_numbers}; only "
                "x[..., d] @ kernel[d, m] is supported."
            )
        if kwargs.get("preferred_element_type") is not None:
            raise ValueError(
                f"use_input_projection: layer '{name}' sets preferred_element_type, which the "
                "input-side projection does not support."
            )
        if kwargs.get("out_sharding") is not None:
            raise ValueError(
                f"use_input_projection: layer '{name}' sets out_sharding, which the input-side "
                "projection does not support."
            )
        return projected_matmul(lhs, rhs, p, precision=precision)

    return dot_general


@contextlib.contextmanager
def use_input_projection(model: Any, matrices: Mapping[str, jax.Array]) -> Iterator[Any]:
    """Within the block, the listed ``nnx.Linear`` layers of ``model`` project their gradients.

    Each ``nnx.Linear`` whose kernel path (``"hidden/0/kernel"``) is a key of ``matrices``
    computes ``x @ kernel`` through :func:`projected_matmul` with that P; its bias and every
    other layer are untouched. Enter it inside the function being differentiated (the model
    there is the traced copy); the layers are restored on exit.

    Args:
      model: a Flax NNX module.
      matrices: kernel path -> P, e.g. from :func:`input_projection_matrices`.

    Yields:
      ``model``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from rgo_jax._input_projection import use_input_projection
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> p = {"kernel": jnp.diag(jnp.array([1.0, 1.0, 0.0]))}
      >>> def loss(model):
      ...     with use_input_projection(model, p):
      ...         return model(jnp.ones((4, 3))).sum()
      >>> nnx.grad(loss)(model)["kernel"][...][2].tolist()  # row 2 projected out
      [0.0, 0.0]
    """
    from flax import nnx

    layers = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            layers["/".join(map(str, (*path, "kernel")))] = node
    missing = sorted(set(matrices) - set(layers))
    if missing:
        raise ValueError(
            f"use_input_projection: no nnx.Linear layer has the kernel path(s) {missing}; the "
            f"model's Linear kernels are {sorted(layers)}."
        )
    saved = {}
    try:
        for name, p in matrices.items():
            layer = layers[name]
            d = layer.kernel.shape[0]
            if jnp.shape(p) != (d, d):
                raise ValueError(
                    f"use_input_projection: P for '{name}' has shape {jnp.shape(p)}, expected "
                    f"({d}, {d}) for its kernel of shape {layer.kernel.shape}."
                )
            saved[name] = layer.dot_general
            layer.dot_general = _projected_dot_general(p, name)
        yield model
    finally:
        for name, fn in saved.items():
            layers[name].dot_general = fn
