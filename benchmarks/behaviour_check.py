"""Behaviour check: a short run of every method, compared bit for bit with a reference.

Runs the ``rgo-bench`` command (``python -m rgo_jax``) on a few small cases that together
run every method (:data:`METHODS` on permuted MNIST, :data:`CONV_METHODS` on split CIFAR-10)
and touch the harness's main paths (vmapped seeds, one seed, checkpoints and
resume, AlexNet on CIFAR-10, input-side projection, the multi-head stream, the sequential
RLS kernel), then records per case and method:

- every seed's accuracy matrix ``R`` and random-init accuracies (``results.json``),
- a SHA-256 of every array of every seed's last task checkpoint (parameters, optimizer
  state, method state): far finer than the accuracies, which move in steps of 1/n.

In the permuted-MNIST case, after the first run the last task's checkpoints are deleted and
a few methods (:data:`RESUME_METHODS`) are run again into the same folder: they resume
from the task before and must give the same numbers as the first run.

``--write FILE`` stores the records; ``--compare FILE`` runs again and exits with status 1,
naming each differing case, method and field, unless every record is identical. Only flags
that have existed since the harness's first layout are used, so the same script runs on
older commits to make a reference.

Usage (measured on 2 CPU cores shared with other jobs, load average about 18: 34 to 44
minutes; far less on an idle machine)::

    PYTHONPATH=. python benchmarks/behaviour_check.py --data-dir DATA --cifar-dir CIFAR \\
        --compare benchmarks/results/behaviour/reference.json

``DATA`` holds ``mnist/`` (IDX files); ``CIFAR`` holds ``cifar-10-batches-py/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Every registered method (the same names at every commit this script compares).
METHODS = (
    "rgo",
    "rgo-sample",
    "rgo-nofel",
    "rgo-alpha1",
    "rgo-bf16",
    "sgd",
    "stl",
    "joint",
    "ewc",
    "online-ewc",
    "owm",
    "gpm",
    "agem",
)

_SMALL = ["--tasks", "3", "--batch-size", "10", "--no-plots"]

#: The methods rerun by the resume check: optimizer state, per-task networks, a method
#: state and an episodic memory.
RESUME_METHODS = "rgo,stl,ewc,agem"

#: The methods run on the conv net: those with code paths of their own for convolutions
#: (RGO's conv curvature vectors, EWC's chunked Fisher, OWM's and GPM's conv inputs,
#: A-GEM's memory of images). Compiling AlexNet for every method would triple the runtime.
CONV_METHODS = "rgo,ewc,owm,gpm,agem"

#: case name -> (data folder key, flags, resume check)
CASES = {
    "permuted_mnist": (
        "data",
        [
            "--benchmark",
            "permuted_mnist",
            "--methods",
            ",".join(METHODS),
            "--hidden",
            "32,32",
            "--steps",
            "30",
            "--chunk-steps",
            "10",
            "--consolidation-batches",
            "4",
            "--vector-chunk",
            "3",
            "--max-train-per-task",
            "300",
            "--max-test-per-task",
            "300",
            "--seeds",
            "0,1",
            "--option",
            "ewc_samples=20",
            "--option",
            "gpm_samples=40",
            "--option",
            "agem_per_task=20",
            "--option",
            "agem_batch=8",
            *_SMALL,
        ],
        True,
    ),
    "split_cifar10": (
        "cifar",
        [
            "--benchmark",
            "split_cifar10",
            "--model",
            "alexnet",
            "--methods",
            CONV_METHODS,
            "--hidden",
            "16,16",
            "--lr",
            "0.03",
            "--steps",
            "10",
            "--chunk-steps",
            "10",
            "--consolidation-batches",
            "3",
            "--max-train-per-task",
            "200",
            "--max-test-per-task",
            "200",
            "--seeds",
            "0",
            "--no-vmap-seeds",
            "--option",
            "ewc_samples=10",
            "--option",
            "ewc_fisher=sampled",
            "--option",
            "gpm_samples=20",
            "--option",
            "gpm_threshold_step=0.003",
            "--option",
            "agem_per_task=10",
            "--option",
            "agem_batch=4",
            *_SMALL,
        ],
        False,
    ),
    "permuted_mnist_variants": (
        "data",
        [
            "--benchmark",
            "permuted_mnist",
            "--methods",
            "rgo,rgo-sample,ewc",
            "--hidden",
            "24",
            "--steps",
            "20",
            "--chunk-steps",
            "20",
            "--consolidation-batches",
            "3",
            "--alpha",
            "0.1",
            "--rls-method",
            "sequential",
            "--head",
            "multi",
            "--input-projection",
            "--max-train-per-task",
            "200",
            "--max-test-per-task",
            "200",
            "--seeds",
            "3",
            "--option",
            "ewc_samples=10",
            "--option",
            "ewc_fisher=empirical",
            "--option",
            "ewc_lambda=100",
            *_SMALL,
        ],
        False,
    ),
}


def _state_hashes(out: Path) -> dict:
    """SHA-256 of the arrays of every (method, seed)'s last complete task checkpoint."""
    import numpy as np  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    hashes: dict = {}
    for seed_dir in sorted((out / "checkpoints").glob("*/seed*")):
        tasks = sorted(d for d in seed_dir.glob("task_*") if (d / "meta.json").is_file())
        if not tasks:
            continue
        arrays = ocp.StandardCheckpointer().restore((tasks[-1] / "arrays").absolute())
        h = hashlib.sha256()
        for key in sorted(arrays):
            a = np.asarray(arrays[key])
            h.update(f"{key}:{a.dtype}:{a.shape};".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        hashes.setdefault(seed_dir.parent.name, {})[seed_dir.name] = {
            "task": tasks[-1].name,
            "sha256": h.hexdigest(),
        }
    return hashes


#: The base of every case: ``rgo-bench``'s default job as of the reference commit. Given as
#: ``--config`` (the same at every commit), so that what a flag leaves unset does not depend
#: on the command line's defaults, which changed (a named benchmark now brings its protocol).
BASE_CONFIG = {
    "benchmark": "permuted_digits",
    "methods": ["rgo", "sgd"],
    "num_tasks": 5,
    "steps_per_task": 500,
    "consolidation_batches": 300,
    "hidden": [256, 256],
    "seeds": [0],
}


def _run_cli(flags: list[str], out: Path, log) -> None:
    base = out.parent / f"{out.name}.base_config.json"
    base.write_text(json.dumps(BASE_CONFIG))
    cmd = [sys.executable, "-m", "rgo_jax", "--config", str(base), *flags, "--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log(f"  {' '.join(cmd[5:])}\n  -> exit {proc.returncode} in {time.time() - t0:.0f} s")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"behaviour_check: the command failed (exit {proc.returncode}).")


def _records(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    hashes = _state_hashes(out)
    return {
        method: {
            "matrices": entry["matrices"],
            "random_init": entry["random_init"],
            "states": hashes.get(method, {}),
        }
        for method, entry in results["methods"].items()
    }


def run_case(name: str, folders: dict, workdir: Path, log) -> dict:
    """Runs case ``name`` of :data:`CASES` and returns ``{method: record}``."""
    key, flags, resume = CASES[name]
    out = workdir / name
    flags = [*flags, "--data-dir", str(folders[key])]
    log(f"[{name}]")
    _run_cli(flags, out, log)
    first = _records(out)
    if resume:
        last = f"task_{int(flags[flags.index('--tasks') + 1]) - 1:03d}"
        for d in (out / "checkpoints").glob(f"*/seed*/{last}"):
            shutil.rmtree(d)
        log(f"  resuming {RESUME_METHODS} after the last task's checkpoints were deleted")
        again_flags = list(flags)
        again_flags[again_flags.index("--methods") + 1] = RESUME_METHODS
        _run_cli(again_flags, out, log)
        again = _records(out)
        bad = sorted(m for m in RESUME_METHODS.split(",") if first[m] != again.get(m))
        if bad:
            raise SystemExit(f"behaviour_check: {name}: resume changed the results of {bad}.")
    return first


def _differences(ref: dict, new: dict) -> list[str]:
    diffs = []
    for case in sorted(set(ref) | set(new)):
        if case not in ref or case not in new:
            diffs.append(f"{case}: only in {'the reference' if case in ref else 'this run'}")
            continue
        for method in sorted(set(ref[case]) | set(new[case])):
            a, b = ref[case].get(method), new[case].get(method)
            if a is None or b is None:
                diffs.append(
                    f"{case}/{method}: only in {'the reference' if b is None else 'this run'}"
                )
                continue
            for field in sorted(set(a) | set(b)):
                if a.get(field) != b.get(field):
                    diffs.append(f"{case}/{method}: {field} differs")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding mnist/ (IDX files)")
    p.add_argument("--cifar-dir", required=True, help="folder holding cifar-10-batches-py/")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="FILE", help="write the records to FILE (JSON)")
    what.add_argument("--compare", metavar="FILE", help="compare with the records in FILE")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of cases")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
    folders = {"data": args.data_dir, "cifar": args.cifar_dir}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="rgo_behaviour_") as tmp:
        new = {c: run_case(c, folders, Path(tmp), print) for c in cases}
    print(f"{len(cases)} cases in {time.time() - t0:.0f} s")
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}")
        return 0
    ref = json.loads(Path(args.compare).read_text())
    ref = {c: ref[c] for c in cases if c in ref}
    diffs = _differences(ref, new)
    for d in diffs:
        print(f"MISMATCH {d}")
    if diffs:
        return 1
    print(f"bit-identical to {args.compare}: {sum(len(v) for v in new.values())} method runs")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
