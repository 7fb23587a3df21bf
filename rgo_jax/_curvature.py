"""Curvature vectors for consolidation (Algorithm 1, line 10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rgo_jax import _layout

__all__ = ["curvature_vectors"]


def _class_mask(labels: jax.Array, num_classes: int, class_mask: jax.Array | None) -> jax.Array:
    if class_mask is None:
        return jnp.any(jax.nn.one_hot(labels, num_classes, dtype=bool), axis=0)
    class_mask = jnp.asarray(class_mask)
    if class_mask.shape != (num_classes,) or class_mask.dtype != bool:
        raise ValueError(
            f"class_mask must be a bool array of shape ({num_classes},) (one entry per logit), "
            f"got {class_mask.dtype}{class_mask.shape}."
        )
    return class_mask


def _weighted_true_logit(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_b s_b z_b[y_b]`` with ``s_b = sqrt(p_b (1 - p_b))`` held constant."""
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    masked = jnp.where(mask[None, :], logits, -jnp.inf)
    p = jnp.exp(true - jax.nn.logsumexp(masked, axis=1))
    s = jax.lax.stop_gradient(jnp.sqrt(jnp.clip(p * (1.0 - p), 0.0, None)))
    return jnp.sum(s * true)


def curvature_vectors(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    labels: jax.Array,
    *,
    class_mask: jax.Array | None = None,
    per_sample: bool = False,
    layout: _layout.LayoutSpec = None,
    project_biases: bool = True,
) -> Any:
    r"""The RLS vectors of one batch, reduced to each projected leaf's P dimension.

    The vector is the gradient of the true-class logits weighted by the square root of the
    diagonal true-class term of the softmax cross-entropy Hessian:

    .. math::  v = \nabla_\theta \sum_b s_b\, z_b[y_b], \qquad
               s_b = \operatorname{sg}\big(\sqrt{p_b (1 - p_b)}\big)

    with ``z`` the raw logits and ``p_b`` the softmax probability of the true class over the
    classes in ``class_mask``. Each leaf's gradient is then reduced by its layout (mean over
    the output axes: dense ``[in, out] -> [in]``, conv ``-> [kh*kw*cin]``, bias as is).

    Two granularities:

    * ``per_sample=False`` (the reference code): one batch-summed vector, shape
      ``[1, *batch, d]`` per leaf.
    * ``per_sample=True`` (the paper's Algorithm 1): one vector per example, ``[B, *batch, d]``,
      computed with ``vmap``. The class mask is then taken from the whole batch (or
      ``class_mask``), never from a single sample, whose own class alone would give
      ``p = 1`` and a zero vector.

    Args:
      logits_fn: ``logits_fn(params, x) -> [B, C]`` raw logits.
      params: the parameters (tree like the optimizer's params).
      x: a batch of inputs.
      labels: int ``[B]`` true classes (indices into the logits).
      class_mask: bool ``[C]``, the task's classes. ``None``: the classes present in
        ``labels`` (the reference code's choice). Pass the task's classes when batches are
        small enough to miss some.
      per_sample: one vector per example instead of one per batch.
      layout, project_biases: as for :func:`rgo_jax.scale_by_rgo` (use the same values).

    Returns:
      A tree like ``params`` with ``[n, *batch, d]`` for projected leaves and ``None`` for the
      others, ready for :func:`rgo_jax.consolidate`. Stack several batches' results along
      axis 0 (``jnp.concatenate``) to consolidate them in one call.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an int vector [B], got {labels.dtype}{labels.shape}.")
    if jnp.shape(x)[0] != labels.shape[0]:
        raise ValueError(f"x has {jnp.shape(x)[0]} examples but labels has {labels.shape[0]}.")
    info = _layout.resolve_layouts(params, layout, project_biases=project_biases)
    num_classes = jax.eval_shape(logits_fn, params, x).shape[-1]
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels range over [{lo}, {hi}], outside the {num_classes} logits.")
    mask = _class_mask(labels, num_classes, class_mask)

    def grad_of(xb, yb):
        return jax.grad(lambda p: _weighted_true_logit(logits_fn(p, xb), yb, mask))(params)

    if per_sample:
        grads = jax.vmap(lambda xi, yi: grad_of(xi[None], yi[None]))(x, labels)
    else:
        grads = jax.tree.map(lambda g: g[None], grad_of(x, labels))

    def reduce(path, g):
        lay, _ = info[_layout.path_str(path)]
        return None if lay is None else jax.vmap(lay.reduce_vector)(g)

    return jax.tree_util.tree_map_with_path(reduce, grads)
