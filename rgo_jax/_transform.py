"""The RGO gradient transformation and its consolidation (projection update)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from rgo_jax import _layout, _matrices, _rls, _sharding

__all__ = [
    "DEFAULT_ALPHA",
    "RGOState",
    "consolidate",
    "rgo",
    "rgo_states",
    "scale_by_rgo",
    "update_projection",
]

DEFAULT_ALPHA = 0.01
"""The RLS regulariser of the reference code (the paper's text says 1; both are offered).

0.01 is the default because the published results were produced with the reference code,
which uses it. With ``P = alpha (alpha I + H)^-1``, a smaller alpha protects directions
of smaller curvature more strongly; after trace normalisation only the ratio of alpha to
the curvature scale matters. ``rgo-bench --methods rgo,rgo-alpha1`` compares the two.
"""


@dataclasses.dataclass(frozen=True)
class Layouts:
    """The layout of every leaf, kept in the state's structure (no arrays, no leaves).

    ``items`` is ``((path, MatrixLayout | None), ...)`` in leaf order. It lets a task
    boundary (:func:`rgo_jax.nnx.consolidate`) compute curvature vectors with exactly the
    transformation's layouts, so they are never repeated.
    """

    items: tuple[tuple[str, _layout.MatrixLayout | None], ...]

    def as_dict(self) -> dict[str, _layout.MatrixLayout | None]:
        return dict(self.items)


jax.tree_util.register_static(Layouts)
serialization.register_serialization_state(Layouts, lambda x: {}, lambda target, state: target)


class RGOState(NamedTuple):
    """State of :func:`scale_by_rgo`: one RLS matrix P per projected parameter tensor."""

    p: Any
    """Tree like params: ``[*batch, d, d]`` per projected leaf, ``optax.MaskedNode()`` for
    an unprojected one (optax's empty node: Orbax and ``flax.serialization`` save it)."""
    num_vectors: jax.Array  # int32 [], consolidation vectors absorbed (not a step counter)
    skipped: jax.Array  # int32 [], non-finite consolidation vectors skipped
    layouts: Any = None
    """:class:`Layouts` of the transformation (static: part of the tree's structure)."""


def scale_by_rgo(
    layout: _layout.LayoutSpec = None,
    *,
    project_biases: bool = True,
    dtype: Any = None,
    input_projected: str | Callable[[str], bool] | None = None,
    max_p_bytes: int | None = None,
    max_total_bytes: int | None = None,
    trace_normalisation: str = "per-leaf",
) -> optax.GradientTransformationExtraArgs:
    r"""Projects each gradient by the trace-normalised RGO matrix of its layer.

    For a parameter viewed as a matrix ``G`` of shape ``[d, m]`` (see
    :class:`rgo_jax.layouts.MatrixLayout`), the update is

    .. math::  \hat G = \frac{d}{\operatorname{tr} P} \, P G ,

    with ``P = alpha (alpha I + \sum_i v_i v_i^T)^{-1}`` accumulated over earlier tasks by
    :func:`update_projection` (``P = I`` before the first consolidation, so the
    transformation starts as the identity). P does not change inside ``update``.

    Chain it before a base optimizer to project the raw gradient (the paper's order, e.g.
    :func:`rgo`), or after it to project the optimizer's update (the Adam-NSCL order)::

      optax.chain(scale_by_rgo(), optax.adam(1e-3))   # project the gradient
      optax.chain(optax.adam(1e-3), scale_by_rgo())   # project Adam's update

    Args:
      layout: which leaves get a P and how they are viewed as matrices: ``None`` (1-D bias,
        2-D dense ``[in, out]``, 4-D HWIO conv; anything else is an error naming the
        leaf), a callable ``(path, leaf) -> MatrixLayout | None`` (see
        :func:`rgo_jax.layouts.layout_rules`), or a tree of layouts like params.
      project_biases: with the default rule, give 1-D leaves their own P (the reference
        code) or leave them unprojected.
      dtype: storage dtype of P, floating (``None`` means ``float32``; ``jnp.bfloat16``
        halves the memory). The product is computed in the gradient's dtype. With bfloat16,
        each consolidation runs in float32 and rounds P to bfloat16; where the rounding
        leaves P indefinite it is raised by the smallest multiple of the identity that keeps
        it positive definite (see :func:`update_projection`), so the projection never
        reverses a gradient component. (``None`` rather than a
        dtype default keeps ``optax.inject_hyperparams`` from mistaking it for a schedule.)
      input_projected: dense kernels whose gradient the *layer* projects, ``(P X^T) D``
        instead of ``P (X^T D)`` (cheaper when the batch is smaller than the layer's width):
        a regex ``re.search``-ed against parameter paths (``r"kernel$"``) or a predicate
        ``path -> bool`` (with ``optax.inject_hyperparams`` use a regex: a callable is
        taken for a schedule). Each selected leaf must have the ``DENSE`` layout. Its P is
        kept in the state, marked as input-projected, and ``update`` passes its
        gradient through: compute the loss under :func:`rgo_jax.nnx.use_input_projection`
        (which reads the marked P from the optimizer state) or with
        :func:`rgo_jax.projected_matmul`. :func:`consolidate` is unchanged.
      max_p_bytes, max_total_bytes: memory guard. ``init`` raises ``ValueError`` naming the
        leaf, its P's shape and bytes when one P (all stacked layers of a leaf together)
        would exceed ``max_p_bytes``, or all P together ``max_total_bytes``. ``None``: the
        defaults :data:`MAX_P_BYTES` (1 GiB) and :data:`MAX_TOTAL_BYTES` (8 GiB); pass a
        larger number to allow more, or leave the leaf unprojected (a ``None`` layout).
        The default rule gives every 2-D leaf a P over its first axis, so an embedding
        table ``[vocab, dim]`` would get a ``vocab x vocab`` P: see
        :data:`rgo_jax.layouts.TRANSFORMER_RULES` for transformer blocks and embeddings.
      trace_normalisation: ``"per-leaf"`` (the paper and the reference code, the default):
        each P is scaled by its own ``d / tr P``. ``"global"``, an extension beyond the
        paper: one scale for the whole network,

        .. math::  \hat G_l = \frac{P_l G_l}{\bar t}, \qquad
                  \bar t = \frac{\sum_l n_l \operatorname{tr}(P_l) / d_l}{\sum_l n_l}

        (``n_l`` the parameters of leaf ``l``; unprojected leaves are not scaled), so that
        the mean step scale over all projected parameters is one, as per-leaf
        normalisation makes it for each leaf. Per leaf, a P whose whole space earlier tasks
        cover (a bias, whose every direction each task's gradient hits) is scaled back to
        mean eigenvalue one and its protection is lost: only the contrast between its
        directions remains. Globally, the relative sizes of the P's are kept, as in the
        regularised second-order step ``alpha (alpha I + H)^{-1} g`` that P approximates.
        Input-projected kernels (normalised by their layer) are rescaled by
        ``(tr P_l / d_l) / t_bar`` here.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rgo_jax import scale_by_rgo
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> tx = optax.chain(scale_by_rgo(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> state[0].p["w"].shape, state[0].p["b"].shape
      ((3, 3), (2, 2))
      >>> updates, state = tx.update({"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, state)
      >>> updates["w"][0].tolist()  # P = I: plain SGD
      [-0.1..., -0.1...]

    References:
      Liu & Liu, "Continual Learning with Recursive Gradient Optimization", ICLR 2022.
    """

    dtype = jnp.float32 if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"scale_by_rgo: dtype of P must be floating, got {jnp.dtype(dtype)}.")
    selected = None if input_projected is None else _selector(input_projected)
    if trace_normalisation not in TRACE_NORMALISATIONS:
        raise ValueError(
            f"scale_by_rgo: trace_normalisation must be one of "
            f"{', '.join(TRACE_NORMALISATIONS)}; got {trace_normalisation!r}."
        )

    def init_fn(params):
        specs = _matrices.leaf_specs(params, layout, project_biases)
        _check_memory(specs, dtype, max_p_bytes, max_total_bytes)
        leaves = _matrices.projected(params)
        for name, spec in specs.items():
            if spec is not None and not jnp.issubdtype(leaves[name].dtype, jnp.floating):
                raise TypeError(
                    f"scale_by_rgo: parameter '{name}' has dtype {leaves[name].dtype}; RGO "
                    "projects floating parameters only (a layout rule returning None leaves "
                    "it unprojected)."
                )
        marked = set()
        if selected is not None and not _matrices.is_params_stand_in(params):
            marked = _input_projected_leaves(specs, selected)

        def identity(spec):
            return jnp.broadcast_to(
                jnp.eye(spec.d, dtype=dtype), (*spec.batch_shape, spec.d, spec.d)
            )

        p = _matrices.init_matrices(params, specs, identity, dtype)
        if marked:
            mats = _matrices.projected(p)
            p = _matrices.with_projected(
                p, {name: _matrices.InputProjected(mats[name]) for name in marked}
            )
        # Two distinct buffers, so that the state can be donated to a jitted step.
        zero = (jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))
        if _matrices.is_params_stand_in(params):
            layouts = _matrices.NOT_PARAMS
        else:
            layouts = Layouts(tuple((n, s if s is None else s.layout) for n, s in specs.items()))
        return RGOState(p=p, num_vectors=zero[0], skipped=zero[1], layouts=layouts)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        specs = _matrices.leaf_specs(updates, layout, project_biases)

        if trace_normalisation == "global":
            return _globally_normalised(updates, state, specs), state

        @_sharding.sharding_boundary(like=1)
        def project(p, g):
            return jnp.matmul(p, g) * trace_scale(p)[..., None, None]

        return _matrices.project_tree("RGO", updates, state.p, specs, project), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


TRACE_NORMALISATIONS = ("per-leaf", "global")
"""The trace normalisations :func:`scale_by_rgo` offers (``trace_normalisation``)."""


def _globally_normalised(updates: Any, state: RGOState, specs: dict) -> Any:
    """``P_l G_l / t_bar`` for every projected leaf (see ``trace_normalisation="global"``)."""
    mats = _matrices.projected(state.p)
    total, weight = 0.0, 0
    for name, mat in mats.items():
        spec = specs[name]
        per_matrix = math.prod(spec.shape) // max(math.prod(spec.batch_shape), 1)
        t = jnp.mean(jnp.diagonal(mat, axis1=-2, axis2=-1).astype(jnp.float32), axis=-1)
        total = total + per_matrix * jnp.sum(t)
        weight += per_matrix * max(math.prod(spec.batch_shape), 1)
    if not mats:
        return updates
    t_bar = total / weight

    @_sharding.sharding_boundary(like=1)
    def project(p, g):
        return jnp.matmul(p, g) / t_bar.astype(g.dtype)

    out = _matrices.project_tree("RGO", updates, state.p, specs, project)

    def rescale(path, g, mat):  # input-projected: the layer applied d / tr P already
        if not isinstance(mat, _matrices.InputProjected):
            return g
        return g * (1.0 / trace_scale(mat.value) / t_bar).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(
        rescale, out, state.p, is_leaf=lambda x: isinstance(x, _matrices.InputProjected)
    )


def rgo(
    learning_rate: optax.ScalarOrSchedule,
    layout: _layout.LayoutSpec = None,
    *,
    project_biases: bool = True,
    dtype: Any = None,
    input_projected: str | Callable[[str], bool] | None = None,
    max_p_bytes: int | None = None,
    max_total_bytes: int | None = None,
    trace_normalisation: str = "per-leaf",
) -> optax.GradientTransformationExtraArgs:
    """The reference optimizer: RGO projection of the gradient, then plain SGD.

    ``rgo(lr)`` is ``optax.chain(scale_by_rgo(...), optax.sgd(lr))``: no momentum, no weight
    decay, as in the reference code. Consolidate after each task with :func:`consolidate`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax import rgo
      >>> tx = rgo(0.1)
      >>> state = tx.init({"w": jnp.ones((4, 3))})
    """
    return optax.chain(
        scale_by_rgo(
            layout,
            project_biases=project_biases,
            dtype=dtype,
            input_projected=input_projected,
            max_p_bytes=max_p_bytes,
            max_total_bytes=max_total_bytes,
            trace_normalisation=trace_normalisation,
        ),
        optax.sgd(learning_rate),
    )


MAX_P_BYTES = 2**30
"""Default largest P of one leaf (bytes): 1 GiB, a float32 P of 16384 x 16384."""
MAX_TOTAL_BYTES = 8 * 2**30
"""Default largest memory of all P of one :func:`scale_by_rgo` together (bytes): 8 GiB."""


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _check_memory(specs: dict, dtype: Any, max_p: Any, max_total: Any) -> None:
    """Raises ``ValueError`` naming the first P over ``max_p`` bytes, or the total."""
    max_p = MAX_P_BYTES if max_p is None else max_p
    max_total = MAX_TOTAL_BYTES if max_total is None else max_total
    itemsize = jnp.dtype(dtype).itemsize
    total, sizes = 0, []
    for name, spec in specs.items():
        if spec is None:
            continue
        shape = (*spec.batch_shape, spec.d, spec.d)
        nbytes = math.prod(shape) * itemsize
        total += nbytes
        sizes.append((nbytes, name, shape))
        if nbytes > max_p:
            raise ValueError(
                f"RGO: parameter '{name}' of shape {spec.shape} would get a P of shape {shape} "
                f"({nbytes} bytes, {_size(nbytes)} in {jnp.dtype(dtype).name}), over "
                f"max_p_bytes={max_p}. Leave it unprojected with a None layout (e.g. "
                f"layout_rules([(r'^{name}$', None)]); embeddings usually should be), choose "
                "another layout, or raise max_p_bytes."
            )
    if total > max_total:
        largest = ", ".join(f"'{n}' {s} {_size(b)}" for b, n, s in sorted(sizes)[::-1][:3])
        raise ValueError(
            f"RGO: the P matrices would take {total} bytes ({_size(total)}), over "
            f"max_total_bytes={max_total}; the largest: {largest}. Leave leaves unprojected "
            "(None layouts), store P in bfloat16 (dtype=), or raise max_total_bytes."
        )


def trace_scale(p: jax.Array) -> jax.Array:
    """``d / tr P`` per matrix of a ``[*batch, d, d]`` P, from its diagonal (``O(d)``;
    ``jnp.trace`` masks and sums all ``d^2`` entries)."""
    return p.shape[-1] / jnp.sum(jnp.diagonal(p, axis1=-2, axis2=-1), axis=-1)


def _selector(spec: str | Callable[[str], bool]) -> Callable[[str], bool]:
    if isinstance(spec, str):
        rx = re.compile(spec)
        return lambda path: rx.search(path) is not None
    if callable(spec):
        return lambda path: bool(spec(path))
    raise TypeError(
        f"input_projected must be a regex string or a callable (path) -> bool, got {spec!r}."
    )


def _input_projected_leaves(
    specs: dict, selected: Callable[[str], bool], method: str = "RGO"
) -> set[str]:
    """The selected leaves; each must be a plain 2-D dense kernel with a P (``method``:
    ``"RGO"`` or ``"OWM"``, for the errors)."""
    names = set()
    for name, spec in specs.items():
        if not selected(name):
            continue
        if spec is None:
            raise ValueError(
                f"{method} input projection: parameter '{name}' is selected for input-side "
                "projection but its layout gives it no P."
            )
        if len(spec.shape) != 2 or spec.layout != _layout.DENSE:
            raise ValueError(
                f"{method} input projection: parameter '{name}' of shape {spec.shape} has "
                f"layout {spec.layout}; only dense kernels [in, out] (layouts.DENSE) can be "
                "projected on the input side."
            )
        names.add(name)
    if not names:
        raise ValueError(
            f"{method} input projection: the selection matches none of the parameters "
            f"{sorted(specs)}."
        )
    return names


def _update_projection(*args):
    """The compiled update (:func:`_update_program`'s for ``args[3]``, the method) of
    ``(state, vectors, alpha, method, block_size, relative_alpha=False, checked_only=False)``;
    under an outer trace (``jit``, ``shard_map``, ...), which compiles it as part of its own
    program, the plain jitted update."""
    if _matrices.under_trace(*args[:3]):
        return _update_default(*args)
    return _update_program(args[3])(*args)


def _update_program(method: str) -> Callable:
    """The jitted update for ``method``: on CPU, the block kernel compiled for one pass.

    A consolidation runs once per task, so its compile time is part of every task's cost.
    XLA's CPU fusion emitters take 25-35 % longer to compile this program than its classic
    loop emitters do, for the same result: measured bit for bit equal and within -5..+7 %
    in run time at widths 64-2048, 1000 vectors (paper MLP: 2.96 s -> 1.97 s to compile;
    ``tests/core/test_update_stages.py`` checks the bits). The sequential scan runs ~15 %
    slower with the classic emitters, so it keeps the default; other backends do too.
    """
    if method == "block" and jax.default_backend() == "cpu":
        return _update_block_cpu
    return _update_default


_ONE_PASS_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_UPDATE_STATIC = ("method", "block_size", "relative_alpha", "checked_only")


@_sharding.sharding_boundary(like=0)
def _update_projection_program(
    state, vectors, alpha, method, block_size, relative_alpha=False, checked_only=False
):
    table = {name: v for name, v in _matrices.projected(vectors).items() if v is not None}
    entries = []  # (name, p, v)
    matrices = _matrices.projected(state.p)
    for name, p in matrices.items():
        if name not in table:
            raise ValueError(
                f"RGO update_projection: no curvature vectors for projected parameter "
                f"'{name}' (vectors have {sorted(table)[:8]})."
            )
        v = table[name]
        batch_shape, d = p.shape[:-2], p.shape[-1]
        if v.ndim != len(batch_shape) + 2 or v.shape[1:] != (*batch_shape, d):
            raise ValueError(
                f"RGO update_projection: vectors for '{name}' have shape {v.shape}; expected "
                f"[n, {', '.join(map(str, (*batch_shape, d)))}] (n vectors for a P of shape "
                f"{p.shape})."
            )
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(
                f"RGO update_projection: vectors for '{name}' must be floating, got {v.dtype}."
            )
        if not jnp.issubdtype(p.dtype, jnp.floating):
            raise TypeError(
                f"RGO update_projection: P of '{name}' has dtype {p.dtype}; it must be "
                "floating (float32 or bfloat16)."
            )
        entries.append((name, p, v))
    if not entries:
        return state
    ns = {v.shape[0] for *_, v in entries}
    if len(ns) != 1:
        raise ValueError(f"RGO update_projection: leaves have different numbers of vectors {ns}.")
    n = ns.pop()
    # A vector index with a non-finite entry in any leaf is a bad batch: skip it everywhere.
    bad = jnp.zeros((n,), bool)
    for *_, v in entries:
        bad = bad | ~jnp.all(jnp.isfinite(v.reshape(n, -1)), axis=1)

    # Bucket matrices of equal size (and stacked layers, and alpha) into one vmapped call.
    per_leaf = isinstance(alpha, dict) or relative_alpha
    names = list(matrices)
    buckets: dict[tuple[int, Any, str | None], list] = {}
    for e in entries:
        buckets.setdefault((e[1].shape[-1], e[1].dtype, e[0] if per_leaf else None), []).append(e)
    new = {}
    refused = jnp.zeros((), bool)
    unchecked = jnp.zeros((), bool)
    for (d, dtype, leaf), group in buckets.items():
        a = alpha
        if isinstance(alpha, dict):
            a = _matrices.per_leaf(alpha, leaf, "RGO alpha", names)
        if relative_alpha:
            a = a * _relative_scale(group[0][2], bad)
        ps = [p.reshape(-1, d, d) for _, p, _ in group]
        vs = [v.reshape(n, -1, d) for *_, v in group]
        sizes = [x.shape[0] for x in ps]
        pk = jnp.concatenate(ps, axis=0)
        vk = jnp.concatenate(vs, axis=1).astype(jnp.float32)
        vk = jnp.where(bad[:, None, None], 0.0, vk)
        pk, _, status = _rls.run_rls(
            pk, vk, a, method=method, block_size=block_size, dtype=dtype, checked_only=checked_only
        )
        refused = refused | jnp.any(status == 2)
        unchecked = unchecked | jnp.any(status == _rls.NOT_CHECKED)
        offsets = np.cumsum([0, *sizes])
        for (name, p, _), lo, hi in zip(group, offsets[:-1], offsets[1:], strict=True):
            new[name] = pk[lo:hi].reshape(p.shape).astype(dtype)
    # A P that no form of the update keeps positive definite: refuse the whole update.
    num_bad = jnp.where(refused, n, jnp.sum(bad, dtype=jnp.int32))
    new = {name: jnp.where(refused, matrices[name], value) for name, value in new.items()}
    updated = state._replace(
        p=_matrices.with_projected(state.p, new),
        num_vectors=_rls.saturating_add(state.num_vectors, n - num_bad),
        skipped=_rls.saturating_add(state.skipped, num_bad),
    )
    if not checked_only:
        return updated
    # A fast result that failed its check: the whole state comes back unchanged, and the
    # caller (:func:`_absorb`) sees that its counters did not move.
    return jax.tree.map(lambda a, b: jnp.where(unchecked, a, b), state, updated)


_update_default = jax.jit(_update_projection_program, static_argnames=_UPDATE_STATIC)
_update_block_cpu = jax.jit(
    _update_projection_program,
    static_argnames=_UPDATE_STATIC,
    compiler_options=_ONE_PASS_CPU_OPTIONS,
)


def _absorb(state, vectors, alpha, method, block_size, relative_alpha):
    """:func:`_update_projection` for :func:`update_projection`, compiled in two stages.

    Called eagerly, the fast kernel and its check run first (:func:`_rls.rls_checked`,
    about half the compilation); only if a result failed its check, which leaves the state
    unchanged, does the full update with its square-root fallback compile and run. The P
    that comes back is the full update's in both cases. Under a trace (``jit``, ``grad``
    or ``eval_shape`` around :func:`update_projection`) the full update is traced at once.
    """
    args = (state, vectors, alpha, method, block_size, relative_alpha)
    if _matrices.under_trace(state, vectors, alpha):
        return _update_projection(*args)
    new = _update_projection(*args, True)  # checked_only
    # A successful update of n > 0 vectors moves num_vectors + skipped by n; unchanged
    # counters mean a failed check (or both counters saturated: the full update decides).
    moved = (int(new.num_vectors), int(new.skipped)) != (
        int(state.num_vectors),
        int(state.skipped),
    )
    return new if moved else _update_projection(*args)


def _relative_scale(v: jax.Array, bad: jax.Array) -> jax.Array:
    """``tr(sum_i v_i v_i^T) / d`` of one leaf's finite vectors ``[n, *batch, d]`` (averaged
    over stacked layers); 1 where they are all zero (P does not move then anyway)."""
    v = jnp.where(bad.reshape(-1, *([1] * (v.ndim - 1))), 0.0, v.astype(jnp.float32))
    per_matrix = v.shape[-1] * math.prod(v.shape[1:-1])
    s = jnp.sum(jnp.square(v)) / per_matrix
    return jnp.where(s > 0, s, 1.0)


def update_projection(
    state: RGOState,
    vectors: Any,
    alpha: float | jax.Array | dict[str, float | jax.Array] = DEFAULT_ALPHA,
    *,
    method: str = "block",
    block_size: int = 64,
    relative_alpha: bool = False,
) -> RGOState:
    r"""Absorbs curvature vectors into the P matrices by rank-one RLS steps (jit-compiled).

    For each projected leaf and each of its ``n`` vectors ``v`` (in order):

    .. math::  P \leftarrow P - \frac{(P v)(P v)^\top}{\alpha + v^\top P v}

    so that, from ``P = I``, ``P = alpha (alpha I + \sum v v^T)^{-1}``. Matrices of equal
    size (including the layers of a stacked leaf) are updated by one vmapped kernel.

    A vector index with a non-finite value in any leaf (a bad batch) is skipped for every
    leaf and counted in ``state.skipped``; P is never corrupted by it.

    Args:
      state: an :class:`RGOState` (see :func:`consolidate` to update one inside a chain).
      vectors: tree keyed like params (missing or ``None`` leaves are allowed only for
        unprojected parameters) with ``[n, *batch, d]`` per projected leaf, e.g. from
        :func:`rgo_jax.curvature_vectors`.
      alpha: RLS regulariser, a finite positive scalar, or a dict ``path -> scalar``
        covering every projected parameter (one alpha per layer). Default 0.01, the
        reference code's value (the paper's text says 1). Concrete values (Python numbers,
        NumPy or JAX arrays) are checked at once: an array that is not a scalar, or a value
        that is zero, negative or NaN raises ``ValueError``. A traced alpha (``update_projection``
        called inside ``jit``) cannot be checked: a non-positive or NaN value there makes the
        RLS denominator ``alpha + v^T P v`` vanish or NaN, and P non-finite.
      method: ``"block"`` (Woodbury, ``block_size`` vectors per solve; the default, fast) or
        ``"sequential"`` (a ``lax.scan`` of rank-one steps, the literal Algorithm 1). Both
        give the same P up to float32 rounding.
      block_size: vectors per Woodbury solve.
      relative_alpha: an extension beyond the paper (off by default): ``alpha`` is relative
        to the curvature each leaf absorbs in this call. Leaf ``l`` with ``d_l``-wide P and
        vectors ``v_1..v_n`` uses

        .. math::  \alpha_l = \alpha \, \operatorname{tr}\Big(\sum_i v_i v_i^\top\Big) / d_l
                  = \alpha \sum_i \lVert v_i\rVert^2 / d_l ,

        so that ``P^{-1} <- P^{-1} + H_l / alpha_l`` adds a curvature whose mean eigenvalue is
        ``1 / alpha`` for every leaf, however large its vectors. One absolute alpha serves
        leaves whose vectors differ in norm by 10-100x (the reference reduction averages a
        kernel's gradient over its outputs, a bias keeps its own): it barely moves the P of
        small-vector leaves and saturates the others. Called once per task, each task's
        curvature enters with the same weight. Non-finite (skipped) vectors do not count; a
        leaf whose vectors are all zero keeps ``alpha``.

    Returns:
      The new state. RLS runs in float32 whatever the storage dtype of P; a refused update
      leaves P unchanged and counts its ``n`` vectors in ``skipped``.

    Numerical safety: for any finite vectors and any ``alpha > 0`` the stored P is finite,
    symmetric and positive definite (its float32 Cholesky factorisation succeeds with every
    pivot above ``2^-24 max diag P``), or the update is refused. The fast kernel's result
    is checked (finite, no diagonal entry grown, positive definite once rounded to the
    storage dtype); where it passes, P is bit for bit the plain kernel's. Where it fails,
    the same rank-one steps rerun from the old P in square-root (Potter) form,
    ``S <- S (I - c h h^T)`` with ``P = S S^T``, and the result is raised by the smallest
    multiple of the identity that keeps it positive definite in the storage dtype. If P was
    not finite on entry, the update is refused: P is unchanged and the ``n`` vectors are
    counted in ``state.skipped``. ``num_vectors`` and ``skipped`` saturate at ``2**31 - 1``.

    Accuracy (``benchmarks/rls_accuracy.py``; maximum entry error against the float64
    closed form, ``|P| <= 1``). P depends only on ``r = alpha / |v|^2``:

    * ``r >= 1e-4``: the plain float32 kernels are accurate (error <= 2e-7 block, 2e-6
      sequential); the check passes and nothing changes. Permuted-MNIST curvature vectors
      at ``alpha = 0.01`` (``|v|^2 ~ 3``) lie here: over 100 tasks x 1000 updates of a
      784-wide P, every task checked (11) took the fast path, within 7e-10 of the closed
      form, smallest eigenvalue as in float64.
    * ``1e-8 <= r < 1e-4``: the plain kernels lose positive definiteness and overflow from
      ``r ~ 1e-6`` (block) and ``1e-8`` (sequential); the square-root fallback keeps the
      error <= 5e-7 down to ``r = 1e-6`` and 1.1e-5 at ``r = 1e-8``. With the MNIST
      vectors (784-wide, 20 tasks) the plain block kernel's P became non-finite at
      ``alpha = 1e-5`` (task 3), 1e-6 and 1e-8 (task 0); here P ends within 3e-8 of the
      closed form at all three (``r`` down to 3e-9), smallest eigenvalue within 15 % of
      float64's.
    * ``r <= 1e-20``: every direction the vectors span is protected to float32 resolution
      (P is the projector onto the rest); accurate (error <= 2e-6, <= 2e-8 from 1e-22).
    * ``1e-20 < r < 1e-8``: P depends on the vectors' components at float32 rounding level,
      beyond float32: P is kept finite and positive definite but may differ from the closed
      form by up to 0.5. Use ``alpha`` of at least ``1e-8 |v|^2``.

    Cost (784-wide P, 1000 vectors, 2 CPU cores): the check is one float32 Cholesky
    factorisation per matrix and update (``2 d^3`` flops, ``0.47 d^3`` from ``d = 2048``;
    no LAPACK call): 40 -> 63 ms for the block kernel, 193 -> 222 ms for the sequential
    one. The fallback, only where the plain kernel fails, took 0.7 s (block) and 0.9 s
    (sequential). Called outside ``jit``,
    the update compiles in two stages: the fast kernel with its check first, and the
    fallback only if a check fails (the P is bit for bit the same as the one-program
    update's). When nothing fails that is 40-55 % less compilation: for an MLP with three
    sizes of P, 6.1 -> 3.7 s (block) and 5.2 -> 2.4 s (sequential) of CPU time. Under
    ``jit`` the whole update is one program.
    """
    if not isinstance(state, RGOState):
        raise TypeError(
            f"update_projection expects an RGOState, got {type(state).__name__}; use "
            "consolidate(opt_state, ...) for a chained optimizer state."
        )
    if isinstance(alpha, dict):
        alpha = _matrices.path_keyed(alpha, "RGO alpha")
    _matrices.check_alpha(alpha, "RGO update_projection")
    if method not in ("sequential", "block"):
        raise ValueError(f"Unknown RLS method {method!r}; use 'sequential' or 'block'.")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"RGO update_projection: block_size must be an int, got {block_size!r}.")
    if block_size < 1:
        raise ValueError(f"RGO update_projection: block_size must be >= 1, got {block_size}.")
    counts = [np.shape(v)[:1] for v in jax.tree.leaves(vectors)]
    if counts and all(c == (0,) for c in counts):
        return state  # no vectors (n = 0): nothing to absorb, P unchanged
    alpha = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), alpha)
    relative = bool(relative_alpha)
    return _absorb(state, vectors, alpha, method, int(block_size), relative)


def rgo_states(opt_state: Any) -> list[RGOState]:
    """All :class:`RGOState` nodes inside a (chained, partitioned, injected) optimizer state."""
    return _matrices.find_states(RGOState, opt_state)


def consolidate(
    opt_state: Any,
    vectors: Any,
    alpha: float | jax.Array = DEFAULT_ALPHA,
    **kwargs,
) -> Any:
    """Runs :func:`update_projection` on every RGO state inside an optimizer state.

    The task-boundary step of Algorithm 1 for an optimizer built with ``optax.chain``,
    ``optax.partition``, ``optax.masked`` or ``optax.inject_hyperparams``.

    alpha belongs to this step, not to the transformation: ``update`` never reads it (it
    only applies the P it is given), so it is neither stored in the state nor injected. It
    may change from task to task, and may be given per layer as a dict ``path -> alpha``
    (see :func:`update_projection`, which also says how it is validated).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rgo_jax import consolidate, rgo, rgo_states
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), rgo(0.1))
      >>> state = tx.init({"w": jnp.zeros((3, 2))})
      >>> state = consolidate(state, {"w": jnp.ones((5, 3))})
      >>> int(rgo_states(state)[0].num_vectors)
      5
    """
    return _matrices.map_states(
        RGOState, lambda s: update_projection(s, vectors, alpha, **kwargs), opt_state, "consolidate"
    )
