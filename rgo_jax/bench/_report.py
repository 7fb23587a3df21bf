"""Result reporting: printed matrices and summaries, Markdown tables, atomic files, plots.

Everything here consumes the accuracy matrices and summaries of :mod:`rgo_jax.bench.metrics`
(accuracies as fractions in ``[0, 1]``) and shows them as percentages. Files are written
atomically (a temporary file in the same directory, flushed, fsynced, then ``os.replace``),
so a report can be rewritten after every task and a reader never sees a half-written file.
Plotting needs matplotlib (the ``bench`` extra); it is imported only inside the plotting
functions, which draw on a standalone ``Figure`` with the Agg renderer: no display, no
pyplot state, no figure left open.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rgo_jax.bench import _plot_style
from rgo_jax.bench import metrics as _metrics

__all__ = [
    "SCENARIO",
    "format_matrix",
    "format_summary",
    "markdown_table",
    "plot_accuracy_matrix",
    "plot_accuracy_per_task",
    "summary_table",
    "to_jsonable",
    "write_json_atomic",
    "write_run_report",
    "write_text_atomic",
]

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


# ----------------------------------------------------------------------------------------
# Text


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


# ----------------------------------------------------------------------------------------
# Atomic files


def to_jsonable(obj: Any, *, where: str = "obj") -> Any:
    """Converts ``obj`` to plain JSON types: numpy arrays to nested lists, numpy scalars to
    Python numbers, non-finite floats (``nan``, ``inf``) to ``None``.

    JSON has no NaN or Infinity, so they are written as ``null`` (read back as ``None``; turn
    a matrix back into floats with ``np.array(x, dtype=float)``, which maps ``None`` to
    ``nan``). Tuples become lists, paths strings, dataclasses dicts; integer mapping keys are
    turned into strings (as ``json`` does).

    Raises:
      TypeError: naming the path of the first value that has no JSON form.

    Examples:
      >>> import numpy as np
      >>> to_jsonable({"R": np.array([[0.5, np.nan]]), "n": np.int64(3)})
      {'R': [[0.5, None]], 'n': 3}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, (str, int, np.integer)):
                raise TypeError(f"{where}: dict key {k!r} ({type(k).__name__}) is not a string.")
            out[str(k)] = to_jsonable(v, where=f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return to_jsonable(fields, where=where)
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biuf":
            if arr.dtype.kind == "O":
                return to_jsonable(arr.tolist(), where=where)
            raise TypeError(f"{where}: array of dtype {arr.dtype} has no JSON form.")
        return to_jsonable(arr.tolist(), where=where)
    raise TypeError(f"{where}: object of type {type(obj).__name__} is not JSON serialisable.")


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a fsynced temp file in the same directory + os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist.")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Writes ``text`` to ``path`` atomically: readers see the old file or the new, never part.

    The text goes to a temporary file in the same directory, which is flushed, fsynced and
    then moved over ``path`` with ``os.replace``; on any error the temporary file is removed
    and an existing ``path`` is left untouched. A new file gets mode ``0o644``; a replaced
    file keeps its mode.

    Examples:
      >>> import os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> write_text_atomic(os.path.join(d, "a.txt"), "hello\\n")
      >>> open(os.path.join(d, "a.txt")).read(), os.listdir(d)
      ('hello\\n', ['a.txt'])
    """
    if not isinstance(text, str):
        raise TypeError(
            f"write_text_atomic({os.fspath(path)!r}): text must be str, got {type(text).__name__}."
        )
    _atomic_write_bytes(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`).

    The object is converted with :func:`to_jsonable` (numpy arrays to nested lists, numpy
    scalars to numbers, ``nan``/``inf`` to ``null`` since JSON has no NaN) and fully
    serialised in memory before anything touches the disk, so an unserialisable value raises
    ``TypeError`` and leaves an existing file intact.

    Examples:
      >>> import json, os, tempfile, numpy as np
      >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
      >>> write_json_atomic(p, {"R": np.eye(2), "bwt": float("nan")})
      >>> json.load(open(p))
      {'R': [[1.0, 0.0], [0.0, 1.0]], 'bwt': None}
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    write_text_atomic(path, text + "\n")


# ----------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float):
    """A standalone matplotlib Figure (no pyplot, nothing registered, nothing to close)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the bench extra
        raise ImportError(
            "plotting needs matplotlib; install it with `pip install 'rgo_jax[bench]'`."
        ) from err
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # render with Agg whatever the process-wide backend is
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        fig.clear()
    _atomic_write_bytes(path, buf.getvalue())


def plot_accuracy_matrix(
    R: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    task_names: Sequence[str] | None = None,
) -> None:
    """Draws the accuracy matrix as an annotated heatmap PNG.

    Rows are "after training task i", columns "evaluated on task j", colours 0-100 %.
    Zero-shot cells (above the diagonal) are annotated in parentheses; unmeasured cells are
    grey. The PNG is written atomically.

    Args:
      R: accuracy matrix ``[T, T]`` (fractions).
      path: the PNG file to write.
      title: figure title (default "Accuracy matrix (%)").
      task_names: optional tick labels for the ``T`` tasks.
    """
    arr = _metrics.check_accuracy_matrix(R)
    T = arr.shape[0]
    names = _task_names(task_names, T) if task_names is not None else [str(j) for j in range(T)]
    side = min(3.0 + 0.5 * T, 14.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(100 * arr), cmap=cmap, vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.85)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(T), names, rotation=90 if task_names is not None else 0)
    ax.set_yticks(range(T), names)
    ax.set_title(title if title is not None else "Accuracy matrix (%)")
    fig.supxlabel(_plot_style.HEATMAP_NOTE, fontsize=8)
    if T <= 40:
        fontsize = max(4.0, min(10.0, 130.0 / T))
        decimals = 1 if T <= 12 else 0
        for i in range(T):
            for j in range(T):
                v = arr[i, j]
                if np.isnan(v):
                    continue
                label = f"{100 * v:.{decimals}f}"
                ax.text(
                    j,
                    i,
                    f"({label})" if j > i else label,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if v < 0.5 else "black",
                    fontstyle="italic" if j > i else "normal",
                )
    _save_png(fig, path)


def _stack_seeds(name: str, value: Any) -> np.ndarray:
    """``[S, T, T]`` from one matrix or a list of per-seed matrices of one method."""
    if isinstance(value, np.ndarray) and value.ndim == 3:
        value = list(value)
    elif not isinstance(value, (list, tuple)) or (len(value) > 0 and np.ndim(value[0]) == 1):
        value = [value]  # a single matrix (array or nested lists)
    if len(value) == 0:
        raise ValueError(f"method {name!r}: no accuracy matrix given.")
    mats = [_metrics.check_accuracy_matrix(m, name=f"{name}[{s}]") for s, m in enumerate(value)]
    if len({m.shape for m in mats}) != 1:
        detail = ", ".join(f"seed {s}: {m.shape}" for s, m in enumerate(mats))
        raise ValueError(f"method {name!r}: seeds have different shapes ({detail}).")
    return np.stack(mats)


def plot_accuracy_per_task(
    results: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    ddof: int = 0,
) -> None:
    """Per-method accuracy curves as a PNG: final accuracy per task, and ACC after each task.

    Left panel: accuracy on each task ``j`` at the end of training, ``R[T-1, j]``. Right
    panel: average accuracy over the tasks seen so far after each task ``i``
    (:func:`rgo_jax.bench.metrics.average_accuracy_curve`). One line per method (mean over seeds)
    with a ``mean ± std`` band when there are several seeds.

    Args:
      results: ``{method: R}`` or ``{method: [R per seed]}``; methods may differ in ``T``,
        the seeds of one method may not.
      path: the PNG file to write (atomically).
      title: optional figure title.
      ddof: delta degrees of freedom of the std band (0: population std).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty {method: matrix or [matrix per seed]}.")
    stacks = {str(name): _stack_seeds(str(name), value) for name, value in results.items()}
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11.0 + (1.6 if len(stacks) > 1 else 0.0), 4.2)
    ax_final, ax_curve = fig.subplots(1, 2)
    styles = _plot_style.method_styles(list(stacks))
    for name, stack in stacks.items():
        S, T, _ = stack.shape
        final = 100 * stack[:, -1, :]
        curve = 100 * np.stack([_metrics.average_accuracy_curve(m) for m in stack])
        x = np.arange(T)
        for ax, ys in ((ax_final, final), (ax_curve, curve)):
            mean = ys.mean(axis=0)
            (line,) = ax.plot(
                x,
                mean,
                **{**styles[name], "marker": styles[name]["marker"] if T <= 30 else None},
                markersize=3,
                label=f"{name} ({S} seed{'s' if S > 1 else ''})",
            )
            if S > max(ddof, 1):
                std = ys.std(axis=0, ddof=ddof)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax_final.set_xlabel("task j")
    ax_final.set_ylabel("accuracy (%)")
    ax_final.set_title("accuracy on each task after the last task")
    ax_curve.set_xlabel("after training task i")
    ax_curve.set_ylabel("average accuracy on tasks 0..i (%)")
    ax_curve.set_title("average accuracy over seen tasks")
    for ax in (ax_final, ax_curve):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_curve.legend(fontsize=8, **_plot_style.LEGEND_OUTSIDE)
    if title is not None:
        fig.suptitle(title)
    _save_png(fig, path)


# ----------------------------------------------------------------------------------------
# Run report


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


# Keys the merge itself accounts for: what it combines (methods, seeds, method options), what
# an earlier merge added, and the software that ran. The harness names its own speed and
# output switches through ``free_keys``.
_MERGE_OWN_KEYS = frozenset(
    {
        "methods",
        "seeds",
        "method_options",
        "method_options_per_method",
        "jax",
        "backend",
        "merged_from",
        "merged_excluded",
        "seeds_per_method",
    }
)


def _read_run(run_dir: str | os.PathLike) -> tuple[dict, dict]:
    out = []
    for name in ("config.json", "results.json"):
        path = os.path.join(run_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                out.append(json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; not a run directory.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from None
    config, results = out
    if not isinstance(results.get("methods"), Mapping) or "seeds" not in config:
        raise ValueError(f"{run_dir}: results.json has no 'methods' or config.json no 'seeds'.")
    return config, results


def merge_run_reports(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    free_keys: Iterable[str] = (),
    key_defaults: Mapping[str, Any] | None = None,
    exclude: Iterable[tuple[str | os.PathLike, str]] = (),
    plots: bool = True,
) -> dict[str, dict[str, Any]]:
    """Merges finished runs of one protocol into one report (e.g. more seeds, more methods).

    Each run directory is one written by :func:`write_run_report` from the benchmark harness
    (``config.json`` with ``seeds``, ``results.json``). The runs must agree on every
    configuration key but the methods, the seeds, the method options, the software versions
    and ``free_keys``. The runs that give one method must agree on every method option they
    both set; runs of different methods may differ (the merged ``config.json`` keeps each
    method's options in ``method_options_per_method``). A (method, seed) pair may come from
    one run only. The merged matrices are ordered by seed, and the merged ``config.json``
    records the source runs (directory names only) and the seeds of every method.

    Args:
      run_dirs: the run directories, in any order.
      out_dir: where the merged report is written.
      free_keys: further configuration keys the runs may differ in: switches of the harness
        that do not change the protocol (for the benchmark harness,
        :data:`rgo_jax.bench.train.MERGE_FREE_KEYS`). The merged ``config.json`` keeps the first
        run's values of these.
      key_defaults: the value a configuration key had before it existed, for keys added
        after some runs were written (for the benchmark harness,
        :data:`rgo_jax.bench.train.ADDED_KEYS`): a run whose ``config.json`` lacks the key is
        compared, and merged, as if it had this value.
      exclude: ``(run_dir, method)`` pairs left out of the merge: a method of a run that a
        later run supersedes (e.g. rerun with another hyperparameter).
      plots: draw the PNG plots.

    Returns:
      ``{method: summary}``, as :func:`write_run_report`.
    """
    if not run_dirs:
        raise ValueError("merge_run_reports needs at least one run directory.")
    if isinstance(free_keys, str):
        raise TypeError(
            f"free_keys must be a collection of key names, not the string {free_keys!r}."
        )
    free = _MERGE_OWN_KEYS | set(free_keys)
    base: dict | None = None
    base_dir = None
    # Method options are checked per method: the runs that give one method must agree on
    # every option they both set (runs of other methods may use other values).
    options: dict[str, dict[str, Any]] = {}
    option_src: dict[str, dict[str, str]] = {}
    per_method: dict[str, dict[int, tuple[Any, Any]]] = {}
    conventions = None
    keys = [os.path.normpath(d) for d in run_dirs]
    skip: dict[str, set[str]] = {}
    for run_dir, method in exclude:
        key = os.path.normpath(run_dir)
        if key not in keys:
            raise ValueError(f"exclude names {run_dir}, which is not one of the runs merged.")
        skip.setdefault(key, set()).add(method)
    for run_dir, key in zip(run_dirs, keys, strict=True):
        config, results = _read_run(run_dir)
        config = {**(key_defaults or {}), **config}
        unknown = skip.get(key, set()) - set(results["methods"])
        if unknown:
            raise ValueError(
                f"exclude names method(s) {sorted(unknown)} that {run_dir} does not have "
                f"(it has {sorted(results['methods'])})."
            )
        conv = (results.get("bwt_divisor", "T-1"), results.get("std_ddof", 0))
        protocol = {k: v for k, v in config.items() if k not in free}
        if base is None:
            base, base_dir, conventions = config, run_dir, conv
            base_protocol = protocol
        else:
            for k in sorted(set(base_protocol) | set(protocol)):
                if base_protocol.get(k) != protocol.get(k):
                    raise ValueError(
                        f"{run_dir} and {base_dir} differ in {k!r} "
                        f"({protocol.get(k)!r} vs {base_protocol.get(k)!r}): not one protocol."
                    )
            if conv != conventions:
                raise ValueError(
                    f"{run_dir} uses BWT divisor / std ddof {conv}, {base_dir} uses {conventions}."
                )
        for method, entry in results["methods"].items():
            if method in skip.get(key, ()):
                continue
            # A rerun that kept earlier results records each method's own seeds.
            seeds = [
                int(s) for s in (config.get("seeds_per_method") or {}).get(method, config["seeds"])
            ]
            run_options = (config.get("method_options_per_method") or {}).get(
                method, config.get("method_options") or {}
            )
            opts, srcs = options.setdefault(method, {}), option_src.setdefault(method, {})
            for k, v in run_options.items():
                if k in opts and opts[k] != v:
                    raise ValueError(
                        f"method option {k!r} is {v!r} in {run_dir} but {opts[k]!r} in "
                        f"{srcs[k]}, and both give method {method!r}."
                    )
                opts[k], srcs[k] = v, str(run_dir)
            mats = entry.get("matrices") or []
            if len(mats) != len(seeds):
                raise ValueError(
                    f"{run_dir}: method {method!r} has {len(mats)} matrices for the "
                    f"{len(seeds)} seeds {seeds} (an unfinished run?)."
                )
            init = entry.get("random_init")
            init_rows = np.asarray(init, dtype=np.float64) if init is not None else None
            for i, seed in enumerate(seeds):
                slot = per_method.setdefault(method, {})
                if seed in slot:
                    raise ValueError(
                        f"method {method!r}, seed {seed} is in {run_dir} and in an earlier run."
                    )
                row = None
                if init_rows is not None:
                    row = init_rows[i] if init_rows.ndim == 2 else init_rows
                slot[seed] = (mats[i], row)
    matrices, random_init = {}, {}
    for method, slot in per_method.items():
        order = sorted(slot)
        matrices[method] = [
            np.array([[np.nan if v is None else v for v in r] for r in slot[s][0]]) for s in order
        ]
        rows = [slot[s][1] for s in order]
        if all(r is not None for r in rows):
            random_init[method] = np.stack(rows)
    config = dict(base)
    config["methods"] = list(per_method)
    config["seeds"] = sorted({s for slot in per_method.values() for s in slot})
    # Top level: the options on which every method agrees; per method: all of its own.
    shared: dict[str, Any] = {}
    clash: set[str] = set()
    for opts in options.values():
        for k, v in opts.items():
            if k in shared and shared[k] != v:
                clash.add(k)
            shared.setdefault(k, v)
    config["method_options"] = {k: v for k, v in shared.items() if k not in clash}
    config["method_options_per_method"] = options
    config["seeds_per_method"] = {m: sorted(slot) for m, slot in per_method.items()}
    config["merged_from"] = [os.path.basename(k) for k in keys]
    if skip:
        config["merged_excluded"] = {os.path.basename(k): sorted(m) for k, m in skip.items()}
    return write_run_report(
        out_dir,
        config=config,
        matrices=matrices,
        random_init=random_init or None,
        bwt_divisor=conventions[0],
        ddof=conventions[1],
        plots=plots,
    )
