"""The block RLS kernel's b x b solve: the hand-written blocked Cholesky against LAPACK.

``rls_block`` solves ``M = alpha I + V P V^T`` (``b x b``, ``b = 64``) per block with a
hand-written recursive Cholesky inverse (:func:`rgo_jax._rls._chol_inv`, plain matrix
products, no LAPACK call inside the jit). This times one P (no vmap over layers) for widths
64..4608, the hand-written form against ``jax.scipy.linalg.cho_factor`` +
``solve_triangular`` (LAPACK potrf / trsm) for the same Woodbury update, interleaved
repetitions, medians, in one run.

Command (a few minutes on 2 CPU cores):
    python benchmarks/rls_block_lapack.py --out benchmarks/results/rls_block_lapack.json
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _provenance import git_commit, machine

import rgo_jax
import rgo_jax.bench
from rgo_jax import _rls

_HI = jax.lax.Precision.HIGHEST


def _block_lapack(p, v, alpha):
    """``_rls._block_one`` with the b x b Cholesky and triangular solve from LAPACK."""
    b = v.shape[0]
    u = jnp.matmul(v, p, precision=_HI)
    m = jnp.matmul(u, v.T, precision=_HI)
    m = 0.5 * (m + m.T) + alpha * jnp.eye(b, dtype=p.dtype)
    low = jax.scipy.linalg.cholesky(m, lower=True)
    w = jax.scipy.linalg.solve_triangular(low, u, lower=True)
    return p - jnp.matmul(w.T, w, precision=_HI)


def _kernel(block_one):
    def run(p, v, alpha):
        def body(carry, blk):
            return block_one(carry, blk, alpha), None

        p, _ = jax.lax.scan(body, p, v.reshape(-1, 64, v.shape[-1]))
        return 0.5 * (p + p.T)

    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256,784,2304,4608")
    ap.add_argument("--vectors", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    commit = git_commit()
    kernels = {"hand_written": _kernel(_rls._block_one), "lapack": _kernel(_block_lapack)}
    rng = np.random.default_rng(0)
    alpha = jnp.float32(0.01)
    rows = []
    for d in (int(w) for w in args.widths.split(",")):
        p = jnp.eye(d, dtype=jnp.float32)
        v = jnp.asarray(np.abs(rng.normal(size=(args.vectors, d))) / np.sqrt(d), jnp.float32)
        outs = {k: f(p, v, alpha).block_until_ready() for k, f in kernels.items()}  # compile
        times = {k: [] for k in kernels}
        for _ in range(args.reps):  # interleaved
            for k, f in kernels.items():
                t0 = time.perf_counter()
                f(p, v, alpha).block_until_ready()
                times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(t)) for k, t in times.items()}
        diff = float(jnp.max(jnp.abs(outs["hand_written"] - outs["lapack"])))
        rows.append(
            {
                "d": d,
                "median_s": med,
                "times_s": times,
                "max_abs_diff": diff,
                "lapack_over_hand_written": med["lapack"] / med["hand_written"],
            }
        )
        print(
            f"d {d:5d}  hand-written {med['hand_written'] * 1e3:8.2f} ms  lapack "
            f"{med['lapack'] * 1e3:8.2f} ms  ratio {med['lapack'] / med['hand_written']:.2f}  "
            f"max|diff| {diff:.1e}",
            flush=True,
        )
    record = {
        "command": "python benchmarks/rls_block_lapack.py",
        "commit": commit,
        "machine": machine(),
        "vectors": args.vectors,
        "block_size": 64,
        "reps": args.reps,
        "rows": rows,
    }
    if args.out:
        rgo_jax.bench.write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()
