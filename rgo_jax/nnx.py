"""Flax NNX helpers: layers whose kernel cotangents are replaced, inside a ``with`` block.

One mechanism (:func:`_patched`) swaps the product of selected ``nnx.Linear`` /
``nnx.Conv`` layers for the custom-VJP products of :mod:`rgo_jax._input_projection` and
restores them on exit. It serves

- :func:`use_reduced_kernel_gradients`: kernel cotangents pre-averaged over the output
  axes, for fast curvature vectors;
- :func:`use_input_projection`: dense kernels whose gradient comes out RGO-projected, the
  matrices read from the optimizer state (``scale_by_rgo(input_projected=...)``).

:func:`consolidate` is the task boundary of an ``nnx.Optimizer`` in one call.

Enter either block inside the function being differentiated (the model there is the traced
copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from rgo_jax import _curvature, _input_projection, _layout, _matrices, _transform

__all__ = ["consolidate", "use_input_projection", "use_reduced_kernel_gradients"]


def _check_dense(what: str, name: str, dimension_numbers, kwargs, lhs, rhs) -> None:
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,) or rhs.ndim != 2:
        raise ValueError(
            f"{what}: layer '{name}' contracts {dimension_numbers}; only "
            "x[..., d] @ kernel[d, m] is supported."
        )
    for key in ("preferred_element_type", "out_sharding"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{what}: layer '{name}' sets {key}, which is not supported.")


def _dense(what: str, name: str, product: Callable) -> Callable[..., jax.Array]:
    """A ``dot_general`` for an ``nnx.Linear``: ``product(x, kernel, precision)``."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        _check_dense(what, name, dimension_numbers, kwargs, lhs, rhs)
        return product(lhs, rhs, precision)

    return dot_general


def _reduced_conv(what: str, name: str, conv_fn: Callable) -> Callable[..., jax.Array]:
    def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
        if kwargs.get("feature_group_count", 1) != 1 or kwargs.get("batch_group_count", 1) != 1:
            raise ValueError(
                f"{what}: layer '{name}' is a grouped convolution; only "
                "feature_group_count == batch_group_count == 1 is supported."
            )
        if kwargs.get("preferred_element_type") is not None:
            raise ValueError(
                f"{what}: layer '{name}' sets preferred_element_type, which is not supported."
            )
        static = dict(kwargs, window_strides=tuple(window_strides))
        static["padding"] = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        frozen = tuple(sorted((k, _freeze(v)) for k, v in static.items()))
        return _input_projection.reduced_conv(lhs, rhs, conv_fn, frozen)

    return conv_general_dilated


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@contextlib.contextmanager
def _patched(
    model: Any,
    what: str,
    kinds: tuple[type, ...],
    chosen: Iterable[str] | None,
    make: Callable[[str, Any], tuple[str, Callable]],
) -> Iterator[Any]:
    """Within the block, each chosen layer's product is ``make(path, layer)``'s.

    Args:
      model: an NNX module.
      what: the public name, for errors.
      kinds: the layer classes that may be chosen.
      chosen: kernel paths (``"hidden/0/kernel"``); ``None``: every layer of ``kinds``.
      make: ``(kernel path, layer) -> (attribute, replacement)``, e.g. ``("dot_general", f)``.
    """
    from flax import nnx  # noqa: PLC0415

    layers = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, kinds):
            layers[_layout.path_str((*path, "kernel"))] = node
    names = list(layers) if chosen is None else list(chosen)
    missing = sorted(set(names) - set(layers))
    if missing:
        kinds_s = "/".join(f"nnx.{k.__name__}" for k in kinds)
        raise ValueError(
            f"{what}: no {kinds_s} layer has the kernel path(s) {missing}; the model's are "
            f"{sorted(layers)}."
        )
    saved = []
    try:
        for name in names:
            layer = layers[name]
            attr, fn = make(name, layer)
            saved.append((layer, attr, getattr(layer, attr)))
            setattr(layer, attr, fn)
        yield model
    finally:
        for layer, attr, fn in reversed(saved):
            setattr(layer, attr, fn)


def use_reduced_kernel_gradients(model: Any, paths: Iterable[str] | None = None):
    """Within the block, kernel cotangents of Linear/Conv layers are pre-averaged.

    Each selected ``nnx.Linear`` (kernel ``[d, m]``) returns ``broadcast(X^T D 1 / m)``
    and each ``nnx.Conv`` (HWIO) the mean over output channels of its kernel gradient,
    broadcast back to the kernel's shape. Averaging such a cotangent over the output axes
    (what :func:`rgo_jax.curvature_vectors` does with the default ``DENSE``/``CONV``
    layouts) gives exactly the averaged true gradient, at a fraction of the cost. The
    cotangent of the layer input, biases and all other values are exact.

    Use it only for curvature vectors, with layouts that put P on the kernels' input axes
    (the default ones), and enter it inside the function being differentiated.

    Args:
      model: a Flax NNX module.
      paths: kernel paths to affect (``"hidden/0/kernel"``); ``None``: every Linear and
        (ungrouped) Conv layer.

    Returns:
      A context manager yielding ``model``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from rgo_jax.nnx import use_reduced_kernel_gradients
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 2.0]])
      >>> def f(model):
      ...     with use_reduced_kernel_gradients(model):
      ...         return (model(x) * jnp.array([[1.0, 2.0, 3.0]])).sum()
      >>> nnx.grad(f)(model)["kernel"][...].tolist()  # rows: x_i * mean(1, 2, 3)
      [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]
    """
    from flax import nnx  # noqa: PLC0415

    what = "use_reduced_kernel_gradients"

    def make(name, layer):
        if isinstance(layer, nnx.Linear):
            return "dot_general", _dense(what, name, _input_projection.reduced_matmul)
        conv = _reduced_conv(what, name, layer.conv_general_dilated)
        return "conv_general_dilated", conv

    return _patched(model, what, (nnx.Linear, nnx.Conv), paths, make)


def _input_projected_matrices(opt_state: Any) -> dict[str, tuple[jax.Array, bool]]:
    """``{kernel path: (P, trace_normalised)}`` of the input-projected leaves of an optimizer
    state: RGO's (trace-normalised) and OWM's (not)."""
    from rgo_jax.baselines._owm import OWMState  # noqa: PLC0415

    if hasattr(opt_state, "opt_state") and hasattr(opt_state, "tx"):  # an nnx.Optimizer
        opt_state = opt_state.opt_state
    out: dict[str, tuple[jax.Array, bool]] = {}
    states = [(s, True) for s in _transform.rgo_states(opt_state)]
    states += [(s, False) for s in _matrices.find_states(OWMState, opt_state)]
    for state, normalised in states:
        flat = jax.tree_util.tree_flatten_with_path(
            state.p, is_leaf=lambda x: isinstance(x, _matrices.InputProjected)
        )[0]
        for path, node in flat:
            if isinstance(node, _matrices.InputProjected):
                name = _layout.path_str(path)
                if name in out:
                    raise ValueError(
                        f"use_input_projection: parameter '{name}' is input-projected by two "
                        "states in the optimizer state."
                    )
                p = node.value
                out[name] = (p[...] if not isinstance(p, jax.Array) else p, normalised)
    return out


def use_input_projection(model: Any, opt_state: Any):
    """Within the block, the input-projected dense layers of ``model`` project their grads.

    The layers are those the optimizer was built for (``scale_by_rgo(input_projected=...)``
    or ``rgo(lr, input_projected=...)``): each ``nnx.Linear`` whose kernel's P is marked
    input-projected in ``opt_state`` computes ``x @ kernel`` through
    :func:`rgo_jax.projected_matmul` with that P, so its kernel gradient comes out projected
    and the optimizer's update passes it through. Its bias and every other layer are
    untouched. The selection is never repeated: it lives in the state. OWM's projectors
    (``scale_by_owm(input_projected=...)``) are read the same way and applied without the
    trace factor, ``P X^T D``; absorb the step's inputs (:func:`rgo_jax.baselines.owm_update`)
    before entering the block, as OWM projects with the P that has absorbed them.

    Args:
      model: a Flax NNX module (the traced copy, inside the differentiated function).
      opt_state: the optimizer state (any chain holding the RGO state) or an
        ``nnx.Optimizer``.

    Returns:
      A context manager yielding ``model``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import rgo_jax
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> opt = nnx.Optimizer(model, rgo_jax.rgo(0.1, input_projected=r"kernel$"), wrt=nnx.Param)
      >>> def loss(model):
      ...     with rgo_jax.nnx.use_input_projection(model, opt):
      ...         return model(jnp.ones((4, 3))).sum()
      >>> nnx.grad(loss)(model)["kernel"][...].tolist()  # P = I: the plain gradient
      [[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]]
    """
    from flax import nnx  # noqa: PLC0415

    what = "use_input_projection"
    matrices = _input_projected_matrices(opt_state)
    if not matrices:
        raise ValueError(
            f"{what}: the optimizer state holds no input-projected P; build the optimizer "
            "with scale_by_rgo(input_projected=...), rgo(lr, input_projected=...) or "
            "scale_by_owm(input_projected=...)."
        )

    def make(name, layer):
        p, normalised = matrices[name]
        d = layer.kernel.shape[0]
        if jnp.shape(p) != (d, d):
            raise ValueError(
                f"{what}: P for '{name}' has shape {jnp.shape(p)}, expected ({d}, {d}) for "
                f"its kernel of shape {layer.kernel.shape}."
            )

        def product(x, kernel, precision):
            return _input_projection.projected_matmul(
                x, kernel, p, precision=precision, trace_normalised=normalised
            )

        return "dot_general", _dense(what, name, product)

    return _patched(model, what, (nnx.Linear,), list(matrices), make)


@dataclasses.dataclass(frozen=True)
class _ModelLogits:
    """``(params, x, rest, *args) -> model(x, *args)`` for a split NNX model (hashable, so
    the compiled curvature function is reused from task to task)."""

    graphdef: Any
    reduced: bool

    def __call__(self, params, x, rest, *args):
        from flax import nnx  # noqa: PLC0415

        # copy=True: a fresh graph per trace, as nnx.scan / nnx.vmap inside the model need.
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        if not self.reduced:
            return model(x, *args)
        with use_reduced_kernel_gradients(model):
            return model(x, *args)


def _layout_table(opt_state: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    states = _transform.rgo_states(opt_state)
    if not states:
        raise ValueError(
            "rgo_jax.nnx.consolidate: no RGOState in the optimizer state; is scale_by_rgo "
            "(or rgo) the optimizer's transformation?"
        )
    for state in states:
        if not isinstance(state.layouts, _transform.Layouts):
            raise ValueError(
                "rgo_jax.nnx.consolidate: the RGO state carries no layouts (it was not made "
                "by scale_by_rgo's init); rebuild the optimizer state with tx.init."
            )
        for name, lay in state.layouts.items:
            if lay is not None or name not in table:
                table[name] = lay
    return table


def consolidate(
    optimizer: Any,
    model: Any,
    x: jax.Array,
    labels: jax.Array,
    *args: Any,
    alpha: Any = _transform.DEFAULT_ALPHA,
    class_mask: jax.Array | None = None,
    per_sample: bool = False,
    chunk: int | None = None,
    reduced: bool = True,
    method: str = "block",
) -> None:
    """The task boundary for an ``nnx.Optimizer``: curvature vectors, then consolidation.

    Computes :func:`rgo_jax.curvature_vectors` of ``model`` on the batches (compiled, the
    batches vmapped, with :func:`use_reduced_kernel_gradients` unless ``reduced=False``)
    with the layouts the optimizer's RGO state was built with, and absorbs them into its
    P matrices (:func:`rgo_jax.consolidate`), updating ``optimizer`` in place. The layout
    and ``project_biases`` are read from the state: they are never repeated. Models using
    ``nnx.scan`` / ``nnx.vmap`` work (the model is merged with ``copy=True`` in the trace).

    Args:
      optimizer: an ``nnx.Optimizer`` whose transformation contains ``scale_by_rgo``.
      model: the NNX model the optimizer updates.
      x: a stack of batches ``[num_batches, B, ...]`` (or one batch ``[B, ...]``).
      labels: int ``[num_batches, B]`` (or ``[B]``).
      *args: further arguments of ``model(x, *args)``, e.g. the task id (traced).
      alpha: the RLS regulariser (a scalar or a dict ``path -> scalar``).
      class_mask, per_sample, chunk: as for :func:`rgo_jax.curvature_vectors`.
      reduced: pre-average kernel cotangents (same vectors, faster); ``False`` for layers
        other than ``nnx.Linear``/``nnx.Conv`` with custom layouts over output axes.
      method: the RLS kernel, ``"block"`` or ``"sequential"``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import rgo_jax
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> opt = nnx.Optimizer(model, rgo_jax.rgo(0.1), wrt=nnx.Param)
      >>> xs = jax.random.normal(jax.random.key(0), (4, 8, 3))  # 4 batches of 8
      >>> ys = jnp.zeros((4, 8), jnp.int32).at[:, ::2].set(1)
      >>> rgo_jax.nnx.consolidate(opt, model, xs, ys)
      >>> int(rgo_jax.rgo_states(nnx.as_pure(opt.opt_state))[0].num_vectors)
      4
    """
    from flax import nnx  # noqa: PLC0415

    wrt = getattr(optimizer, "wrt", nnx.Param)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    pure_state = nnx.as_pure(optimizer.opt_state)
    table = _layout_table(pure_state)
    params = nnx.as_pure(params)
    missing = sorted(set(_matrices.projected(params)) - set(table))
    if missing:
        raise ValueError(
            f"rgo_jax.nnx.consolidate: the optimizer's state has no layout for parameter(s) "
            f"{missing[:8]}: is it the optimizer of this model?"
        )
    vectors = _curvature.curvature_vectors(
        _ModelLogits(graphdef, bool(reduced)),
        params,
        x,
        labels,
        rest,
        *args,
        class_mask=class_mask,
        per_sample=per_sample,
        layout=lambda path, leaf: table[path],
        chunk=chunk,
    )
    new_state = _transform.consolidate(pure_state, vectors, alpha, method=method)
    nnx.update(optimizer.opt_state, nnx.state(new_state))
