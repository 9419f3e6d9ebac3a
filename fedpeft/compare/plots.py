"""The grid's plots: accuracy per round and accuracy against cumulative bytes, with CI bands.

A line per strategy (or per value of the first swept key when the strategy is not swept), a panel
per combination of the other swept keys; the band is the 95% confidence interval over seeds.
Against bytes, a dashed vertical line marks each panel's equal-bytes budget (fedpeft/compare/
budget.py) when the lines are strategies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from fedpeft.compare.aggregate import RunResult, group_by_config, mean_ci
from fedpeft.compare.budget import matched_bytes

HUE = "strategy"


def _layout(configs: Sequence[tuple]) -> tuple[str | None, list[tuple]]:
    """The key that tells lines apart and the panels (the other keys' value combinations)."""
    keys = [k for k, _ in configs[0]] if configs else []
    hue = HUE if HUE in keys else (keys[0] if keys else None)
    panels = []
    for config in configs:
        panel = _panel(config, hue)
        if panel not in panels:
            panels.append(panel)
    return hue, panels


def _panel(config: tuple, hue: str | None) -> tuple:
    """The panel a configuration's line is drawn in: its values other than the hue's."""
    return tuple((k, v) for k, v in config if k != hue)


def _band(series: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per-point mean and CI bounds over runs, on the points every run has.

    A point some run did not evaluate (NaN: eval.every skips rounds) is NaN, not averaged.
    """
    length = min(len(s) for s in series)
    means, lows, highs = [], [], []
    for i in range(length):
        values = [s[i] for s in series]
        skipped = any(math.isnan(v) for v in values)
        mean, half = (math.nan, None) if skipped else mean_ci(values)
        means.append(mean)
        lows.append(mean - (half or 0.0))
        highs.append(mean + (half or 0.0))
    return means, lows, highs


def _evaluated(xs: list[float], *series: list[float]) -> list[list[float]]:
    """The points whose accuracy (the first of `series`) exists: eval.every skips rounds."""
    shown = [i for i in range(min(len(xs), len(series[0]))) if not math.isnan(series[0][i])]
    return [[values[i] for i in shown] for values in (xs, *series)]


def _plot(
    results: Sequence[RunResult],
    path: Path,
    x_of: Callable[[RunResult], list[float]],
    xlabel: str,
    log_x: bool,
    first: int,
    budget: Callable[[list[RunResult]], float | None] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = group_by_config(results)
    hue, panels = _layout(list(groups))
    cols = min(3, max(1, len(panels)))
    rows = -(-max(1, len(panels)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels or [()], strict=False):
        # Ten colours, then the same ten dashed: all thirteen methods stay told apart.
        palette = [plt.get_cmap("tab10")(i) for i in range(10)]
        ax.set_prop_cycle(plt.cycler(linestyle=["-", "--", ":"]) * plt.cycler(color=palette))
        shown = [r for c, g in groups.items() if _panel(c, hue) == panel for r in g]
        for config, group in groups.items():
            if _panel(config, hue) != panel:
                continue
            label = dict(config).get(hue, "runs") if hue else "runs"
            xs, _, _ = _band([x_of(r)[first:] for r in group])
            ys, lows, highs = _band([r.accuracy()[first:] for r in group])
            xs, ys, lows, highs = _evaluated(xs, ys, lows, highs)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{label}")
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
        matched = budget(shown) if budget and hue == HUE else None
        if matched:
            label = f"equal bytes ({matched / 1e6:.3g} MB)"
            ax.axvline(matched, color="0.35", linestyle="--", linewidth=1, label=label)
        ax.set(xlabel=xlabel, ylabel="held-out accuracy")
        ax.set_title(", ".join(f"{k}={v}" for k, v in panel) or "all runs", fontsize=10)
        if log_x:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels or [()]) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_by_round(results: Sequence[RunResult], path: Path) -> Path:
    """accuracy_by_round.png: mean held-out accuracy per round with its 95% CI band."""
    return _plot(
        results, path, lambda r: [float(i) for i in range(len(r.accuracy()))], "round", False, 0
    )


def accuracy_vs_bytes(results: Sequence[RunResult], path: Path) -> Path:
    """accuracy_vs_bytes.png: accuracy against cumulative bytes moved (log axis), from round 1."""
    xlabel = "cumulative bytes (up + down)"
    return _plot(results, path, RunResult.cumulative_bytes, xlabel, True, 1, matched_bytes)
