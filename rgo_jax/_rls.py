"""Recursive-least-squares (RLS) kernels for the RGO projection matrices.

Every kernel works on a stack of matrices ``p: [k, d, d]`` and vectors ``v: [n, k, d]`` (``n``
vectors for each of ``k`` independent matrices) and returns the updated stack and the
number of vectors it skipped. A vector that is not finite is replaced by zero, and a zero
vector leaves P unchanged, so a bad batch can never corrupt P.

With ``P_0 = I`` the recursion gives ``P = alpha (alpha I + sum_i v_i v_i^T)^{-1}``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

__all__ = ["rls_block", "rls_sequential", "rls_step"]

_HI = jax.lax.Precision.HIGHEST


def _sanitize(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zeroes non-finite vectors (last axis); returns them and a bool mask of the bad ones."""
    bad = ~jnp.all(jnp.isfinite(v), axis=-1)
    return jnp.where(bad[..., None], jnp.zeros_like(v), v), bad


def _step_one(p: jax.Array, v: jax.Array, alpha: jax.Array) -> jax.Array:
    """One rank-one step for a single ``[d, d]`` P and ``[d]`` v.

    ``P <- P - (P v)(P v)^T / (alpha + v^T P v)``. The outer product is formed as
    ``(u u^T) * (1 / denom)`` so that a symmetric P stays exactly symmetric in floating
    point, and ``v^T P v`` is clipped at zero so the denominator is at least ``alpha``.
    """
    u = jnp.matmul(p, v, precision=_HI)
    denom = alpha + jnp.maximum(jnp.dot(v, u, precision=_HI), 0.0)
    return p - jnp.outer(u, u) * (1.0 / denom)


def _each_matrix(fn, *args, in_axes):
    """``fn`` (one ``[d, d]`` P, the first argument) for each of the ``k`` matrices of
    ``args[0] [k, d, d]``: a ``jax.vmap`` over ``in_axes``, or, for ``k = 1``, ``fn`` on the
    one matrix unbatched (XLA:CPU runs a batch of one slower: a rank-one step 2.4x at
    d = 784, where unbatched it updates P in place; the block kernel 1.03-1.08x)."""
    if args[0].shape[0] == 1:
        pairs = zip(args, in_axes, strict=True)
        one = [a if ax is None else jnp.take(a, 0, axis=ax) for a, ax in pairs]
        return fn(*one)[None]
    return jax.vmap(fn, in_axes=in_axes)(*args)


def rls_step(p: jax.Array, v: jax.Array, alpha: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """One rank-one RLS step for each of ``k`` matrices: ``p [k,d,d]``, ``v [k,d]``.

    Returns ``(p_new, skipped)`` with ``skipped`` a bool ``[k]`` (non-finite vectors).
    """
    v, bad = _sanitize(v.astype(p.dtype))
    alpha = jnp.asarray(alpha, p.dtype)
    return _each_matrix(_step_one, p, v, alpha, in_axes=(0, 0, None)), bad


def rls_sequential(
    p: jax.Array, v: jax.Array, alpha: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``n`` rank-one steps in order (a ``lax.scan``): ``p [k,d,d]``, ``v [n,k,d]``.

    Returns ``(p_new, skipped)`` with ``skipped`` an int32 ``[k]`` count.
    """

    def body(carry, vi):
        carry, bad = rls_step(carry, vi, alpha)
        return carry, bad

    p, bad = jax.lax.scan(body, p, v)
    return p, jnp.sum(bad, axis=0, dtype=jnp.int32)


_BASE = 32  # the block kernel's b x b inverse: loops of plain array ops up to this size


def _factor_column(
    c: jax.Array, low: jax.Array, j: jax.Array, start: jax.Array | int, floor: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Column ``j`` of the left-looking Cholesky factor of a panel ``c [r, b]`` whose
    diagonal block starts at row ``start``: ``low`` with that column set, and the pivot
    before its floor. Columns ``>= j`` of ``low`` must still be zero, so the full product
    subtracts exactly the contribution of the columns already factored."""
    x = c[:, j] - jnp.matmul(low, low[start + j], precision=_HI)
    pivot = jnp.sqrt(jnp.maximum(x[start + j], floor))
    at = jnp.arange(c.shape[0]) - start
    low = low.at[:, j].set(jnp.where(at == j, pivot, jnp.where(at > j, x / pivot, 0.0)))
    return low, x[start + j]


def _cholesky_panel(
    c: jax.Array, start: jax.Array | int, floor: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of a column panel ``c [r, b]`` whose diagonal block starts at row
    ``start``, column by column (rows above ``start`` come back zero).

    Plain array ops rather than ``jnp.linalg.cholesky``: vmapped over layers that is one
    batched LAPACK call, which splits its batch over XLA:CPU's intra-op thread pool and waits
    for the pieces. Two such calls running at once (two size buckets of one consolidation)
    can each hold a worker while waiting for pieces queued behind the other: on a 2-thread
    pool the program deadlocks at 0 % CPU (seen with the ResNet-18 of the CIFAR-100
    config). Each pivot (the diagonal of the Schur complement) is raised to at least
    ``floor`` before its square root; in exact arithmetic that factors ``m + E`` with ``E``
    diagonal and ``E >= 0`` (a modified Cholesky). Returns the factor and the smallest
    pivot before the floor (``> floor`` everywhere means no entry was raised; NaN if ``c``
    is not finite).
    """

    def column(j, carry):
        low, least = carry
        low, raw = _factor_column(c, low, j, start, floor)
        return low, _nanmin(least, raw)

    init = (jnp.zeros_like(c), jnp.full_like(c[0, 0], jnp.inf))  # like c: varying in shard_map
    return jax.lax.fori_loop(0, c.shape[1], column, init)


def _chol_inv_small(m: jax.Array) -> jax.Array:
    """``L^{-1}`` for the Cholesky factor ``L`` of a small SPD ``[b, b]`` (``b <= _BASE``).

    One loop over ``j``: column ``j`` of ``L`` (:func:`_factor_column`, as in the check),
    which completes row ``j`` of ``L``, then row ``j`` of ``L^{-1}`` by forward substitution.
    One loop instead of a factor loop and an inverse loop: measured on one CPU core, with
    blocks of 32 rather than 16, the block kernel (``block_size=64``) runs 1.4x faster at
    ``d = 64`` and 1.1x at ``d = 256`` and ``784``, and compiles in two thirds of the time.
    ``m`` is ``alpha I + V P V^T`` in the block kernel; the pivot is clipped at a tiny
    positive value.
    """
    tiny = jnp.finfo(m.dtype).tiny
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)

    def step(j, carry):
        low, inv = carry
        low, _ = _factor_column(m, low, j, 0, tiny)
        # Rows >= j of ``inv`` are still zero and row j of ``low`` is now complete.
        inv = inv.at[j].set((eye[j] - jnp.matmul(low[j], inv, precision=_HI)) / low[j, j])
        return low, inv

    zero = jnp.zeros_like(m)
    return jax.lax.fori_loop(0, m.shape[-1], step, (zero, zero))[1]


def _chol_inv(m: jax.Array, small=_chol_inv_small) -> jax.Array:
    """``L^{-1}`` for the Cholesky factor ``L`` of a symmetric positive definite ``[b, b]``.

    Recursive blocking (``L21 = B L11^{-T}``, Schur complement ``C - L21 L21^T``) down to
    blocks of at most ``_BASE``, factored and inverted by ``small`` (default
    :func:`_chol_inv_small`; the benchmarks swap in other forms of it): matrix
    products only, no LAPACK call (see :func:`_cholesky_panel` for the deadlock that
    avoids; XLA:CPU's Cholesky was also measured ~1000x slower at 256 x 256 than at
    128 x 128).
    """
    b = m.shape[-1]
    if b <= _BASE:
        return small(m)
    h = b // 2
    l11i = _chol_inv(m[:h, :h], small)
    l21 = jnp.matmul(m[h:, :h], l11i.T, precision=_HI)
    s = m[h:, h:] - jnp.matmul(l21, l21.T, precision=_HI)
    l22i = _chol_inv(0.5 * (s + s.T), small)
    low = -jnp.matmul(l22i, jnp.matmul(l21, l11i, precision=_HI), precision=_HI)
    top = jnp.concatenate([l11i, jnp.zeros((h, b - h), m.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([low, l22i], axis=1)], axis=0)


def _block_one(p: jax.Array, v: jax.Array, alpha: jax.Array, inverse=_chol_inv) -> jax.Array:
    """Woodbury update of one ``[d, d]`` P by a block ``v [b, d]``.

    ``P <- P - P V^T (alpha I + V P V^T)^{-1} V P``, which equals ``b`` sequential rank-one
    steps in exact arithmetic. With ``M = alpha I + V P V^T = L L^T`` (Cholesky) and
    ``W = L^{-1} V P``, the update is the Gram product ``P - W^T W``. ``L^{-1}`` is the
    inverse of a ``b x b`` triangle (:func:`_chol_inv`), so the only ``O(d)``-sized work is
    three matrix products; ``cho_solve`` against the ``[b, d]`` right-hand side was
    measured 3-6x slower on CPU (``inverse``: the benchmarks swap in other forms of
    :func:`_chol_inv`). The caller symmetrises P once after all blocks.
    """
    b = v.shape[0]
    u = jnp.matmul(v, p, precision=_HI)  # [b, d] = V P
    m = jnp.matmul(u, v.T, precision=_HI)  # [b, b] = V P V^T
    m = 0.5 * (m + m.T) + alpha * jnp.eye(b, dtype=p.dtype)
    w = jnp.matmul(inverse(m), u, precision=_HI)  # [b, d] = L^-1 V P
    return p - jnp.matmul(w.T, w, precision=_HI)


def _blocks_one(p: jax.Array, blocks: jax.Array, alpha: jax.Array, inverse=_chol_inv):
    """:func:`_block_one` over ``blocks [nb, b, d]`` in order for one P, then one
    symmetrisation (a transpose of P per block costs as much as a block's products for
    large d)."""
    p = jax.lax.scan(lambda c, blk: (_block_one(c, blk, alpha, inverse), None), p, blocks)[0]
    return 0.5 * (p + p.T)


def rls_block(
    p: jax.Array,
    v: jax.Array,
    alpha: float | jax.Array,
    *,
    block_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """``n`` vectors applied in blocks of ``block_size`` by the Woodbury identity.

    Equals :func:`rls_sequential` in exact arithmetic (the result does not depend on the
    order of the vectors). ``n`` is padded with zero vectors to a multiple of the block.

    Args:
      p: ``[k, d, d]`` matrices.
      v: ``[n, k, d]`` vectors.
      alpha: the RLS regulariser (> 0).
      block_size: vectors per Woodbury solve; larger is faster but the ``b x b`` system is
        worse conditioned in float32.

    Returns:
      ``(p_new, skipped)`` with ``skipped`` an int32 ``[k]`` count of non-finite vectors.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    v, bad = _sanitize(v.astype(p.dtype))
    n = v.shape[0]
    alpha = jnp.asarray(alpha, p.dtype)
    b = min(block_size, n)
    pad = (-n) % b
    if pad:
        v = jnp.concatenate([v, jnp.zeros((pad, *v.shape[1:]), v.dtype)], axis=0)
    blocks = v.reshape(-1, b, *v.shape[1:])  # [nb, b, k, d]
    p = _each_matrix(_blocks_one, p, blocks, alpha, in_axes=(0, 2, None))
    return p, jnp.sum(bad, axis=0, dtype=jnp.int32)


_PANEL = 32  # block columns of :func:`_cholesky`


def _nanmin(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(a) | jnp.isnan(b), jnp.nan, jnp.minimum(a, b))


def _cholesky(m: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of a symmetric ``[d, d]`` and its smallest pivot (no LAPACK).

    Left-looking over block columns of ``_PANEL``: each column block ``A[:, J] - L L[J]^T``
    is factored by :func:`_cholesky_panel` (with ``floor`` > 0 the result is a modified
    Cholesky factor of ``m`` plus a non-negative diagonal). One ``lax.fori_loop`` over the
    block columns (one compiled body whatever ``d``; a recursive blocking unrolled per level
    compiles for minutes at ``d = 784``) costs ``2 d^3`` flops: its product runs over the
    whole factor. From ``d = 2048`` the block columns run in up to ``_GROUPS`` consecutive
    groups, one loop each, whose product reads only the rows from the group's first block
    column down and the columns that can be non-zero: ``2 d^3 sum_i (g - i)(i + 1) / g^3``
    flops for ``g`` groups (``0.47 d^3`` for 8). Measured on one CPU core, 2.2x (d = 2304)
    and 2.4x (d = 4608) faster, for ~2 s more compile time per size of P (so smaller P keep
    the single loop, and its float32 results bit for bit).
    """
    d = m.shape[-1]
    b = min(_PANEL, d)
    pad = (-d) % b
    if pad:  # an identity block below: pivots 1, no coupling
        m = jnp.block(
            [
                [m, jnp.zeros((d, pad), m.dtype)],
                [jnp.zeros((pad, d), m.dtype), jnp.eye(pad, dtype=m.dtype)],
            ]
        )
    size = d + pad
    blocks = size // b
    groups = 1 if blocks < _MIN_BLOCKS_TO_GROUP else min(_GROUPS, blocks // _GROUP_BLOCKS)
    bounds = [round(i * blocks / groups) for i in range(groups + 1)]
    low, least = jnp.zeros_like(m), jnp.full_like(m[0, 0], jnp.inf)
    for lo, hi in itertools.pairwise(bounds):
        top = lo * b  # rows above are finished: zero in every column from here on
        # Columns at or past any block's start in this group are zero (one group: every
        # column, the product of the plain left-looking loop).
        cols = size if groups == 1 else (hi - 1) * b

        def column_block(j, carry, top=top, cols=cols):
            low, least = carry
            start = j * b
            c = jax.lax.dynamic_slice(m, (top, start), (size - top, b))
            if cols:  # minus the contribution of the column blocks already factored
                done = jax.lax.dynamic_slice(low, (start, 0), (b, cols))
                c = c - jnp.matmul(low[top:, :cols], done.T, precision=_HI)
            panel, least_j = _cholesky_panel(c, start - top, floor)
            low = jax.lax.dynamic_update_slice(low, panel, (top, start))
            return low, _nanmin(least, least_j)

        low, least = jax.lax.fori_loop(lo, hi, column_block, (low, least))
    return low[:d, :d], least


_GROUPS = 8  # static groups of block columns in :func:`_cholesky`, for large P only:
_MIN_BLOCKS_TO_GROUP = 64  # d >= 2048 (smaller P: one loop, ~2 s less compile per size)
_GROUP_BLOCKS = 8  # at least this many block columns per group


# A stored P must factor with every pivot above this fraction of its largest diagonal entry:
# positive definite at float32 resolution (2^-24 is half a float32 ulp of 1).
PD_TOLERANCE = 2.0**-24


def _pd_floor(p: jax.Array) -> jax.Array:
    top = jnp.max(jnp.diagonal(p))
    return jnp.maximum(PD_TOLERANCE * top, jnp.finfo(p.dtype).tiny)


def _factor_checked(x: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Modified Cholesky factors of ``x [k, d, d]`` (pivot floors ``floor [k]``) and whether
    each ``x`` is finite and positive definite at float32 resolution (every pivot above
    ``_pd_floor``)."""
    low, least = jax.vmap(_cholesky)(x, floor)
    finite = jnp.all(jnp.isfinite(x), axis=(-2, -1))
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return low, finite & (least > jax.vmap(_pd_floor)(jnp.where(finite[:, None, None], x, eye)))


def is_positive_definite(p: jax.Array) -> jax.Array:
    """Whether a symmetric ``[d, d]`` P is finite and positive definite at float32 resolution.

    True when the float32 Cholesky factorisation of P succeeds with every pivot above
    ``PD_TOLERANCE`` times the largest diagonal entry (``O(d^3)``, no LAPACK call).
    """
    return _factor_checked(p[None], jnp.full((1,), jnp.finfo(p.dtype).tiny))[1][0]


def _unit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x / |x|, |x|)`` without overflow or underflow in the squares; ``(0, 0)`` for 0."""
    top = jnp.max(jnp.abs(x))
    scaled = jnp.where(top > 0, x / jnp.where(top > 0, top, 1.0), 0.0)
    length = jnp.sqrt(jnp.sum(scaled * scaled))
    unit = jnp.where(length > 0, scaled / jnp.where(length > 0, length, 1.0), 0.0)
    return unit, top * length


def _potter_one(s: jax.Array, v: jax.Array, alpha: jax.Array) -> jax.Array:
    r"""One rank-one RLS step in square-root form (Potter): ``S <- S (I - c h h^T)``.

    With ``P = S S^T``, ``f = S^T v = |f| h`` and ``t = sqrt(alpha) / |f|``,

    .. math::  c = \frac{1}{1 + t^2 + t \sqrt{1 + t^2}}

    gives ``S' S'^T = P - (P v)(P v)^T / (alpha + v^T P v)``, the step of :func:`_step_one`.
    ``S S^T`` is positive semi-definite whatever the rounding, the denominator is a sum of
    squares, and every quantity is scaled (``h`` is a unit vector, ``c`` lies in
    ``[0, 1]``), so no vector norm overflows or underflows.
    """
    vh, vlen = _unit(v)
    f = jnp.matmul(s.T, vh, precision=_HI)  # S^T v / |v|
    h, flen = _unit(f)
    t = jnp.sqrt(alpha) / vlen / flen  # sqrt(alpha) / |S^T v|; inf for a zero vector
    t2 = t * t
    c = 1.0 / (1.0 + t2 + t * jnp.sqrt(1.0 + t2))
    return s - jnp.outer(jnp.matmul(s, h, precision=_HI), h * c)


def _potter_steps(s: jax.Array, v: jax.Array, alpha: jax.Array) -> jax.Array:
    """``n`` Potter steps in order on factors ``s [k, d, d]``; returns ``S S^T`` (symmetric)."""

    def body(carry, vi):
        return jax.vmap(_potter_one, in_axes=(0, 0, None))(carry, vi, alpha), None

    s, _ = jax.lax.scan(body, s, v)
    q = jnp.matmul(s, jnp.swapaxes(s, -1, -2), precision=_HI)
    return 0.5 * (q + jnp.swapaxes(q, -1, -2))


def _start_factor(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The matrix and pivot floor whose modified Cholesky factor starts the Potter steps.

    The floor is ``PD_TOLERANCE`` times the largest diagonal entry (where rounding left P at
    the edge of definiteness); a non-finite P becomes NaN (and its update is refused).
    """
    finite = jnp.all(jnp.isfinite(p))
    return jnp.where(finite, 0.5 * (p + p.T), jnp.nan), _pd_floor(p)


def rls_square_root(p: jax.Array, v: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """The rank-one RLS steps of :func:`rls_sequential` on a square-root factor of each P.

    Factors ``P = S S^T`` (:func:`_start_factor`), runs the ``n`` steps in order by
    :func:`_potter_one` and returns ``S S^T`` (symmetrised). For ``p [k, d, d]`` and
    ``v [n, k, d]`` (non-finite vectors must already be zeroed).
    """
    m, floor = jax.vmap(_start_factor)(p)
    s = jax.vmap(_cholesky)(m, floor)[0]
    return _potter_steps(s, v, jnp.asarray(alpha, p.dtype))


def _store(p: jax.Array, dtype) -> jax.Array:
    return p.astype(dtype).astype(p.dtype)


def _not_grown(p_new: jax.Array, p_old: jax.Array) -> jax.Array:
    """Finite, and no diagonal entry grown: an RLS step never increases P, so growth beyond
    rounding means the recursion went unstable."""
    d_new, d_old = jnp.diagonal(p_new), jnp.diagonal(p_old)
    grown = jnp.any(d_new > d_old + 1e-4 * jnp.max(d_old))
    return jnp.all(jnp.isfinite(p_new)) & ~grown


def _fast_kernel(p, v, alpha, method, block_size, dtype):
    """The plain kernel's result rounded to ``dtype``, its skipped counts, and whether it is
    finite with no diagonal entry grown (:func:`_not_grown`)."""
    if method == "sequential":
        fast, skipped = rls_sequential(p, v, alpha)
    elif method == "block":
        fast, skipped = rls_block(p, v, alpha, block_size=block_size)
    else:
        raise ValueError(f"Unknown RLS method {method!r}; use 'sequential' or 'block'.")
    return _store(fast, dtype), skipped, jax.vmap(_not_grown)(fast, p)


def rls_checked(
    p: jax.Array,
    v: jax.Array,
    alpha: float | jax.Array,
    *,
    method: str = "block",
    block_size: int = 64,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first phase of :func:`rls_safe` alone: the fast kernel and its check.

    Returns ``(p_new, skipped, accepted)``: where ``accepted`` (bool ``[k]``), ``p_new`` is
    bit for bit what :func:`rls_safe` returns; elsewhere it is the unchecked fast result and
    :func:`rls_safe` must run. Compiles in about half the time of :func:`rls_safe` (no
    square-root fallback, no repair loop), for a caller that can run :func:`rls_safe` after
    it only when something was not accepted.
    """
    alpha = jnp.asarray(alpha, p.dtype)
    fast, skipped, sane = _fast_kernel(p, v, alpha, method, block_size, dtype)
    _, pd = _factor_checked(fast, jnp.full(p.shape[:1], jnp.finfo(p.dtype).tiny))
    return fast, skipped, sane & pd


_FAST, _FACTOR, _REPAIR, _DONE = 0, 1, 2, 3
_REPAIR_TRIES = 24


def rls_safe(
    p: jax.Array,
    v: jax.Array,
    alpha: float | jax.Array,
    *,
    method: str = "block",
    block_size: int = 64,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The RLS update of :func:`rgo_jax.update_projection`: fast kernel, checked, with a
    square-root fallback, so that every stored P is finite and positive definite.

    1. The fast kernel (:func:`rls_block` or :func:`rls_sequential`) runs as before; where
       its result, rounded to ``dtype``, is finite, has no diagonal entry grown and passes
       :func:`is_positive_definite`, it is returned unchanged (bit for bit).
    2. Only where it fails (float32 cannot resolve ``alpha / |v|^2``, a vector overflows
       ``v^T P v``, P has collected eigenvalues below float32 resolution, or bfloat16
       rounding made it indefinite), the same steps rerun from the old P in square-root
       form (:func:`_potter_one`, from a modified Cholesky factor of the old P), and the
       result is raised by the smallest ``delta I`` (``delta`` in ``0, f, 4 f, 16 f, ...``,
       ``f = PD_TOLERANCE * max diag``) that is positive definite once rounded to ``dtype``.
    3. If even that fails (P was not finite on entry), the update is refused.

    One ``lax.while_loop`` over these phases, with one Cholesky factorisation in its body,
    so that the check and the fallback compile once.

    Args:
      p: ``[k, d, d]`` float32 matrices (values as stored).
      v: ``[n, k, d]`` vectors.
      alpha: the RLS regulariser (> 0).
      method: the fast kernel, ``"block"`` or ``"sequential"``.
      block_size: vectors per Woodbury solve of the block kernel.
      dtype: the dtype P is stored in; the result is rounded to it (returned as float32).

    Returns:
      ``(p_new, skipped, status)``: ``skipped`` an int32 ``[k]`` count of non-finite
      vectors, ``status`` an int32 ``[k]``: 0 fast kernel, 1 square-root fallback,
      2 refused (``p_new`` is then the old ``p``).
    """
    alpha = jnp.asarray(alpha, p.dtype)
    fast, skipped, sane = _fast_kernel(p, v, alpha, method, block_size, dtype)
    start, start_floor = jax.vmap(_start_factor)(p)
    vz, _ = _sanitize(v.astype(p.dtype))
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    tiny = jnp.full(p.shape[:1], jnp.finfo(p.dtype).tiny)

    def cond(c):
        return c["phase"] != _DONE

    def body(c):
        phase = c["phase"]
        # The one factorisation: the fast result, the old P (to start Potter), or a repair.
        x = jnp.where(phase == _FACTOR, start, c["candidate"])
        low, pd = _factor_checked(x, jnp.where(phase == _FACTOR, start_floor, tiny))
        accepted = jnp.where(phase == _FAST, sane & pd, c["accepted"])
        robust = jax.lax.cond(
            phase == _FACTOR, lambda: _potter_steps(low, vz, alpha), lambda: c["robust"]
        )
        ok = jnp.where(phase == _REPAIR, c["ok"] | pd, c["ok"])
        tries = c["tries"] + (phase == _REPAIR).astype(jnp.int32) * (~ok)
        hopeless = ~jnp.all(jnp.isfinite(robust), axis=(-2, -1))
        settled = accepted | ok | hopeless | (tries >= _REPAIR_TRIES)
        shift = jnp.where(tries > 0, 4.0 ** (tries - 1).astype(p.dtype), 0.0)
        shift = shift * jax.vmap(_pd_floor)(jnp.where(hopeless[:, None, None], eye, robust))
        candidate = jnp.where(
            phase == _FAST, c["candidate"], _store(robust + shift[:, None, None] * eye[None], dtype)
        )
        candidate = jnp.where(((phase == _REPAIR) & ok)[:, None, None], c["candidate"], candidate)
        following = jnp.where(
            phase == _FAST,
            jnp.where(jnp.all(accepted), _DONE, _FACTOR),
            jnp.where(phase == _FACTOR, _REPAIR, jnp.where(jnp.all(settled), _DONE, _REPAIR)),
        )
        return {
            "phase": following,
            "accepted": accepted,
            "robust": robust,
            "ok": ok,
            "tries": tries,
            "candidate": candidate,
        }

    # Built from p so that, inside shard_map, the carry varies over the axes p varies over.
    no = jnp.zeros_like(p[:, 0, 0], bool)
    init = {
        "phase": jnp.zeros_like(p[0, 0, 0], jnp.int32) + _FAST,
        "accepted": no,
        "robust": p,
        "ok": no,
        "tries": jnp.zeros_like(p[:, 0, 0], jnp.int32),
        "candidate": fast,
    }
    c = jax.lax.while_loop(cond, body, init)
    keep = c["accepted"][:, None, None]
    out = jnp.where(keep, fast, jnp.where(c["ok"][:, None, None], c["candidate"], p))
    status = jnp.where(c["accepted"], 0, jnp.where(c["ok"], 1, 2)).astype(jnp.int32)
    return out, skipped, status


def saturating_add(counter: jax.Array, n: jax.Array) -> jax.Array:
    """``counter + n`` (``n >= 0``) for an integer counter, stopping at its dtype's maximum
    (``2**31 - 1`` for int32) instead of wrapping to negative values."""
    top = jnp.iinfo(counter.dtype).max
    n = jnp.asarray(n, counter.dtype)
    return jnp.where(counter > top - n, top, counter + n)


NOT_CHECKED = -1  # status of run_rls(checked_only=True) where rls_safe must run


@functools.partial(jax.jit, static_argnames=("method", "block_size", "dtype", "checked_only"))
def run_rls(
    p: jax.Array,
    v: jax.Array,
    alpha: jax.Array,
    *,
    method: str = "sequential",
    block_size: int = 64,
    dtype=jnp.float32,
    checked_only: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Jitted :func:`rls_safe` used by :func:`rgo_jax.update_projection` for one size bucket.

    With ``checked_only``, :func:`rls_checked` instead: status 0 where the fast result was
    accepted, ``NOT_CHECKED`` where :func:`rls_safe` must run (``p_new`` is then the old P).
    """
    p = p.astype(jnp.float32)
    if not checked_only:
        return rls_safe(p, v, alpha, method=method, block_size=block_size, dtype=dtype)
    fast, skipped, accepted = rls_checked(
        p, v, alpha, method=method, block_size=block_size, dtype=dtype
    )
    out = jnp.where(accepted[:, None, None], fast, p)
    return out, skipped, jnp.where(accepted, 0, NOT_CHECKED).astype(jnp.int32)
