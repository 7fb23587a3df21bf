"""Consolidation cost: RLS throughput per P width, and one whole task for the paper MLP.

Part A (``widths``): vectors per second absorbed by ``rgo_jax.update_projection`` into one
``d x d`` P, for ``method="sequential"`` (one rank-one step per vector, ``O(d^2)`` memory
traffic each) and ``method="block"`` (Woodbury, several block sizes), plus the previous
block kernel (``cho_solve`` on the ``[b, d]`` right-hand side, symmetrised every block) for
comparison, and each method's float32 error against the float64 closed form
``alpha (alpha I + V^T V)^-1``.

Part B (``buckets``): ``k`` same-size matrices updated by one vmapped kernel (what
``update_projection`` does) vs a sequential ``lax.map`` over them: time and XLA's
temporary-buffer size.

Part C (``mlp_task``): one task's consolidation for the paper MLP 784-256-256-10: curvature
vectors of 1000 batches of 10 (``vmap``; with the full weight gradients as the core
computes them, and with ``use_reduced_kernel_gradients``), then the RLS update of all six
P matrices; and both fused in one jitted call.

Command and cost (2-core CPU): ``python benchmarks/perf/bench_consolidation.py``, about
3-4 minutes (the sequential method at d = 4608 is most of it).
"""

from __future__ import annotations

import argparse
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rgo_jax
from rgo_jax import _rls
from rgo_jax.bench.models import build_model
from rgo_jax.nnx import use_reduced_kernel_gradients

ALPHA = 0.01
WIDTHS = (64, 256, 784, 1024, 2304, 4608)
_HI = jax.lax.Precision.HIGHEST


def _vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Correlated, mostly non-negative vectors of norm ~1-3, like curvature vectors."""
    basis = rng.normal(size=(max(2, d // 4), d))
    coef = np.abs(rng.normal(size=(n, basis.shape[0])))
    v = coef @ basis
    return (2.0 * v / np.linalg.norm(v, axis=1, keepdims=True).mean()).astype(np.float32)


def _old_block_one(p, v, alpha):
    """The block kernel before this benchmark: cho_solve on [b, d], symmetrised per block."""
    u = jnp.matmul(v, p, precision=_HI)
    m = jnp.matmul(u, v.T, precision=_HI)
    m = 0.5 * (m + m.T) + alpha * jnp.eye(v.shape[0], dtype=p.dtype)
    chol = jnp.linalg.cholesky(m)
    x = jax.scipy.linalg.cho_solve((chol, True), u)
    new = p - jnp.matmul(u.T, x, precision=_HI)
    return 0.5 * (new + new.T)


def _old_rls_block(p, v, alpha, block_size=64):
    n = v.shape[0]
    b = min(block_size, n)
    pad = (-n) % b
    if pad:
        v = jnp.concatenate([v, jnp.zeros((pad, *v.shape[1:]), v.dtype)], axis=0)
    blocks = v.reshape(-1, b, *v.shape[1:])
    update = jax.vmap(_old_block_one, in_axes=(0, 1, None))
    p, _ = jax.lax.scan(lambda c, blk: (update(c, blk, alpha), None), p, blocks)
    return p


def bench_widths(widths, rounds: int, budget: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for d in widths:
        n = 1024 if d <= 1024 else (512 if d <= 2304 else 256)
        v = _vectors(rng, n, d)
        state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((d, 1))})
        vecs = {"w": jnp.asarray(v)}
        cases = {
            "sequential": (
                lambda s, v: rgo_jax.update_projection(s, v, ALPHA, method="sequential"),
                (state, vecs),
            ),
        }
        for b in (16, 64, 256):
            cases[f"block{b}"] = (
                lambda s, v, b=b: rgo_jax.update_projection(
                    s, v, ALPHA, method="block", block_size=b
                ),
                (state, vecs),
            )
        cases["block64_previous"] = (
            lambda p, v: _old_rls_block(p, v, jnp.float32(ALPHA), 64),
            (state.p["w"][None], jnp.asarray(v)[:, None]),
        )
        print(f"[consolidation] d={d} n={n} ...", flush=True)
        outs: dict = {}
        res = C.time_cases(cases, rounds=rounds, max_total_s=budget, min_sample_s=0.0, outputs=outs)
        ref = None
        if d <= 2304:
            v64 = v.astype(np.float64)
            ref = ALPHA * np.linalg.inv(ALPHA * np.eye(d) + v64.T @ v64)
        for name, r in res.items():
            r["vectors_per_s"] = n / r["median_s"]
            r["gflops_per_s"] = (r["xla_flops"] or float("nan")) / r["median_s"] / 1e9
            if ref is not None:
                got = outs[name]
                p = got.p["w"] if hasattr(got, "p") else got[0]
                p = np.asarray(p, np.float64).reshape(d, d)
                r["rel_error"] = float(np.abs(p - ref).max() / np.abs(ref).max())
                r["asymmetry"] = float(np.abs(p - p.T).max())
            print(
                f"  {name:18s} {C.fmt_s(r['median_s']):>10s}  {r['vectors_per_s']:9.0f} vec/s"
                f"  err {r.get('rel_error', float('nan')):.1e}",
                flush=True,
            )
        out.append({"d": d, "n": n, "cases": res})
    return out


def bench_buckets(rounds: int, budget: float, seed: int = 1) -> list[dict]:
    """k same-size P: one vmapped kernel vs a lax.map over the matrices."""
    rng = np.random.default_rng(seed)
    out = []
    for d, k, n in ((256, 16, 256), (1024, 4, 128)):
        p = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (k, d, d))
        v = jnp.asarray(np.stack([_vectors(rng, n, d) for _ in range(k)], axis=1))
        cases = {}
        for method in ("sequential", "block"):
            cases[f"{method}_vmap"] = (
                lambda p, v, m=method: _rls.run_rls(p, v, jnp.float32(ALPHA), method=m)[0],
                (p, v),
            )
            cases[f"{method}_laxmap"] = (
                lambda p, v, m=method: jax.lax.map(
                    lambda pv: _rls.run_rls(
                        pv[0][None], pv[1][:, None], jnp.float32(ALPHA), method=m
                    )[0][0],
                    (p, jnp.swapaxes(v, 0, 1)),
                ),
                (p, v),
            )
        print(f"[consolidation] bucket k={k} d={d} n={n} ...", flush=True)
        res = C.time_cases(cases, rounds=rounds, max_total_s=budget, min_sample_s=0.0)
        for name, r in res.items():
            print(
                f"  {name:18s} {C.fmt_s(r['median_s']):>10s}  temp "
                f"{C.fmt_bytes(r['temp_bytes'] or 0)}",
                flush=True,
            )
        out.append({"d": d, "k": k, "n": n, "p_bytes": k * d * d * 4, "cases": res})
    return out


def bench_mlp_task(rounds: int, budget: float, num_batches: int = 1000, batch: int = 10) -> dict:
    model = build_model("mlp", num_classes=10, input_shape=(28, 28, 1))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.random(size=(num_batches, batch, 28, 28, 1)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, size=(num_batches, batch)), jnp.int32)
    task = 1

    def plain_fn(p, x):
        return nnx.merge(graph, p, rest)(x, task)

    def fast_fn(p, x):
        m = nnx.merge(graph, p, rest)
        with use_reduced_kernel_gradients(m):
            return m(x, task)

    def vectors(params, xs, ys, fn):
        return rgo_jax.curvature_vectors(fn, params, xs, ys)

    state = rgo_jax.scale_by_rgo().init(params)
    vecs = jax.jit(lambda p, x, y: vectors(p, x, y, fast_fn))(params, xs, ys)

    def rls(state, vecs, method, b):
        return rgo_jax.update_projection(state, vecs, ALPHA, method=method, block_size=b)

    cases = {
        "vectors_full_grad": (lambda p, x, y: vectors(p, x, y, plain_fn), (params, xs, ys)),
        "vectors_reduced": (lambda p, x, y: vectors(p, x, y, fast_fn), (params, xs, ys)),
        "rls_sequential": (lambda s, v: rls(s, v, "sequential", 64), (state, vecs)),
        "rls_block64": (lambda s, v: rls(s, v, "block", 64), (state, vecs)),
        "rls_block128": (lambda s, v: rls(s, v, "block", 128), (state, vecs)),
        "rls_block256": (lambda s, v: rls(s, v, "block", 256), (state, vecs)),
    }
    print("[consolidation] paper MLP, one task ...", flush=True)
    res = C.time_cases(cases, rounds=rounds, max_total_s=budget, min_sample_s=0.0)
    best_rls = min((k for k in res if k.startswith("rls_block")), key=lambda k: res[k]["median_s"])
    best_b = int(best_rls.removeprefix("rls_block"))
    fused = {
        "task_full_grad_block": (
            lambda s, p, x, y: rls(s, vectors(p, x, y, plain_fn), "block", best_b),
            (state, params, xs, ys),
        ),
        "task_reduced_block": (
            lambda s, p, x, y: rls(s, vectors(p, x, y, fast_fn), "block", best_b),
            (state, params, xs, ys),
        ),
        "task_reduced_sequential": (
            lambda s, p, x, y: rls(s, vectors(p, x, y, fast_fn), "sequential", 64),
            (state, params, xs, ys),
        ),
    }
    res.update(C.time_cases(fused, rounds=rounds, max_total_s=budget, min_sample_s=0.0))
    for name, r in res.items():
        print(
            f"  {name:24s} {C.fmt_s(r['median_s']):>10s} (min {C.fmt_s(r['min_s'])})  "
            f"temp {C.fmt_bytes(r['temp_bytes'] or 0)}",
            flush=True,
        )
    return {
        "num_batches": num_batches,
        "batch": batch,
        "best_block_size": best_b,
        "target_s": 0.5,
        "cases": res,
    }


def markdown(widths: list[dict], buckets: list[dict], task: dict) -> str:
    out = [
        "Median of interleaved samples (min in brackets), compile time apart. `err`: max "
        "|P - P_ref| / max |P_ref| against the float64 closed form (d <= 2304).",
        "",
        "## A. RLS throughput per P width (vectors/s)",
        "",
    ]
    names = list(widths[0]["cases"])
    rows = []
    for w in widths:
        row = [w["d"], w["n"]]
        for k in names:
            c = w["cases"][k]
            err = f", err {c['rel_error']:.0e}" if "rel_error" in c else ""
            row.append(f"{c['vectors_per_s']:,.0f} ({C.fmt_s(c['median_s'])}{err})")
        rows.append(row)
    out.append(C.md_table(["d", "n", *names], rows))
    out += ["", "## B. k same-size matrices: one vmapped kernel vs lax.map", ""]
    rows = []
    for b in buckets:
        for k, c in b["cases"].items():
            rows.append(
                [
                    f"k={b['k']} d={b['d']} n={b['n']} (P: {C.fmt_bytes(b['p_bytes'])})",
                    k,
                    f"{C.fmt_s(c['median_s'])} ({C.fmt_s(c['min_s'])})",
                    C.fmt_bytes(c["temp_bytes"] or 0),
                ]
            )
    out.append(C.md_table(["bucket", "case", "time", "XLA temp buffers"], rows))
    out += [
        "",
        f"## C. One task of the paper MLP ({task['num_batches']} batches of {task['batch']}; "
        f"target {task['target_s']} s)",
        "",
    ]
    rows = [
        [
            k,
            f"{C.fmt_s(c['median_s'])} ({C.fmt_s(c['min_s'])})",
            f"{c['compile_s']:.2f} s",
            C.fmt_bytes(c["temp_bytes"] or 0),
        ]
        for k, c in task["cases"].items()
    ]
    out.append(C.md_table(["case", "time", "compile", "XLA temp buffers"], rows))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=40.0, help="timed seconds per comparison")
    ap.add_argument("--out", default="consolidation")
    args = ap.parse_args()
    prov = C.provenance()
    t0 = time.perf_counter()
    widths = bench_widths([int(w) for w in args.widths.split(",")], args.rounds, args.budget)
    buckets = bench_buckets(args.rounds, args.budget)
    task = bench_mlp_task(args.rounds, args.budget)
    data = {"widths": widths, "buckets": buckets, "mlp_task": task, "alpha": ALPHA}
    data["wall_s"] = time.perf_counter() - t0
    path = C.write_results(args.out, prov, data, markdown(widths, buckets, task))
    print(f"[consolidation] wrote {path} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
