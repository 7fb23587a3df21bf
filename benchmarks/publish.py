"""Copies a finished run directory into ``benchmarks/results/`` with its provenance.

Only the small files are copied (config, raw matrices, summary, plots; never checkpoints),
and ``PROVENANCE.md`` records the command, the commit the run started from, the machine and
the wall time. Several run directories of one protocol (e.g. seeds 0-2 and, later, seeds
3-4) are merged into one report by :func:`rgo_jax.bench.merge_run_reports`; give one ``--command``
per run, in the same order. ``--exclude RUN_DIR:METHOD`` leaves one method of one run out of
the merge (a method rerun later, e.g. with a hyperparameter found on a wider search).

    python benchmarks/publish.py runs/pmnist benchmarks/results/permuted_mnist \\
        --command "rgo-bench --config ..." --commit abc1234 --wall "27 min"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

import jax

from rgo_jax.bench import merge_run_reports, write_json_atomic, write_text_atomic
from rgo_jax.bench.train import ADDED_KEYS, MERGE_FREE_KEYS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("dest")
    ap.add_argument("--command", required=True, action="append", help="once per RUN_DIR")
    ap.add_argument("--commit", required=True, action="append", help="once, or once per RUN_DIR")
    ap.add_argument("--wall", default="not recorded")
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="RUN_DIR:METHOD",
        help="leave METHOD of RUN_DIR out of the merge (repeatable)",
    )
    args = ap.parse_args()
    srcs, dest = [Path(d) for d in args.run_dirs], Path(args.dest)
    for src in srcs:
        if not (src / "results.json").is_file():
            raise SystemExit(f"{src} has no results.json: not a finished run directory.")
    if len(args.command) != len(srcs) or len(args.commit) not in (1, len(srcs)):
        raise SystemExit(
            f"{len(srcs)} run directories need {len(srcs)} --command and 1 or {len(srcs)} "
            f"--commit, got {len(args.command)} and {len(args.commit)}."
        )
    exclude = []
    for item in args.exclude:
        run_dir, sep, method = item.rpartition(":")
        if not sep or not run_dir or not method:
            raise SystemExit(f"--exclude {item!r} must be RUN_DIR:METHOD.")
        exclude.append((run_dir, method))
    merged = len(srcs) > 1 or bool(exclude)
    if not merged:
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(srcs[0].iterdir()):
            if f.is_file() and f.suffix in {".json", ".md", ".png"}:
                shutil.copy2(f, dest / f.name)
    else:
        try:
            merge_run_reports(
                srcs, dest, free_keys=MERGE_FREE_KEYS, key_defaults=ADDED_KEYS, exclude=exclude
            )
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"publish: not merged: {err}") from None
    # The data directory is a path of the machine that ran: recorded as the commands'
    # placeholder, not as that path.
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("data_dir") and os.path.isabs(config["data_dir"]):
        config["data_dir"] = "DATA"
        write_json_atomic(config_path, config)
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commits = args.commit * len(srcs) if len(args.commit) == 1 else args.commit
    if not merged:
        runs = f"- command: `{args.command[0]}`\n- commit: `{commits[0]}`\n"
    else:
        runs = (
            f"- merged from {len(srcs)} runs (`rgo_jax.bench.merge_run_reports`), in this order:\n"
        )
        runs += "".join(
            f"  - `{c}` at commit `{k}`\n" for c, k in zip(args.command, commits, strict=True)
        )
        runs += "".join(f"  - left out: `{m}` of `{Path(d).name}`\n" for d, m in exclude)
    text = (
        f"# Provenance\n\n{runs}"
        f"- machine: {platform.platform()}, {cpu}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()})\n- wall time: {args.wall}\n"
    )
    if args.note:
        text += f"- note: {args.note}\n"
    write_text_atomic(dest / "PROVENANCE.md", text)
    print(f"published {', '.join(map(str, srcs))} -> {dest}")


if __name__ == "__main__":
    main()
