"""Paired differences from a baseline: per seed, a method's final accuracy minus the baseline's.

Runs of one configuration share their seeds across methods, and a seed fixes the partition, the
adapter's initialisation and the batches, so a method's run and the baseline's run of one seed
pair. Per configuration other than the strategy, and per method other than the baseline: the mean
difference over the seeds both finished, its 95% confidence interval (Student t, n - 1 degrees
of freedom), the paired t-test's p-value and the p-value Holm-adjusted over the methods of that
configuration; a difference is significant when its Holm-adjusted p < 0.05.
"""

from __future__ import annotations

import csv
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from fedpeft.compare.aggregate import STRATEGY, RunResult, group_by_config, markdown_table
from fedpeft.compare.grid import Run
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError

#: the family-wise error rate the Holm adjustment holds
ALPHA = 0.05
DEFAULT_BASELINE = "fedavg"


@dataclass
class PairedRow:
    """One method against the baseline in one configuration."""

    config: tuple[tuple[str, str], ...]
    method: str
    baseline: str
    seeds: list[int]
    differences: list[float]
    ci: tuple[float, float] | None = None
    p: float | None = None
    p_holm: float | None = None

    @property
    def mean(self) -> float | None:
        """The mean difference (None without a shared seed)."""
        return statistics.fmean(self.differences) if self.differences else None

    @property
    def significant(self) -> bool:
        """Whether the Holm-adjusted p-value is below ALPHA."""
        return self.p_holm is not None and self.p_holm < ALPHA


def grid_strategies(runs: Sequence[Run]) -> list[str]:
    """The grid's strategies in grid order (the one every run uses when it is not swept)."""
    swept = [r.values[STRATEGY] for r in runs if STRATEGY in r.values]
    if swept:
        return list(dict.fromkeys(swept))
    return [compose_config(list(runs[0].overrides)).strategy.name] if runs else []


def choose_baseline(strategies: Sequence[str], given: str | None = None) -> str | None:
    """`given` if the grid has it, else fedavg when in the grid, else the grid's first strategy."""
    if given is not None:
        if given not in strategies:
            raise ConfigError(
                f"baseline={given} is not a strategy of the grid: choose one of "
                + ", ".join(strategies)
            )
        return given
    if DEFAULT_BASELINE in strategies:
        return DEFAULT_BASELINE
    return strategies[0] if strategies else None


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _final_by_seed(group: Sequence[RunResult]) -> dict[int, float]:
    """Seed -> final accuracy of the group's runs that released one."""
    return {
        r.seed: float(r.summary["final_accuracy"])
        for r in group
        if r.seed is not None and r.summary.get("final_accuracy") is not None
    }


def pair(config: tuple, method: str, baseline: str, ours: dict, theirs: dict) -> PairedRow:
    """The differences over the shared seeds, with CI and p-value when there are two or more."""
    seeds = sorted(set(ours) & set(theirs))
    row = PairedRow(config, method, baseline, seeds, [ours[s] - theirs[s] for s in seeds])
    if len(seeds) >= 2:
        with warnings.catch_warnings():  # identical differences: scipy warns of lost precision
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_rel([ours[s] for s in seeds], [theirs[s] for s in seeds])
            low, high = test.confidence_interval(1 - ALPHA)
        if not math.isnan(test.pvalue):  # NaN: every difference 0, nothing to test
            row.ci, row.p = (float(low), float(high)), float(test.pvalue)
    return row


def paired_differences(results: Sequence[RunResult], baseline: str | None) -> list[PairedRow]:
    """A row per configuration (less the strategy) and method other than the baseline."""
    rows: list[PairedRow] = []
    if baseline is None:
        return rows
    for config, group in group_by_config(results, without=STRATEGY).items():
        by_method: dict[str, list[RunResult]] = {}
        for result in group:
            by_method.setdefault(result.method, []).append(result)
        theirs = _final_by_seed(by_method.get(baseline, []))
        family = [
            pair(config, method, baseline, _final_by_seed(runs), theirs)
            for method, runs in by_method.items()
            if method != baseline
        ]
        tested = [row for row in family if row.p is not None]
        for row, adjusted in zip(tested, holm([row.p for row in tested]), strict=True):
            row.p_holm = adjusted
        rows += family
    return rows


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _label(row: PairedRow) -> str:
    where = ", ".join(f"{k}={v}" for k, v in row.config)
    return f"{row.method} ({where})" if where else row.method


def markdown(rows: Sequence[PairedRow], baseline: str | None) -> str:
    """results.md's "Paired differences from <baseline>" section ("" with nothing to pair)."""
    if not rows:
        return ""
    keys = [k for k, _ in rows[0].config]
    header = [*keys, "method", "shared seeds", "Δ final accuracy", "95% CI", "p", "p (Holm)"]
    table = [
        [
            *(v for _, v in row.config),
            row.method,
            str(len(row.seeds)),
            _signed(row.mean),
            "—" if row.ci is None else f"[{_signed(row.ci[0])}, {_signed(row.ci[1])}]",
            _p(row.p),
            _p(row.p_holm) + (" *" if row.significant else ""),
        ]
        for row in rows
    ]
    significant = [f"{_label(r)} {_signed(r.mean)}" for r in rows if r.significant]
    verdict = (
        "Significant at Holm-adjusted p < 0.05: " + "; ".join(significant) + "."
        if significant
        else "No difference from the baseline is significant at Holm-adjusted p < 0.05."
    )
    text = (
        f"Per seed, a method's final accuracy minus {baseline}'s in the same configuration "
        "(a seed fixes the partition, initialisation and batches, so the runs pair), over the "
        "seeds both finished: the mean difference, its 95% confidence interval (Student t, n - 1 "
        "degrees of freedom), the paired t-test's p and the p Holm-adjusted over the methods of "
        "the configuration; * marks a significant difference (Holm-adjusted p < 0.05). One "
        "shared seed gives no interval or test (—), nor do differences that are all zero. "
        "Choose the baseline with `baseline=<strategy>`."
    )
    title = f"## Paired differences from {baseline}\n"
    return "\n".join([title, text + "\n", markdown_table(header, table), verdict + "\n"])


def write_csv(rows: Sequence[PairedRow], path: Path) -> Path:
    """paired.csv: a row per configuration and method, numbers unrounded."""
    keys = [k for k, _ in rows[0].config] if rows else []
    fields = [*keys, "method", "baseline", "seeds", "n_seeds", "mean_difference"]
    fields += ["ci_low", "ci_high", "p_value", "p_holm", "significant"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **dict(row.config),
                    "method": row.method,
                    "baseline": row.baseline,
                    "seeds": ";".join(map(str, row.seeds)),
                    "n_seeds": len(row.seeds),
                    "mean_difference": row.mean,
                    "ci_low": row.ci[0] if row.ci else None,
                    "ci_high": row.ci[1] if row.ci else None,
                    "p_value": row.p,
                    "p_holm": row.p_holm,
                    "significant": row.significant,
                }
            )
    return path
