"""A-GEM: averaged gradient episodic memory (Chaudhry et al., 2019). USES MEMORY."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rgo_jax import _layout

__all__ = ["AGEMState", "agem", "agem_project"]


class AGEMState(NamedTuple):
    """State of :func:`agem`: counters only (the memory of examples is the caller's)."""

    count: jax.Array  # int32 [], updates with a reference gradient
    num_projected: jax.Array  # int32 [], of which violated <g, g_ref> >= 0 and were projected


def _by_path(tree: Any, what: str) -> tuple[list[str], list[jax.Array], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [_layout.path_str(p) for p, _ in flat]
    if len(set(names)) != len(names):
        raise ValueError(f"A-GEM: {what} has repeated parameter paths.")
    return names, [x for _, x in flat], treedef


def _tree_dot(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    hi = jax.lax.Precision.HIGHEST
    total = jnp.zeros([], jnp.float32)
    for x, y in zip(a, b, strict=True):
        total = total + jnp.dot(
            x.reshape(-1).astype(jnp.float32), y.reshape(-1).astype(jnp.float32), precision=hi
        )
    return total


def agem_project(grads: Any, ref_grads: Any) -> tuple[Any, jax.Array]:
    r"""A-GEM's projection of a gradient tree against a reference gradient tree.

    .. math::
        g' = g - \frac{g^\top g_{ref}}{g_{ref}^\top g_{ref}}\, g_{ref}
        \quad\text{if } g^\top g_{ref} < 0, \qquad g' = g \text{ otherwise,}

    with the dot products over the *whole* parameter tree (one constraint for the average
    loss on the memory, not one per layer). A zero ``g_ref`` leaves ``g`` unchanged.

    Args:
      grads: the gradient on the current batch.
      ref_grads: the gradient on a batch from the episodic memory, with (at least) the
        parameter paths of ``grads``. Extra paths are ignored, so the full reference gradient
        can be passed through ``optax.partition`` / ``optax.masked``: the constraint is then
        on the parameters this transformation updates.

    Returns:
      ``(projected grads, violated)`` with ``violated`` a bool scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.baselines import agem_project
      >>> g, v = agem_project({"w": jnp.array([1.0, -1.0])}, {"w": jnp.array([0.0, 1.0])})
      >>> g["w"].tolist(), bool(v)
      ([1.0, 0.0], True)
    """
    names, g, treedef = _by_path(grads, "grads")
    ref_names, r, _ = _by_path(ref_grads, "ref_grads")
    if names != ref_names:
        ref_by_name = dict(zip(ref_names, r, strict=True))
        missing = [n for n in names if n not in ref_by_name]
        if missing:
            raise ValueError(
                f"A-GEM: ref_grads do not match grads: missing {missing[:8]} (ref_grads have "
                f"{sorted(ref_names)[:8]})."
            )
        r = [ref_by_name[n] for n in names]
    for n, x, y in zip(names, g, r, strict=True):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"A-GEM: ref_grads for '{n}' have shape {jnp.shape(y)}, grads {jnp.shape(x)}."
            )
    dot = _tree_dot(g, r)
    ref_sq = _tree_dot(r, r)
    violated = (dot < 0) & (ref_sq > 0)
    coef = jnp.where(violated, dot / jnp.where(ref_sq > 0, ref_sq, 1.0), 0.0)
    out = [x - (coef * y.astype(jnp.float32)).astype(x.dtype) for x, y in zip(g, r, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out), violated


def agem() -> optax.GradientTransformationExtraArgs:
    r"""A-GEM as a gradient transformation: projects ``g`` when it conflicts with ``g_ref``.

    **This method USES MEMORY: it replays stored examples of earlier tasks** (through the
    reference gradient), unlike RGO, OWM, GPM and EWC. The memory itself (which examples
    are kept, how a batch is drawn) is the caller's: any fixed-size array buffer works
    inside a jitted step.

    ``update(grads, state, ref_grads=g_ref)`` returns :func:`agem_project` of ``grads``,
    where ``g_ref`` is the gradient of the loss on a batch sampled from the episodic memory
    (each example with its own task's head/mask). Without ``ref_grads`` (the first task,
    empty memory) the gradient passes unchanged. Put it first in a chain so that it sees the
    raw gradients: ``optax.chain(agem(), optax.sgd(lr))``. With ``nnx.Optimizer``:
    ``optimizer.update(model, grads, ref_grads=ref)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; other extra arguments are ignored.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rgo_jax.baselines import agem
      >>> tx = optax.chain(agem(), optax.sgd(1.0))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.array([1.0, -1.0])}, state,
      ...                      ref_grads={"w": jnp.array([0.0, 1.0])})
      >>> u["w"].tolist(), int(state[0].num_projected)
      ([-1.0, -0.0], 1)

    References:
      Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with A-GEM",
      ICLR 2019.
    """

    def init_fn(params):
        del params
        # Two buffers, not one: a step that donates its state would donate one twice.
        return AGEMState(count=jnp.zeros([], jnp.int32), num_projected=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, ref_grads=None, **extra_args):
        del params, extra_args
        if ref_grads is None:
            return updates, state
        updates, violated = agem_project(updates, ref_grads)
        return updates, AGEMState(
            count=state.count + 1,
            num_projected=state.num_projected + violated.astype(jnp.int32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
