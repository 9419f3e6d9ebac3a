"""Private federations through Flower's simulation engine: every method, and the budget path."""

import csv
import json

import pytest

from fedpeft.cli import simulate
from fedpeft.strategies.base import LowRankStrategy
from tests.conftest import FAST_RUN

METHODS = ["fedavg", "ffa_lora", "flora", "fedsvd", "lora_fair", "fed_sb"]


@pytest.mark.parametrize("strategy", METHODS)
def test_each_method_runs_two_private_rounds(strategy, tmp_path, data_dir):
    summary = simulate([*FAST_RUN, f"strategy={strategy}", "dp=eps3", f"run_dir={tmp_path}"])
    assert summary["rounds_completed"] == 2
    # Each client is calibrated to end at eps 3 after its planned rounds (every round here).
    assert 2.9 <= summary["max_epsilon"] <= 3.0
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows[1:]:
        per_client = json.loads(row["client_epsilon"].replace("'", '"'))
        assert per_client and all(0 < float(e) <= 3.0 for e in per_client.values())
        assert float(row["max_epsilon"]) == max(float(e) for e in per_client.values())
    assert float(rows[2]["max_epsilon"]) > float(rows[1]["max_epsilon"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_client_out_of_budget_refuses_and_the_run_goes_on(tmp_path, data_dir):
    reasons = []
    aggregate = LowRankStrategy.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        reasons.extend(m.error.reason for m in replies if m.has_error())
        return aggregate(self, server_round, replies)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LowRankStrategy, "aggregate_train", spy)
        summary = simulate(
            [*FAST_RUN, "dp=eps3", "dp.planned_rounds=1", "federation.rounds=2",
             f"run_dir={tmp_path}"]
        )  # fmt: skip
    assert summary["rounds_completed"] == 2
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["failed"] == "0" and rows[2]["failed"] == "2" and rows[2]["replied"] == "0"
    assert len(reasons) == 2 and all("budget exhausted: ε would reach" in r for r in reasons)
    assert summary["max_epsilon"] <= 3.0
