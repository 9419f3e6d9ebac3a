"""Private federations: every method's client rounds under DP-SGD, and the budget path.

Every method runs two private rounds in process (the strategy drives the real ClientApp train
handler, no Ray); Flower's simulation engine runs the private path end to end here (the budget
test) and in tests/strategies/test_drift.py.
"""

import csv

import pytest

from fedpeft.cli import main, simulate
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


def test_a_client_out_of_budget_refuses_and_both_levels_are_reported(tmp_path, data_dir):
    """Example-level budgets run out after round 1; client-level DP still releases round 2."""
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
             *CLIENT_LEVEL, f"run_dir={tmp_path}"]
        )  # fmt: skip
    assert summary["rounds_completed"] == 2
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["failed"] == "0" and rows[2]["failed"] == "2" and rows[2]["replied"] == "0"
    assert len(reasons) == 2 and all("budget exhausted: ε would reach" in r for r in reasons)
    assert 0 < summary["max_epsilon"] <= 3.0  # the example level's, accounted on the nodes
    # Client-level DP counts and releases round 2 too (noise alone): both rounds accounted.
    assert summary["client_level_rounds"] == 2 and summary["client_level_delta"] == 1e-5
    assert 2.9 <= summary["client_level_epsilon"] <= 3.0 * (1 + 1e-6)
    eps = [float(r["client_level_epsilon"]) for r in rows[1:]]
    assert eps[0] < eps[1] == pytest.approx(summary["client_level_epsilon"])
    assert all(r["train_loss"] == "" and r["client_seconds"] == "" for r in rows[1:])
    assert all(float(r["clip_norm"]) == 0.5 for r in rows[1:])


#: client-level DP on FAST_RUN's two clients, both sampled each round (q = 1): a fixed bound,
#: since the adaptive rule's noisy count needs a cohort of dozens
CLIENT_LEVEL = ["client_dp=eps3", "client_dp.clipping=fixed", "client_dp.clip_norm=0.5"]


@pytest.mark.parametrize(
    "strategy", sorted(n for n, k in STRATEGIES.items() if k.client_dp_refusal({}) is None)
)
def test_each_composing_method_runs_client_level_rounds(strategy, tmp_path, data_dir):
    cfg = compose_config([*FAST_RUN, f"strategy={strategy}", *CLIENT_LEVEL])
    fed = prepare(cfg)
    start = {k: v.clone() for k, v in fed.strategy.global_adapter.items()}
    rounds = in_process_rounds(fed, 2, tmp_path)
    mechanism = fed.strategy.client_dp
    assert mechanism.rounds == 2 and 0 < rounds[0]["client_dp"].epsilon < mechanism.epsilon()
    assert mechanism.epsilon() <= 3.0 * (1 + 1e-6)
    assert all(not r["client_loss"] and r["train_loss"] is None for r in rounds)
    sent = fed.strategy.up_keys()
    assert any(not fed.strategy.global_adapter[k].equal(start[k]) for k in sent if k in start)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["strategy=flora"], "client_dp.enabled=true with strategy=flora: it stacks"),
        (["strategy=fedavg", "strategy.params.ranks=[2,4]"], "strategy.params.ranks"),
        (["client_opt.scaffold=true", "train.optimizer=sgd"], "client_opt.scaffold=false"),
        (["client_dp.clipping=adaptive"], "count_stddev above"),
    ],
)
def test_what_does_not_compose_exits_2_with_the_reason(overrides, fragment, capsys):
    assert main(["simulate", *FAST_RUN, *CLIENT_LEVEL, *overrides]) == 2
    assert fragment in capsys.readouterr().err
