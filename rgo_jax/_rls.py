"""Recursive-least-squares (RLS) kernels for the RGO projection matrices.

Every kernel works on a stack of matrices ``p: [k, d, d]`` and vectors ``v: [n, k, d]`` (``n``
vectors for each of ``k`` independent matrices) and returns the updated stack and the
number of vectors it skipped. A vector that is not finite is replaced by zero, and a zero
vector leaves P unchanged, so a bad batch can never corrupt P.

With ``P_0 = I`` the recursion gives ``P = alpha (alpha I + sum_i v_i v_i^T)^{-1}``.
"""

from __future__ import annotations

import functools

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


def rls_step(p: jax.Array, v: jax.Array, alpha: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """One rank-one RLS step for each of ``k`` matrices: ``p [k,d,d]``, ``v [k,d]``.

    Returns ``(p_new, skipped)`` with ``skipped`` a bool ``[k]`` (non-finite vectors).
    """
    v, bad = _sanitize(v.astype(p.dtype))
    alpha = jnp.asarray(alpha, p.dtype)
    return jax.vmap(_step_one, in_axes=(0, 0, None))(p, v, alpha), bad


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


_BASE = 16  # triangle and Cholesky blocks up to this size: loops of plain array ops


def _cholesky_small(m: jax.Array) -> jax.Array:
    """Lower Cholesky factor of a small SPD ``[b, b]`` (``b <= _BASE``), column by column.

    Plain array ops rather than ``jnp.linalg.cholesky``: vmapped over layers that is one
    batched LAPACK call, which splits its batch over XLA:CPU's intra-op thread pool and waits
    for the pieces. Two such calls running at once (two size buckets of one consolidation)
    can each hold a worker while waiting for pieces queued behind the other: on a 2-thread
    pool the program deadlocks at 0 % CPU (seen with the ResNet-18 of the CIFAR-100
    config). The pivot is clipped at a tiny positive value; ``m`` is ``alpha I + V P V^T``.
    """
    rows = jnp.arange(m.shape[-1])

    def column(j, low):
        # Columns >= j of ``low`` are still zero, so the full product subtracts exactly the
        # contribution of the columns already factored.
        c = m[:, j] - jnp.matmul(low, low[j], precision=_HI)
        pivot = jnp.sqrt(jnp.maximum(c[j], jnp.finfo(m.dtype).tiny))
        return low.at[:, j].set(jnp.where(rows == j, pivot, jnp.where(rows > j, c / pivot, 0.0)))

    return jax.lax.fori_loop(0, m.shape[-1], column, jnp.zeros_like(m))


def _tril_inv_small(low_tri: jax.Array) -> jax.Array:
    """Inverse of a small lower-triangular ``[b, b]`` by forward substitution (no LAPACK)."""
    eye = jnp.eye(low_tri.shape[-1], dtype=low_tri.dtype)

    def row(i, inv):
        # Rows >= i of ``inv`` are still zero and ``low_tri[i, i + 1:]`` is zero.
        return inv.at[i].set((eye[i] - jnp.matmul(low_tri[i], inv, precision=_HI)) / low_tri[i, i])

    return jax.lax.fori_loop(0, low_tri.shape[-1], row, jnp.zeros_like(low_tri))


def _tril_inv(low_tri: jax.Array) -> jax.Array:
    """Inverse of a lower-triangular ``[b, b]`` matrix by recursive 2 x 2 blocking.

    ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``: matrix products, down to
    blocks of at most ``_BASE`` rows solved by :func:`_tril_inv_small`.
    """
    b = low_tri.shape[-1]
    if b <= _BASE:
        return _tril_inv_small(low_tri)
    h = b // 2
    ai, di = _tril_inv(low_tri[:h, :h]), _tril_inv(low_tri[h:, h:])
    low = -jnp.matmul(di, jnp.matmul(low_tri[h:, :h], ai, precision=_HI), precision=_HI)
    top = jnp.concatenate([ai, jnp.zeros((h, b - h), low_tri.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([low, di], axis=1)], axis=0)


def _chol_inv(m: jax.Array) -> jax.Array:
    """``L^{-1}`` for the Cholesky factor ``L`` of a symmetric positive definite ``[b, b]``.

    Recursive blocking (``L21 = B L11^{-T}``, Schur complement ``C - L21 L21^T``) down to
    blocks of at most ``_BASE``, factored by :func:`_cholesky_small`: matrix products only,
    no LAPACK call (see :func:`_cholesky_small` for the deadlock that avoids; XLA:CPU's
    Cholesky was also measured ~1000x slower at 256 x 256 than at 128 x 128).
    """
    b = m.shape[-1]
    if b <= _BASE:
        return _tril_inv_small(_cholesky_small(m))
    h = b // 2
    l11i = _chol_inv(m[:h, :h])
    l21 = jnp.matmul(m[h:, :h], l11i.T, precision=_HI)
    s = m[h:, h:] - jnp.matmul(l21, l21.T, precision=_HI)
    l22i = _chol_inv(0.5 * (s + s.T))
    low = -jnp.matmul(l22i, jnp.matmul(l21, l11i, precision=_HI), precision=_HI)
    top = jnp.concatenate([l11i, jnp.zeros((h, b - h), m.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([low, l22i], axis=1)], axis=0)


def _block_one(p: jax.Array, v: jax.Array, alpha: jax.Array) -> jax.Array:
    """Woodbury update of one ``[d, d]`` P by a block ``v [b, d]``.

    ``P <- P - P V^T (alpha I + V P V^T)^{-1} V P``, which equals ``b`` sequential rank-one
    steps in exact arithmetic. With ``M = alpha I + V P V^T = L L^T`` (Cholesky) and
    ``W = L^{-1} V P``, the update is the Gram product ``P - W^T W``. ``L^{-1}`` is the
    inverse of a ``b x b`` triangle (:func:`_chol_inv`), so the only ``O(d)``-sized work is
    three matrix products; ``cho_solve`` against the ``[b, d]`` right-hand side was
    measured 3-6x slower on CPU. The caller symmetrises P once after all blocks.
    """
    b = v.shape[0]
    u = jnp.matmul(v, p, precision=_HI)  # [b, d] = V P
    m = jnp.matmul(u, v.T, precision=_HI)  # [b, b] = V P V^T
    m = 0.5 * (m + m.T) + alpha * jnp.eye(b, dtype=p.dtype)
    w = jnp.matmul(_chol_inv(m), u, precision=_HI)  # [b, d] = L^-1 V P
    return p - jnp.matmul(w.T, w, precision=_HI)


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
    b = min(block_size, n)
    pad = (-n) % b
    if pad:
        v = jnp.concatenate([v, jnp.zeros((pad, *v.shape[1:]), v.dtype)], axis=0)
    blocks = v.reshape(-1, b, *v.shape[1:])  # [nb, b, k, d]
    alpha = jnp.asarray(alpha, p.dtype)
    update = jax.vmap(_block_one, in_axes=(0, 1, None))  # over k

    def body(carry, blk):
        return update(carry, blk, alpha), None

    p, _ = jax.lax.scan(body, p, blocks)
    # One symmetrisation after all blocks (a transpose of P per block costs as much as a
    # block's products for large d).
    p = 0.5 * (p + jnp.swapaxes(p, -1, -2))
    return p, jnp.sum(bad, axis=0, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("method", "block_size"))
def run_rls(
    p: jax.Array,
    v: jax.Array,
    alpha: jax.Array,
    *,
    method: str = "sequential",
    block_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Jitted dispatcher used by :func:`rgo_jax.update_projection` for one size bucket."""
    if method == "sequential":
        return rls_sequential(p, v, alpha)
    if method == "block":
        return rls_block(p, v, alpha, block_size=block_size)
    raise ValueError(f"Unknown RLS method {method!r}; use 'sequential' or 'block'.")
