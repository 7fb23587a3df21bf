"""Curvature vectors for consolidation (Algorithm 1, line 10)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rgo_jax import _layout

__all__ = ["HESSIANS", "curvature_vectors"]

HESSIANS = ("true-class", "full", "sampled")
"""The output-Hessian factors :func:`curvature_vectors` offers (its ``hessian`` argument)."""


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


def _masked_probs(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the classes in ``mask`` (zero outside), ``[B, C]``."""
    return jax.nn.softmax(jnp.where(mask[None, :], logits, -jnp.inf), axis=-1)


def hessian_factor(p: jax.Array) -> jax.Array:
    r"""The square-root factor ``F`` of the softmax cross-entropy output Hessian.

    .. math::  F = \operatorname{diag}(\sqrt p) - p \sqrt p^\top, \qquad
               F F^\top = \operatorname{diag}(p) - p p^\top

    (using ``sum p = 1``). Column ``c`` is ``sqrt(p_c) (e_c - p)``: the cotangent on the
    logits of the curvature vector of class ``c`` (the paper's Eq. 13 with the full Hessian).

    Args:
      p: probabilities ``[..., C]`` summing to one (zero for masked classes).

    Returns:
      ``[..., C, C]``, rows indexed by logit, columns by class.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax._curvature import hessian_factor
      >>> p = jnp.array([0.5, 0.25, 0.25])
      >>> f = hessian_factor(p)
      >>> bool(jnp.allclose(f @ f.T, jnp.diag(p) - jnp.outer(p, p)))
      True
      >>> bool(jnp.allclose(f.sum(axis=0), 0.0, atol=1e-7))  # columns sum to zero
      True
    """
    p = jnp.asarray(p)
    sq = jnp.sqrt(p)[..., None, :]
    eye = jnp.broadcast_to(jnp.eye(p.shape[-1], dtype=p.dtype), (*p.shape, p.shape[-1]))
    return eye * sq - p[..., :, None] * sq


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
    hessian: str = "true-class",
    rng: jax.Array | None = None,
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

    Three factors of the output Hessian (``hessian``):

    * ``"true-class"`` (the reference code, the default): the vector above, one per batch
      (or sample); only the diagonal true-class term ``p_y (1 - p_y)`` of the Hessian.
    * ``"full"`` (the paper's Eq. 13 as written): the whole softmax cross-entropy Hessian
      ``H_b = diag(p_b) - p_b p_b^T`` through its square-root factor
      ``F_b = diag(sqrt p_b) - p_b sqrt(p_b)^T`` (``F F^T = H``): one vector per class ``c``,
      ``v_c = \nabla_\theta \sum_b \operatorname{sg}(F_b[:, c])^\top z_b``, so that
      ``sum_c v_c v_c^T`` is the Gauss-Newton matrix of the batch-summed logits. ``C``
      (number of logits) vectors per batch or sample, class-major within it; those of
      classes outside the task are zero (they leave P unchanged).
    * ``"sampled"`` (a sampled Fisher): one vector per batch (or sample) with cotangent
      ``e_{\hat y_b} - p_b``, ``\hat y_b`` drawn from the model's ``p_b`` (``rng``), whose
      expected outer product is ``H_b``: the full Hessian at the default's cost.

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
        concatenated; a last, partial chunk is padded to the chunk's size, so one program
        serves every call); ``None`` does all batches in one call (fastest; needs memory for
        all their activations).
      hessian: ``"true-class"`` (default, the reference code), ``"full"`` or ``"sampled"``
        (see above; one of :data:`HESSIANS`).
      rng: a JAX key, required by ``hessian="sampled"`` (the drawn classes), else unused.

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
    if hessian not in HESSIANS:
        raise ValueError(
            f"curvature_vectors: hessian must be one of {', '.join(HESSIANS)}; got {hessian!r}."
        )
    if hessian == "sampled" and rng is None:
        raise ValueError("curvature_vectors: hessian='sampled' needs an rng key (rng=...).")
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
    if hessian != "true-class":
        static["hessian"] = hessian
    try:
        hash(logits_fn)
        fn = functools.partial(_batched_jit, **static)
    except TypeError:  # an unhashable callable cannot be a static argument: jit a closure
        fn = jax.jit(functools.partial(_batched, **static))
    nb = ys.shape[0]
    step = nb if chunk is None else max(1, min(chunk, nb))  # a chunk never exceeds the batches
    keys = None if hessian != "sampled" else jax.random.split(rng, nb)

    def call(lo):
        xc, yc = jnp.asarray(xs[lo : lo + step]), jnp.asarray(ys[lo : lo + step])
        kc = None if keys is None else keys[lo : lo + step]
        real = yc.shape[0]
        if real < step:  # the last, partial chunk: padded with copies of its last batch so
            # that every chunk runs the one compiled program; the copies' vectors are dropped
            pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], step - real, axis=0)])  # noqa: E731
            xc, yc, kc = pad(xc), pad(yc), None if kc is None else pad(kc)
        out = (
            fn(params, xc, yc, mask, args)
            if kc is None
            else fn(params, xc, yc, mask, args, keys=kc)
        )
        if real == step:
            return out
        return jax.tree.map(lambda v: v[: v.shape[0] // step * real], out)

    parts = [call(lo) for lo in range(0, nb, step)]
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *v: jnp.concatenate(v), *parts)


def _cotangents(z: jax.Array, y: jax.Array, m: jax.Array, hessian: str, key) -> jax.Array:
    """The logit cotangents ``[n, B, C]`` of the ``n`` vectors of one batch (held constant)."""
    p = _masked_probs(z, m)
    if hessian == "full":  # column c of F_b for each sample b: [C, B, C]
        return jnp.moveaxis(hessian_factor(p), -1, 0)
    # sampled Fisher: e_yhat - p with yhat ~ p (masked classes have p = 0, never drawn)
    yhat = jax.random.categorical(key, jnp.where(m[None, :], z, -jnp.inf), axis=-1)
    return (jax.nn.one_hot(yhat, z.shape[-1], dtype=z.dtype) - p)[None]


def _batched(
    params,
    xs,
    ys,
    mask,
    args,
    keys=None,
    *,
    logits_fn,
    per_sample,
    reducers,
    num_classes,
    hessian="true-class",
):
    """The vectors of a stack of batches ``[nb, B, ...]``: one ``vmap`` over the batches."""
    table = dict(reducers)

    def one(x, y, key):
        m = task_class_mask(y, num_classes, mask, "curvature_vectors")

        def grad_of(xb, yb, kb):
            if hessian == "true-class":
                return jax.grad(lambda p: _weighted_true_logit(logits_fn(p, xb, *args), yb, m))(
                    params
                )
            z, vjp = jax.vjp(lambda p: logits_fn(p, xb, *args), params)
            cot = jax.lax.stop_gradient(_cotangents(z, yb, m, hessian, kb))
            return jax.vmap(lambda c: vjp(c.astype(z.dtype))[0])(cot)  # [n, ...] per leaf

        if hessian == "true-class":
            if per_sample:
                grads = jax.vmap(lambda xi, yi: grad_of(xi[None], yi[None], None))(x, y)
            else:
                grads = jax.tree.map(lambda g: g[None], grad_of(x, y, None))
        elif per_sample:  # [B, n, ...] -> [B * n, ...] (sample-major, class-minor)
            ks = None if key is None else jax.random.split(key, x.shape[0])
            grads = jax.vmap(
                lambda xi, yi, ki: grad_of(xi[None], yi[None], ki),
                in_axes=(0, 0, None if ks is None else 0),
            )(x, y, ks)
            grads = jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]), grads)
        else:
            grads = grad_of(x, y, key)

        def reduce(path, g):
            lay = table[_layout.path_str(path)]
            return None if lay is None else jax.vmap(lay.reduce_vector)(g)

        return jax.tree_util.tree_map_with_path(reduce, grads)

    if keys is None:
        vecs = jax.vmap(lambda x, y: one(x, y, None))(xs, ys)
    else:
        vecs = jax.vmap(one)(xs, ys, keys)
    # [num_batches, n_per_batch, *batch, d] -> [num_batches * n_per_batch, *batch, d]
    return jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), vecs)


_batched_jit = jax.jit(
    _batched, static_argnames=("logits_fn", "per_sample", "reducers", "num_classes", "hessian")
)
