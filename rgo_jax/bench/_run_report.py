"""The report of one run: ``config.json``, ``results.json``, ``summary.md`` and plots."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rgo_jax.bench import _plot_style
from rgo_jax.bench import metrics as _metrics
from rgo_jax.bench._files import to_jsonable, write_text_atomic
from rgo_jax.bench._plots import plot_accuracy_matrix, plot_accuracy_per_task
from rgo_jax.bench._text import _DIVISOR_NOTE, SCENARIO, _task_names, format_matrix, summary_table

__all__ = ["write_run_report"]

#: The continual-learning scenario of every RGO report.


def _file_stem(method: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", method).strip("._")
    return stem or "method"


def _random_init_for(random_init: Any, method: str) -> Any:
    if random_init is None:
        return None
    if isinstance(random_init, Mapping):
        return random_init.get(method)
    return random_init


def _select_seeds(method: str, value: Any) -> tuple[list[np.ndarray], list[int], list[int]]:
    """All validated seed matrices, the seeds at the largest T, the seeds still running."""
    if isinstance(value, np.ndarray) and value.ndim == 3:
        value = list(value)
    if isinstance(value, np.ndarray) and value.ndim == 2:
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"matrices[{method!r}] must be a non-empty list of [T, T] matrices (one per seed)."
        )
    mats = [
        _metrics.check_accuracy_matrix(m, name=f"matrices[{method!r}][{s}]")
        for s, m in enumerate(value)
    ]
    T = max(m.shape[0] for m in mats)
    done = [s for s, m in enumerate(mats) if m.shape[0] == T]
    running = [s for s, m in enumerate(mats) if m.shape[0] < T]
    return mats, done, running


def _init_rows(method: str, random_init: Any, num_seeds: int, seeds: list[int], T: int):
    """Random-init accuracies for the chosen seeds, cut to the first T tasks."""
    if random_init is None:
        return None
    try:
        b = np.array(random_init, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"random_init for {method!r} must be numeric: {err}") from None
    if b.ndim not in (1, 2) or (b.ndim == 2 and b.shape[0] != num_seeds) or b.shape[-1] < T:
        raise ValueError(
            f"random_init for {method!r} must be [T_total] (shared by the seeds) or "
            f"[{num_seeds}, T_total] (one row per seed) with T_total >= {T}, got shape {b.shape}."
        )
    b = b[..., :T]
    return b if b.ndim == 1 else b[seeds]


def write_run_report(
    run_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    matrices: Mapping[str, Sequence[Any]],
    random_init: Any = None,
    bwt_divisor: str = "T-1",
    ddof: int = 0,
    task_names: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, dict[str, Any]]:
    """Writes the complete report of a run; safe to call again after every task.

    Files in ``run_dir`` (created if needed), each replaced atomically:

    - ``config.json``: ``config``.
    - ``results.json``: per method the raw matrix of every seed (``null`` = not measured),
      the random-init accuracies, and the summary (metrics as fractions, mean matrix).
    - ``summary.md``: the scenario statement, the comparison table (percent, mean ± std),
      the BWT divisor and std convention, and each method's mean matrix.
    - ``accuracy_matrix_<method>.png`` (mean over seeds) and ``accuracy_per_task.png``.

    Partial runs: pass each seed's leading block ``R[:k+1, :k+1]``. When the seeds of a
    method have reached different tasks, the summary and plots use the seeds that reached
    the most tasks, and the others are listed as running (``seeds_in_progress``); all raw
    matrices are saved. All inputs are checked before any file is written.

    Args:
      run_dir: output directory.
      config: the run's configuration (JSON-able; numpy values are converted).
      matrices: ``{method: [R per seed]}`` accuracy matrices (fractions).
      random_init: optional accuracies of randomly initialised networks for FWT: ``[T]``,
        ``[S, T]`` (per seed), or ``{method: either}``; longer vectors are cut to ``T``.
      bwt_divisor: ``"T-1"`` (default) or ``"T"`` (GEM's code), see
        :func:`rgo_jax.bench.metrics.backward_transfer`.
      ddof: std convention over seeds (0: population std).
      task_names: optional names of the tasks (for the matrices' labels).
      plots: write the PNGs (needs matplotlib).

    Returns:
      ``{method: summary}``, each from :func:`rgo_jax.bench.metrics.summarize_seeds` plus
      ``"seeds_summarized"`` and ``"seeds_in_progress"`` (seed indices).

    Examples:
      >>> import os, tempfile
      >>> run = os.path.join(tempfile.mkdtemp(), "run")
      >>> R = [[0.75, 0.5], [0.5, 0.875]]
      >>> out = write_run_report(run, config={"lr": 0.1}, matrices={"RGO": [R]}, plots=False)
      >>> out["RGO"]["acc"]["mean"], sorted(os.listdir(run))
      (0.6875, ['config.json', 'results.json', 'summary.md'])
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}.")
    if not isinstance(matrices, Mapping) or not matrices:
        raise ValueError("matrices must be a non-empty {method: [R per seed]} dict.")
    stems: dict[str, str] = {}
    summaries: dict[str, dict[str, Any]] = {}
    raw: dict[str, Any] = {}
    mean_mats: dict[str, np.ndarray] = {}
    for method, value in matrices.items():
        if not isinstance(method, str) or not method:
            raise TypeError(f"method names must be non-empty strings, got {method!r}.")
        stem = _file_stem(method)
        if stem in stems.values():
            other = next(m for m, s in stems.items() if s == stem)
            raise ValueError(
                f"methods {other!r} and {method!r} map to the same file name {stem!r}."
            )
        stems[method] = stem
        mats, done, running = _select_seeds(method, value)
        T = mats[done[0]].shape[0]
        b = _init_rows(method, _random_init_for(random_init, method), len(mats), done, T)
        summary = _metrics.summarize_seeds(
            [mats[s] for s in done], b, bwt_divisor=bwt_divisor, ddof=ddof
        )
        summary["seeds_summarized"] = done
        summary["seeds_in_progress"] = running
        summaries[method] = summary
        mean_mats[method] = summary["mean_matrix"]
        raw[method] = {
            "matrices": mats,
            "random_init": _random_init_for(random_init, method),
            "summary": summary,
        }
    if task_names is not None:
        for m in mean_mats.values():
            _task_names(list(task_names)[: m.shape[0]], m.shape[0])
    results = {
        "scenario": SCENARIO,
        "convention": "R[i][j] = test accuracy (fraction) on task j after training through "
        "task i; null = not measured",
        "bwt_divisor": bwt_divisor,
        "std_ddof": ddof,
        "methods": raw,
    }
    config_text = json.dumps(to_jsonable(config, where="config"), indent=2, allow_nan=False)
    results_text = json.dumps(to_jsonable(results, where="results"), indent=2, allow_nan=False)
    md = _summary_markdown(summaries, stems, task_names, ddof, bwt_divisor, plots)

    os.makedirs(run_dir, exist_ok=True)
    write_text_atomic(os.path.join(run_dir, "config.json"), config_text + "\n")
    write_text_atomic(os.path.join(run_dir, "results.json"), results_text + "\n")
    write_text_atomic(os.path.join(run_dir, "summary.md"), md)
    if plots:
        for method, m in mean_mats.items():
            names = None if task_names is None else list(task_names)[: m.shape[0]]
            n = summaries[method]["num_seeds"]
            plot_accuracy_matrix(
                m,
                os.path.join(run_dir, f"accuracy_matrix_{stems[method]}.png"),
                title=f"{method}: accuracy (%), mean of {n} seed{'s' if n > 1 else ''}",
                task_names=names,
            )
        per_task = {
            method: [
                np.asarray(raw[method]["matrices"][s])
                for s in summaries[method]["seeds_summarized"]
            ]
            for method in summaries
        }
        plot_accuracy_per_task(per_task, os.path.join(run_dir, "accuracy_per_task.png"), ddof=ddof)
    return summaries


def _summary_markdown(summaries, stems, task_names, ddof, bwt_divisor, plots) -> str:
    std_kind = "population std, ddof=0" if ddof == 0 else f"sample std, ddof={ddof}"
    lines = [
        "# Results",
        "",
        f"Scenario: {SCENARIO}.",
        "",
        f"Accuracies in %, mean ± std over seeds ({std_kind}). "
        f"BWT {_DIVISOR_NOTE.get(bwt_divisor, 'divisor ' + bwt_divisor)}. "
        "Forgetting: mean over earlier tasks of the best accuracy after learning the task "
        "minus the final accuracy (Chaudhry et al., 2018). "
        + _plot_style.FORGETTING_NOTE
        + " LA: accuracy on each task just after "
        "learning it. FWT (when given): zero-shot accuracy before training a task minus that "
        "of a randomly initialised network (GEM).",
        "",
        summary_table(summaries),
        "",
        "Raw accuracy matrices of every seed: `results.json`; configuration: `config.json`.",
    ]
    for method, s in summaries.items():
        T = s["num_tasks"]
        names = None if task_names is None else list(task_names)[:T]
        lines += [
            "",
            f"## {method}",
            "",
            f"Mean accuracy matrix (%) over {s['num_seeds']} seed(s), row i = after training "
            "task i, column j = evaluated on task j:",
            "",
            "```",
            format_matrix(s["mean_matrix"], task_names=names),
            "```",
        ]
        if s["seeds_in_progress"]:
            lines += ["", f"Seeds still running (not in the summary): {s['seeds_in_progress']}."]
        if plots:
            lines += ["", f"![{method} accuracy matrix](accuracy_matrix_{stems[method]}.png)"]
    if plots:
        lines += ["", "![accuracy per task](accuracy_per_task.png)"]
    return "\n".join(lines) + "\n"
