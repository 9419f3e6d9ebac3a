"""Collect the grid's run folders into results.csv (a row per run) and a markdown table.

The table has a row per configuration (the swept values other than the seed): mean and 95%
confidence half-width over its seeds (Student t, n - 1 degrees of freedom) of the final and best
held-out accuracy, the rounds to a target accuracy, the total bytes moved, the wall time and the
final epsilon; for private SGD runs also the signal-to-noise ratio of the rounds' averaged updates.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from scipy import stats

from fedpeft.compare.cells import LOG_NAME, is_done
from fedpeft.compare.grid import Run
from fedpeft.strategies.update_noise import signal_norm

DEFAULT_TARGET = 0.8
SEED = "seed"
STRATEGY = "strategy"


@dataclass
class RunResult:
    """One run's folder as read back: its summary and per-round history when it finished."""

    run: Run
    folder: Path
    seed: int | None
    summary: dict[str, Any] | None
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Whether the run finished (it has a summary)."""
        return self.summary is not None

    @property
    def config(self) -> tuple[tuple[str, str], ...]:
        """The swept values other than the seed: what the table groups by."""
        return tuple((k, v) for k, v in self.run.swept if k != SEED)

    def accuracy(self) -> list[float]:
        """Held-out accuracy by round, round 0 first; NaN for rounds not evaluated (eval.every)."""
        return [
            math.nan if a is None else float(a)
            for a in (self.summary or {}).get("accuracy_by_round", [])
        ]

    def best_accuracy(self) -> float | None:
        """The best accuracy over the evaluated rounds."""
        return max((a for a in self.accuracy() if not math.isnan(a)), default=None)

    def signal_to_noise(self) -> list[float]:
        """Per round with a DP noise norm: the averaged update's estimated signal over its noise.

        From history.csv's update_norm and dp_noise_norm (strategies/update_noise.py): 0 means the
        update is no larger than its noise, i.e. nothing but noise reached the global adapter.
        """
        ratios = []
        for row in self.history:
            update, noise = row.get("update_norm"), row.get("dp_noise_norm")
            if update and noise and float(noise) > 0:
                ratios.append(signal_norm(float(update), float(noise)) / float(noise))
        return ratios

    def mean_signal_to_noise(self) -> float | None:
        """The mean of `signal_to_noise` over the run's rounds (None for a non-private run)."""
        ratios = self.signal_to_noise()
        return statistics.fmean(ratios) if ratios else None

    @property
    def method(self) -> str | None:
        """The run's strategy: its swept value, else the one its summary names."""
        return self.run.values.get(STRATEGY) or (self.summary or {}).get(STRATEGY)

    def cumulative_bytes(self) -> list[float]:
        """Bytes moved up and down until the end of each round, round 0 first."""
        return self._running(("bytes_up", "bytes_down"), sum) or []

    def cumulative_client_seconds(self) -> list[float] | None:
        """Clients' training CPU seconds until each round's end; None where history lacks them."""
        return self._running(("client_seconds",), sum)

    def epsilon_by_round(self) -> list[float] | None:
        """The ledger's largest client epsilon at each round's end; None for a non-private run."""
        return self._running(("max_epsilon",), max)

    def _running(
        self, columns: Sequence[str], combine: Callable[[list[float]], float]
    ) -> list[float] | None:
        """History's columns combined round by round (sum or max); None when never logged."""
        if all(row.get(c) in (None, "") for row in self.history for c in columns):
            return None
        total, out = 0.0, []
        for row in self.history:
            total = combine([total, *(float(row.get(c) or 0) for c in columns)])
            out.append(total)
        return out


def load_results(runs: Sequence[Run], out_dir: Path) -> list[RunResult]:
    """Read every run's folder (unfinished runs come back without a summary)."""
    results = []
    for run in runs:
        folder = run.folder(out_dir)
        summary = history = None
        seed = None
        if (folder / "config.yaml").is_file():
            seed = int(OmegaConf.load(folder / "config.yaml").seed)
        if is_done(folder):
            summary = json.loads((folder / "summary.json").read_text())
            with (folder / "history.csv").open(newline="") as fh:
                history = list(csv.DictReader(fh))
        results.append(RunResult(run, folder, seed, summary, history or []))
    return results


def rounds_to_target(accuracy: Sequence[float], target: float) -> int | None:
    """The first round whose accuracy reaches `target` (None if none does)."""
    return next((r for r, a in enumerate(accuracy) if a >= target), None)


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and 95% confidence half-width (Student t); no half-width from a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(half)


def run_row(result: RunResult, target: float) -> dict[str, Any]:
    """One row of results.csv."""
    row: dict[str, Any] = {"run": result.run.name, "status": "done" if result.done else "failed"}
    row.update(dict(result.config))
    row[SEED] = result.seed
    s = result.summary or {}
    acc = result.accuracy()
    row.update(
        strategy=s.get("strategy"),
        rounds_completed=s.get("rounds_completed"),
        final_accuracy=s.get("final_accuracy"),
        best_accuracy=result.best_accuracy(),
        rounds_to_target=rounds_to_target(acc, target) if acc else None,
        bytes_up=s.get("bytes_up"),
        bytes_down=s.get("bytes_down"),
        total_bytes=s["bytes_up"] + s["bytes_down"] if s else None,
        wall_time_s=s.get("wall_time_s"),
        max_epsilon=s.get("max_epsilon"),
        client_level_epsilon=s.get("client_level_epsilon"),
        audited_epsilon_lower_bound=s.get("audited_epsilon_lower_bound"),
        signal_to_noise=result.mean_signal_to_noise(),
        run_dir=str(result.folder),
    )
    return row


def write_results_csv(results: Sequence[RunResult], path: Path, target: float) -> Path:
    """results.csv: a row per run, finished or not."""
    rows = [run_row(r, target) for r in results]
    fields = list(rows[0]) if rows else ["run"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def group_by_config(
    results: Sequence[RunResult], without: str | None = None
) -> dict[tuple, list[RunResult]]:
    """Finished runs by configuration (less the swept key `without`, if given), in grid order."""
    groups: dict[tuple, list[RunResult]] = {}
    for result in results:
        if result.done:
            config = tuple((k, v) for k, v in result.config if k != without)
            groups.setdefault(config, []).append(result)
    return groups


def fmt_ci(values: Sequence[float], digits: int) -> str:
    """`mean ± half-width` (95%, Student t), or the value alone from a single one."""
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def partial_cell(values: Sequence[float | None], digits: int, none: str = "—") -> str:
    """`fmt_ci` of the known values, "(k/n seeds)" when some are None, `none` when all are."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return none
    text = fmt_ci(known, digits)
    return text if len(known) == len(values) else f"{text} ({len(known)}/{len(values)} seeds)"


def _accuracy_cell(
    summaries: Sequence[dict[str, Any]], key: str | None, values: Sequence[float | None] = ()
) -> str:
    """Mean ± CI of an accuracy, "—" when none was released (a private personalised run).

    "(personalised)" marks a method scored per client (summary evaluation=personalised), which is
    not comparable with a global model's held-out accuracy.
    """
    found = [s.get(key) for s in summaries] if key is not None else list(values)
    known = [float(v) for v in found if v is not None]
    text = fmt_ci(known, 4) if known else "—"
    if any(s.get("evaluation") == "personalised" for s in summaries):
        text += " (personalised)"
    return text


def _rounds_cell(group: Sequence[RunResult], target: float) -> str:
    reached = [rounds_to_target(r.accuracy(), target) for r in group]
    return partial_cell(reached, 1, "not reached")


def _client_level_cell(group: Sequence[RunResult]) -> str:
    """Mean ± CI of the runs' client-level epsilons ("—" for runs without client-level DP)."""
    eps = [
        r.summary["client_level_epsilon"]
        for r in group
        if r.summary.get("client_level_epsilon") is not None
    ]
    return fmt_ci(eps, 2) if eps else "—"


def _audited_cell(group: Sequence[RunResult]) -> str:
    """Mean ± CI of the runs' audited lower bounds; flagged when any exceeds its run's epsilon."""
    bounds = [
        (r.summary["audited_epsilon_lower_bound"], r.summary.get("max_epsilon"))
        for r in group
        if r.summary.get("audited_epsilon_lower_bound") is not None
    ]
    if not bounds:
        return "—"
    text = fmt_ci([b for b, _ in bounds], 2)
    above = sum(1 for b, eps in bounds if eps is not None and b > eps)
    return f"{text} (above the ledger in {above}/{len(bounds)})" if above else text


def table_rows(results: Sequence[RunResult], target: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table, a row per configuration.

    A "signal / noise" column (mean over rounds, then over seeds) is added when any run logged
    a DP noise norm, an "audited ε ≥" column when any run was audited (`audit=`): the mean
    of the runs' empirical lower bounds, marked when one exceeds its own run's ledger, and a
    "client-level ε" column when any run was under client-level DP (`client_dp`).
    """
    groups = group_by_config(results)
    snrs = {
        config: [v for v in (r.mean_signal_to_noise() for r in group) if v is not None]
        for config, group in groups.items()
    }
    noisy = any(snrs.values())
    audited = any(
        r.summary.get("audited_epsilon_lower_bound") is not None for r in results if r.done
    )
    client_level = any(
        (r.summary or {}).get("client_level_epsilon") is not None for r in results if r.done
    )
    keys = [k for k, _ in next(iter(groups))] if groups else []
    header = [
        *keys,
        "seeds",
        "final accuracy",
        "best accuracy",
        f"rounds to {target:g}",
        "total MB",
        "wall time (s)",
        "final ε",
        *(["client-level ε"] if client_level else []),
        *(["signal / noise"] if noisy else []),
        *(["audited ε ≥"] if audited else []),
    ]
    rows = []
    for config, group in groups.items():
        eps = [r.summary["max_epsilon"] for r in group if r.summary["max_epsilon"] is not None]
        snr = snrs[config]
        rows.append(
            [
                *(v for _, v in config),
                str(len(group)),
                _accuracy_cell([r.summary for r in group], "final_accuracy"),
                _accuracy_cell(
                    [r.summary for r in group], None, [r.best_accuracy() for r in group]
                ),
                _rounds_cell(group, target),
                fmt_ci([(r.summary["bytes_up"] + r.summary["bytes_down"]) / 1e6 for r in group], 2),
                fmt_ci([r.summary["wall_time_s"] for r in group], 1),
                fmt_ci(eps, 2) if eps else "—",
                *([_client_level_cell(group)] if client_level else []),
                *([fmt_ci(snr, 2) if snr else "—"] if noisy else []),
                *([_audited_cell(group)] if audited else []),
            ]
        )
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(
    results: Sequence[RunResult],
    path: Path,
    target: float,
    title: str,
    description: str = "",
    grid: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> Path:
    """results.md: the summary table, the grid it ran, how to read it, and any unfinished runs.

    `sections` (markdown, e.g. the paired differences) follow the summary table.
    """
    header, rows = table_rows(results, target)
    parts = [f"# {title}\n"]
    if description:
        parts.append(description + "\n")
    if grid:
        parts.append("Grid: `" + " ".join(grid) + "`\n")
    parts.append(
        "Mean ± 95% confidence half-width over seeds (Student t); a single seed shows its value. "
        f"Rounds to {target:g}: the first round whose held-out accuracy reaches it. Total MB: "
        "adapter bytes moved up and down over the run. Final ε: the largest client epsilon. "
        "Signal / noise (private SGD runs): per round, sqrt(||update||^2 - E||noise||^2) / "
        "E||noise|| of the averaged update (history.csv's update_norm, dp_noise_norm), averaged "
        "over the rounds; 0 means the rounds moved the global adapter by noise alone. Audited "
        "ε ≥ (`audit=`): the one-run canary audit's empirical lower bound on epsilon "
        "(docs/privacy.md); above the ledger's epsilon means that run leaked more than it "
        "accounted for.\n"
    )
    parts.append(markdown_table(header, rows))
    parts += [section for section in sections if section]
    failed = [r for r in results if not r.done]
    if failed:
        parts.append(f"Unfinished runs ({len(failed)}), left out of the table:\n")
        parts += [f"- {r.run.name}: see {r.folder / LOG_NAME}" for r in failed]
        parts.append("")
    path.write_text("\n".join(parts))
    return path
