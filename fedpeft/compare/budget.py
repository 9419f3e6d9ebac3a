"""Budget-matched views: each method's accuracy at the same rounds, bytes, client compute and ε.

Per configuration other than the strategy, every method is scored at one budget: equal rounds
(the last round every run of the configuration completed and evaluated), equal bytes (the smallest
cumulative bytes up + down any run reached at its last evaluated round, each run scored at its
last evaluated round within it), equal client compute (the same with the clients' training CPU
seconds) and, for private runs, equal ε (the same with the ledger's largest client epsilon).
Then the cost to reach the target accuracy: rounds, MB and client-seconds to the first round
whose accuracy reaches it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpeft.compare.aggregate import (
    STRATEGY,
    RunResult,
    group_by_config,
    markdown_table,
    mean_ci,
    partial_cell,
    rounds_to_target,
)

Costs = Callable[[RunResult], list[float] | None]


def _round_costs(result: RunResult) -> list[float]:
    return [float(i) for i in range(len(result.accuracy()))]


def _bytes(result: RunResult) -> list[float] | None:
    return result.cumulative_bytes() or None


#: name in budget.csv, heading in results.md, the run's cumulative cost by round
MEASURES: list[tuple[str, str, Costs]] = [
    ("round", "rounds", _round_costs),
    ("bytes", "MB", _bytes),
    ("client_seconds", "client-s", RunResult.cumulative_client_seconds),
    ("epsilon", "ε", RunResult.epsilon_by_round),
]


def evaluated(result: RunResult, costs: Sequence[float]) -> list[int]:
    """The rounds with an accuracy (eval.every skips some) and a logged cost."""
    return [i for i, a in enumerate(result.accuracy()[: len(costs)]) if not math.isnan(a)]


def matched_budget(group: Sequence[RunResult], costs_of: Costs) -> float | None:
    """The largest budget every run reached at an evaluated round (None: a run lacks the cost).

    For rounds: the last round every run evaluated; otherwise the smallest cost any run had
    at its last evaluated round.
    """
    costs = [costs_of(r) for r in group]
    if not group or any(c is None for c in costs):
        return None
    rounds = [evaluated(r, c) for r, c in zip(group, costs, strict=True)]
    if costs_of is _round_costs:
        common = set.intersection(*(set(e) for e in rounds))
        return max(common) if common else None
    if not all(rounds):
        return None
    return min(c[e[-1]] for c, e in zip(costs, rounds, strict=True))


def accuracy_within(result: RunResult, costs_of: Costs, budget: float | None) -> float | None:
    """The accuracy at the run's last evaluated round whose cost is within `budget`."""
    costs = costs_of(result) if budget is not None else None
    if costs is None:
        return None
    within = [i for i in evaluated(result, costs) if costs[i] <= budget]
    return result.accuracy()[within[-1]] if within else None


def matched_bytes(group: Sequence[RunResult]) -> float | None:
    """The equal-bytes budget of a configuration's runs (what the plot marks)."""
    return matched_budget(group, _bytes)


@dataclass
class BudgetRow:
    """One method of one configuration: per seed, its accuracies at the budgets and its costs."""

    config: tuple[tuple[str, str], ...]
    method: str
    budgets: dict[str, float | None]
    accuracy: dict[str, list[float | None]]
    to_target: dict[str, list[float | None]]


def _to_target(result: RunResult, target: float) -> dict[str, float | None]:
    """Rounds, MB and client-seconds until the first round reaching `target` (None if none)."""
    reached = rounds_to_target(result.accuracy(), target)
    spent = {"rounds": reached, "mb": None, "client_seconds": None}
    for key, costs, scale in [
        ("mb", result.cumulative_bytes(), 1e6),
        ("client_seconds", result.cumulative_client_seconds(), 1.0),
    ]:
        if reached is not None and costs and reached < len(costs):
            spent[key] = costs[reached] / scale
    return spent


def budget_rows(results: Sequence[RunResult], target: float) -> list[BudgetRow]:
    """A row per configuration (less the strategy) and method, its runs matched per budget."""
    rows = []
    for config, group in group_by_config(results, without=STRATEGY).items():
        budgets = {name: matched_budget(group, costs) for name, _, costs in MEASURES}
        by_method: dict[str, list[RunResult]] = {}
        for result in group:
            by_method.setdefault(result.method, []).append(result)
        for method, runs in by_method.items():
            accuracy = {
                name: [accuracy_within(r, costs, budgets[name]) for r in runs]
                for name, _, costs in MEASURES
            }
            spent = [_to_target(r, target) for r in runs]
            to_target = {key: [s[key] for s in spent] for key in spent[0]}
            rows.append(BudgetRow(config, method, budgets, accuracy, to_target))
    return rows


def _budget(name: str, value: float | None) -> str:
    """A matched budget as results.md shows it: a round, MB, client-seconds or ε."""
    if value is None:
        return "—"
    if name == "round":
        return str(int(value))
    return f"{value / 1e6 if name == 'bytes' else value:.3g}"


def markdown(rows: Sequence[BudgetRow], target: float) -> str:
    """results.md's "Budget-matched" section: the budgets, then the accuracies and costs."""
    if not rows:
        return ""
    private = any(r.budgets["epsilon"] is not None for r in rows)
    measures = [m for m in MEASURES if private or m[0] != "epsilon"]
    keys = [k for k, _ in rows[0].config]
    budgets = {r.config: r.budgets for r in rows}
    header = [*keys, *(f"equal {label}" for _, label, _ in measures)]
    matched = [[*(v for _, v in c), *(_budget(n, b[n]) for n, _, _ in measures)]
               for c, b in budgets.items()]  # fmt: skip
    header2 = [*keys, "method", "seeds", *(f"acc @ {label}" for _, label, _ in measures)]
    header2 += [f"{label} to {target:g}" for label in ("rounds", "MB", "client-s")]
    table = [
        [
            *(v for _, v in row.config),
            row.method,
            str(len(row.accuracy["round"])),
            *(partial_cell(row.accuracy[name], 4) for name, _, _ in measures),
            partial_cell(row.to_target["rounds"], 1, "not reached"),
            partial_cell(row.to_target["mb"], 2, "—"),
            partial_cell(row.to_target["client_seconds"], 1, "—"),
        ]
        for row in rows
    ]
    text = (
        "Each method's held-out accuracy (mean ± 95% CI over seeds) at budgets matched per "
        "configuration, the first table giving each: equal rounds, the last round every run of "
        "the configuration completed and evaluated; equal MB, the smallest cumulative adapter "
        "bytes up + down (everything sent both ways, as the FlowerTune leaderboard counts "
        "communication) any run reached at its last evaluated round, each run scored at its "
        "last evaluated round within it; equal client-s likewise with the clients' training CPU "
        "seconds summed over a round's replies (— for runs from before history.csv logged "
        "client_seconds)"
        + ("; equal ε likewise with the ledger's largest client epsilon" if private else "")
        + f". Then the cost to reach accuracy {target:g}: rounds, MB and client-seconds up to the "
        "first round reaching it, over the seeds that reach it (k/n seeds when not all do)."
    )
    return "\n".join(
        [
            "## Budget-matched\n",
            text + "\n",
            markdown_table(header, matched),
            markdown_table(header2, table),
        ]
    )


def write_csv(rows: Sequence[BudgetRow], path: Path) -> Path:
    """budget.csv: a row per configuration and method; mean and CI half-width of each column."""
    keys = [k for k, _ in rows[0].config] if rows else []
    fields = [*keys, "method", "n_seeds"]
    for name, _, _ in MEASURES:
        fields += [f"matched_{name}", f"accuracy_at_{name}", f"accuracy_at_{name}_ci"]
    for name in ("rounds", "mb", "client_seconds"):
        fields += [f"{name}_to_target", f"{name}_to_target_ci"]
    fields.append("seeds_reaching_target")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            out = {**dict(row.config), "method": row.method, "n_seeds": len(row.accuracy["round"])}
            for name, _, _ in MEASURES:
                out[f"matched_{name}"] = row.budgets[name]
                out[f"accuracy_at_{name}"], out[f"accuracy_at_{name}_ci"] = _stats(
                    row.accuracy[name]
                )
            for name, values in row.to_target.items():
                out[f"{name}_to_target"], out[f"{name}_to_target_ci"] = _stats(values)
            out["seeds_reaching_target"] = sum(v is not None for v in row.to_target["rounds"])
            writer.writerow(out)
    return path


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and CI half-width of the known values (None, None when there are none)."""
    known = [float(v) for v in values if v is not None]
    return mean_ci(known) if known else (None, None)
