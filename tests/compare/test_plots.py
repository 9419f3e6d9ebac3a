import math

import pytest
from matplotlib.image import imread

from fedpeft.compare import plots
from tests.compare.test_aggregate import _result


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
