"""Forms of the RLS block kernel that were measured against the library's and dropped.

For one ``[d, d]`` P and 1024 vectors (blocks of 64), timed in interleaved rounds
(``_common.time_calls``, compiled ahead of time):

* ``library``: :func:`rgo_jax.rls_block`;
* ``same loop, library inverse``: the block loop of this script (no sanitising of the
  vectors, no padding) with the library's ``b x b`` inverse, the reference of the rest;
* ``inverse: lapack`` / ``inverse: none``: the library's block loop with only the ``b x b``
  inverse swapped for ``jnp.linalg.cholesky`` + ``solve_triangular`` (LAPACK), or left out
  (a scaled copy of M: timing only), to show what the hand-written inverse costs;
* ``unroll K``: the base-block loop (``_rls._chol_inv_small``) with ``fori_loop(...,
  unroll=K)``;
* ``elementwise``: the same loop with elementwise products and sums instead of
  matrix-vector products (so that XLA fuses the loop body).

And the accuracy of the **information form** ``P <- L (I + L^T V^T V L / alpha)^{-1} L^T``
(``P = L L^T``, every vector in one ``d x d`` solve) against the Woodbury blocks, on the
vectors of ``tests/core/test_perf_features.py::test_block_kernel_many_blocks...`` (a
12-dimensional subspace of ``d = 40``): maximum entry error against the float64 closed form,
relative to the largest entry, and the time of both forms at d = 64 and 256.

Command (one core, single-threaded, as the width sweep)::

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" python benchmarks/perf/bench_rls_alternatives.py
"""

from __future__ import annotations

import _common as C
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

import rgo_jax
from rgo_jax import _rls

_HI = jax.lax.Precision.HIGHEST
ALPHA = 0.01


def _woodbury_with(inverse):
    """The library's block loop for one P (``_rls._blocks_one``) with the ``b x b`` factor
    inverse ``inverse(m)``; ``v [n, d]``, ``n`` a multiple of 64."""
    alpha = jnp.float32(ALPHA)
    return lambda p, v: _rls._blocks_one(p, v.reshape(-1, 64, v.shape[-1]), alpha, inverse)


def _lapack_inverse(m):
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return jsl.solve_triangular(jnp.linalg.cholesky(m), eye, lower=True)


def _base_loop(unroll: int = 1, elementwise: bool = False):
    """``_rls._chol_inv_small`` with ``unroll`` or elementwise products in its body."""

    def small(m):
        b, tiny = m.shape[-1], jnp.finfo(m.dtype).tiny
        eye, at = jnp.eye(b, dtype=m.dtype), jnp.arange(b)

        def step(j, carry):
            low, inv = carry
            if elementwise:
                x = m[:, j] - jnp.sum(low * low[j][None, :], axis=1)
                pivot = jnp.sqrt(jnp.maximum(x[j], tiny))
                low = low.at[:, j].set(jnp.where(at == j, pivot, jnp.where(at > j, x / pivot, 0)))
                row = eye[j] - jnp.sum(low[j][:, None] * inv, axis=0)
            else:
                low, _ = _rls._factor_column(m, low, j, 0, tiny)
                row = eye[j] - jnp.matmul(low[j], inv, precision=_HI)
            return low, inv.at[j].set(row / low[j, j])

        zero = jnp.zeros_like(m)
        return jax.lax.fori_loop(0, b, step, (zero, zero), unroll=unroll)[1]

    return lambda m: _rls._chol_inv(m, small)


def information_form(p, v, alpha=ALPHA):
    """``P <- L (I + L^T V^T V L / alpha)^{-1} L^T`` for one P (``v [n, d]``)."""
    low, _ = _rls._cholesky(p, jnp.finfo(p.dtype).tiny)
    g = jnp.matmul(v, low, precision=_HI)
    z = jnp.matmul(g.T, g, precision=_HI) / alpha
    z = 0.5 * (z + z.T) + jnp.eye(p.shape[-1], dtype=p.dtype)
    w = jnp.matmul(low, _rls._chol_inv(z).T, precision=_HI)
    q = jnp.matmul(w, w.T, precision=_HI)
    return 0.5 * (q + q.T)


def _library(p, v):
    return rgo_jax.rls_block(p[None], v[:, None], ALPHA)[0][0]


def timings(d: int, n: int = 1024, rounds: int = 15) -> dict:
    rng = np.random.default_rng(0)
    v = jnp.asarray((rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32))
    p = jnp.eye(d, dtype=jnp.float32)
    forms = {
        "library": _library,
        "same loop, library inverse": _woodbury_with(_rls._chol_inv),
        "inverse: lapack": _woodbury_with(_lapack_inverse),
        "inverse: none": _woodbury_with(lambda m: m * 1e-3),
        **{f"unroll {k}": _woodbury_with(_base_loop(unroll=k)) for k in (2, 4, 8)},
        "elementwise": _woodbury_with(_base_loop(elementwise=True)),
        "information form": information_form,
    }
    cases = {k: C._Case(fn, (p, v)) for k, fn in forms.items()}
    samples, _ = C.time_calls({k: c.call for k, c in cases.items()}, rounds=rounds)
    return {k: C.summarize(s) | {"compile_s": cases[k].compile_s} for k, s in samples.items()}


def accuracy() -> dict:
    """The vectors of the many-blocks test: a 12-dimensional subspace of d = 40."""
    rng = np.random.default_rng(11)
    d, n = 40, 640
    basis = rng.normal(size=(12, d))
    v = (np.abs(rng.normal(size=(n, 12))) @ basis / np.sqrt(d)).astype(np.float32)
    v64 = v.astype(np.float64)
    ref = ALPHA * np.linalg.inv(ALPHA * np.eye(d) + v64.T @ v64)
    p0, vj = jnp.eye(d, dtype=jnp.float32), jnp.asarray(v)
    got = {"woodbury (library)": _library(p0, vj), "information form": information_form(p0, vj)}
    scale = np.abs(ref).max()
    return {k: float(np.abs(np.asarray(g, np.float64) - ref).max() / scale) for k, g in got.items()}


def main() -> None:
    prov = C.provenance()
    rows, data = [], {}
    for d in (64, 256):
        t = timings(d)
        data[str(d)] = t
        base = t["same loop, library inverse"]["median_s"]
        for k, s in t.items():
            rows.append(
                [
                    str(d),
                    k,
                    C.fmt_s(s["median_s"]),
                    f"{s['median_s'] / base:.2f}",
                    f"{s['compile_s']:.2f} s",
                ]
            )
        print(f"d {d}: " + ", ".join(f"{k} {C.fmt_s(s['median_s'])}" for k, s in t.items()))
    acc = accuracy()
    data["accuracy_d40_rank12"] = acc
    md = "\n".join(
        [
            "One P, 1024 vectors, blocks of 64; medians of interleaved rounds, ratio to the "
            "script's block loop with the library's inverse; compile time of each form.",
            "",
            C.md_table(["d", "form", "median", "/ same loop", "compile"], rows),
            "",
            "Maximum entry error against the float64 closed form, relative to its largest "
            "entry, on 640 vectors from a 12-dimensional subspace of d = 40 (alpha 0.01):",
            "",
            C.md_table(["form", "error"], [[k, f"{e:.1e}"] for k, e in acc.items()]),
            "",
        ]
    )
    print(md)
    print(f"wrote {C.write_results('rls_alternatives', prov, data, md)}")


if __name__ == "__main__":
    main()
