"""Private federations: every method's client rounds under DP-SGD, and the budget path.

Every method runs two private rounds in process (the strategy drives the real ClientApp train
handler, no Ray); Flower's simulation engine runs the private path end to end here (the budget
test) and in tests/strategies/test_drift.py.
"""

import csv

import pytest

from fedpeft.cli import simulate
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.base import LowRankStrategy
from tests.conftest import FAST_RUN, in_process_rounds

#: per-method options a private two-round run needs beyond FAST_RUN
EXTRA = {"hetlora": ["strategy.params.ranks=[4,8]", "strategy.params.min_rank=2"]}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_method_runs_two_private_rounds(strategy, tmp_path, data_dir):
    cfg = compose_config([*FAST_RUN, f"strategy={strategy}", "dp=eps3", *EXTRA.get(strategy, [])])
    fed = prepare(cfg)
    rounds = in_process_rounds(fed, 2, tmp_path)
    for stats in rounds:
        assert stats["replied"] == 2 and not stats["rejected"]
        assert not stats["client_loss"]  # a private reply carries no training loss
        if strategy in ("fedavg", "ffa_lora", "fedsvd"):  # the DP study's noise-to-signal
            assert stats["update_norm"] > 0 and stats["dp_noise_norm"] > 0
    eps = [r["client_epsilon"] for r in rounds]
    # Each client is calibrated to end at eps 3 after its planned rounds (every round here).
    assert len(eps[0]) == 2 and set(eps[0]) == set(eps[1])
    assert all(0 < eps[0][m] < eps[1][m] <= 3.0 for m in eps[0])
    assert 2.9 <= fed.strategy.privacy.max_epsilon() <= 3.0


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
