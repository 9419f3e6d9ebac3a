import math

import pytest
from matplotlib.image import imread

from fedpeft.compare import plots
from fedpeft.compare.grid import Run
from tests.compare.test_aggregate import _result
from tests.compare.test_budget import _group


def test_both_plots_are_written(grid_dir):
    for name in ("accuracy_by_round.png", "accuracy_vs_bytes.png"):
        image = imread(grid_dir / name)
        assert image.shape[0] > 200 and image.shape[1] > 300


def test_a_line_per_strategy_and_a_panel_per_other_value():
    configs = [
        (("strategy", s), ("partition.alpha", a)) for a in ("0.1", "1.0") for s in ("x", "y")
    ]
    hue, panels = plots._layout(configs)
    assert hue == "strategy"
    assert panels == [(("partition.alpha", "0.1"),), (("partition.alpha", "1.0"),)]
    hue, panels = plots._layout([(("dp", "off"),), (("dp", "eps3"),)])
    assert hue == "dp" and panels == [()]


def test_band_is_the_ci_over_runs_on_common_points():
    means, lows, highs = plots._band([[0.5, 0.6], [0.7, 0.8, 0.9]])
    assert means == pytest.approx([0.6, 0.7])
    sd = 0.1 * math.sqrt(2)  # of (0.5, 0.7) and of (0.6, 0.8)
    half = 12.7062047 * sd / math.sqrt(2)  # t(0.975, 1 degree of freedom) * sd / sqrt(n)
    assert highs[0] - means[0] == pytest.approx(half, rel=1e-6)
    assert means[1] - lows[1] == pytest.approx(half, rel=1e-6)
    assert plots._band([[0.5, 0.6]]) == ([0.5, 0.6], [0.5, 0.6], [0.5, 0.6])


def test_rounds_not_evaluated_are_left_out_of_the_lines():
    nan = math.nan
    xs, ys, lows = plots._evaluated([0.0, 1.0, 2.0, 3.0], [0.5, nan, 0.7, nan], [0.4, nan, 0.6, 0])
    assert (xs, ys, lows) == ([0.0, 2.0], [0.5, 0.7], [0.4, 0.6])


def test_seeds_with_rounds_not_evaluated_plot(tmp_path):
    # eval.every=3 over 3 seeds: rounds 1 and 2 are NaN in every run (this crashed the plot once).
    results = [_result("fedsvd", s, [0.5, None, None, 0.6 + 0.01 * s]) for s in range(3)]
    means, _, _ = plots._band([r.accuracy() for r in results])
    assert math.isnan(means[1]) and means[3] == pytest.approx(0.61)
    image = imread(plots.accuracy_by_round(results, tmp_path / "a.png"))
    assert image.shape[0] > 200


def _drawn(monkeypatch, draw):
    """The figure a plot function drew (pyplot.close is kept from discarding it)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    draw()
    return figures[-1]


def test_accuracy_vs_bytes_marks_the_equal_bytes_budget(tmp_path, monkeypatch):
    results = _group()
    fig = _drawn(monkeypatch, lambda: plots.accuracy_vs_bytes(results, tmp_path / "b.png"))
    (ax,) = fig.axes
    a, b, budget = ax.get_lines()
    assert [a.get_label(), b.get_label()] == ["a", "b"]
    # a line and a band per method, the mean over seeds: A's bytes, B's at 0.25 MB a round
    assert list(a.get_xdata()) == [100_000, 200_000, 300_000]
    assert list(a.get_ydata()) == pytest.approx([0.61, 0.71, 0.82])
    assert list(b.get_xdata()) == [250_000, 500_000] and len(ax.collections) == 2
    assert list(budget.get_xdata()) == [300_000, 300_000]
    assert budget.get_linestyle() == "--" and budget.get_label() == "equal bytes (0.3 MB)"
    # lines that are not strategies (a grid sweeping dp alone): no budget line
    for result in results:
        result.run = Run((), (("dp", str(result.seed)),), "x")
    fig = _drawn(monkeypatch, lambda: plots.accuracy_vs_bytes(results, tmp_path / "c.png"))
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["0", "1"]
