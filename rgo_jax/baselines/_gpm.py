"""GPM: gradient projection memory (Saha, Garg & Roy, 2021)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgo_jax import _layout
from rgo_jax import _matrices as _common

__all__ = ["GPMState", "gpm_update_bases", "scale_by_gpm"]


class GPMState(NamedTuple):
    """State of :func:`scale_by_gpm`: an orthonormal input-space basis per projected leaf."""

    bases: Any
    """Tree like params: ``[*batch, d, d]`` per projected leaf, whose first ``rank`` columns
    are an orthonormal basis ``M`` of the protected input space and whose other ``d - rank``
    columns are zero up to rank ``d / 2`` and, past it, an orthonormal basis ``N`` of the
    complement (``[M | N]`` orthogonal, ``M M^T + N N^T = I``), from which the step projects
    there; zero also for ``d < 128`` (one column block, always projected by ``M``) and in a
    state made by hand or by an earlier version (projected by ``M`` alone).
    ``optax.MaskedNode()`` for leaves not projected. The basis is ``bases[..., :rank]``."""
    rank: Any
    """Tree like params: int32 ``[*batch]`` basis size per projected leaf, ``MaskedNode()``
    otherwise."""
    count: jax.Array  # int32 [], gpm_update_bases calls (tasks absorbed)


def scale_by_gpm(
    layout: _layout.LayoutSpec = None,
    *,
    project_biases: bool = False,
    dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Removes from each gradient its component in the stored input space ``span(M)``.

    For a parameter viewed as ``G [d, m]`` with ``d`` its input dimension (dense ``[in,
    out]``: ``in``; HWIO conv: ``kh*kw*cin``; see :mod:`rgo_jax.layouts`) the update is

    .. math::  \hat G = G - M M^\top G ,

    the reference code's ``grad - grad @ (M M^T)`` in PyTorch's ``[out, in]`` layout. ``M``
    is empty at first (the transformation is the identity on the first task) and grows at
    each task boundary by :func:`gpm_update_bases`. The basis is stored as a ``[d, d]``
    matrix with its rank, so shapes are static under ``jit``, its columns past the rank
    holding, past rank ``d / 2``, an orthonormal basis ``N`` of the complement (zero before);
    the projection reads, in blocks,
    only the columns it needs (:func:`project_out_basis`): ``G - M (M^T G)`` up to rank
    ``d / 2`` and the equal ``N (N^T G)`` past it, about ``4 d \min(k, d - k) m`` FLOPs per
    step for rank ``k``, nothing on the first task and none at full rank (the update is
    zero).

    GPM stores no data, only the bases (at most ``d x d`` per layer).

    Args:
      layout: which leaves are projected and how they are viewed as matrices, as in
        :func:`rgo_jax.scale_by_rgo`.
      project_biases: with the default rule, give 1-D leaves (biases) a ``[1, 1]`` basis whose
        representation is the constant input 1: after the first task the basis is ``[1]``
        and the bias is frozen, as the reference code does for 1-D parameters. Default
        ``False``: biases are left free (the reference MLP/AlexNet have no biases).
      dtype: storage dtype of the bases (``None``: float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from rgo_jax.baselines import gpm_update_bases, scale_by_gpm
      >>> tx = scale_by_gpm()
      >>> state = tx.init({"fc": {"kernel": jnp.zeros((3, 2))}})
      >>> reps = {"fc/kernel": np.array([[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])}
      >>> state = gpm_update_bases(state, reps, threshold=0.97)
      >>> state.rank["fc"]["kernel"].tolist()
      1
      >>> g, _ = tx.update({"fc": {"kernel": jnp.ones((3, 2))}}, state)
      >>> g["fc"]["kernel"][:, 0].tolist()  # the input direction e_0 is removed
      [0.0, 1.0, 1.0]

    References:
      Saha, Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021.
    """

    dtype = jnp.float32 if dtype is None else dtype

    def init_fn(params):
        specs = _common.leaf_specs(params, layout, project_biases, bias_input=True)

        def make_basis(spec):
            return jnp.zeros((*spec.batch_shape, spec.d, spec.d), dtype)

        def make_rank(path, _):
            spec = specs[_layout.path_str(path)]
            if spec is None:
                return _common.PLACEHOLDER
            return jnp.zeros(spec.batch_shape, jnp.int32)

        bases = _common.init_matrices(params, specs, make_basis, dtype)
        rank = bases
        if not _common.is_params_stand_in(params):
            rank = jax.tree_util.tree_map_with_path(make_rank, params)
        return GPMState(bases=bases, rank=rank, count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        specs = _common.leaf_specs(updates, layout, project_biases, bias_input=True)
        # The ranks of each projected leaf, in the order project_tree visits the leaves.
        ranks = iter(
            [
                r
                for m, r in zip(
                    jax.tree.leaves(state.bases), jax.tree.leaves(state.rank), strict=True
                )
                if not _common.is_placeholder(m)
            ]
        )

        def project(m, g):
            return project_out_basis(m, g, next(ranks))

        return _common.project_tree("GPM", updates, state.bases, specs, project), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_BLOCKS = 4  # column blocks per basis; measured (d = 784, m = 256, one core): rank d/4
# (by M) and 3d/4 (by N) 3-4x faster than the dense form over all columns, rank d free


def _blocks(d: int) -> tuple[int, int]:
    """Column block size and count of a ``[d, d]`` basis: blocks of at least 64 columns."""
    size = -(-d // max(1, min(_BLOCKS, d // 64)))
    return size, -(-d // size)


def project_out_basis(basis: jax.Array, g: jax.Array, rank: jax.Array) -> jax.Array:
    r"""``G - M M^T G`` for a stored ``[M | N]`` basis, touching only the columns it needs.

    With ``M`` the first ``k`` columns of ``basis``, ``N`` the others (past rank ``d / 2``
    an orthonormal basis of the complement of ``span(M)``, see :class:`GPMState`) and
    ``M_b``, ``N_b`` their parts in the ``b``-th block of ``s = d / 4`` columns (at least
    64),

    .. math::  \hat G = G - \sum_{b < \lceil k / s \rceil} M_b (M_b^\top G)
       \quad\text{or}\quad
       \hat G = \sum_{b \ge \lfloor k / s \rfloor} N_b (N_b^\top G) ,

    whichever reads fewer blocks (the first on a tie), equal in exact arithmetic since
    ``M M^T + N N^T = I``. Either is one ``lax.fori_loop`` over the chosen blocks, its
    start and trip count traced, so one compilation serves every rank. The cost is about
    ``4 d \min(k, d - k) m`` FLOPs instead of ``4 d^2 m``: rank 0 (the first task) costs
    nothing, rank ``d`` nothing either and gives exactly zero. The first form is bit for
    bit the projection by a zero-padded basis of earlier versions (every rank up to
    ``d / 2``); the second equals it up to float32 rounding. A basis without complement
    columns (zero past the rank: made by hand or by an earlier version) is always projected
    by the first form.

    A batched basis is projected element by element with each element's own rank (its
    columns past the rank masked off in the first form, before it in the second); the
    blocks read are those up to the largest rank (first form) or from the smallest one
    (second form, taken only where every element of rank between 0 and ``d`` stores N).

    Args:
      basis: ``[*batch, d, d]``: orthonormal ``M``, then ``N`` (or zeros) past the rank.
      g: ``[*batch, d, m]`` gradient matrix.
      rank: int32 ``[*batch]`` (a scalar: the same for every element), the columns of ``M``.

    Returns:
      The projected ``[*batch, d, m]`` gradient.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rgo_jax.baselines._gpm import project_out_basis
      >>> m = jnp.zeros((3, 3)).at[0, 0].set(1.0)  # basis e_0, rank 1, no complement
      >>> project_out_basis(m, jnp.ones((3, 2)), jnp.int32(1))[:, 0].tolist()
      [0.0, 1.0, 1.0]
      >>> mn = jnp.eye(3)  # basis e_0, e_1 (rank 2), complement e_2
      >>> project_out_basis(mn, jnp.ones((3, 2)), jnp.int32(2))[:, 0].tolist()
      [0.0, 0.0, 1.0]
    """
    d = basis.shape[-1]
    size, blocks = _blocks(d)
    rank = jnp.broadcast_to(jnp.asarray(rank, jnp.int32), basis.shape[:-2])
    kmax, kmin = jnp.max(rank, initial=0), jnp.min(rank, initial=d)
    m_trips = (kmax + size - 1) // size  # blocks holding a column of some M
    n_first = kmin // size  # the first block holding a column of some N
    n_trips = jnp.where(kmin >= d, 0, blocks - n_first)
    if blocks == 1:  # reading N is never cheaper (rank d is zeroed below)
        use_n = jnp.asarray(False)
    else:  # N is stored where d/2 < rank < d: its last column has unit norm (zero without)
        last = jnp.sum(jnp.square(basis[..., :, -1].astype(jnp.float32)), axis=-1)
        stored = jnp.all((rank <= 0) | (rank >= d) | (last > 0.5))
        use_n = stored & (n_trips < m_trips)
    first = jnp.where(use_n, n_first, 0)
    sign = jnp.where(use_n, 1, -1).astype(g.dtype)
    k = rank[..., None, None]
    cols = jnp.arange(size).reshape((1,) * (k.ndim - 1) + (size,))  # [*batch, 1, size]

    def body(i, acc):
        start = (first + i) * size
        lo = jnp.minimum(start, d - size)  # the last block, clamped if size does not divide d
        mb = jax.lax.dynamic_slice_in_dim(basis, lo, size, axis=-1)
        c = cols + lo  # the block's columns; those of an earlier block are dropped
        keep = (c >= start) & jnp.where(use_n, c >= k, c < k)
        mb = jnp.where(keep, mb, jnp.zeros_like(mb))
        # acc - M_b (M_b^T G) or acc + N_b (N_b^T G); the sign flip is exact
        return acc + jnp.matmul(mb, sign * jnp.matmul(jnp.swapaxes(mb, -1, -2), g))

    acc = jnp.where(use_n, jnp.zeros_like(g), g)
    out = jax.lax.fori_loop(0, jnp.where(use_n, n_trips, m_trips), body, acc)
    if basis.ndim == 2 and blocks > 1:  # rank d reads no N block: exactly zero already
        return out
    return jnp.where(k >= d, jnp.zeros_like(out), out)  # rank d by M (one block, a batch)


def _num_new(captured: float, ratio: np.ndarray, threshold: float) -> int:
    """Fewest leading ``ratio`` entries that bring ``captured`` up to ``threshold``."""
    if captured >= threshold or ratio.size == 0:
        return 0
    reached = captured + np.cumsum(ratio) >= threshold
    return int(np.argmax(reached)) + 1 if reached.any() else int(ratio.size)


def _extend_basis(basis: np.ndarray, rep: np.ndarray, threshold: float) -> np.ndarray:
    """GPM's basis update for one matrix: ``basis [d, k]``, ``rep [rows, d]`` (float64).

    Returns the new ``[d, k + r]`` basis, ``r >= 0`` the fewest residual directions whose
    energy, added to the energy of ``rep`` already in ``span(basis)``, reaches
    ``threshold`` times the total energy of ``rep`` (eq. 5 on the first task, eq. 8-9 after).
    """
    d, k = basis.shape
    total = float(np.sum(rep * rep))
    if total <= 0.0 or k >= d:
        return basis
    resid = rep - (rep @ basis) @ basis.T if k else rep
    u, s, _ = np.linalg.svd(resid.T, full_matrices=False)  # u [d, min(d, rows)]
    # Directions below float32 rounding of ``rep`` are noise, never protected.
    tol = np.sqrt(total) * max(rep.shape) * float(np.finfo(np.float32).eps)
    valid = s > tol
    u, s = u[:, valid], s[valid]
    captured = (total - float(np.sum(s * s))) / total if k else 0.0
    r = min(_num_new(captured, s * s / total, threshold), d - k)
    if r == 0:
        return basis
    new = u[:, :r]
    if k:  # re-orthogonalise against the stored (float32-rounded) basis
        new = new - basis @ (basis.T @ new)
    q, rr = np.linalg.qr(new)
    q = q * np.where(np.diag(rr) < 0, -1.0, 1.0)[None, :]
    return np.concatenate([basis, q], axis=1)


def _complement(basis: np.ndarray) -> np.ndarray:
    """The columns stored past the rank of ``basis [d, k]`` (float64): an orthonormal basis
    of the complement of its span (a complete QR) where :func:`project_out_basis` may read
    it, ``d / 2 < k < d`` with more than one block; zeros otherwise (as before it existed)."""
    d, k = basis.shape
    if not (d < 2 * k < 2 * d and _blocks(d)[1] > 1):
        return np.zeros((d, d - k))
    return np.linalg.qr(basis, mode="complete")[0][:, k:]


def _check_threshold(name: str, t: Any) -> float:
    t = float(t)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"gpm_update_bases: threshold for '{name}' must be in (0, 1], got {t}.")
    return t


def _update_state(state: GPMState, reps: dict, threshold: Any) -> GPMState:
    bases = _common.projected(state.bases)
    ranks = _common.projected(state.rank)
    names = list(bases)
    new_bases, new_ranks = {}, {}
    for name, m in bases.items():
        rank = ranks[name]
        batch_shape, d = m.shape[:-2], m.shape[-1]
        thr = _check_threshold(name, _common.per_leaf(threshold, name, "threshold", names))
        x = reps.get(name)
        if x is not None:
            x = _common.check_input("gpm_update_bases", name, x, batch_shape, d)
            x = np.asarray(x, np.float64)
        elif m.shape == (1, 1):  # a bias: its representation is the constant input 1
            x = np.ones((1, 1))
        else:
            raise ValueError(
                f"gpm_update_bases: no representation for projected parameter '{name}' "
                f"(representations have {sorted(reps)[:8]}); pass [rows, d] under this path."
            )
        m_np = np.asarray(m, np.float64)
        rank_np = np.asarray(rank)
        out_m = np.zeros_like(m_np)
        out_r = np.zeros(batch_shape, np.int32)
        for idx in np.ndindex(*batch_shape):
            k = int(rank_np[idx])
            basis = _extend_basis(m_np[idx][:, :k], x[idx], thr)
            basis = np.asarray(basis.astype(m.dtype), np.float64)  # as stored
            out_m[idx][:, : basis.shape[1]] = basis
            out_m[idx][:, basis.shape[1] :] = _complement(basis)
            out_r[idx] = basis.shape[1]
        new_bases[name] = jnp.asarray(out_m, m.dtype)
        new_ranks[name] = jnp.asarray(out_r)
    return GPMState(
        bases=_common.with_projected(state.bases, new_bases),
        rank=_common.with_projected(state.rank, new_ranks),
        count=state.count + 1,
    )


def gpm_update_bases(
    state: Any,
    representations: dict[str, Any],
    threshold: float | dict[str, float],
) -> Any:
    r"""Adds a task's significant input directions to every GPM basis (Algorithm 1).

    Runs once per task, after training on it, in float64 NumPy (not jitted). For each
    projected parameter with representation ``R [rows, d]`` (rows = layer inputs of
    examples of the task) and current orthonormal basis ``M [d, k]``:

    - the energy already protected is ``||M M^T R||^2`` (zero on the first task);
    - the residual ``R - R M M^T`` is decomposed by SVD;
    - the fewest leading residual directions are added such that protected energy plus
      their energy reaches ``threshold * ||R||_F^2`` (eq. 5 and eq. 9 of the paper); none
      when the basis already holds that much. The basis never exceeds ``d`` columns.

    On the first task this keeps the smallest ``k`` with cumulative energy ``>= threshold``
    (the paper's eq. 5). The authors' code keeps one fewer there (its ``+1`` is commented
    out); later tasks agree with the code.

    Args:
      state: a :class:`GPMState`, or any optimizer state containing some (a chain), whose
        every :class:`GPMState` is updated.
      representations: ``{path: [rows, d]}`` layer inputs keyed like
        :func:`rgo_jax.layouts.path_str` of the parameter (or by the tuple path, as the
        models' ``return_inputs`` give): dense ``[n, in]``, conv im2col
        patches ``[n*H'*W', kh*kw*cin]`` in HWIO-flatten order; ``[*batch, rows, d]`` for a
        stacked layout. Extra keys are ignored; a projected bias needs no entry (input 1).
      threshold: energy fraction in ``(0, 1]``, a scalar or a dict ``path -> float``
        covering every projected parameter (the paper uses 0.95-0.99, rising per task).

    A basis past half its dimension is stored with an orthonormal basis of its complement in
    the columns past its rank (:class:`GPMState`), from which the step projects, more
    cheaply; a state from an earlier version, zero there, gets it at its next update.

    Returns:
      The state with extended bases and ranks, ``count`` increased by one.
    """
    reps = _common.path_keyed(representations, "gpm_update_bases representations")
    if isinstance(threshold, dict):
        threshold = _common.path_keyed(threshold, "gpm_update_bases threshold")
    return _common.map_states(
        GPMState, lambda s: _update_state(s, reps, threshold), state, "gpm_update_bases"
    )
