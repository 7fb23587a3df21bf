"""How the report's figures tell methods apart and explain themselves: one line style per
method, distinct for any number of methods, a legend outside the axes, and the notes that
say what a figure's marks mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "FORGETTING_NOTE",
    "HEATMAP_NOTE",
    "LEGEND_OUTSIDE",
    "method_styles",
]

#: The heatmap's marks, in the figure itself.
HEATMAP_NOTE = "(x), italic: zero-shot accuracy on a task not yet trained; grey: not measured"
#: Said wherever forgetting is reported.
FORGETTING_NOTE = (
    "Forgetting can be negative by definition: a task whose final accuracy exceeds its best "
    "earlier one (backward transfer) has forgetting below zero."
)
#: ``Axes.legend`` keywords that place the legend to the right of the axes, off the curves.
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}

_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    import matplotlib  # noqa: PLC0415

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:  # tab20: a dark and a light shade of each hue
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["turbo"]  # n evenly spaced, distinct colours
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def method_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A line style per method: a colour of its own, and a line style and marker that also
    differ between methods of neighbouring colours.

    Up to 10 methods get the ``tab10`` colours and solid lines (matplotlib's default cycle);
    more get ``tab20`` (20) or ``turbo`` colours, every colour distinct, with the line style
    and marker cycling so that the light and dark shade of a hue look different as well.

    Args:
      names: the methods, in plotting order (repeated names are an error).

    Returns:
      ``{name: {"color", "linestyle", "marker"}}``, keywords of ``Axes.plot``.

    Examples:
      >>> styles = method_styles([f"m{i}" for i in range(12)])
      >>> len({s["color"] for s in styles.values()})
      12
      >>> styles["m0"]["linestyle"] != styles["m1"]["linestyle"]
      True
    """
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}.")
    n = len(names)
    colours = _colours(n)
    styles = {}
    for i, name in enumerate(names):
        k = 0 if n <= 10 else i
        styles[name] = {
            "color": tuple(float(c) for c in colours[i]),
            "linestyle": _LINESTYLES[k % len(_LINESTYLES)],
            "marker": _MARKERS[k % len(_MARKERS)] if n > 10 else "o",
        }
    return styles
