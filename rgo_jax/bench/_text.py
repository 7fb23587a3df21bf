"""Result text: printed accuracy matrices and summaries, Markdown tables (percentages).

Everything here consumes the accuracy matrices and summaries of :mod:`rgo_jax.bench.metrics`
(accuracies as fractions in ``[0, 1]``) and shows them as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rgo_jax.bench import metrics as _metrics

__all__ = ["SCENARIO", "format_matrix", "format_summary", "markdown_table", "summary_table"]

#: The continual-learning scenario of every RGO report.
SCENARIO = "task-incremental, task id known at train and test time"

_LABELS = {
    "acc": "ACC",
    "bwt": "BWT",
    "forgetting": "Forgetting",
    "learning_accuracy": "Learning accuracy",
    "fwt": "FWT",
}
_DIVISOR_NOTE = {
    "T-1": "divisor T-1: mean over the T-1 earlier tasks, as GEM's paper, GPM, Mammoth, Avalanche",
    "T": "divisor T: sum over the T-1 earlier tasks divided by T, as GEM's released code",
}
_DIVISOR_SHORT = {"T-1": "divisor T-1", "T": "divisor T, as GEM's code"}


def _task_names(task_names: Sequence[str] | None, T: int) -> list[str]:
    if task_names is None:
        return [f"task {j}" for j in range(T)]
    names = [str(n) for n in task_names]
    if len(names) != T:
        raise ValueError(f"task_names has {len(names)} names for a matrix of {T} tasks.")
    return names


def format_matrix(R: Any, *, task_names: Sequence[str] | None = None, decimals: int = 1) -> str:
    """The accuracy matrix row by row, in percent.

    Row ``i`` reads "after task i", column ``j`` is "task j". Entries above the diagonal
    (zero-shot accuracy on a task not yet trained) are shown in parentheses; unmeasured
    (``nan``) entries are shown as ``-``.

    Args:
      R: accuracy matrix ``[T, T]`` (fractions), see
        :func:`rgo_jax.bench.metrics.check_accuracy_matrix`.
      task_names: optional ``T`` names used instead of ``"task j"``.
      decimals: digits after the decimal point.

    Returns:
      A multi-line string (no trailing newline).

    Examples:
      >>> print(format_matrix([[0.9, 0.125], [0.8, 0.95]]))
                    task 0  task 1
      after task 0   90.0   (12.5)
      after task 1   80.0    95.0
      (x): zero-shot accuracy before the task was trained
    """
    arr = _metrics.check_accuracy_matrix(R)
    T = arr.shape[0]
    names = _task_names(task_names, T)
    cells: list[list[str]] = []
    for i in range(T):
        row = []
        for j in range(T):
            v = arr[i, j]
            if np.isnan(v):
                row.append("- ")
            elif j > i:
                row.append(f"({100 * v:.{decimals}f})")
            else:
                row.append(f"{100 * v:.{decimals}f} ")
        cells.append(row)
    width = max(max(len(c) for r in cells for c in r), max(len(n) for n in names) + 1)
    labels = [f"after {n}" for n in names]
    lw = max(len(s) for s in labels)
    lines = [" " * lw + " " + "".join(f"{n} ".rjust(width + 1) for n in names).rstrip()]
    for label, row in zip(labels, cells, strict=True):
        lines.append(label.ljust(lw) + " " + "".join(c.rjust(width + 1) for c in row).rstrip())
    upper = ~np.tril(np.ones((T, T), dtype=bool))
    notes = []
    if (upper & ~np.isnan(arr)).any():
        notes.append("(x): zero-shot accuracy before the task was trained")
    if np.isnan(arr).any():
        notes.append("-: not measured")
    if notes:
        lines.append("; ".join(notes))
    return "\n".join(lines)


def _pct(x: float, decimals: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{decimals}f}"


def format_summary(summary: Mapping[str, Any], *, decimals: int = 2) -> str:
    """Summary lines such as ``ACC  91.14 ± 0.20 %`` from :func:`~rgo_jax.bench.metrics.summarize`.

    Accepts the output of :func:`rgo_jax.bench.metrics.summarize` (one run: plain values) or
    of :func:`rgo_jax.bench.metrics.summarize_seeds` (``mean ± std`` over seeds). The BWT line
    states its divisor; FWT appears when the summary has it. Undefined metrics (one task)
    print ``n/a``.

    Examples:
      >>> from rgo_jax.bench.metrics import summarize
      >>> print(format_summary(summarize([[0.75, 0.5], [0.5, 0.875]])))
      ACC                 68.75 %
      BWT                -25.00 %  (divisor T-1)
      Forgetting          25.00 %
      Learning accuracy   81.25 %
      2 tasks, 1 run
    """
    if not isinstance(summary, Mapping) or "acc" not in summary:
        raise TypeError(
            "format_summary expects the dict returned by metrics.summarize or "
            f"metrics.summarize_seeds, got {type(summary).__name__}"
            + (f" with keys {sorted(summary)}" if isinstance(summary, Mapping) else "")
            + "."
        )
    lines = []
    width = max(len(v) for v in _LABELS.values())
    for key, label in _LABELS.items():
        if key not in summary:
            continue
        value = summary[key]
        mean = value["mean"] if isinstance(value, Mapping) else value
        text = _mean_std(value, decimals, with_std=summary.get("num_seeds", 1) > 1)
        if text is None:
            text = "n/a".rjust(decimals + 5)
        else:
            text = text.rjust(decimals + 5 + (len(text) - len(text.split(" ")[0]))) + " %"
        if key == "bwt":
            divisor = summary.get("bwt_divisor", "T-1")
            text += f"  ({_DIVISOR_SHORT.get(divisor, f'divisor {divisor}')})"
        if not _finite(mean) and summary.get("num_tasks") == 1:
            text += "  (undefined with a single task)"
        lines.append(f"{label.ljust(width)} {text}")
    footer = []
    if "num_tasks" in summary:
        t = summary["num_tasks"]
        footer.append(f"{t} task{'s' if t != 1 else ''}")
    if "num_seeds" in summary:
        n = summary["num_seeds"]
        ddof = summary.get("std_ddof", 0)
        kind = "population std" if ddof == 0 else "sample std" if ddof == 1 else "std"
        footer.append(f"{n} seeds (mean ± {kind}, ddof={ddof})" if n > 1 else "1 seed")
    else:
        footer.append("1 run")
    lines.append(", ".join(footer))
    return "\n".join(lines)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(value) else format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    *,
    floatfmt: str = ".2f",
) -> str:
    """A Markdown (GitHub) table: one line per row dict, one column per key.

    Args:
      rows: dicts mapping column keys to values. Strings are written as they are (``|``
        escaped), floats with ``floatfmt``, ``None``/``nan`` and missing keys as ``—``.
      columns: the keys to show, in order; a mapping ``{key: header}`` sets the headers.
      floatfmt: format spec for floats.

    Returns:
      The table, no trailing newline.

    Raises:
      KeyError: if a column appears in none of the rows (most likely a misspelt key).

    Examples:
      >>> print(markdown_table([{"method": "RGO", "ACC": 91.136}], ["method", "ACC"]))
      | method | ACC   |
      | ---    | ---   |
      | RGO    | 91.14 |
    """
    if isinstance(columns, Mapping):
        keys, headers = list(columns), [str(h) for h in columns.values()]
    elif isinstance(columns, str):
        raise TypeError("columns must be a sequence of keys (or a mapping), not one string.")
    else:
        keys = list(columns)
        headers = [str(k) for k in keys]
    if not keys:
        raise ValueError("markdown_table needs at least one column.")
    for k in keys:
        if rows and not any(k in r for r in rows):
            raise KeyError(f"column {k!r} is in none of the rows (row keys: {sorted(rows[0])}).")
    table = [headers, ["---"] * len(keys)]
    table += [[_cell(r.get(k), floatfmt) for k in keys] for r in rows]
    widths = [max(len(line[c]) for line in table) for c in range(len(keys))]
    return "\n".join(
        "| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |"
        for line in table
    )


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _mean_std(value: Any, decimals: int = 2, *, with_std: bool = True) -> str | None:
    """``"91.14 ± 0.20"`` (percent) from a seed metric, a plain value from a single run, or
    ``None`` when undefined. The std is left out when ``with_std`` is false (one seed) or
    when it is undefined."""
    if isinstance(value, Mapping):
        mean, std = value["mean"], value["std"]
        if not _finite(mean):
            return None
        if not with_std or not _finite(std):
            return _pct(mean, decimals)
        return f"{_pct(mean, decimals)} ± {_pct(std, decimals)}"
    return _pct(value, decimals) if _finite(value) else None


_TABLE_COLUMNS = {
    "method": "method",
    "tasks": "tasks",
    "seeds": "seeds",
    "acc": "ACC %",
    "bwt": "BWT %",
    "forgetting": "forgetting %",
    "learning_accuracy": "LA %",
    "fwt": "FWT %",
}


def summary_table(summaries: Mapping[str, Mapping[str, Any]], *, decimals: int = 2) -> str:
    """The Markdown comparison table of several methods' summaries (one row per method).

    Args:
      summaries: ``{method: summary}`` with summaries from :func:`rgo_jax.bench.metrics.summarize`
        or :func:`rgo_jax.bench.metrics.summarize_seeds`.
      decimals: digits of the percentages.

    Returns:
      A Markdown table with columns method, tasks, seeds, ACC %, BWT %, forgetting %, LA %
      and, when some summary has it, FWT %; cells are ``mean ± std`` in percent (the mean
      alone for a single seed or run).

    Examples:
      >>> from rgo_jax.bench.metrics import summarize_seeds
      >>> R1, R2 = [[0.75, 0.5], [0.5, 0.875]], [[0.75, 0.5], [0.25, 0.875]]
      >>> print(summary_table({"RGO": summarize_seeds([R1, R2])}))
      | method | tasks | seeds | ACC %         | BWT %          | forgetting %  | LA %         |
      | ---    | ---   | ---   | ---           | ---            | ---           | ---          |
      | RGO    | 2     | 2     | 62.50 ± 6.25  | -37.50 ± 12.50 | 37.50 ± 12.50 | 81.25 ± 0.00 |
    """
    rows = []
    for method, s in summaries.items():
        seeds = str(s.get("num_seeds", 1))
        running = len(s.get("seeds_in_progress", ()))
        if running:
            seeds += f" (+{running} running)"
        row: dict[str, Any] = {"method": str(method), "tasks": s.get("num_tasks"), "seeds": seeds}
        for key in _metrics.METRIC_KEYS:
            if key in s:
                row[key] = _mean_std(s[key], decimals, with_std=s.get("num_seeds", 1) > 1)
        rows.append(row)
    columns = dict(_TABLE_COLUMNS)
    if not any("fwt" in s for s in summaries.values()):
        del columns["fwt"]
    return markdown_table(rows, columns)
