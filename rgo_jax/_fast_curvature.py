"""Fast curvature vectors: kernel gradients that are only ever averaged over output axes.

A curvature vector of a dense kernel is ``mean_out(X^T D) = X^T (D 1 / m)`` (and of a conv
kernel the mean over ``cout`` of its weight gradient). Taking the full weight gradient and
averaging afterwards costs ``d m`` per example and, with a ``vmap`` over the 1000 batches of a
consolidation pass, materialises a ``[1000, d, m]`` array (800 MB for the MLP's first layer).
Inside :func:`use_reduced_kernel_gradients` each selected ``nnx.Linear`` / ``nnx.Conv``
returns as its kernel cotangent the already-averaged vector, broadcast (lazily) over the
output axes: averaging it again gives the same vector, and XLA never forms the full gradient.
These cotangents are *not* gradients: use the block for curvature vectors only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from rgo_jax import _curvature, _layout

__all__ = ["batched_curvature_vectors", "use_reduced_kernel_gradients"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _reduced_matmul(x, kernel, precision):
    return jnp.matmul(x, kernel, precision=precision)


def _rm_fwd(x, kernel, precision):
    return jnp.matmul(x, kernel, precision=precision), (x, kernel)


def _rm_bwd(precision, res, dy):
    x, kernel = res
    d, m = kernel.shape
    xs, dys = x.reshape(-1, d), dy.reshape(-1, m)
    r = jnp.matmul(xs.T, jnp.mean(dys, axis=-1), precision=precision)  # [d]
    dx = jnp.matmul(dy, kernel.T, precision=precision)
    return dx.astype(x.dtype), jnp.broadcast_to(r[:, None], (d, m)).astype(kernel.dtype)


_reduced_matmul.defvjp(_rm_fwd, _rm_bwd)


def _conv(x, k, conv_fn, kwargs):
    return conv_fn(x, k, **dict(kwargs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _reduced_conv(x, kernel, conv_fn, kwargs):
    return _conv(x, kernel, conv_fn, kwargs)


def _rc_fwd(x, kernel, conv_fn, kwargs):
    return _conv(x, kernel, conv_fn, kwargs), (x, kernel)


def _rc_bwd(conv_fn, kwargs, res, dy):
    x, kernel = res
    dn = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, dict(kwargs).get("dimension_numbers")
    )
    k_out, y_feat = dn.rhs_spec[0], dn.out_spec[1]
    _, vjp_x = jax.vjp(lambda x: _conv(x, kernel, conv_fn, kwargs), x)
    (dx,) = vjp_x(dy)
    # Sum of the kernel gradient over output channels = the gradient of a one-channel conv
    # at the channel-summed cotangent (each output channel depends on its own filter only).
    k1 = jax.lax.slice_in_dim(kernel, 0, 1, axis=k_out)
    _, vjp_k = jax.vjp(lambda k: _conv(x, k, conv_fn, kwargs), k1)
    (dk1,) = vjp_k(jnp.sum(dy, axis=y_feat, keepdims=True))
    cout = kernel.shape[k_out]
    return dx, jnp.broadcast_to(dk1 / cout, kernel.shape).astype(kernel.dtype)


_reduced_conv.defvjp(_rc_fwd, _rc_bwd)


def _reduced_dot_general(name: str) -> Callable[..., jax.Array]:
    def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        (lc, rc), (lb, rb) = dimension_numbers
        if lb or rb or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,) or rhs.ndim != 2:
            raise ValueError(
                f"use_reduced_kernel_gradients: layer '{name}' contracts {dimension_numbers}; "
                "only x[..., d] @ kernel[d, m] is supported."
            )
        if any(kwargs.get(k) is not None for k in ("preferred_element_type", "out_sharding")):
            raise ValueError(
                f"use_reduced_kernel_gradients: layer '{name}' sets preferred_element_type or "
                "out_sharding, which are not supported."
            )
        return _reduced_matmul(lhs, rhs, precision)

    return dot_general


def _reduced_conv_general(name: str, conv_fn: Callable) -> Callable[..., jax.Array]:
    def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
        if kwargs.get("feature_group_count", 1) != 1 or kwargs.get("batch_group_count", 1) != 1:
            raise ValueError(
                f"use_reduced_kernel_gradients: layer '{name}' is a grouped convolution; only "
                "feature_group_count == batch_group_count == 1 is supported."
            )
        if kwargs.get("preferred_element_type") is not None:
            raise ValueError(
                f"use_reduced_kernel_gradients: layer '{name}' sets preferred_element_type, "
                "which is not supported."
            )
        static = dict(kwargs, window_strides=tuple(window_strides))
        static["padding"] = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        frozen = tuple(sorted((k, _freeze(v)) for k, v in static.items()))
        return _reduced_conv(lhs, rhs, conv_fn, frozen)

    return conv_general_dilated


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@contextlib.contextmanager
def use_reduced_kernel_gradients(model: Any, paths: Iterable[str] | None = None) -> Iterator[Any]:
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

    Yields:
      ``model``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from rgo_jax._fast_curvature import use_reduced_kernel_gradients
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 2.0]])
      >>> def f(model):
      ...     with use_reduced_kernel_gradients(model):
      ...         return (model(x) * jnp.array([[1.0, 2.0, 3.0]])).sum()
      >>> nnx.grad(f)(model)["kernel"][...].tolist()  # rows: x_i * mean(1, 2, 3)
      [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]
    """
    from flax import nnx

    layers = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, nnx.Conv)):
            layers["/".join(map(str, (*path, "kernel")))] = node
    if paths is None:
        chosen = list(layers)
    else:
        chosen = list(paths)
        missing = sorted(set(chosen) - set(layers))
        if missing:
            raise ValueError(
                f"use_reduced_kernel_gradients: no nnx.Linear/nnx.Conv has the kernel path(s) "
                f"{missing}; the model's are {sorted(layers)}."
            )
    saved = []
    try:
        for name in chosen:
            layer = layers[name]
            if isinstance(layer, nnx.Linear):
                saved.append((layer, "dot_general", layer.dot_general))
                layer.dot_general = _reduced_dot_general(name)
            else:
                conv_fn = layer.conv_general_dilated
                saved.append((layer, "conv_general_dilated", conv_fn))
                layer.conv_general_dilated = _reduced_conv_general(name, conv_fn)
        yield model
    finally:
        for layer, attr, fn in reversed(saved):
            setattr(layer, attr, fn)


def batched_curvature_vectors(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    xs: jax.Array,
    labels: jax.Array,
    *,
    class_mask: jax.Array | None = None,
    per_sample: bool = False,
    layout: _layout.LayoutSpec = None,
    project_biases: bool = True,
    chunk: int | None = None,
) -> Any:
    """:func:`rgo_jax.curvature_vectors` of many batches at once, ready for consolidation.

    Args:
      logits_fn: ``logits_fn(params, x) -> [B, C]``; to be fast, let it apply the model
        under :func:`use_reduced_kernel_gradients`.
      params: the parameters.
      xs: ``[num_batches, B, ...]`` inputs.
      labels: int ``[num_batches, B]``.
      class_mask, per_sample, layout, project_biases: as for ``curvature_vectors`` (the
        class mask is taken per batch when ``None``).
      chunk: batches per vectorised call (``lax.map`` over chunks); ``None`` does all
        batches in one ``vmap`` (fastest; needs memory for all their activations).

    Returns:
      A tree like ``params`` with ``[num_batches, *batch, d]`` (``[num_batches * B, ...]``
      with ``per_sample``) per projected leaf and ``None`` elsewhere.
    """
    xs, labels = jnp.asarray(xs), jnp.asarray(labels)
    if labels.ndim != 2 or xs.shape[:2] != labels.shape:
        raise ValueError(
            f"batched_curvature_vectors: xs {xs.shape} and labels {labels.shape} must start "
            "with the same [num_batches, B] axes."
        )

    def one(x, y):
        return _curvature.curvature_vectors(
            logits_fn,
            params,
            x,
            y,
            class_mask=class_mask,
            per_sample=per_sample,
            layout=layout,
            project_biases=project_biases,
        )

    nb = xs.shape[0]
    if chunk is None or chunk >= nb:
        out = jax.vmap(one)(xs, labels)
    else:
        if nb % chunk:
            raise ValueError(
                f"batched_curvature_vectors: {nb} batches are not a multiple of chunk={chunk}."
            )
        shaped = lambda a: a.reshape(nb // chunk, chunk, *a.shape[1:])  # noqa: E731
        out = jax.lax.map(lambda xy: jax.vmap(one)(*xy), (shaped(xs), shaped(labels)))
        out = jax.tree.map(lambda v: v.reshape(nb, *v.shape[2:]), out)
    return jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), out)
