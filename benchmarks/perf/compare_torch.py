"""rgo_jax against the PyTorch reference (``torch_reference.py``), side by side in one run.

Paper MLP 784-256-256-10, batch 10, synthetic data for the kernels, real permuted MNIST for
the time to result. Every row's two (or more) cases run in interleaved rounds (``_common``:
JAX functions compiled ahead of time, PyTorch eager), medians reported with the minima:

* train steps: SGD; RGO with ``P @ G`` after the backward pass (one jitted step vs eager
  PyTorch); RGO with the input-side projection (one jitted step, and per step of a
  100-step ``lax.scan`` chunk as the harness runs it, vs the custom ``autograd.Function``);
  the plain RGO step at hidden width 2048;
* one task's consolidation (1000 batches of 10, all six P) through the PUBLIC API
  (``rgo_jax.curvature_vectors`` over the reduced-gradient model, then
  ``rgo_jax.consolidate``) vs the best-effort PyTorch pass (one backward over all
  examples, Woodbury blocks of 64) and the straightforward one (a backward per batch,
  rank-one loop);
* the RLS alone (the same 1000 vectors per P, block 64) vs PyTorch's Woodbury update;
* the RLS block kernel over widths 64..4608 (one P per width, block 64,
  ``bench_rls_forms``): the library's hand-written blocked Cholesky against the same update
  written with LAPACK-backed ``jax.scipy.linalg`` calls and against PyTorch's Woodbury
  update, with the positive-definiteness check ``update_projection`` adds;
* time to result in a fresh process: ``python -m rgo_jax --config
  benchmarks/configs/permuted_mnist.json --methods rgo --seeds 0 --input-projection`` (1
  and 4 tasks, no checkpoints or plots) vs ``torch_reference.py``, with an empty JAX
  compilation cache (cold) and again with the cache it filled (warm).

PyTorch runs with ``OMP_WAIT_POLICY=PASSIVE`` (set by ``torch_reference``): with the
default spinning threads its MLP step took 160 ms instead of 0.75 ms at a load average of
14 on 2 cores. Needs ``torch`` (``pip install torch``, or the ``perf`` extra) and the MNIST
files (``--data-dir``, default ``$RGO_DATA_DIR``).

Command and cost (2-core CPU): ``python benchmarks/perf/compare_torch.py`` (about 6-10
minutes under load); ``--quick`` (fewer rounds, one time-to-result run each: about 3
minutes on a quiet machine). Results: ``benchmarks/results/perf/compare_torch.{json,md}``.
The width sweep alone: ``--rls-sweep-only`` (about 3 minutes on one core; results
``compare_torch_rls_sweep.{json,md}``), widths by ``--rls-widths 64,256``.
"""

from __future__ import annotations

import os

# Before anything loads an OpenMP runtime (scikit-learn does, via the harness): PyTorch's
# threads then wait passively (torch_reference sets the same when it runs alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rgo_jax
from rgo_jax.bench._profile import format_profile
from rgo_jax.bench.models import build_model
from rgo_jax.nnx import use_reduced_kernel_gradients

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_rls_forms  # noqa: E402
import torch  # noqa: E402
import torch_reference as T  # noqa: E402 - sets OMP_WAIT_POLICY before torch loads

LR = 0.1


def _tstep(fn, *args):
    return lambda: fn(*args)


def _torch_model(hidden, seed=0):
    torch.manual_seed(seed)
    model = T.MLP(hidden)
    return model, T.init_projections(model)


def steps_row(rounds: int, budget: float) -> dict:
    """SGD, plain RGO, input-side RGO (single step and scan chunk): JAX vs PyTorch."""
    from bench_methods import _problem, _step  # noqa: PLC0415 - the kernel rows only

    params, x, y, ce, _, _ = _problem(10, (256, 256))
    own = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    sgd, rgo = optax.sgd(LR), rgo_jax.rgo(LR)
    rin = rgo_jax.rgo(LR, input_projected=r"kernel$")
    chunk_n = 100
    xs = jnp.broadcast_to(x, (chunk_n, *x.shape))
    ys = jnp.broadcast_to(y, (chunk_n, *y.shape))
    one = _step(rin, ce, input_projected=True)

    def chunk(params, state, xs, ys):
        def body(c, b):
            return one(*c, *b), None

        return jax.lax.scan(body, (params, state), (xs, ys))[0]

    jax_cases = {
        "jax_sgd": (_step(sgd, ce), (own(params), sgd.init(params), x, y), (0, 1)),
        "jax_rgo_plain": (_step(rgo, ce), (own(params), rgo.init(params), x, y), (0, 1)),
        "jax_rgo_input": (one, (own(params), rin.init(params), x, y), (0, 1)),
        "jax_rgo_input_chunk100": (chunk, (own(params), rin.init(params), xs, ys), (0, 1)),
    }
    built = {k: C._Case(*v) for k, v in jax_cases.items()}
    tm, tps = _torch_model((256, 256))
    tx = torch.from_numpy(np.array(x).reshape(10, -1))
    ty = torch.from_numpy(np.asarray(y).astype(np.int64))

    def t_input():
        tm.projected = tps
        T.rgo_step_input_side(tm, tps, tx, ty)
        tm.projected = None

    calls = {k: c.call for k, c in built.items()}
    calls |= {
        "torch_sgd": _tstep(T.sgd_step, tm, tx, ty),
        "torch_rgo_plain": _tstep(T.rgo_step_plain, tm, tps, tx, ty),
        "torch_rgo_input": t_input,
    }
    samples, _ = C.time_calls(calls, rounds=rounds, max_total_s=budget)
    out = {k: C.summarize(v) for k, v in samples.items()}
    for k in ("jax_rgo_input_chunk100",):
        out[k] = {m: v / chunk_n if m.endswith("_s") else v for m, v in out[k].items()}
    for k, c in built.items():
        out[k]["compile_s"] = c.compile_s
    return out


def wide_row(rounds: int, budget: float, width: int = 2048) -> dict:
    """The plain RGO step at hidden width ``width``."""
    from bench_methods import _problem, _step  # noqa: PLC0415 - the kernel rows only

    params, x, y, ce, _, _ = _problem(10, (width, width))
    rgo = rgo_jax.rgo(LR)
    case = C._Case(_step(rgo, ce), (params, rgo.init(params), x, y), (0, 1))
    tm, tps = _torch_model((width, width))
    tx = torch.from_numpy(np.array(x).reshape(10, -1))
    ty = torch.from_numpy(np.asarray(y).astype(np.int64))
    samples, _ = C.time_calls(
        {
            "jax_rgo_plain_w": case.call,
            "torch_rgo_plain_w": _tstep(T.rgo_step_plain, tm, tps, tx, ty),
        },
        rounds=rounds,
        max_total_s=budget,
    )
    out = {k: C.summarize(v) for k, v in samples.items()}
    out["jax_rgo_plain_w"]["compile_s"] = case.compile_s
    return out


class _Reduced:
    """``logits(params, x)`` of the MLP with reduced kernel gradients (hashable, static)."""

    def __init__(self, graph, rest):
        self.graph, self.rest = graph, rest

    def __call__(self, params, x):
        model = nnx.merge(self.graph, params, self.rest)
        with use_reduced_kernel_gradients(model):
            return model(x, 0)


def consolidation_rows(rounds: int, budget: float, batches: int = 1000) -> dict:
    """One task's consolidation (public API vs PyTorch) and the RLS alone."""
    model = build_model("mlp", num_classes=10, input_shape=(28, 28, 1), fel=False, seed=0)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(batches, 10, 28, 28, 1)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, size=(batches, 10)), jnp.int32)
    state0 = rgo_jax.rgo(LR).init(params)
    logits = _Reduced(graph, rest)
    vec_fn = jax.jit(rgo_jax.curvature_vectors, static_argnums=0)

    def public():
        vecs = vec_fn(logits, params, xs, ys)
        jax.block_until_ready(rgo_jax.consolidate(state0, vecs))

    vecs = jax.block_until_ready(vec_fn(logits, params, xs, ys))

    def rls_only():
        jax.block_until_ready(rgo_jax.consolidate(state0, vecs))

    t0 = time.perf_counter()
    public()  # compiles both
    first_s = time.perf_counter() - t0
    tm, tps = _torch_model((256, 256))
    txs = torch.from_numpy(np.array(xs).reshape(batches, 10, -1))
    tys = torch.from_numpy(np.asarray(ys).astype(np.int64))
    tvecs = T.curvature_vectors_batched(tm, txs, tys)

    def t_rls():
        with torch.no_grad():
            for w, v in tvecs.items():
                T.rls_woodbury(tps[w], v)

    calls = {
        "jax_consolidation_public": public,
        "torch_consolidation_best": lambda: T.consolidate(tm, tps, txs, tys, best_effort=True),
        "jax_rls_block64": rls_only,
        "torch_rls_woodbury64": t_rls,
    }
    samples, _ = C.time_calls(calls, rounds=rounds, max_total_s=budget)
    out = {k: C.summarize(v) for k, v in samples.items()}
    out["jax_consolidation_public"]["first_call_s"] = first_s
    t0 = time.perf_counter()  # the straightforward port once (slow: a backward per batch)
    T.consolidate(tm, tps, txs, tys, best_effort=False)
    out["torch_consolidation_straightforward"] = C.summarize([time.perf_counter() - t0])
    return out


def _run(cmd: list[str], env: dict, cwd: Path = C.REPO) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return wall


def _jax_cmd(n: int, data_dir: str, out: Path) -> list[str]:
    """The timed ``rgo-bench`` command: ``n`` permuted-MNIST tasks, one seed, input-side."""
    return [
        sys.executable,
        "-m",
        "rgo_jax",
        "--config",
        "benchmarks/configs/permuted_mnist.json",
        "--methods",
        "rgo",
        "--seeds",
        "0",
        "--tasks",
        str(n),
        "--input-projection",
        "--no-checkpoint",
        "--no-plots",
        "--profile",
        "--data-dir",
        data_dir,
        "--out",
        str(out),
    ]


def time_to_result(
    data_dir: str, reps: int, tasks=(1, 4), baseline: Path | None = None
) -> tuple[dict, dict, dict]:
    """Fresh-process wall time of rgo-bench (cold and warm compilation cache) and PyTorch.

    Every repetition runs, for each task count, the harness cold, PyTorch, the harness warm
    (and, with ``baseline``, the same harness command from that checkout of an earlier
    commit, cold and warm), one after the other: load from other processes hits all alike.

    Returns the timings, the harness's ``--profile`` breakdowns of the first repetition and
    the 1-minute load average before each run.
    """
    data_dir = str(Path(data_dir).resolve())  # the runs start in other folders
    out: dict[str, list[float]] = {}
    profiles: dict[str, dict] = {}
    loads: dict[str, list[float]] = {}
    trees = {"jax": C.REPO} | ({} if baseline is None else {"base": baseline})
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for n in tasks:
                torch_cmd = [sys.executable, str(HERE / "torch_reference.py")]
                torch_cmd += ["--data-dir", data_dir, "--tasks", str(n)]
                runs = []
                for tag, tree in trees.items():
                    cache = Path(tmp) / f"cache_{tag}_{rep}_{n}"
                    env = dict(os.environ, PYTHONPATH=str(tree))
                    env["RGO_JAX_COMPILATION_CACHE"] = str(cache)
                    run_dir = Path(tmp) / f"run_{tag}_{rep}_{n}"
                    cmd = _jax_cmd(n, data_dir, run_dir)
                    runs.append((f"{tag}_{n}_cold", cmd, env, tree, run_dir))
                    if tag == "jax":
                        env_t = dict(os.environ, PYTHONPATH=str(C.REPO))
                        runs.append((f"torch_{n}", torch_cmd, env_t, C.REPO, None))
                    runs.append((f"{tag}_{n}_warm", cmd, env, tree, run_dir))
                for key, cmd, env, tree, run_dir in runs:
                    loads.setdefault(key, []).append(os.getloadavg()[0])
                    out.setdefault(key, []).append(_run(cmd, env, tree))
                    if rep == 0 and run_dir is not None and key.startswith("jax_"):
                        profiles[key] = json.loads((run_dir / "profile.json").read_text())
                print(
                    f"  [ttr] rep {rep} tasks {n}: "
                    + ", ".join(
                        f"{k} {v[-1]:.1f} s" for k, v in out.items() if k.split("_")[1] == str(n)
                    )
                    + f" (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    return {k: C.summarize(v) for k, v in out.items()}, profiles, loads


ROWS = [
    # label, jax key, torch key
    ("SGD step", "jax_sgd", "torch_sgd"),
    ("RGO step, plain P @ G (one jitted step / eager)", "jax_rgo_plain", "torch_rgo_plain"),
    (
        "RGO step, input-side projection (one jitted step / autograd.Function)",
        "jax_rgo_input",
        "torch_rgo_input",
    ),
    (
        "RGO step, input-side, per step of a 100-step scan chunk (harness) / autograd.Function",
        "jax_rgo_input_chunk100",
        "torch_rgo_input",
    ),
    ("RGO step at hidden width 2048 (plain)", "jax_rgo_plain_w", "torch_rgo_plain_w"),
    (
        "one task's consolidation, 1000 batch vectors, all layers (PUBLIC API / best effort)",
        "jax_consolidation_public",
        "torch_consolidation_best",
    ),
    (
        "the same against the straightforward port (backward per batch, rank-one loop)",
        "jax_consolidation_public",
        "torch_consolidation_straightforward",
    ),
    ("RLS only, Woodbury block 64 (all six P)", "jax_rls_block64", "torch_rls_woodbury64"),
]
TTR_TASKS = (1, 4)


def _tasks(n: int) -> str:
    return f"{n} task{'s' if n > 1 else ''}"


def ttr_rows(tasks) -> list[tuple[str, str, str]]:
    """The time-to-result rows of :data:`ROWS`' form for each task count."""
    return [
        (
            f"time to result, {_tasks(n)}"
            + (", fresh process" if i == 0 and what == "cold" else "")
            + f", {what} compile cache",
            f"jax_{n}_{what}",
            f"torch_{n}",
        )
        for i, n in enumerate(tasks)
        for what in ("cold", "warm")
    ]


def _ttr_tasks(res: dict) -> list[int]:
    return sorted({int(k.split("_")[1]) for k in res if k.startswith("torch_") and k[6:].isdigit()})


def markdown(
    res: dict, quick: bool, load: list[float], profiles: dict, loads: dict | None = None
) -> str:
    loads = loads or {}
    rows = []
    tasks = _ttr_tasks(res)
    for label, j, t in ROWS + ttr_rows(tasks):
        if j not in res or t not in res:
            continue
        a, b = res[j], res[t]
        rows.append(
            [
                label,
                f"{C.fmt_s(a['median_s'])} ({C.fmt_s(a['min_s'])})",
                f"{C.fmt_s(b['median_s'])} ({C.fmt_s(b['min_s'])})",
                f"{a['median_s'] / b['median_s']:.2f}",
                f"{a['min_s'] / b['min_s']:.2f}",
            ]
        )
    base = [
        [
            f"{what}, {_tasks(n)}",
            f"{res[f'base_{n}_{what}']['median_s']:.1f} s",
            f"{res[f'jax_{n}_{what}']['median_s']:.1f} s",
            f"{res[f'torch_{n}']['median_s']:.1f} s",
            f"{res[f'base_{n}_{what}']['median_s'] / res[f'torch_{n}']['median_s']:.2f}",
            f"{res[f'jax_{n}_{what}']['median_s'] / res[f'torch_{n}']['median_s']:.2f}",
        ]
        for n in tasks
        for what in ("cold", "warm")
        if f"base_{n}_{what}" in res and f"jax_{n}_{what}" in res and f"torch_{n}" in res
    ]
    before_after = ""
    if base:
        before_after = "\n".join(
            [
                "",
                "Time to result, the harness of the baseline commit (`--baseline-repo`) and of "
                "this one, in the same interleaved rounds (medians):",
                "",
                C.md_table(
                    [
                        "cache, tasks",
                        "before",
                        "after",
                        "PyTorch",
                        "before / PyTorch",
                        "after / PyTorch",
                    ],
                    base,
                ),
                "",
            ]
        )
    if loads:
        allv = [v for vs in loads.values() for v in vs]
        before_after += (
            f"\nLoad average (1-minute) before the time-to-result runs: median "
            f"{float(np.median(allv)):.1f}, range {min(allv):.1f}-{max(allv):.1f}.\n"
        )
    slope = ""
    if len(tasks) > 1:
        lo, hi = tasks[0], tasks[-1]

        def per_task(key: str) -> float:
            return (res[key.format(hi)]["median_s"] - res[key.format(lo)]["median_s"]) / (hi - lo)

        keys = ("jax_{}_cold", "jax_{}_warm", "torch_{}")
        if all(k.format(n) in res for k in keys for n in (lo, hi)):
            slope = (
                f"\nPer additional task (slope {lo} -> {hi} tasks): rgo_jax "
                f"{per_task('jax_{}_cold'):.2f} s cold, {per_task('jax_{}_warm'):.2f} s warm; "
                f"PyTorch {per_task('torch_{}'):.2f} s.\n"
            )
    return "\n".join(
        [
            "Medians of interleaved samples (min in brackets); ratio = rgo_jax / PyTorch "
            "(below 1: rgo_jax ahead), of the medians and of the minima. "
            + ("`--quick`: few rounds, one time-to-result run each. " if quick else "")
            + f"Load average during the run: {load[0]:.1f} -> {load[1]:.1f} (1-minute) on "
            f"{os.cpu_count()} cores, shared with other jobs: read ratios within ~30 % as noise.",
            "",
            C.md_table(["measure", "rgo_jax", "PyTorch", "ratio (median)", "ratio (min)"], rows),
            slope,
            before_after,
            *(
                f"\n### `--profile` of the first {k} run\n\n```{format_profile(v)}\n```"
                for k, v in profiles.items()
            ),
        ]
    )


def _commit_of(tree: Path) -> str:
    """The commit a checkout is at (``tree/COMMIT`` for an exported tree), or ``unknown``."""
    marker = tree / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip()
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, one run per time to result")
    ap.add_argument("--data-dir", default=os.environ.get("RGO_DATA_DIR"))
    ap.add_argument("--no-ttr", action="store_true", help="skip the time-to-result runs")
    ap.add_argument(
        "--ttr-only", action="store_true", help="only the time-to-result runs (no kernel rows)"
    )
    ap.add_argument("--reps", type=int, help="time-to-result repetitions (default 3; --quick 1)")
    ap.add_argument(
        "--ttr-tasks",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=TTR_TASKS,
        help="comma-separated task counts of the time-to-result runs (default %(default)s)",
    )
    ap.add_argument(
        "--baseline-repo",
        type=Path,
        help="a checkout of an earlier commit: its harness is timed in the same rounds",
    )
    ap.add_argument(
        "--rls-sweep-only",
        action="store_true",
        help="only the RLS block kernel width sweep (no other rows, no data needed)",
    )
    ap.add_argument("--no-rls-sweep", action="store_true", help="skip the RLS width sweep")
    ap.add_argument(
        "--rls-widths",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=bench_rls_forms.WIDTHS,
        help="comma-separated widths of the RLS sweep (default %(default)s)",
    )
    ap.add_argument("--out", help="result name (default compare_torch, or compare_torch_rls_sweep)")
    args = ap.parse_args()
    if args.rls_sweep_only:
        args.no_ttr = True
    if args.out is None:
        args.out = "compare_torch_rls_sweep" if args.rls_sweep_only else "compare_torch"
    if not args.no_ttr and not args.data_dir:
        raise SystemExit("compare_torch: pass --data-dir (the folder with mnist/) or --no-ttr")
    prov = C.provenance()
    prov["torch"] = torch.__version__
    prov["torch_threads"] = torch.get_num_threads()
    prov["env"] = {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS")}
    if args.baseline_repo is not None:
        prov["baseline_commit"] = _commit_of(args.baseline_repo)
    load0 = os.getloadavg()[0]
    rounds, budget = (5, 8.0) if args.quick else (15, 30.0)
    res = {}
    kernels = (
        ("steps", lambda: steps_row(rounds, budget)),
        ("width 2048", lambda: wide_row(rounds, budget)),
        ("consolidation", lambda: consolidation_rows(rounds, budget)),
    )
    for name, fn in () if args.ttr_only or args.rls_sweep_only else kernels:
        print(f"[compare_torch] {name} ...", flush=True)
        part = fn()
        for k, v in part.items():
            print(f"  {k:38s} {C.fmt_s(v['median_s']):>10s}", flush=True)
        res |= part
    sweep: list = []
    if args.rls_sweep_only or not (args.ttr_only or args.no_rls_sweep):
        print("[compare_torch] RLS width sweep ...", flush=True)
        sweep = bench_rls_forms.sweep(args.rls_widths, rounds=rounds, budget=budget)
    profiles: dict = {}
    loads: dict = {}
    if not args.no_ttr:
        print("[compare_torch] time to result ...", flush=True)
        reps = args.reps or (1 if args.quick else 3)
        ttr, profiles, loads = time_to_result(
            args.data_dir, reps, args.ttr_tasks, baseline=args.baseline_repo
        )
        res |= ttr
    load = [load0, os.getloadavg()[0]]
    md = "" if args.rls_sweep_only else markdown(res, args.quick, load, profiles, loads) + "\n"
    if sweep:
        env = ", ".join(f"`{k}={v}`" for k, v in prov["env"].items() if v is not None)
        md += (
            f"Load average during the run: {load[0]:.1f} -> {load[1]:.1f} (1-minute) on "
            f"{os.cpu_count()} cores ({prov['machine']['cores_usable']} usable); PyTorch "
            f"threads {prov['torch_threads']}; {env or 'default XLA and OpenMP threads'}.\n\n"
        ) + bench_rls_forms.markdown(sweep)
    print(md)
    data = {"results": res, "quick": args.quick, "profiles": profiles, "loads": loads}
    data["rls_sweep"] = sweep
    path = C.write_results(args.out, prov, data, md)
    print(f"[compare_torch] wrote {path}")


if __name__ == "__main__":
    main()
