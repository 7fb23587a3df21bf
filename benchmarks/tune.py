"""Hyperparameter selection on a validation split of the first tasks (never on test data).

For each method and each value of its hyperparameter, trains on the first ``--tasks`` tasks
of a benchmark with ``validation_fraction`` of every task's TRAINING set held out as the
evaluation set, and keeps the value with the best final average accuracy (ACC). The search
and the chosen values are written to ``--out`` (JSON) and printed as a table.

Command (permuted MNIST, 3 tasks, 1 seed; about 20 minutes on 2 CPU cores):
    python benchmarks/tune.py --data-dir ../shared/datasets \\
        --out benchmarks/results/tuning_permuted_mnist.json

With ``--config FILE`` (``benchmarks/configs/*.json``) the search runs that benchmark's
protocol (model, budget, every task unless ``--tasks``/``--steps`` say otherwise), each run
changing only the searched value:
    python benchmarks/tune.py --config benchmarks/configs/split_cifar10.json \\
        --data-dir DATA --methods owm --values 1,10,100,1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from _provenance import git_commit, machine

import rgo_jax
from rgo_jax.bench import cli, train
from rgo_jax.bench._methods import OPTION_ALIASES
from rgo_jax.bench._validate import NonFiniteError

GRID = {
    # method: (Config field or method option, addressed as in --option; values)
    "rgo": ("rgo.alpha", [0.001, 0.01, 0.1, 1.0]),
    "rgo-plus": ("rgo.alpha", [0.001, 0.01, 0.1, 1.0]),
    "sgd": ("learning_rate", [0.03, 0.1, 0.3]),
    "ewc": ("ewc.lambda", [1.0, 10.0, 100.0, 1000.0]),
    "online-ewc": ("ewc.lambda", [1.0, 10.0, 100.0, 1000.0]),
    "owm": ("owm.alpha", [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]),
    "gpm": ("gpm.threshold", [0.9, 0.95, 0.97, 0.99]),
    "agem": ("agem.batch", [16.0, 64.0, 256.0]),
}


def _with_value(base: train.Config, method: str, field: str, value: float) -> train.Config:
    """``base`` running ``method`` alone with ``field`` (a Config field or a method option,
    addressed or by its earlier name) set to ``value`` instead of the base's setting."""
    # a Config stores each option under its earlier name (RGO's as Config fields)
    stored = {new: old for old, new in OPTION_ALIASES.items()}.get(field, field)
    if stored in {f.name for f in dataclasses.fields(train.Config)}:
        return dataclasses.replace(base, methods=(method,), **{stored: value})
    options = {**base.method_options, stored: value}
    return dataclasses.replace(base, methods=(method,), method_options=options)


def _measure(cfg: train.Config, method: str, value: float) -> dict:
    """One run of the search: validation ACC, BWT and LA, or why it diverged."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = train.run(cfg, tmp, log=lambda *a: None)
        except NonFiniteError as err:  # a value that diverges is a result, not a crash
            return {"value": value, "seconds": time.perf_counter() - t0, "diverged": str(err)}
    summary = res["summaries"][method]
    return {
        "value": value,
        "seconds": time.perf_counter() - t0,
        "val_acc": summary["acc"]["mean"],
        "val_bwt": summary["bwt"]["mean"],
        "val_la": summary["learning_accuracy"]["mean"],
    }


#: The arguments that decide what a search's rows measured: --resume refuses to mix protocols.
_PROTOCOL_ARGS = ("benchmark", "config", "tasks", "steps", "validation_fraction", "init", "seeds")


def _earlier_record(args: argparse.Namespace, protocol: dict) -> dict:
    """The record at ``--out`` that ``--resume`` continues (empty if there is none)."""
    if not args.out:
        raise SystemExit("tune.py: --resume needs --out (the earlier search's record)")
    try:
        with open(args.out) as f:
            earlier = json.load(f)
    except FileNotFoundError:
        return {}
    for key, value in earlier.get("protocol_args", protocol).items():
        if protocol.get(key) != value:
            raise SystemExit(
                f"tune.py: --resume: {args.out} was searched with --{key.replace('_', '-')} "
                f"{value}, this search has {protocol.get(key)}; its rows would not compare"
            )
    return earlier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default=None, help="permuted_mnist unless --config")
    ap.add_argument(
        "--config", default=None, help="a benchmark's JSON config (instead of --benchmark)"
    )
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--tasks", type=int, default=None, help="3, or every task of --config")
    ap.add_argument("--steps", type=int, default=None, help="1000, or --config's budget")
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--methods", default=",".join(GRID))
    ap.add_argument(
        "--values",
        default=None,
        help="comma-separated values to search instead of the grid (one method only)",
    )
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD=V1,V2,...",
        help="the values to search for METHOD instead of its default grid (repeatable)",
    )
    ap.add_argument(
        "--init", default=None, help="parameter initialisation (Config.init; default lecun)"
    )
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; ACC is their mean")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows an earlier search wrote to --out and run only the values it lacks",
    )
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in GRID]
    if unknown:
        ap.error(f"no search grid for {', '.join(unknown)}; known: {', '.join(GRID)}")
    if args.config is not None and args.benchmark is not None:
        ap.error("--benchmark and --config name the benchmark twice; give one")
    if args.values is not None and len(methods) != 1:
        ap.error("--values needs exactly one method in --methods")
    grids = {}
    for item in args.grid:
        method, sep, values = item.partition("=")
        if not sep or method not in methods:
            ap.error(f"--grid {item!r} must be METHOD=V1,V2,... with METHOD in --methods")
        grids[method] = [float(v) for v in values.split(",")]
    if args.values is not None:
        grids[methods[0]] = [float(v) for v in args.values.split(",")]
    common = {
        "data_dir": args.data_dir,
        "validation_fraction": args.validation_fraction,
        "checkpoint": False,
        "plots": False,
        "seeds": tuple(int(s) for s in args.seeds.split(",")),
    }
    if args.config is not None:
        base = cli.config_from_argv(["--config", args.config])
        common.update({"num_tasks": args.tasks, "steps_per_task": args.steps, "init": args.init})
        base = dataclasses.replace(base, **{k: v for k, v in common.items() if v is not None})
    else:
        base = train.Config(
            benchmark=args.benchmark or "permuted_mnist",
            num_tasks=args.tasks or 3,
            steps_per_task=args.steps or 1000,
            init=args.init or "lecun",
            **common,
        )
    command = "python benchmarks/tune.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items()
        if v not in (None, [], False) and k not in ("out", "grid")
    )
    command += "".join(f" --grid {g}" for g in args.grid)
    protocol = {k: getattr(args, k) for k in _PROTOCOL_ARGS}
    earlier = _earlier_record(args, protocol) if args.resume else {}
    search, chosen = earlier.get("search", {}), earlier.get("chosen", {})
    record = {
        "command": command,
        "commit": git_commit(),
        "machine": machine(),
        "protocol": "validation split of each task's TRAINING data; test data never used",
        "protocol_args": protocol,
        "search": search,
        "chosen": chosen,
    }
    if earlier:
        record["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {k: earlier[k] for k in ("command", "commit", "machine")}
        ]
    for method in methods:
        field, values = GRID[method]
        entry = search.setdefault(method, {"hyperparameter": field, "rows": []})
        rows = entry["rows"]
        for value in grids.get(method, values):
            if any(r["value"] == value for r in rows):
                continue  # measured by the earlier search (--resume)
            rows.append(_measure(_with_value(base, method, field, value), method, value))
            rows.sort(key=lambda r: r["value"])
            row = next(r for r in rows if r["value"] == value)
            if "diverged" in row:
                print(f"{method:11s} {field}={value:<8g} diverged: {row['diverged']}", flush=True)
            else:
                print(
                    f"{method:11s} {field}={value:<8g} validation ACC {100 * row['val_acc']:6.2f}"
                    f" %  BWT {100 * row['val_bwt']:6.2f}  LA {100 * row['val_la']:6.2f}",
                    flush=True,
                )
            finite = [r for r in rows if "diverged" not in r]
            if finite:
                chosen[method] = {field: max(finite, key=lambda r: r["val_acc"])["value"]}
            if args.out:  # after every run, so that a stopped search keeps what it measured
                rgo_jax.bench.write_json_atomic(args.out, record)
    print(json.dumps(chosen, indent=1))


if __name__ == "__main__":
    main()
