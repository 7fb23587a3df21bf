"""Copies a finished run directory into ``benchmarks/results/`` with its provenance.

Only the small files are copied (config, raw matrices, summary, plots; never checkpoints),
and ``PROVENANCE.md`` records the command, the commit the run started from, the machine and
the wall time.

    python benchmarks/publish.py runs/pmnist benchmarks/results/permuted_mnist \\
        --command "rgo-bench --config ..." --commit abc1234 --wall "27 min"
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
from pathlib import Path

import jax

from rgo_jax import write_text_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("dest")
    ap.add_argument("--command", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--wall", default="not recorded")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    src, dest = Path(args.run_dir), Path(args.dest)
    if not (src / "results.json").is_file():
        raise SystemExit(f"{src} has no results.json: not a finished run directory.")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in {".json", ".md", ".png"}:
            shutil.copy2(f, dest / f.name)
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (
        f"# Provenance\n\n- command: `{args.command}`\n- commit: `{args.commit}`\n"
        f"- machine: {platform.platform()}, {cpu}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()})\n- wall time: {args.wall}\n"
    )
    if args.note:
        text += f"- note: {args.note}\n"
    write_text_atomic(dest / "PROVENANCE.md", text)
    print(f"published {src} -> {dest}")


if __name__ == "__main__":
    main()
