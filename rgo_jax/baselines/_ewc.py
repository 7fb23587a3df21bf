"""EWC (Kirkpatrick et al., 2017) and online EWC (Schwarz et al., 2018) as loss terms."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rgo_jax import _curvature, _layout

__all__ = [
    "EWCState",
    "diagonal_fisher",
    "ewc_accumulate",
    "ewc_loss",
    "ewc_penalty",
]

_HI = jax.lax.Precision.HIGHEST


def _table(tree: Any, what: str) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {_layout.path_str(p): x for p, x in flat}
    if len(out) != len(flat):
        raise ValueError(f"EWC: {what} has repeated parameter paths.")
    return out


def _matched(params: Any, other: Any, what: str) -> tuple[list[str], list, list]:
    """Leaves of ``params`` and of ``other`` matched by parameter path (NNX wrappers ignored)."""
    p = _table(params, "params")
    o = _table(other, what)
    missing = [n for n in p if n not in o]
    if missing:
        raise ValueError(
            f"EWC: {what} has no entry for parameter(s) {missing[:8]} (it has "
            f"{sorted(o)[:8]}{'...' if len(o) > 8 else ''})."
        )
    for n in p:
        if jnp.shape(p[n]) != jnp.shape(o[n]):
            raise ValueError(
                f"EWC: {what} for '{n}' has shape {jnp.shape(o[n])}, the parameter "
                f"{jnp.shape(p[n])}."
            )
    names = list(p)
    return names, [p[n] for n in names], [o[n] for n in names]


def ewc_penalty(params: Any, anchors: Any, fisher: Any, lam: float | jax.Array) -> jax.Array:
    r"""The EWC penalty :math:`\frac{\lambda}{2} \sum_i F_i (\theta_i - \theta^*_i)^2`.

    Args:
      params: the current parameters (a tree of arrays; an ``nnx.State`` is fine).
      anchors: ``theta*``, a tree with the same parameter paths.
      fisher: the diagonal Fisher ``F``, a tree with the same parameter paths.
      lam: the penalty strength ``lambda``.

    Returns:
      A float32 scalar; differentiable in ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.baselines import ewc_penalty
      >>> float(ewc_penalty({"w": jnp.array([1.0, 3.0])}, {"w": jnp.zeros(2)},
      ...                   {"w": jnp.array([2.0, 0.5])}, lam=4.0))
      13.0
    """
    _, p, a = _matched(params, anchors, "anchors")
    _, _, f = _matched(params, fisher, "fisher")
    return _penalty(p, a, f, lam)


@jax.jit
def _penalty(p: list, a: list, f: list, lam: Any) -> jax.Array:
    total = jnp.zeros([], jnp.float32)
    for x, x0, w in zip(p, a, f, strict=True):
        diff = jnp.asarray(x, jnp.float32) - jnp.asarray(x0, jnp.float32)
        total = total + jnp.sum(jnp.asarray(w, jnp.float32) * diff * diff)
    return 0.5 * jnp.asarray(lam, jnp.float32) * total


class EWCState(NamedTuple):
    """Anchors and accumulated diagonal Fisher of the tasks so far (see :func:`ewc_accumulate`)."""

    anchors: Any
    """Tree like params: the quadratic's centre ``theta*``."""
    fisher: Any
    """Tree like params: the accumulated diagonal Fisher ``F``."""
    offset: jax.Array  # float32 [], sum_i F_i (theta - theta*)^2 at its minimum (multi-task)
    num_tasks: jax.Array  # int32 [], tasks accumulated

    def penalty(self, params: Any, lam: float | jax.Array) -> jax.Array:
        """``lam / 2 * (sum F (params - anchors)^2 + offset)``: the penalty of all tasks so far."""
        return (
            ewc_penalty(params, self.anchors, self.fisher, lam)
            + 0.5 * jnp.asarray(lam, jnp.float32) * self.offset
        )


def _pure(tree: Any) -> Any:
    """Arrays only, keyed like ``tree`` (NNX ``Variable`` wrappers dropped)."""
    flat, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in flat])


@functools.partial(jax.jit, static_argnames=("online",))
def _combine(theta, old_a, old_f, new_f, offset, gamma, online):
    """Per-leaf anchors, Fisher and offset of :func:`ewc_accumulate` (lists of arrays)."""
    anchors, fishers = [], []
    for t, a, fo, fn in zip(theta, old_a, old_f, new_f, strict=True):
        a, fo = jnp.asarray(a, jnp.float32), jnp.asarray(fo, jnp.float32)
        if online:
            anchors.append(t)
            fishers.append(gamma * fo + fn)
            continue
        f = fo + fn
        safe = jnp.where(f > 0, f, 1.0)
        anchors.append(jnp.where(f > 0, (fo * a + fn * t) / safe, t))
        fishers.append(f)
        # a (x - p)^2 + b (x - q)^2 = (a + b)(x - m)^2 + ab / (a + b) (p - q)^2
        offset = offset + jnp.sum(jnp.where(f > 0, fo * fn / safe, 0.0) * (a - t) ** 2)
    if online:
        offset = jnp.zeros([], jnp.float32)
    return anchors, fishers, offset


def ewc_accumulate(
    state: EWCState | None,
    params: Any,
    fisher: Any,
    *,
    online: bool = False,
    gamma: float = 1.0,
) -> EWCState:
    r"""Adds a finished task (its parameters and Fisher) to the EWC state.

    Two rules:

    - ``online=False``, multi-task EWC (Kirkpatrick et al.): the penalty is the sum of one
      quadratic per task, :math:`\sum_t \frac{\lambda}{2} \sum_i F_{t,i}(\theta_i -
      \theta^*_{t,i})^2`. It is stored exactly as one quadratic: ``F = sum_t F_t``, centre
      the Fisher-weighted mean of the anchors ``sum_t F_t theta*_t / F`` (the latest anchor
      where ``F = 0``), plus the constant ``offset`` (its value at the minimum), so
      :meth:`EWCState.penalty` equals the sum of the per-task penalties and costs the same
      as one.
    - ``online=True``, online EWC (Schwarz et al.): ``F <- gamma * F_old + F_new`` and the
      anchor is the latest parameters (``gamma=1`` is Huszar's accumulated Fisher).

    Args:
      state: the state so far, or ``None`` before the first task.
      params: the parameters at the end of the task (the new anchor).
      fisher: the task's diagonal Fisher (e.g. :func:`diagonal_fisher`), same paths.
      online: the online-EWC rule instead of the multi-task sum.
      gamma: online EWC's decay of the old Fisher, in ``[0, 1]``.

    Returns:
      The new :class:`EWCState` (float32 trees with the structure of ``params``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.baselines import ewc_accumulate
      >>> s = ewc_accumulate(None, {"w": jnp.array(0.0)}, {"w": jnp.array(1.0)})
      >>> s = ewc_accumulate(s, {"w": jnp.array(2.0)}, {"w": jnp.array(1.0)})
      >>> float(s.anchors["w"]), float(s.fisher["w"]), float(s.offset)
      (1.0, 2.0, 2.0)
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"ewc_accumulate: gamma must be in [0, 1], got {gamma}.")
    names, _, new_f = _matched(params, fisher, "fisher")
    params = _pure(params)
    flat, treedef = jax.tree_util.tree_flatten(params)
    f_new = [jnp.asarray(x, jnp.float32) for x in new_f]
    for n, x in zip(names, f_new, strict=True):
        concrete = _concrete(x)
        if concrete is not None and np.any(concrete < 0):
            raise ValueError(f"ewc_accumulate: the Fisher of '{n}' has negative entries.")
    if state is None:
        fisher_tree = jax.tree_util.tree_unflatten(treedef, f_new)
        zero_f = jnp.zeros([], jnp.float32)
        return EWCState(params, fisher_tree, zero_f, jnp.ones([], jnp.int32))
    _, _, old_a = _matched(params, state.anchors, "state.anchors")
    _, _, old_f = _matched(params, state.fisher, "state.fisher")
    anchors, fishers, offset = _combine(flat, old_a, old_f, f_new, state.offset, gamma, online)
    return EWCState(
        anchors=jax.tree_util.tree_unflatten(treedef, anchors),
        fisher=jax.tree_util.tree_unflatten(treedef, fishers),
        offset=offset,
        num_tasks=state.num_tasks + 1,
    )


def ewc_loss(
    loss_fn: Callable[..., Any], lam: float | jax.Array, *, has_aux: bool = False
) -> Callable[..., Any]:
    """Wraps ``loss_fn(params, *args)`` into ``fn(params, ewc_state, *args)`` adding the penalty.

    ``ewc_state`` is an argument (not a closure) so a jitted step is compiled once for all
    tasks; pass ``None`` on the first task for the plain loss.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
      lam: the EWC strength ``lambda``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``fn(params, ewc_state, *args, **kwargs)`` returning ``loss + ewc_state.penalty(params,
      lam)`` (with ``aux`` passed through).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from rgo_jax.baselines import ewc_accumulate, ewc_loss
      >>> loss = ewc_loss(lambda p, x: jnp.sum(p["w"] * x), lam=2.0)
      >>> s = ewc_accumulate(None, {"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
      >>> jax.grad(loss)({"w": jnp.array([1.0, 0.0])}, s, jnp.ones(2))["w"].tolist()
      [3.0, 1.0]
    """

    def wrapped(params, ewc_state, *args, **kwargs):
        out = loss_fn(params, *args, **kwargs)
        if ewc_state is None:
            return out
        pen = ewc_state.penalty(params, lam)
        if has_aux:
            value, aux = out
            return value + pen, aux
        return out + pen

    return wrapped


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _concrete_indices(mask: Any) -> np.ndarray | None:
    m = _concrete(mask)
    return None if m is None else np.flatnonzero(m)


def _per_example(logits_fn, params, xi, yi, wi, key, cls, num_classes, empirical, sampled, kept):
    """Squared score(s) of one example, weighted: a tree like params."""

    def logp(p):
        z = logits_fn(p, xi[None])
        if z.ndim != 2 or z.shape != (1, num_classes):
            raise ValueError(
                f"diagonal_fisher: logits_fn(params, x[:1]) must return [1, {num_classes}], "
                f"got {z.shape}."
            )
        z = jnp.where(cls, z[0], -jnp.inf)
        return jax.nn.log_softmax(z)

    if empirical or sampled:
        if sampled:
            z = jax.lax.stop_gradient(logp(params))
            yi = jax.random.categorical(key, z)
        g = jax.grad(lambda p: logp(p)[yi])(params)
        return jax.tree.map(lambda t: wi * jnp.square(t.astype(jnp.float32)), g)
    # Exact expectation over the model's predictive distribution (over the kept classes).
    jac = jax.jacrev(lambda p: logp(p)[kept])(params)  # leaves [K, *shape]
    prob = jax.lax.stop_gradient(jnp.exp(logp(params)[kept]))  # [K]
    return jax.tree.map(
        lambda t: (
            wi * jnp.tensordot(prob, jnp.square(t.astype(jnp.float32)), axes=1, precision=_HI)
        ),
        jac,
    )


def diagonal_fisher(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    labels: jax.Array,
    *,
    class_mask: jax.Array | None = None,
    empirical: bool = False,
    rng: jax.Array | None = None,
    chunk_size: int = 16,
    loop: str = "scan",
) -> Any:
    r"""The diagonal Fisher information of a classifier, averaged over the examples.

    .. math::
        F_i = \frac{1}{n} \sum_{b=1}^n \sum_{c} p(c \mid x_b)
              \Big(\frac{\partial \log p(c \mid x_b)}{\partial \theta_i}\Big)^2

    with ``p`` the softmax over the task's classes (``class_mask``; logits of other classes
    are excluded, as in the masked single head). Three estimators:

    - default (``empirical=False``, ``rng=None``): the *true* Fisher, the exact
      expectation over the model's predictive distribution (one backward pass per example
      and kept class);
    - ``rng=key``: the true Fisher estimated with one label per example sampled from the
      model's predictive distribution (one backward pass per example);
    - ``empirical=True``: the empirical Fisher, the squared gradient of ``log p(y_b | x_b)``
      at the given labels.

    Args:
      logits_fn: ``logits_fn(params, x) -> [n, C]`` logits (close over the task id).
      params: the parameters (a tree of arrays).
      x: ``[n, ...]`` inputs (called one example at a time as ``x[b:b+1]``).
      labels: ``[n]`` int labels (used by the empirical Fisher and, without ``class_mask``,
        to pick the classes).
      class_mask: bool ``[C]``: the task's classes. Default: the classes present in
        ``labels`` (as :func:`rgo_jax.curvature_vectors`). A concrete mask also limits the
        exact estimator's backward passes to the kept classes.
      empirical: use the labels instead of the model's distribution.
      rng: a PRNG key for the sampled estimator.
      chunk_size: examples per vmapped chunk (memory: ``chunk_size x kept classes x
        params`` floats for the exact estimator).
      loop: how the chunks run: ``"scan"``, one compiled ``lax.scan`` over them (it reuses
        its buffers: the faster for dense nets), or ``"calls"``, one call of a compiled
        chunk function per chunk (XLA on CPU runs convolutions about 10x slower inside any
        loop, even a partly unrolled one: the faster for conv nets on CPU). Same sums.

    Returns:
      A float32 tree like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.baselines import diagonal_fisher
      >>> f = diagonal_fisher(lambda p, x: x @ p["w"], {"w": jnp.zeros((1, 2))},
      ...                     jnp.ones((3, 1)), jnp.array([0, 1, 0]))
      >>> f["w"].tolist()  # p = (1/2, 1/2): E_c (1[c=k] - p_k)^2 x^2 = 1/4
      [[0.25, 0.25]]
    """
    if empirical and rng is not None:
        raise ValueError("diagonal_fisher: pass either empirical=True or rng=, not both.")
    if chunk_size < 1:
        raise ValueError(f"diagonal_fisher: chunk_size must be positive, got {chunk_size}.")
    if loop not in ("scan", "calls"):
        raise ValueError(f"diagonal_fisher: loop must be 'scan' or 'calls', got {loop!r}.")
    x = jnp.asarray(x)
    labels = jnp.asarray(labels)
    n = x.shape[0]
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"diagonal_fisher: labels must be int [{n}] (one per example of x {x.shape}), got "
            f"{labels.dtype}{labels.shape}."
        )
    if n == 0:
        raise ValueError("diagonal_fisher: x has no examples.")
    num_classes = jax.eval_shape(lambda p: logits_fn(p, x[:1]), params).shape[-1]
    cls = _curvature.task_class_mask(labels, num_classes, class_mask, "diagonal_fisher")
    kept = _concrete_indices(cls)
    kept = jnp.arange(num_classes) if kept is None else jnp.asarray(kept)

    b = min(chunk_size, n)
    pad = (-n) % b

    def blocked(t):  # [chunks, b, ...]; padding rows repeat the first ones, with zero weight
        return jnp.concatenate([t, t[:pad]]).reshape(-1, b, *t.shape[1:])

    w = jnp.concatenate([jnp.full((n,), 1.0 / n, jnp.float32), jnp.zeros((pad,), jnp.float32)])
    keys = jax.random.split(rng, n) if rng is not None else jnp.zeros((n, 2), jnp.uint32)
    blocks = (blocked(x), blocked(labels), w.reshape(-1, b), blocked(keys))
    static = dict(
        logits_fn=logits_fn, num_classes=num_classes, empirical=empirical, sampled=rng is not None
    )
    impl = _fisher_scan if loop == "scan" else _fisher_chunk
    try:
        hash(logits_fn)
        fn = functools.partial(_JITTED[impl], **static)
    except TypeError:  # an unhashable callable cannot be a static argument: jit a closure
        fn = jax.jit(functools.partial(impl, **static))
    if loop == "scan":
        return fn(params, blocks, cls, kept)
    fisher = None
    for i in range(blocks[0].shape[0]):
        out = fn(params, *(t[i] for t in blocks), cls, kept)
        fisher = out if fisher is None else jax.tree.map(jnp.add, fisher, out)
    return fisher


def _fisher_chunk(
    params, x, labels, w, keys, cls, kept, *, logits_fn, num_classes, empirical, sampled
):
    """The weighted sum of one chunk's squared scores (per-example terms vmapped)."""
    one = functools.partial(
        _per_example,
        logits_fn,
        params,
        cls=cls,
        num_classes=num_classes,
        empirical=empirical,
        sampled=sampled,
        kept=kept,
    )
    return jax.tree.map(lambda o: jnp.sum(o, axis=0), jax.vmap(one)(x, labels, w, keys))


def _fisher_scan(params, blocks, cls, kept, **static):
    """``_fisher_chunk`` summed over the leading (chunk) axis of ``blocks`` by a scan."""

    def body(acc, blk):
        return jax.tree.map(jnp.add, acc, _fisher_chunk(params, *blk, cls, kept, **static)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return jax.lax.scan(body, zeros, blocks)[0]


_JITTED = {
    f: jax.jit(f, static_argnames=("logits_fn", "num_classes", "empirical", "sampled"))
    for f in (_fisher_chunk, _fisher_scan)
}
