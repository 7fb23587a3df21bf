"""Plots of accuracy matrices (heatmap) and of accuracy per task over training.

Plotting needs matplotlib (the ``bench`` extra); it is imported only inside the plotting
functions, which draw on a standalone ``Figure`` with the Agg renderer: no display, no
pyplot state, no figure left open.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rgo_jax.bench import _plot_style
from rgo_jax.bench import metrics as _metrics
from rgo_jax.bench._files import _atomic_write_bytes
from rgo_jax.bench._text import _task_names

__all__ = ["plot_accuracy_matrix", "plot_accuracy_per_task"]


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
