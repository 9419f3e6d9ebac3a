import csv
import json
import math
from pathlib import Path

import pytest

from fedpeft.compare.aggregate import (
    RunResult,
    mean_ci,
    rounds_to_target,
    table_rows,
)
from fedpeft.compare.grid import Run


def test_mean_ci_is_the_student_t_half_width():
    mean, half = mean_ci([0.8, 0.9, 1.0])
    # t(0.975, 2 degrees of freedom) = 4.302653; sd = 0.1
    assert mean == pytest.approx(0.9)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert mean_ci([0.7]) == (0.7, None)


def test_rounds_to_target():
    assert rounds_to_target([0.5, 0.7, 0.85, 0.9], 0.8) == 2
    assert rounds_to_target([0.5, 0.7], 0.8) is None
    assert rounds_to_target([0.9], 0.8) == 0


def _result(strategy, seed, accuracy, eps=None):
    run = Run((), (("strategy", strategy), ("seed", str(seed))), f"{strategy}{seed}")
    summary = {
        "final_accuracy": accuracy[-1],
        "accuracy_by_round": accuracy,
        "bytes_up": 1_000_000,
        "bytes_down": 3_000_000,
        "wall_time_s": 10.0 + seed,
        "max_epsilon": eps,
    }
    return RunResult(run, Path("."), seed, summary)


def test_table_groups_seeds_and_reports_partial_targets():
    results = [
        _result("fedavg", 0, [0.5, 0.7, 0.9]),
        _result("fedavg", 1, [0.5, 0.6, 0.7]),
        _result("fedsvd", 0, [0.5, 0.85, 0.8], eps=2.9),
        _result("fedsvd", 1, [0.5, 0.9, 0.95], eps=3.0),
    ]
    header, rows = table_rows(results, 0.8)
    assert header[:2] == ["strategy", "seeds"] and header[4] == "rounds to 0.8"
    fedavg, fedsvd = rows
    assert fedavg[4] == "2.0 (1/2 seeds)" and fedavg[7] == "—"
    assert fedsvd[4] == "1.0 ± 0.0"
    assert fedsvd[2].startswith("0.8750 ± ")  # final accuracy: mean of 0.8 and 0.95
    assert fedsvd[3].startswith("0.9000 ± ")  # best accuracy: mean of 0.85 and 0.95
    assert fedsvd[5] == "4.00 ± 0.00" and fedsvd[7].startswith("2.95 ± ")


def test_results_csv_and_table_match_the_run_folders(grid_dir):
    with (grid_dir / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert sorted((r["strategy"], r["seed"]) for r in rows) == [
        ("fedavg", "0"),
        ("fedavg", "1"),
        ("flora", "0"),
        ("flora", "1"),
    ]
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["final_accuracy"]) == summary["final_accuracy"]
        assert float(row["best_accuracy"]) == max(summary["accuracy_by_round"])
        assert int(row["total_bytes"]) == summary["bytes_up"] + summary["bytes_down"]
        assert row["max_epsilon"] == ""
    table = (grid_dir / "results.md").read_text()
    fedavg = [float(r["final_accuracy"]) for r in rows if r["strategy"] == "fedavg"]
    mean, half = mean_ci(fedavg)
    assert f"| fedavg | 2 | {mean:.4f} ± {half:.4f} |" in table
    assert "| flora | 2 |" in table and "Unfinished" not in table


def test_rounds_not_evaluated_are_skipped_not_counted():
    # eval.every=2: rounds 1 and 3 have no accuracy (null in summary.json).
    results = [_result("fedavg", 0, [0.5, None, 0.9, None, 0.85])]
    assert math.isnan(results[0].accuracy()[1]) and results[0].best_accuracy() == 0.9
    _, (row,) = table_rows(results, 0.8)
    assert row[2] == "0.8500" and row[3] == "0.9000" and row[4] == "2.0"


def test_signal_to_noise_column_from_the_histories_noise_norms():
    def private(seed, rounds):
        result = _result("fedsvd", seed, [0.5] * (len(rounds) + 1), eps=3.0)
        result.history = [{"round": "0", "update_norm": "", "dp_noise_norm": ""}] + [
            {"round": str(i + 1), "update_norm": repr(u), "dp_noise_norm": repr(n)}
            for i, (u, n) in enumerate(rounds)
        ]
        return result

    # update 5 against noise 3: signal 4, ratio 4/3; an update smaller than its noise: 0.
    a, b = private(0, [(5.0, 3.0), (2.0, 3.0)]), private(1, [(13.0, 5.0)])
    assert a.signal_to_noise() == pytest.approx([4 / 3, 0.0])
    assert a.mean_signal_to_noise() == pytest.approx(2 / 3)
    assert b.mean_signal_to_noise() == pytest.approx(12 / 5)
    plain = _result("fedavg", 0, [0.5, 0.9])
    header, rows = table_rows([plain, a, b], 0.8)
    assert header[-1] == "signal / noise"
    mean, half = mean_ci([2 / 3, 12 / 5])
    assert rows[0][-1] == "—" and rows[1][-1] == f"{mean:.2f} ± {half:.2f}"
    assert table_rows([plain], 0.8)[0][-1] == "final ε"  # no column without DP noise


def test_audited_column_shows_the_bound_and_flags_one_above_its_ledger():
    honest = [_result("fedavg", s, [0.5, 0.9], eps=3.0) for s in (0, 1)]
    for result, bound in zip(honest, (0.3, 0.5), strict=True):
        result.summary["audited_epsilon_lower_bound"] = bound
    broken = _result("fedsvd", 0, [0.5, 0.9], eps=3.0)
    broken.summary["audited_epsilon_lower_bound"] = 4.36
    header, rows = table_rows([*honest, broken], 0.8)
    assert header[-1] == "audited ε ≥"
    assert rows[0][-1].startswith("0.40 ± ") and "above" not in rows[0][-1]
    assert rows[1][-1] == "4.36 (above the ledger in 1/1)"
    assert "audited ε ≥" not in table_rows([_result("fedavg", 0, [0.5])], 0.8)[0]


def test_client_level_column_appears_with_client_level_runs():
    private = [_result("fedavg", s, [0.5, 0.8]) for s in (0, 1)]
    for result, eps in zip(private, (2.98, 3.0), strict=True):
        result.summary["client_level_epsilon"] = eps
    plain = _result("ffa_lora", 0, [0.5, 0.9])
    header, rows = table_rows([*private, plain], 0.8)
    column = header.index("client-level ε")
    assert header[column - 1] == "final ε"
    assert rows[0][column].startswith("2.99 ± ") and rows[1][column] == "—"
    assert "client-level ε" not in table_rows([plain], 0.8)[0]
