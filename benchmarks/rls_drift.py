"""Float32 drift of the RLS recursion against the float64 closed form.

20 tasks x 1000 rank-one updates of a 784-wide P (the paper MLP's first layer) with
realistic vectors: per-batch curvature vectors of permuted MNIST, v = (1/C) sum_b s_b x_b
over batches of 10, s_b = sqrt(p_b (1 - p_b)) with p_b (the true-class probability of a
trained network) drawn from Beta(8, 1). After every task it compares the float32 P of
``update_projection`` (sequential and block) with ``alpha (alpha I + sum v v^T)^-1`` in
float64, and reports the largest deviation, the smallest eigenvalue of P and the error of
the trace-normalised projection of random gradients.

Command (about 2 minutes on 2 CPU cores):
    python benchmarks/rls_drift.py --data-dir ../shared/datasets \
        --out benchmarks/results/rls_drift.json
"""

from __future__ import annotations

import argparse
import platform
import time

import jax.numpy as jnp
import numpy as np
from _provenance import git_commit, machine

import rgo_jax
from rgo_jax.bench import data


def curvature_like_vectors(images: np.ndarray, tasks: int, per_task: int, seed: int):
    rng = np.random.default_rng(seed)
    flat = images.reshape(len(images), -1).astype(np.float64)
    d = flat.shape[1]
    out = []
    for t in range(tasks):
        perm = np.arange(d) if t == 0 else rng.permutation(d)
        idx = rng.integers(0, len(flat), size=(per_task, 10))
        p = rng.beta(8.0, 1.0, size=(per_task, 10))
        s = np.sqrt(p * (1 - p))
        v = np.einsum("nb,nbd->nd", s, flat[idx][:, :, perm]) / 10.0
        out.append(v)
    return np.stack(out)  # [tasks, per_task, d]


def closed_form(s_sum: np.ndarray, alpha: float) -> np.ndarray:
    w, q = np.linalg.eigh(alpha * np.eye(len(s_sum)) + s_sum)
    return (q * (alpha / w)) @ q.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--per-task", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    commit = git_commit()
    images = data.load_dataset("mnist", args.data_dir).x_train
    vecs = curvature_like_vectors(images, args.tasks, args.per_task, seed=0)
    d = vecs.shape[-1]
    g = np.random.default_rng(1).normal(size=(d, 256))
    results = {}
    for alpha in (0.01, 1.0):
        for method in ("sequential", "block"):
            state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((d, 256))})
            s_sum = np.zeros((d, d))
            rows = []
            t0 = time.perf_counter()
            for t in range(args.tasks):
                v = vecs[t]
                state = rgo_jax.update_projection(
                    state, {"w": jnp.asarray(v, jnp.float32)}, alpha, method=method
                )
                s_sum += v.T @ v
                p32 = np.asarray(state.p["w"], np.float64)
                p64 = closed_form(s_sum, alpha)
                n32 = d / np.trace(p32) * p32
                n64 = d / np.trace(p64) * p64
                proj_err = np.linalg.norm(n32 @ g - n64 @ g) / np.linalg.norm(n64 @ g)
                rows.append(
                    {
                        "task": t,
                        "max_abs_dev": float(np.max(np.abs(p32 - p64))),
                        "max_rel_dev": float(np.max(np.abs(p32 - p64)) / np.max(np.abs(p64))),
                        "min_eig_p32": float(np.linalg.eigvalsh(p32).min()),
                        "min_eig_p64": float(np.linalg.eigvalsh(p64).min()),
                        "asymmetry": float(np.max(np.abs(p32 - p32.T))),
                        "normalised_projection_rel_err": float(proj_err),
                    }
                )
            key = f"alpha={alpha},{method}"
            results[key] = {"seconds": time.perf_counter() - t0, "per_task": rows}
            last = rows[-1]
            print(
                f"{key:28s} max|P32-P64| {last['max_abs_dev']:.2e} "
                f"(rel {last['max_rel_dev']:.2e})  min eig P32 {last['min_eig_p32']:.2e} "
                f"(P64 {last['min_eig_p64']:.2e})  projection rel err "
                f"{last['normalised_projection_rel_err']:.2e}"
            )
    record = {
        "command": "python benchmarks/rls_drift.py --data-dir ../shared/datasets",
        "commit": commit,
        "machine": {**machine(), "processor": platform.processor()},
        "tasks": args.tasks,
        "updates_per_task": args.per_task,
        "width": d,
        "results": results,
    }
    if args.out:
        rgo_jax.bench.write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()
