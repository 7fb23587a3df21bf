"""The run directory (``--out``) across reruns: checked before training, resumed per seed,
reported with every finished result, marked while partial.

- :func:`prepare_run_dir` creates ``--out``, checks that it is writable (a probe file, so a
  read-only folder fails at once, not after a task's training inside Orbax), and compares
  the configuration with the one of the run already there: a changed key (e.g.
  ``steps_per_task: 1000 -> 500``) is an error naming it. It returns the finished results
  already there, which :func:`write_report` keeps in the report when the rerun has other
  methods or seeds.
- :func:`split_by_resume_point` splits a group of seeds trained together into runs of
  seeds that resume from the same task, so ``--seeds 0,1`` after a finished seed 0
  restores seed 0 and trains only seed 1.
- :func:`interrupted_message` is the line printed on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgo_jax.bench import _report
from rgo_jax.bench._checkpoint import latest_good_checkpoint
from rgo_jax.bench._validate import RunError

__all__ = [
    "PARTIAL_NOTE",
    "checkpoint_root",
    "end_progress_bars",
    "interrupted_message",
    "prepare_run_dir",
    "removed_if_left_empty",
    "split_by_resume_point",
    "write_report",
]

PARTIAL_NOTE = "**Partial results**"


_ABSENT = object()


def _protocol(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a (JSON) config that must agree for a run to resume: the fingerprint's."""
    from rgo_jax.bench import train  # noqa: PLC0415  (train imports this module)

    names = [f.name for f in dataclasses.fields(train.Config) if f.name not in train.OUTPUT_KEYS]
    return {k: config.get(k, train.ADDED_KEYS.get(k, _ABSENT)) for k in names}


def _fmt(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, sort_keys=True)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every protocol key that differs between two JSON configs.

    Keys that do not change the numbers (:data:`rgo_jax.bench.train.OUTPUT_KEYS`) are not
    compared; a key an older run lacks reads as its value in
    :data:`rgo_jax.bench.train.ADDED_KEYS`.

    Examples:
      >>> config_changes({"steps_per_task": 1000, "seeds": [0]}, {"steps_per_task": 500})
      ['steps_per_task: 1000 -> 500']
    """
    a, b = _protocol(old), _protocol(new)
    return [f"{k}: {_fmt(a[k])} -> {_fmt(b[k])}" for k in a if a[k] != b[k]]


def _probe(folder: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise RunError(
            f"--out {folder} is not writable ({err.strerror or err}); choose another "
            "output directory or fix its permissions."
        ) from None


def prepare_run_dir(cfg: Any, workdir: Path) -> dict[str, list[tuple[int, Any, Any]]]:
    """Creates and checks ``workdir`` before anything trains.

    Args:
      cfg: the run's :class:`rgo_jax.bench.train.Config`.
      workdir: the run directory.

    Returns:
      The finished results already in ``workdir`` (``{method: [(seed, R, random_init row)]}``,
      empty for a new directory).

    Raises:
      RunError: ``workdir`` cannot be created or written, or holds a run of another
        configuration (the message names each differing key, ``old -> new``).
    """
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"--out {workdir} cannot be created ({err.strerror or err}).") from None
    for folder in (workdir, workdir / "checkpoints"):
        if folder.is_dir():
            _probe(folder)
    old = _read_json(workdir / "config.json")
    if old is None:
        return {}
    new = _report.to_jsonable(cfg.to_dict())
    changes = config_changes(old, new)
    if changes:
        raise RunError(
            f"--out {workdir} holds a run of another configuration ({'; '.join(changes)}); "
            "rerun with the same settings to resume, or use another --out."
        )
    return _finished(old, _read_json(workdir / "results.json"))


@contextlib.contextmanager
def removed_if_left_empty(workdir: Path) -> Iterator[None]:
    """Removes the folders a run created for ``workdir`` when it fails before writing a file.

    A data or input error found before training (a data set not found, a bad option) then
    leaves no empty run folder behind. Only folders that did not exist before are removed,
    and only when no file is in them: a pre-existing folder and its content are never touched.

    Examples:
      >>> import pathlib, tempfile
      >>> root = pathlib.Path(tempfile.mkdtemp())
      >>> try:
      ...     with removed_if_left_empty(root / "new" / "run"):
      ...         (root / "new" / "run").mkdir(parents=True)
      ...         raise FileNotFoundError("no data")
      ... except FileNotFoundError:
      ...     pass
      >>> (root / "new").exists()
      False
    """
    top = Path(workdir).absolute()
    if top.exists():
        yield
        return
    while not top.parent.exists():
        top = top.parent
    try:
        yield
    except BaseException:
        if top.is_dir() and not any(p.is_file() or p.is_symlink() for p in top.rglob("*")):
            shutil.rmtree(top, ignore_errors=True)
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: unreadable ({err}); delete it or use another --out.") from None


def _seeds_of(config: Mapping[str, Any], method: str) -> list[int]:
    per_method = config.get("seeds_per_method") or {}
    return [int(s) for s in per_method.get(method, config.get("seeds", []))]


def _finished(config: Mapping[str, Any], results: Any) -> dict[str, list]:
    """The (seed, R, random_init row) of every finished seed of every method of a report."""
    if not isinstance(results, Mapping) or not isinstance(results.get("methods"), Mapping):
        return {}
    out: dict[str, list] = {}
    mats_all = {m: e.get("matrices") or [] for m, e in results["methods"].items()}
    sizes = [len(R) for mats in mats_all.values() for R in mats if R]
    if not sizes:
        return {}
    T = max(sizes)
    for method, entry in results["methods"].items():
        seeds = _seeds_of(config, method)
        init = entry.get("random_init")
        rows = None if init is None else np.asarray(init, dtype=np.float64)
        for i, R in enumerate(mats_all[method]):
            if i >= len(seeds) or not R or len(R) != T:
                continue
            row = None
            if rows is not None:
                row = rows[i] if rows.ndim == 2 else rows
            out.setdefault(method, []).append((seeds[i], np.array(R, dtype=np.float64), row))
    return out


def checkpoint_root(workdir: Path, method: str, seed: int) -> Path:
    """The folder of one (method, seed)'s task checkpoints."""
    return Path(workdir) / "checkpoints" / method / f"seed{seed}"


def split_by_resume_point(
    seeds: tuple[int, ...], workdir: Path, cfg: Any, method: str, log=print
) -> list[tuple[int, ...]]:
    """Splits a group of seeds into consecutive runs of seeds that resume at the same task.

    Args:
      seeds: the group (trained together under ``vmap``).
      workdir: the run directory.
      cfg: the run's config (checkpoints of another fingerprint count as none).
      method: the method's name.
      log: where a corrupt checkpoint is reported.

    Returns:
      The sub-groups, in the order of ``seeds``.
    """
    if not cfg.checkpoint or len(seeds) == 1:
        return [seeds]
    points = []
    for s in seeds:
        found = latest_good_checkpoint(checkpoint_root(workdir, method, s), log=log)
        same = found is not None and found[1].get("fingerprint") == cfg.fingerprint()
        points.append(found[1]["task"] + 1 if same else 0)
    groups: list[list[int]] = []
    for i, s in enumerate(seeds):
        if i and points[i] == points[i - 1]:
            groups[-1].append(s)
        else:
            groups.append([s])
    return [tuple(g) for g in groups]


def write_report(
    workdir: Path,
    previous: Mapping[str, list],
    seeds: Sequence[int],
    num_tasks: int,
    *,
    config: Mapping[str, Any],
    matrices: Mapping[str, list],
    random_init: Mapping[str, Any],
    plots: bool,
) -> dict:
    """:func:`rgo_jax.bench._report.write_run_report` of this run plus the finished
    results of earlier runs in ``workdir`` that it does not redo, and a partial-results
    note in ``summary.md`` until every method and seed of this run has all its tasks.

    Args:
      workdir: the run directory.
      previous: from :func:`prepare_run_dir`.
      seeds: this run's seeds (``matrices[m][k]`` belongs to ``seeds[k]``).
      num_tasks: the number of tasks of a finished seed.
      config, matrices, random_init, plots: as for ``write_run_report`` (this run only).
    """
    methods = list(config["methods"])
    done = all(
        len(matrices.get(m, [])) == len(seeds)
        and all(R is not None and R.shape[0] == num_tasks for R in matrices[m])
        for m in methods
    )
    merged_m: dict[str, list] = {}
    merged_b: dict[str, list] = {}
    per_method: dict[str, list[int]] = {}
    carried = False
    for m in dict.fromkeys([*matrices, *previous]):
        rows: dict[int, tuple[Any, Any]] = {}
        current = list(matrices.get(m, []))
        inits = random_init.get(m)
        for k, R in enumerate(current):
            rows[seeds[k]] = (R, None if inits is None else inits[k])
        for seed, R, row in previous.get(m, []):
            if seed in rows or (m in methods and seed in seeds):
                continue  # this run redoes it (from its checkpoint, or afresh)
            rows[seed] = (R, row)
            carried = True
        if not rows:
            continue
        order = list(rows) if not carried else sorted(rows)
        merged_m[m] = [rows[s][0] for s in order]
        per_method[m] = order
        if all(rows[s][1] is not None for s in order):
            merged_b[m] = [rows[s][1] for s in order]
    if carried:
        config = dict(config)
        config["methods"] = list(merged_m)
        config["seeds"] = sorted({s for v in per_method.values() for s in v})
        config["seeds_per_method"] = per_method
    summaries = _report.write_run_report(
        workdir,
        config=config,
        matrices=merged_m,
        random_init={m: np.stack(v) for m, v in merged_b.items()},
        plots=plots,
    )
    if not done:
        _mark_partial(workdir / "summary.md", matrices, methods, seeds, num_tasks)
    return summaries


def _mark_partial(path: Path, matrices, methods, seeds, num_tasks: int) -> None:
    have = {m: [0 if R is None else R.shape[0] for R in matrices.get(m, [])] for m in methods}
    progress = ", ".join(f"{m} {sum(have[m])}/{len(seeds) * num_tasks} seed-tasks" for m in methods)
    note = (
        f"> {PARTIAL_NOTE}: the run has not finished ({progress}); rerun the same command "
        "to resume. Numbers below cover what has been trained so far."
    )
    text = path.read_text()
    head, sep, rest = text.partition("\n\n")
    _report.write_text_atomic(path, f"{head}{sep}{note}\n\n{rest}")


def interrupted_message(workdir: str | Path, checkpoint: bool = True) -> str:
    """The one line printed when a run is interrupted (Ctrl-C), from what ``workdir`` holds."""
    results = _read_json_quiet(Path(workdir) / "results.json")
    where = "before its first task finished"
    if isinstance(results, Mapping) and isinstance(results.get("methods"), Mapping):
        last = None
        for method, entry in results["methods"].items():
            sizes = [len(R) for R in entry.get("matrices") or [] if R]
            if sizes:  # the seeds still training are the ones with the fewest tasks
                last = (method, min(sizes) - 1)
        if last is not None:
            where = f"after task {last[1]} ({last[0]})"
    tail = (
        "rerun the same command to resume"
        if checkpoint
        else "checkpoints are off, so a rerun starts again"
    )
    return f"rgo-bench: interrupted {where}; {tail}."


def end_progress_bars() -> None:
    """Closes the progress bars a stopped run left open, so that a message starts a line."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _read_json_quiet(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
