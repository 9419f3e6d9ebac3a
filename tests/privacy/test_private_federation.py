"""Private federations: every method's client rounds under DP-SGD, and the budget path.

Every method runs two private rounds in process (the strategy drives the real ClientApp train
handler, no Ray); Flower's simulation engine runs the private path end to end here (the budget
test) and in tests/privacy/test_presets.py and tests/strategies/test_drift.py.
"""

import csv

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedpeft.cli import simulate
from fedpeft.clients.client_app import train
from fedpeft.config import compose_config
from fedpeft.federation import prepare
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.base import LowRankStrategy
from tests.conftest import FAST_RUN
from tests.strategies.conftest import FakeGrid, _task_identity  # noqa: F401 (autouse fixture)

#: per-method options a private two-round run needs beyond FAST_RUN
EXTRA = {"hetlora": ["strategy.params.ranks=[4,8]", "strategy.params.min_rank=2"]}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_method_runs_two_private_rounds(strategy, tmp_path, data_dir):
    cfg = compose_config([*FAST_RUN, f"strategy={strategy}", "dp=eps3", *EXTRA.get(strategy, [])])
    fed = prepare(cfg)
    contexts = {
        n: Context(
            1, n, {"partition-id": n - 1, "num-partitions": 2, "state-dir": str(tmp_path)},
            RecordDict(), {},
        )
        for n in (1, 2)
    }  # fmt: skip
    rounds = []
    for server_round in (1, 2):
        grid = FakeGrid([1, 2])
        messages = fed.strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        assert not any(r.has_error() for r in replies), [
            r.error.reason for r in replies if r.has_error()
        ]
        assert fed.strategy.aggregate_train(server_round, replies)[0] is not None
        stats = fed.strategy.stats
        assert stats.replied == 2 and not stats.rejected and not stats.client_loss  # no loss sent
        rounds.append(dict(stats.client_epsilon))
    # Each client is calibrated to end at eps 3 after its planned rounds (every round here).
    assert len(rounds[0]) == 2 and set(rounds[0]) == set(rounds[1])
    assert all(0 < rounds[0][m] < rounds[1][m] <= 3.0 for m in rounds[0])
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
