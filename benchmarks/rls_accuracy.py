"""Accuracy and cost of the RLS update against the float64 closed form, over vector lengths
and alphas: the plain float32 kernels (``rls_block``, ``rls_sequential``: the update before
the square-root fallback) against ``update_projection`` (the same kernels, checked, with the
square-root fallback where they fail).

Parts (each optional):
  grid      vector length |v| in 1e-12 .. 1e20 x alpha in 1e-8 .. 1e4, a d = 32 P, vectors
            in a 16-dimensional subspace (so P keeps free directions, eigenvalue 1, next to
            protected ones), 4 tasks x 100 updates. P depends on alpha / |v|^2 only, so the
            reference is the closed form of the unit vectors with alpha / |v|^2, through the
            SVD of V in float64 (no inverse of an ill-conditioned matrix).
  wide      784-wide P, permuted-MNIST curvature-like vectors (as benchmarks/rls_drift.py),
            --wide-tasks tasks x 1000 updates at a few alphas, block kernel (the default).
  bf16      P stored in bfloat16, 784-wide, --wide-tasks tasks at alpha 0.01: the plain
            kernel then a cast (before) against update_projection: negative eigenvalues and the
            gradient projected on the 50 most protected directions (size and sign vs exact).
  cost      seconds per call at d = 784, n = 1000 (interleaved repetitions, medians) and
            compile seconds, old kernel vs update_projection, in the normal regime and
            where the fallback runs.

Commands (results accumulate in the --out file; minutes on 2 shared CPU cores):
    python benchmarks/rls_accuracy.py --parts grid,cost --out benchmarks/results/rls_accuracy.json
    python benchmarks/rls_accuracy.py --parts bf16 --wide-tasks 10 \
        --data-dir ../shared/datasets --out benchmarks/results/rls_accuracy.json
    python benchmarks/rls_accuracy.py --parts wide --wide-tasks 100 --wide-alphas 1e-2 \
        --data-dir ../shared/datasets --out benchmarks/results/rls_accuracy.json
    python benchmarks/rls_accuracy.py --parts wide --wide-tasks 20 --wide-alphas 1e-5,1e-6,1e-8 \
        --data-dir ../shared/datasets --out benchmarks/results/rls_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rgo_jax
from rgo_jax import _rls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import git_commit, machine
from rls_drift import closed_form, curvature_like_vectors  # noqa: E402

NORMS = [1e-12, 1e-8, 1e-4, 1.0, 1e4, 1e8, 1e12, 1e16, 1e20]
ALPHAS = [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4]
ACCURATE = 1e-5  # max |P32 - P64| (|P| <= 1): "accurate" means within ~100 float32 ulps of 1


def closed_form_svd(v: np.ndarray, alpha: float) -> np.ndarray:
    _, sig, wt = np.linalg.svd(np.asarray(v, np.float64), full_matrices=True)
    s2 = np.zeros(v.shape[1])
    s2[: len(sig)] = sig**2
    return (wt.T * (alpha / (alpha + s2))) @ wt


def describe(p: np.ndarray, ref: np.ndarray | None) -> dict:
    p = np.asarray(p, np.float64)
    finite = bool(np.all(np.isfinite(p)))
    out = {"finite": finite}
    if finite:
        out["min_eig"] = float(np.linalg.eigvalsh(0.5 * (p + p.T)).min())
        out["symmetric"] = bool(np.array_equal(p, p.T))
        if ref is not None:
            out["max_abs_err"] = float(np.max(np.abs(p - ref)))
    return out


_old_jit = {
    m: jax.jit(k) for m, k in (("block", _rls.rls_block), ("sequential", _rls.rls_sequential))
}


def run_grid(d=32, rank=16, tasks=4, per_task=100, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(tasks * per_task, rank)) @ rng.normal(size=(rank, d))
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    rows = []
    for norm in NORMS:
        v = (unit * norm).astype(np.float32)
        for alpha in ALPHAS:
            ref = closed_form_svd(v.astype(np.float64) / norm, alpha / norm**2)
            cell = {"norm": norm, "alpha": alpha, "alpha_over_norm2": alpha / norm**2}
            for method in ("block", "sequential"):
                p_old = jnp.eye(d, dtype=jnp.float32)[None]
                p_new = p_old
                worst_old = worst_new = np.inf
                statuses = []
                all_finite_old = True
                for t in range(tasks):
                    chunk = jnp.asarray(v[t * per_task : (t + 1) * per_task])[:, None]
                    p_old = _old_jit[method](p_old, chunk, jnp.float32(alpha))[0]
                    p_new, _, status = _rls.run_rls(p_new, chunk, jnp.float32(alpha), method=method)
                    statuses.append(int(status[0]))
                    po = np.asarray(p_old, np.float64)[0]
                    pn = np.asarray(p_new, np.float64)[0]
                    all_finite_old &= bool(np.all(np.isfinite(po)))
                    if np.all(np.isfinite(po)):
                        worst_old = min(worst_old, np.linalg.eigvalsh(po).min())
                    worst_new = min(worst_new, np.linalg.eigvalsh(pn).min())
                cell[f"old_{method}"] = describe(np.asarray(p_old)[0], ref) | {
                    "finite_every_task": all_finite_old,
                    "min_eig_over_tasks": float(worst_old) if all_finite_old else None,
                }
                cell[f"new_{method}"] = describe(np.asarray(p_new)[0], ref) | {
                    "min_eig_over_tasks": float(worst_new),
                    "status_per_task": statuses,
                }
            rows.append(cell)
            print(
                f"|v| {norm:7.0e} alpha {alpha:7.0e}  "
                + "  ".join(
                    f"{k} err {cell[k].get('max_abs_err', float('nan')):.1e}"
                    f" mineig {cell[k].get('min_eig', float('nan')):+.1e}"
                    for k in ("old_block", "new_block")
                )
                + f"  path {cell['new_block']['status_per_task']}",
                flush=True,
            )
    return {"d": d, "rank": rank, "tasks": tasks, "updates_per_task": per_task, "cells": rows}


def run_wide(images, tasks, alphas, every=10):
    vecs = curvature_like_vectors(images, tasks, 1000, seed=0)
    d = vecs.shape[-1]
    g = np.random.default_rng(1).normal(size=(d, 256))
    out = {}
    for alpha in alphas:
        p_old = jnp.eye(d, dtype=jnp.float32)[None]
        p_new = p_old
        h = np.zeros((d, d))
        rows = []
        old_broken_at = None
        t0 = time.perf_counter()
        for t in range(tasks):
            chunk = jnp.asarray(vecs[t], jnp.float32)[:, None]
            if old_broken_at is None:
                p_old = _old_jit["block"](p_old, chunk, jnp.float32(alpha))[0]
            p_new, _, status = _rls.run_rls(p_new, chunk, jnp.float32(alpha), method="block")
            h += vecs[t].T @ vecs[t]
            po = np.asarray(p_old, np.float64)[0]
            if old_broken_at is None and not np.all(np.isfinite(po)):
                old_broken_at = t
            if (t + 1) % every == 0 or t == tasks - 1 or t == 0:
                ref = closed_form(h, alpha)
                pn = np.asarray(p_new, np.float64)[0]
                nn = d / np.trace(pn) * pn
                nr = d / np.trace(ref) * ref
                row = {
                    "task": t,
                    "status": int(status[0]),
                    "new": describe(pn, ref)
                    | {
                        "normalised_projection_rel_err": float(
                            np.linalg.norm(nn @ g - nr @ g) / np.linalg.norm(nr @ g)
                        )
                    },
                    "ref_min_eig": float(np.linalg.eigvalsh(ref).min()),
                }
                if old_broken_at is None:
                    row["old"] = describe(po, ref)
                rows.append(row)
                print(
                    f"wide alpha {alpha:.0e} task {t:3d} status {row['status']} new err "
                    f"{row['new'].get('max_abs_err', float('nan')):.1e} min eig "
                    f"{row['new'].get('min_eig', float('nan')):+.2e} (ref "
                    f"{row['ref_min_eig']:.2e}) old "
                    + (
                        f"err {row['old'].get('max_abs_err', float('nan')):.1e} min eig "
                        f"{row['old'].get('min_eig', float('nan')):+.2e}"
                        if "old" in row
                        else f"non-finite since task {old_broken_at}"
                    ),
                    flush=True,
                )
        out[f"alpha={alpha:g}"] = {
            "seconds": time.perf_counter() - t0,
            "old_block_non_finite_from_task": old_broken_at,
            "checkpoints": rows,
        }
    return {"d": d, "tasks": tasks, "updates_per_task": 1000, "results": out}


def run_bf16(images, tasks, alpha=0.01, protected=50):
    """P stored in bfloat16: the plain kernel then a cast (before) against update_projection."""
    vecs = curvature_like_vectors(images, tasks, 1000, seed=0)
    d = vecs.shape[-1]
    g = np.random.default_rng(1).normal(size=(d, 256))
    p_old = jnp.eye(d, dtype=jnp.bfloat16)[None]
    p_new = p_old
    h = np.zeros((d, d))
    rows = []
    a = jnp.float32(alpha)
    for t in range(tasks):
        chunk = jnp.asarray(vecs[t], jnp.float32)[:, None]
        p_old = _old_jit["block"](p_old.astype(jnp.float32), chunk, a)[0].astype(jnp.bfloat16)
        q, _, status = _rls.run_rls(p_new, chunk, a, method="block", dtype=jnp.bfloat16)
        p_new = q.astype(jnp.bfloat16)
        h += vecs[t].T @ vecs[t]
        ref = closed_form(h, alpha)
        w, basis = np.linalg.eigh(ref)
        prot = basis[:, :protected]  # the most protected directions
        nr = d / np.trace(ref) * ref
        row = {"task": t, "status": int(status[0]), "ref_min_eig": float(w.min())}
        for name, pm in (("old", p_old), ("new", p_new)):
            x = np.asarray(pm[0].astype(jnp.float32), np.float64)
            if not np.all(np.isfinite(x)):
                row[name] = {"finite": False}
                continue
            nx = d / np.trace(x) * x
            # Gradient projected onto the protected directions: sign and size vs exact.
            ratio = (prot.T @ nx @ g) / (prot.T @ nr @ g)
            row[name] = {
                "finite": True,
                "min_eig": float(np.linalg.eigvalsh(x).min()),
                "negative_eigs": int(np.sum(np.linalg.eigvalsh(x) < 0)),
                "max_abs_err": float(np.max(np.abs(x - ref))),
                "normalised_projection_rel_err": float(
                    np.linalg.norm(nx @ g - nr @ g) / np.linalg.norm(nr @ g)
                ),
                "protected_norm_ratio": float(
                    np.linalg.norm(prot.T @ nx @ g) / np.linalg.norm(prot.T @ nr @ g)
                ),
                "protected_wrong_sign_fraction": float(np.mean(ratio < 0)),
            }
        rows.append(row)
        print(
            f"bf16 task {t:2d} status {row['status']} "
            + "  ".join(
                f"{n}: min eig {row[n].get('min_eig', float('nan')):+.1e} "
                f"({row[n].get('negative_eigs', -1)} neg) protected x"
                f"{row[n].get('protected_norm_ratio', float('nan')):.1f} wrong sign "
                f"{row[n].get('protected_wrong_sign_fraction', float('nan')):.2f}"
                for n in ("old", "new")
            ),
            flush=True,
        )
    return {
        "d": d,
        "tasks": tasks,
        "alpha": alpha,
        "protected_directions": protected,
        "per_task": rows,
    }


def run_cost(reps=5, d=784, n=1000):
    rng = np.random.default_rng(0)
    p = jnp.eye(d, dtype=jnp.float32)[None]
    v_ok = jnp.asarray(np.abs(rng.normal(size=(n, 1, d))) / np.sqrt(d), jnp.float32)
    v_bad = v_ok * 1e4  # alpha / |v|^2 ~ 1e-10: the plain kernel fails, the fallback runs
    a = jnp.float32(0.01)
    cases = {}
    for method in ("block", "sequential"):
        old = jax.jit(lambda p, v, m=method: _old_jit[m](p, v, a)[0])
        new = jax.jit(lambda p, v, m=method: _rls.run_rls(p, v, a, method=m)[0])
        for name, fn, v in (
            (f"old_{method}", old, v_ok),
            (f"new_{method}", new, v_ok),
            (f"new_{method}_fallback", new, v_bad),
        ):
            jax.clear_caches()
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(p, v).compile()
            cases[name] = {"compile_s": time.perf_counter() - t0, "fn": compiled, "v": v}
    times = {k: [] for k in cases}
    for _ in range(reps):  # interleaved repetitions
        for k, c in cases.items():
            c["fn"](p, c["v"]).block_until_ready()  # warm
            t0 = time.perf_counter()
            c["fn"](p, c["v"]).block_until_ready()
            times[k].append(time.perf_counter() - t0)
    _, _, status = _rls.run_rls(p, v_bad, a, method="block")
    res = {
        k: {
            "compile_s": cases[k]["compile_s"],
            "median_s": float(np.median(times[k])),
            "times_s": times[k],
        }
        for k in cases
    }
    for m in ("block", "sequential"):
        for suffix in ("", "_fallback"):
            res[f"new_{m}{suffix}"]["ratio_to_old"] = (
                res[f"new_{m}{suffix}"]["median_s"] / res[f"old_{m}"]["median_s"]
            )
    res["fallback_status"] = int(status[0])
    for k, r in res.items():
        if isinstance(r, dict):
            print(
                f"cost {k:28s} median {r['median_s'] * 1e3:8.1f} ms  compile "
                f"{r['compile_s']:5.1f} s  ratio {r.get('ratio_to_old', 1.0):.2f}",
                flush=True,
            )
    return {"d": d, "n": n, "reps": reps, "cases": res}


def report(record: dict) -> str:
    """The results file as markdown tables."""
    lines = ["# RLS accuracy and cost against the float64 closed form", ""]
    lines += ["Generated by `benchmarks/rls_accuracy.py` from `rls_accuracy.json`.", ""]
    lines += ["Runs:", ""] + [
        f"- `{r['command']}` (commit `{r['commit'][:12]}`, {r['machine']['platform']}, "
        f"{r['machine']['cpus']} CPUs, jax {r['machine']['jax']}, {r['wall_s']:.0f} s)"
        for r in record.get("runs", [])
    ]
    if "note" in record:
        lines += ["", record["note"]]
    lines += ["", "Where a part ran twice, the later run's figures are the ones below."]
    acc = record["accurate_threshold_max_abs_err"]
    if "grid" in record:
        grid = record["grid"]
        cells = grid["cells"]
        lines += [
            "",
            f"## Grid: d = {grid['d']}, vectors in a {grid['rank']}-dimensional subspace, "
            f"{grid['tasks']} tasks x {grid['updates_per_task']} updates",
            "",
            "max |P32 - P64| after the last task (|P| <= 1); NaN/Inf: P destroyed. "
            "P depends on r = alpha / |v|^2 only.",
            "",
        ]
        by_r: dict[float, list] = {}
        for c in cells:
            by_r.setdefault(float(f"{c['alpha_over_norm2']:.0e}"), []).append(c)
        head = (
            "| r = alpha/|v|^2 | cells | plain block | plain sequential | "
            "update_projection block | update_projection sequential | fallback ran (tasks) | "
            "PD (update_projection) |"
        )
        lines += [head, "|" + "---|" * 8]
        for r in sorted(by_r):
            cs = by_r[r]

            def worst(key, cs=cs):
                errs = [c[key].get("max_abs_err") for c in cs]
                if any(e is None for e in errs):
                    return "NaN/Inf"
                return f"{max(errs):.1e}"

            fallback = sum(
                sum(1 for s in c[f"new_{m}"]["status_per_task"] if s == 1)
                for c in cs
                for m in ("block", "sequential")
            )
            total = sum(len(c["new_block"]["status_per_task"]) * 2 for c in cs)
            pd = all(
                c[f"new_{m}"].get("min_eig", -1) > 0 and c[f"new_{m}"]["min_eig_over_tasks"] > 0
                for c in cs
                for m in ("block", "sequential")
            )
            lines.append(
                f"| {r:.0e} | {len(cs)} | {worst('old_block')} | {worst('old_sequential')} | "
                f"{worst('new_block')} | {worst('new_sequential')} | {fallback}/{total} | "
                f"{'yes' if pd else 'NO'} |"
            )
        lines += ["", f"Accurate: max error <= {acc:.0e}.", ""]

        def accurate_rs(key):
            return sorted(
                r
                for r, cs in by_r.items()
                if all((c[key].get("max_abs_err") or np.inf) <= acc for c in cs)
            )

        def spans(rs):
            allr = sorted(by_r)
            out, run = [], []
            for r in allr:
                if r in rs:
                    run.append(r)
                elif run:
                    out.append(run)
                    run = []
            if run:
                out.append(run)
            return ", ".join(f"{x[0]:.0e} .. {x[-1]:.0e}" for x in out) or "none"

        lines += ["Accurate region (r = alpha / |v|^2):", ""]
        for key, name in (
            ("old_block", "plain block kernel"),
            ("old_sequential", "plain sequential kernel"),
            ("new_block", "update_projection, block"),
            ("new_sequential", "update_projection, sequential"),
        ):
            lines.append(f"- {name}: {spans(accurate_rs(key))}")
        pd_all = all(
            c[f"new_{m}"]["min_eig_over_tasks"] > 0 for c in cells for m in ("block", "sequential")
        )
        finite_old = sum(
            1 for c in cells for m in ("block", "sequential") if c[f"old_{m}"]["finite_every_task"]
        )
        lines += [
            f"- update_projection: P finite and positive definite after every task in every "
            f"cell: {'yes' if pd_all else 'NO'}; plain kernels finite in {finite_old} of "
            f"{2 * len(cells)} (cell, kernel) runs.",
            "",
        ]
    if "wide" in record:
        w = record["wide"]
        lines += [
            f"## 784-wide P, permuted-MNIST curvature-like vectors, {w['updates_per_task']} "
            "updates per task, block kernel",
            "",
            "| alpha | tasks | plain kernel | update_projection: max err (last task) | min eig "
            "P32 / P64 | fallback ran (at the tasks checked: first, every 10th, last) | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, res in w["results"].items():
            last = res["checkpoints"][-1]
            broke = res["old_block_non_finite_from_task"]
            old = (
                f"non-finite from task {broke}"
                if broke is not None
                else f"finite, max err {last['old'].get('max_abs_err', float('nan')):.1e}, "
                f"min eig {last['old'].get('min_eig', float('nan')):.2e}"
            )
            fb = sum(1 for c in res["checkpoints"] if c["status"] == 1)
            lines.append(
                f"| {key.split('=')[1]} | {res['tasks']} | {old} | "
                f"{last['new'].get('max_abs_err', float('nan')):.1e} | "
                f"{last['new'].get('min_eig', float('nan')):.2e} / {last['ref_min_eig']:.2e} | "
                f"{fb}/{len(res['checkpoints'])} | {res['seconds']:.0f} |"
            )
        lines.append("")
    if "bf16" in record:
        b = record["bf16"]
        rows = b["per_task"]
        lines += [
            f"## P stored in bfloat16: 784-wide, alpha {b['alpha']}, {b['tasks']} tasks",
            "",
            f"Protected-gradient norm ratio: the trace-normalised projection of random gradients "
            f"onto the {b['protected_directions']} most protected directions of the exact P, "
            "norm relative to the exact one.",
            "",
            "| task | plain kernel then cast: negative eigenvalues, min eig | "
            "update_projection: negative eigenvalues, min eig | exact min eig | "
            "update_projection: protected-gradient norm ratio | path |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            o, n = r["old"], r["new"]
            lines.append(
                f"| {r['task']} | {o.get('negative_eigs')}, {o.get('min_eig', float('nan')):.1e}"
                f" | {n.get('negative_eigs')}, {n.get('min_eig', float('nan')):.1e} | "
                f"{r['ref_min_eig']:.1e} | {n.get('protected_norm_ratio', float('nan')):.2f} | "
                f"{'fallback' if r['status'] == 1 else 'fast'} |"
            )
        lines.append("")
    if "cost" in record:
        c = record["cost"]
        lines += [
            f"## Cost: d = {c['d']}, n = {c['n']} vectors, one P, medians of {c['reps']} "
            "interleaved repetitions",
            "",
            "| case | median ms | ratio to plain kernel | compile s |",
            "|---|---|---|---|",
        ]
        for k, r in c["cases"].items():
            if isinstance(r, dict):
                lines.append(
                    f"| {k} | {r['median_s'] * 1e3:.1f} | {r.get('ratio_to_old', 1.0):.2f} | "
                    f"{r['compile_s']:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--parts", default="grid,wide,cost")
    ap.add_argument("--wide-tasks", type=int, default=100)
    ap.add_argument("--wide-alphas", default="1e-2,1e-5,1e-6,1e-8")
    ap.add_argument("--cost-reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None, help="write this results file as .md; no runs")
    args = ap.parse_args()
    if args.report:
        path = Path(args.report)
        path.with_suffix(".md").write_text(report(json.loads(path.read_text())))
        return
    parts = args.parts.split(",")
    commit = git_commit()
    argv = [
        a.replace(args.data_dir, "../shared/datasets") if args.data_dir else a for a in sys.argv[1:]
    ]
    record = {
        "command": "python benchmarks/rls_accuracy.py " + " ".join(argv),
        "commit": commit,
        "machine": machine(),
        "accurate_threshold_max_abs_err": ACCURATE,
    }
    t0 = time.perf_counter()
    if "grid" in parts:
        record["grid"] = run_grid()
    if "wide" in parts:
        from rgo_jax.bench import data

        images = data.load_dataset("mnist", args.data_dir).x_train
        alphas = [float(a) for a in args.wide_alphas.split(",")]
        record["wide"] = run_wide(images, args.wide_tasks, alphas)
    if "bf16" in parts:
        from rgo_jax.bench import data

        images = data.load_dataset("mnist", args.data_dir).x_train
        record["bf16"] = run_bf16(images, args.wide_tasks)
    if "cost" in parts:
        record["cost"] = run_cost(reps=args.cost_reps)
    record["wall_s"] = time.perf_counter() - t0
    if args.out:
        # Parts run by separate commands accumulate in one file (wide runs by alpha).
        path = Path(args.out)
        merged = json.loads(path.read_text()) if path.exists() else {}
        runs = merged.pop("runs", [])
        runs.append({k: record[k] for k in ("command", "commit", "machine", "wall_s")})
        for part in ("grid", "cost", "bf16"):
            if part in record:
                merged[part] = record[part]
        if "wide" in record:
            wide = merged.setdefault("wide", {"results": {}})
            wide["d"] = record["wide"]["d"]
            wide["updates_per_task"] = record["wide"]["updates_per_task"]
            for key, res in record["wide"]["results"].items():
                wide["results"][key] = res | {"tasks": record["wide"]["tasks"]}
        merged["accurate_threshold_max_abs_err"] = ACCURATE
        merged["runs"] = runs
        rgo_jax.bench.write_json_atomic(args.out, merged)


if __name__ == "__main__":
    main()
