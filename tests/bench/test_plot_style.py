"""The report's figures: a distinct style per method for any number of methods, the legend
off the curves, the heatmap's marks explained in the figure, negative forgetting explained."""

import numpy as np
import pytest

from rgo_jax.bench import _plot_style, _plots, _report

TWELVE = ["rgo", "sgd", "stl", "ewc", "agem", "owm", "online-ewc", "joint", "rgo-nofel"]
TWELVE += ["rgo-alpha1", "rgo-sample", "gpm"]  # the permuted-MNIST report's methods


@pytest.mark.parametrize("n", [1, 2, 10, 11, 12, 20, 21, 60])
def test_every_method_gets_its_own_colour(n):
    styles = _plot_style.method_styles([f"m{i}" for i in range(n)])
    assert len({s["color"] for s in styles.values()}) == n
    # and its own (colour, line style, marker) look
    assert len({tuple(s.values()) for s in styles.values()}) == n


def test_up_to_ten_methods_keep_matplotlibs_default_colours():
    import matplotlib

    default = [
        matplotlib.colors.to_rgba(c)
        for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    ]
    styles = _plot_style.method_styles(TWELVE[:10])
    assert [s["color"] for s in styles.values()] == default[:10]


def test_shades_of_one_hue_differ_in_line_style_too():
    # tab20 pairs a dark and a light shade: neighbours must not look alike.
    styles = list(_plot_style.method_styles([f"m{i}" for i in range(20)]).values())
    for a, b in zip(styles[::2], styles[1::2], strict=True):
        assert a["linestyle"] != b["linestyle"] and a["marker"] != b["marker"]


def test_repeated_method_names_are_an_error():
    with pytest.raises(ValueError, match="distinct"):
        _plot_style.method_styles(["rgo", "rgo"])


def _capture(monkeypatch):
    figures = []

    def keep(fig, path):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig).draw()  # laid out as when saved
        figures.append(fig)

    monkeypatch.setattr(_plots, "_save_png", keep)
    return figures


def test_twelve_methods_plot_distinct_with_the_legend_outside(tmp_path, monkeypatch):
    figures = _capture(monkeypatch)
    rng = np.random.default_rng(0)
    results = {m: np.tril(rng.uniform(0.5, 1.0, (4, 4))) for m in TWELVE}
    _report.plot_accuracy_per_task(results, tmp_path / "c.png")
    (fig,) = figures
    for ax in fig.axes:
        looks = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines()}
        colours = {str(ln.get_color()) for ln in ax.get_lines()}
        assert len(ax.get_lines()) == 12 and len(looks) == 12 and len(colours) == 12
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    renderer = fig.canvas.get_renderer()
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:  # the legend overlaps no axes
        inner = ax.get_window_extent(renderer)
        assert box.x0 >= inner.x1 or box.x1 <= inner.x0 or box.y0 >= inner.y1 or box.y1 <= inner.y0


def test_heatmap_explains_grey_and_italic_cells(tmp_path, monkeypatch):
    figures = _capture(monkeypatch)
    R = np.array([[0.9, 0.1, np.nan], [0.8, 0.9, 0.2], [0.7, 0.8, 0.9]])
    _report.plot_accuracy_matrix(R, tmp_path / "m.png")
    (fig,) = figures
    texts = " ".join(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")))
    assert "grey: not measured" in texts and "italic: zero-shot" in texts


def test_summary_says_forgetting_can_be_negative(tmp_path):
    R = np.array([[0.6, np.nan], [0.9, 0.9]])  # task 0 improves: forgetting -30 %
    summaries = _report.write_run_report(
        tmp_path, config={"methods": ["rgo"], "seeds": [0]}, matrices={"rgo": [R]}, plots=False
    )
    assert summaries["rgo"]["forgetting"]["mean"] < 0
    text = (tmp_path / "summary.md").read_text()
    assert _plot_style.FORGETTING_NOTE in " ".join(text.split())
