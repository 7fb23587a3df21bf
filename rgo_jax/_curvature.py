"""Curvature vectors for consolidation (Algorithm 1, line 10)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rgo_jax import _layout

__all__ = ["curvature_vectors"]


def task_class_mask(
    labels: jax.Array, num_classes: int, mask: jax.Array | None, what: str
) -> jax.Array:
    """The task's classes: ``mask`` checked, or (``None``) the classes present in ``labels``.

    The default of every consumer of a class mask (curvature vectors, EWC's Fisher).
    """
    if mask is None:
        return jnp.any(jax.nn.one_hot(labels, num_classes, dtype=bool), axis=0)
    mask = jnp.asarray(mask)
    if mask.shape != (num_classes,) or mask.dtype != bool:
        raise ValueError(
            f"{what}: class_mask must be bool [{num_classes}] (one entry per logit), got "
            f"{mask.dtype}{mask.shape}."
        )
    return mask


def _weighted_true_logit(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_b s_b z_b[y_b]`` with ``s_b = sqrt(p_b (1 - p_b))`` held constant."""
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    masked = jnp.where(mask[None, :], logits, -jnp.inf)
    p = jnp.exp(true - jax.nn.logsumexp(masked, axis=1))
    s = jax.lax.stop_gradient(jnp.sqrt(jnp.clip(p * (1.0 - p), 0.0, None)))
    return jnp.sum(s * true)


def curvature_vectors(
    logits_fn: Callable[..., jax.Array],
    params: Any,
    x: jax.Array,
    labels: jax.Array,
    *args: Any,
    class_mask: jax.Array | None = None,
    per_sample: bool = False,
    layout: _layout.LayoutSpec = None,
    project_biases: bool = True,
    chunk: int | None = None,
) -> Any:
    r"""The RLS vectors of one batch or a stack of batches, reduced to each P's dimension.

    The vector is the gradient of the true-class logits weighted by the square root of the
    diagonal true-class term of the softmax cross-entropy Hessian:

    .. math::  v = \nabla_\theta \sum_b s_b\, z_b[y_b], \qquad
               s_b = \operatorname{sg}\big(\sqrt{p_b (1 - p_b)}\big)

    with ``z`` the raw logits and ``p_b`` the softmax probability of the true class over the
    classes in ``class_mask``. Each leaf's gradient is then reduced by its layout (mean over
    the output axes: dense ``[in, out] -> [in]``, conv ``-> [kh*kw*cin]``, bias as is).

    The computation is compiled (``jax.jit``, ``logits_fn`` a static argument) and the
    batches of a stack are ``vmap``-ed: pass a whole consolidation pass as one stack
    ``[num_batches, B, ...]`` (or call it repeatedly with the *same* ``logits_fn`` object,
    which reuses the compiled function; a new ``lambda`` per call compiles again). It may
    also be called inside ``jit``/``vmap``.

    Two granularities:

    * ``per_sample=False`` (the reference code): one batch-summed vector per batch,
      ``[num_batches, *batch, d]`` per leaf (``[1, *batch, d]`` for a single batch).
    * ``per_sample=True`` (the paper's Algorithm 1): one vector per example,
      ``[num_batches * B, *batch, d]``. The class mask is then taken from the whole batch
      (or ``class_mask``), never from a single sample, whose own class alone would give
      ``p = 1`` and a zero vector.

    Args:
      logits_fn: ``logits_fn(params, x, *args) -> [B, C]`` raw logits. Apply an NNX model
        under :func:`rgo_jax.nnx.use_reduced_kernel_gradients` inside it for speed.
      params: the parameters (tree like the optimizer's params).
      x: one batch ``[B, ...]``, or a stack of batches ``[num_batches, B, ...]``.
      labels: int ``[B]`` (or ``[num_batches, B]``) true classes (indices into the logits).
      *args: further arguments of ``logits_fn`` (e.g. a task id, or the non-parameter state
        of a model), traced: changing them does not recompile.
      class_mask: bool ``[C]``, the task's classes. ``None``: the classes present in each
        batch's ``labels`` (the reference code's choice). Pass the task's classes when
        batches are small enough to miss some.
      per_sample: one vector per example instead of one per batch.
      layout, project_biases: as for :func:`rgo_jax.scale_by_rgo` (use the same values).
      chunk: batches per compiled call (a Python loop over chunks, whose results are
        concatenated); ``None`` does all batches in one call (fastest; needs memory for all
        their activations).

    Returns:
      A tree like ``params`` with ``[n, *batch, d]`` for projected leaves and ``None`` for the
      others, ready for :func:`rgo_jax.consolidate`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from rgo_jax import curvature_vectors
      >>> params = {"w": jnp.ones((3, 2))}
      >>> logits_fn = lambda p, x: x @ p["w"]
      >>> xs = jnp.ones((5, 4, 3))  # 5 batches of 4 examples
      >>> ys = jnp.zeros((5, 4), jnp.int32)
      >>> curvature_vectors(logits_fn, params, xs, ys)["w"].shape  # one vector per batch
      (5, 3)
    """
    labels = jnp.asarray(labels)
    if labels.ndim not in (1, 2) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be int [B] (one batch) or [num_batches, B] (a stack), got "
            f"{labels.dtype}{labels.shape}."
        )
    single = labels.ndim == 1
    xs = x[None] if single else x
    ys = labels[None] if single else labels
    if single and jnp.shape(x)[0] != labels.shape[0]:
        raise ValueError(f"x has {jnp.shape(x)[0]} examples but labels has {labels.shape[0]}.")
    if tuple(jnp.shape(xs)[:2]) != ys.shape:
        raise ValueError(
            f"x of shape {tuple(jnp.shape(x))} and labels of shape {labels.shape} must start "
            "with the same [num_batches, B] axes."
        )
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"curvature_vectors: chunk must be a positive int, got {chunk!r}.")
    info = _layout.resolve_layouts(params, layout, project_biases=project_biases)
    reducers = tuple((name, lay) for name, (lay, _) in info.items())
    num_classes = jax.eval_shape(logits_fn, params, xs[0], *args).shape[-1]
    try:  # concrete labels are range-checked; traced ones (inside an outer jit) cannot be
        concrete = np.asarray(ys)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None and concrete.size:
        lo, hi = int(concrete.min()), int(concrete.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels range over [{lo}, {hi}], outside the {num_classes} logits.")
    mask = None
    if class_mask is not None:
        mask = task_class_mask(None, num_classes, class_mask, "curvature_vectors")
    static = dict(
        logits_fn=logits_fn,
        per_sample=bool(per_sample),
        reducers=reducers,
        num_classes=num_classes,
    )
    try:
        hash(logits_fn)
        fn = functools.partial(_batched_jit, **static)
    except TypeError:  # an unhashable callable cannot be a static argument: jit a closure
        fn = jax.jit(functools.partial(_batched, **static))
    nb = ys.shape[0]
    step = nb if chunk is None else chunk
    parts = [
        fn(params, jnp.asarray(xs[lo : lo + step]), jnp.asarray(ys[lo : lo + step]), mask, args)
        for lo in range(0, nb, step)
    ]
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *v: jnp.concatenate(v), *parts)


def _batched(params, xs, ys, mask, args, *, logits_fn, per_sample, reducers, num_classes):
    """The vectors of a stack of batches ``[nb, B, ...]``: one ``vmap`` over the batches."""
    table = dict(reducers)

    def one(x, y):
        m = task_class_mask(y, num_classes, mask, "curvature_vectors")

        def grad_of(xb, yb):
            return jax.grad(lambda p: _weighted_true_logit(logits_fn(p, xb, *args), yb, m))(params)

        if per_sample:
            grads = jax.vmap(lambda xi, yi: grad_of(xi[None], yi[None]))(x, y)
        else:
            grads = jax.tree.map(lambda g: g[None], grad_of(x, y))

        def reduce(path, g):
            lay = table[_layout.path_str(path)]
            return None if lay is None else jax.vmap(lay.reduce_vector)(g)

        return jax.tree_util.tree_map_with_path(reduce, grads)

    vecs = jax.vmap(one)(xs, ys)
    # [num_batches, n_per_batch, *batch, d] -> [num_batches * n_per_batch, *batch, d]
    return jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), vecs)


_batched_jit = jax.jit(
    _batched, static_argnames=("logits_fn", "per_sample", "reducers", "num_classes")
)
