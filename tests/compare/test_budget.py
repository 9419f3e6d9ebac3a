import csv
import math
from pathlib import Path

import pytest

from fedpeft.compare import budget
from fedpeft.compare.aggregate import RunResult, mean_ci
from fedpeft.compare.grid import Run


def _run(method, seed, accuracy, per_round=100_000, seconds=None, eps=None, **config):
    """A finished run: `per_round` bytes (2/5 up, 3/5 down) and `seconds` client-s per round."""
    swept = (("strategy", method), *config.items(), ("seed", str(seed)))
    history = []
    for i in range(len(accuracy)):
        row = {"round": str(i), "bytes_up": "0", "bytes_down": "0"}
        if i:
            row.update(bytes_up=str(per_round * 2 // 5), bytes_down=str(per_round * 3 // 5))
        if seconds is not None:
            row["client_seconds"] = str(seconds) if i else ""
        if eps is not None:
            row["max_epsilon"] = str(eps[i - 1]) if i else ""
        history.append(row)
    summary = {
        "strategy": method,
        "final_accuracy": accuracy[-1],
        "accuracy_by_round": accuracy,
        "bytes_up": 0,
        "bytes_down": 0,
        "wall_time_s": 1.0,
        "max_epsilon": eps[-1] if eps else None,
    }
    return RunResult(Run((), swept, f"{method}{seed}"), Path("."), seed, summary, history)


def _group(eps=False):
    """A: 4 rounds of 0.1 MB and 2 or 3 client-s; B: 3 rounds of 0.25 MB and 1 client-s."""
    return [
        _run("a", 0, [0.5, 0.6, 0.7, 0.8], seconds=2, eps=[1.0, 2.0, 3.0] if eps else None),
        _run("a", 1, [0.5, 0.62, 0.72, 0.84], seconds=3, eps=[1.0, 2.0, 3.0] if eps else None),
        _run("b", 0, [0.5, 0.7, 0.8], 250_000, seconds=1, eps=[2.5, 5.0] if eps else None),
        _run("b", 1, [0.5, 0.66, 0.79], 250_000, seconds=1, eps=[2.5, 5.0] if eps else None),
    ]


def test_cumulative_costs_by_round_and_none_when_not_logged():
    a0 = _group(eps=True)[0]
    assert a0.cumulative_bytes() == [0, 100_000, 200_000, 300_000]
    assert a0.cumulative_client_seconds() == [0, 2, 4, 6]
    assert a0.epsilon_by_round() == [0, 1.0, 2.0, 3.0]
    old = _run("a", 0, [0.5, 0.6])
    assert old.cumulative_client_seconds() is None and old.epsilon_by_round() is None


def test_budgets_are_matched_across_the_methods_of_a_configuration():
    group = _group(eps=True)
    assert budget.matched_budget(group, budget._round_costs) == 2
    assert budget.matched_bytes(group) == 300_000  # A's total; B reached 500_000
    assert budget.matched_budget(group, RunResult.cumulative_client_seconds) == 2  # B's total
    assert budget.matched_budget(group, RunResult.epsilon_by_round) == 3.0  # A's total
    a, b = budget.budget_rows(group, 0.8)
    assert (a.method, b.method) == ("a", "b")
    assert a.accuracy["round"] == [0.7, 0.72] and b.accuracy["round"] == [0.8, 0.79]
    # at 0.3 MB: A's last round, B's round 1 (0.25 MB; round 2 is at 0.5 MB)
    assert a.accuracy["bytes"] == [0.8, 0.84] and b.accuracy["bytes"] == [0.7, 0.66]
    # at 2 client-s: A seed 0 after round 1 (2 s), seed 1 only round 0 (its round 1 took 3 s)
    assert a.accuracy["client_seconds"] == [0.6, 0.5]
    assert b.accuracy["client_seconds"] == [0.8, 0.79]
    assert a.accuracy["epsilon"] == [0.8, 0.84] and b.accuracy["epsilon"] == [0.7, 0.66]
    assert a.to_target == {"rounds": [3, 3], "mb": [0.3, 0.3], "client_seconds": [6, 9]}
    assert b.to_target == {"rounds": [2, None], "mb": [0.5, None], "client_seconds": [2, None]}


def test_rounds_not_evaluated_are_not_matched():
    x = _run("x", 0, [0.5, None, 0.7], per_round=10)
    y = _run("y", 0, [0.5, 0.6, 0.65, 0.7], per_round=5)
    assert budget.matched_budget([x, y], budget._round_costs) == 2  # x skipped round 1
    assert budget.matched_bytes([x, y]) == 15  # y's 3 rounds; x's last evaluated is at 20
    x_row, y_row = budget.budget_rows([x, y], 0.8)
    assert x_row.accuracy["bytes"] == [0.5] and y_row.accuracy["bytes"] == [0.7]


def test_a_run_without_client_seconds_leaves_the_configuration_unmatched():
    group = [*_group()[:3], _run("b", 1, [0.5, 0.66, 0.79], 250_000)]
    assert budget.matched_budget(group, RunResult.cumulative_client_seconds) is None
    a, b = budget.budget_rows(group, 0.8)
    assert a.accuracy["client_seconds"] == [None, None]
    assert b.to_target["client_seconds"] == [2, None]


def test_markdown_gives_the_budgets_then_the_matched_accuracies(tmp_path):
    rows = budget.budget_rows(_group(), 0.8)
    text = budget.markdown(rows, 0.8)
    assert text.startswith("## Budget-matched\n") and "equal ε" not in text
    assert "| equal rounds | equal MB | equal client-s |\n|---|---|---|\n| 2 | 0.3 | 2 |" in text
    assert (
        "| method | seeds | acc @ rounds | acc @ MB | acc @ client-s | rounds to 0.8 | MB to 0.8 "
        "| client-s to 0.8 |" in text
    )
    half = lambda values: mean_ci(values)[1]  # noqa: E731
    a_round = f"0.7100 ± {half([0.7, 0.72]):.4f}"
    a_seconds = f"7.5 ± {half([6, 9]):.1f}"
    assert a_seconds == "7.5 ± 19.1"  # t(0.975, 1) = 12.706 times sd 2.121 / sqrt(2)
    assert f"| a | 2 | {a_round} | 0.8200 ± {half([0.8, 0.84]):.4f} |" in text
    assert f"| 3.0 ± 0.0 | 0.30 ± 0.00 | {a_seconds} |" in text
    assert "| 2.0 (1/2 seeds) | 0.50 (1/2 seeds) | 2.0 (1/2 seeds) |" in text
    private = budget.markdown(budget.budget_rows(_group(eps=True), 0.8), 0.8)
    assert "| equal rounds | equal MB | equal client-s | equal ε |" in private
    assert "| 2 | 0.3 | 2 | 3 |" in private and "equal ε likewise" in private
    path = budget.write_csv(rows, tmp_path / "budget.csv")
    with path.open() as fh:
        a, b = csv.DictReader(fh)
    assert (a["method"], a["n_seeds"], a["matched_round"], a["matched_bytes"]) == (
        "a",
        "2",
        "2",
        "300000.0",
    )
    assert float(a["accuracy_at_bytes"]) == pytest.approx(0.82)
    assert float(a["accuracy_at_bytes_ci"]) == pytest.approx(half([0.8, 0.84]))
    assert float(a["client_seconds_to_target"]) == 7.5 and a["matched_epsilon"] == ""
    assert b["seeds_reaching_target"] == "1" and b["rounds_to_target_ci"] == ""


def test_configurations_are_matched_separately():
    group = _group()
    other = [_run("a", 0, [0.5, 0.9], dataset="trec"), _run("b", 0, [0.5, 0.4], dataset="trec")]
    for result in group:
        result.run = Run((), (("strategy", result.method), ("dataset", "sst2")), "x")
    rows = budget.budget_rows([*group, *other], 0.8)
    assert [(r.config, r.method) for r in rows] == [
        ((("dataset", "sst2"),), "a"),
        ((("dataset", "sst2"),), "b"),
        ((("dataset", "trec"),), "a"),
        ((("dataset", "trec"),), "b"),
    ]
    assert rows[2].budgets["bytes"] == 100_000 and rows[2].budgets["client_seconds"] is None
    text = budget.markdown(rows, 0.8)
    assert "| dataset | equal rounds | equal MB | equal client-s |" in text
    assert "| trec | 1 | 0.1 | — |" in text and "| trec | b | 1 | 0.4000 | 0.4000 | — |" in text


def test_results_md_has_the_budget_matched_section(grid_dir):
    table = (grid_dir / "results.md").read_text()
    assert "## Budget-matched" in table
    with (grid_dir / "budget.csv").open() as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["fedavg", "flora"]
    with (grid_dir / "results.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    totals = [int(r["total_bytes"]) for r in runs]
    for method, row in rows.items():
        # two rounds, both evaluated: equal rounds is the last one, and the final accuracy
        assert row["matched_round"] == "2" and float(row["matched_bytes"]) == min(totals)
        finals = [float(r["final_accuracy"]) for r in runs if r["strategy"] == method]
        assert float(row["accuracy_at_round"]) == pytest.approx(mean_ci(finals)[0])
        assert float(row["accuracy_at_round_ci"]) == pytest.approx(mean_ci(finals)[1])
    equal_mb = f"{min(totals) / 1e6:.3g}"
    assert f"| 2 | {equal_mb} |" in table
    logged = rows["fedavg"]["matched_client_seconds"] != ""
    assert (f"| 2 | {equal_mb} | — |" in table) is not logged
    assert not math.isnan(float(rows["flora"]["accuracy_at_bytes"]))
