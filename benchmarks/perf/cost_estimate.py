"""Cost of the paper's 20-split CIFAR-100 and miniImageNet runs, measured from a short run.

For each config (``benchmarks/configs/split_cifar100.json``, ``split_miniimagenet.json``)
this builds the config's network and times, with the harness's own compiled functions, on
inputs of the config's shape (random pixels: the cost depends on shapes, not on values, so
no data set is needed):

* one training step of SGD and of RGO (the harness's chunk of ``--chunk`` unrolled steps,
  divided by its length),
* RGO's consolidation at a task boundary (curvature vectors of the config's batches and the
  RLS update of every P),
* the evaluation of one task's test set (``--test-per-task`` images).

and extrapolates to the whole run: ``seeds * (tasks * steps * step + tasks * consolidation
+ evaluations * eval)``, where the harness evaluates ``min(t + 2, T)`` tasks after task
``t`` and every task once at initialisation. Compilation (once per seed) is listed apart.

    python benchmarks/perf/cost_estimate.py            # both configs, CPU or whatever JAX sees

Writes ``benchmarks/results/perf/cost_estimate_<backend>.json`` and ``.md``
(``--out-stem`` renames them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from rgo_jax.bench import train
from rgo_jax.bench._methods import TaskContext

CONFIGS = {
    "split_cifar100": ((32, 32, 3), 100, 500),
    "split_miniimagenet": ((84, 84, 3), 100, 500),
}


def _config(name: str, **overrides) -> train.Config:
    fields = json.loads((C.REPO / "benchmarks" / "configs" / f"{name}.json").read_text())
    fields.pop("_doc")
    for k in ("methods", "seeds", "hidden"):
        if k in fields:
            fields[k] = tuple(fields[k])
    fields.update(overrides)
    return train.Config(**fields)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(
    name: str, chunk: int, rounds: int, max_repeat_s: float = 120.0, consolidation: bool = True
) -> dict:
    shape, classes, test_per_task = CONFIGS[name]
    cfg = _config(name, input_projection=True, scan_unroll=chunk, chunk_steps=chunk)
    stream = types.SimpleNamespace(input_shape=shape, num_classes=classes)
    rng = np.random.default_rng(0)
    n = 200
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, 5, n).astype(np.int32)
    mask = np.arange(classes) < 5
    masks, tasks = np.broadcast_to(mask, (n, classes)), np.zeros(n, np.int32)
    idx = rng.integers(0, n, (chunk, cfg.batch_size))
    cases, after = {}, {}
    for method_name in ("sgd", "rgo"):
        method = cfg.method(method_name)
        graphdef, params, rest = train._build(cfg, method, stream, 0)
        net = train._Net(graphdef, rest)
        tx = method.optimizer(cfg.run_info())
        fn = train._over_seeds(train._make_chunk_fn(net, tx, method, cfg), 1)
        args = jax.tree.map(
            lambda a: jnp.asarray(a)[None],
            (params, tx.init(params), (), x, y, masks, tasks, idx, np.arange(chunk)),
        )

        def step(p, s, *rest_args, fn=fn):
            p, s, _ = fn(p, s, *rest_args)
            return p, s

        cases[f"{method_name}_chunk"] = (step, args, (0, 1))
        if method_name == "rgo":
            after[method_name] = (method, net, params, tx.init(params))
    _log(f"{name}: timing the training steps (compiles first)")
    timed = C.time_cases(cases, rounds=rounds, max_total_s=60.0)
    out = {
        "config": cfg.to_dict(),
        "input_shape": shape,
        "timed_chunk_steps": chunk,
        "step_s": {k.split("_")[0]: v["median_s"] / chunk for k, v in timed.items()},
        "compile_s": {k.split("_")[0]: v["compile_s"] for k, v in timed.items()},
    }
    _, net, params, _ = after["rgo"]
    ctx = TaskContext(
        task=0,
        x_train=x,
        y_train=y,
        class_mask=mask,
        logits_fn=net.logits,
        inputs_fn=net.inputs,
        curvature_logits_fn=net.reduced_logits,
        rng=np.random.default_rng(1),
        run=cfg.run_info(),
    )
    out["consolidation_s"], out["consolidation_includes_compile"] = None, False
    if consolidation:
        _time_consolidation(out, ctx, after["rgo"], max_repeat_s, name)
    _log(f"{name}: timing the evaluation")
    correct = train._accuracy_fn(net)
    xb = jnp.asarray(rng.random((cfg.eval_batch_size, *shape), dtype=np.float32))
    yb = jnp.zeros(cfg.eval_batch_size, jnp.int32)
    ev = [jnp.asarray(mask), jnp.int32(0)]
    jax.block_until_ready(correct(params, xb, yb, *ev))
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(correct(params, xb, yb, *ev))
    out["eval_task_s"] = (time.perf_counter() - t0) / 3 * test_per_task / cfg.eval_batch_size
    T, S, seeds = cfg.num_tasks, cfg.steps_per_task, len(cfg.seeds)
    evals = T + sum(min(t + 2, T) for t in range(T))
    out["extrapolated_hours"] = {}
    for m in ("sgd", "rgo"):
        per_seed = T * S * out["step_s"][m] + evals * out["eval_task_s"]
        if m == "rgo" and out["consolidation_s"] is not None:
            per_seed += T * out["consolidation_s"]
        out["extrapolated_hours"][m] = {
            "per_seed": per_seed / 3600,
            "all_seeds": seeds * per_seed / 3600,
        }
    return out


def _time_consolidation(out, ctx, rgo, max_repeat_s, name):
    method, _, params, state = rgo
    _log(f"{name}: timing the consolidation pass")
    times = []
    for _ in range(2):  # the first call compiles; a slow one is not repeated
        t0 = time.perf_counter()
        jax.block_until_ready(method.after_task(ctx, params, state, ())[0])
        times.append(time.perf_counter() - t0)
        if times[0] > max_repeat_s:
            break
    out["consolidation_s"] = times[-1]
    out["consolidation_includes_compile"] = len(times) == 1


def _markdown(results: dict, prov: dict) -> str:
    lines = [
        f"# Cost of the paper's ResNet-18 runs on `{jax.default_backend()}`",
        "",
        f"Command: `{prov['command']}`  ",
        f"Commit: `{prov['git_commit']}`, {prov['utc']}  ",
        f"Machine: {prov['machine']}",
        "",
        "| config | input | SGD step | RGO step | RGO / SGD | consolidation | eval of a task "
        "| SGD run, 1 seed | RGO run, 1 seed | RGO run, all seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s, h = r["step_s"], r["extrapolated_hours"]
        star = "*" if r["consolidation_includes_compile"] else ""
        cons = "not timed" if r["consolidation_s"] is None else f"{r['consolidation_s']:.1f} s"
        lines.append(
            f"| {name} | {'x'.join(map(str, r['input_shape']))} | {s['sgd'] * 1e3:.0f} ms "
            f"| {s['rgo'] * 1e3:.0f} ms | {s['rgo'] / s['sgd']:.2f}x "
            f"| {cons}{star} | {r['eval_task_s']:.1f} s "
            f"| {h['sgd']['per_seed']:.1f} h | {h['rgo']['per_seed']:.1f} h "
            f"| {h['rgo']['all_seeds']:.1f} h |"
        )
    lines += [
        "",
        "Steps timed as the harness runs them (a chunk of unrolled steps, divided by its "
        "length); the run time extrapolates steps, consolidations and evaluations of the "
        "config (20 tasks x 2000 steps, 5 seeds) and leaves out compilation (once per seed, "
        "listed in the JSON). *: a consolidation slower than 2 min was timed once, "
        "compilation included (an upper bound). Not timed: the run estimate leaves the "
        "consolidation passes out (a lower bound).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--chunk", type=int, default=2, help="unrolled steps per timed call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--out-stem",
        default=None,
        help="output file names without suffix (default cost_estimate_<backend>)",
    )
    ap.add_argument(
        "--no-consolidation",
        action="store_true",
        help="skip timing RGO's consolidation pass (then left out of the run estimate)",
    )
    args = ap.parse_args()
    prov = C.provenance()
    backend = jax.default_backend()
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    stem = args.out_stem or f"cost_estimate_{backend}"
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}")
        results[name] = measure(
            name, args.chunk, args.rounds, consolidation=not args.no_consolidation
        )
        # Written after every config, so a long second config does not lose the first.
        (C.RESULTS / f"{stem}.json").write_text(
            json.dumps({"provenance": prov, "results": results}, indent=1)
        )
        md = _markdown(results, prov)
        (C.RESULTS / f"{stem}.md").write_text(md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
