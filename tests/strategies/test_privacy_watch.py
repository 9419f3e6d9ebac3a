"""The server's monotonic check of each client's reported privacy ledger."""

import math

from fedpeft.strategies.privacy_watch import PrivacyWatch


def _m(steps, eps):
    return {"dp-steps": steps, "epsilon": eps}


def test_growing_ledgers_pass_and_a_reset_is_named():
    watch = PrivacyWatch()
    assert watch.observe(4, _m(3, 1.2), private_run=True) is None
    assert watch.observe(4, _m(6, 2.0), private_run=True) is None
    assert watch.observe(5, _m(3, 1.1), private_run=True) is None  # another client
    reason = watch.observe(4, _m(3, 1.2), private_run=True)
    assert reason.startswith("privacy ledger of client 4 was reset: dp-steps went from 6 to 3")
    assert "epsilon from 2 to 1.2" in reason
    # Equal steps in a later round are a reset too (every round takes at least one step).
    assert "was reset" in watch.observe(5, _m(3, 1.1), private_run=True)
    # The largest report is kept, not the reset one.
    assert watch.steps[4] == 6 and watch.max_epsilon() == 2.0


def test_epsilon_going_back_alone_is_a_reset():
    watch = PrivacyWatch()
    watch.observe(1, _m(3, 2.0), private_run=True)
    assert "was reset" in watch.observe(1, _m(6, 1.5), private_run=True)


def test_a_private_run_needs_a_ledger_and_a_malformed_one_is_refused():
    watch = PrivacyWatch()
    assert watch.observe(1, {}, private_run=False) is None
    assert "must report its privacy ledger" in watch.observe(1, {}, private_run=True)
    for bad in (_m(-1, 1.0), _m(2.5, 1.0), _m(3, math.nan), _m(3, "x"), _m(True, 1.0)):
        assert "malformed privacy ledger" in watch.observe(1, bad, private_run=True)
    assert watch.steps == {}


def test_the_watch_round_trips_through_the_checkpoint_state():
    watch = PrivacyWatch()
    watch.observe(1, _m(3, 2.0), private_run=True)
    watch.observe(7, _m(9, 2.5), private_run=True)
    again = PrivacyWatch.from_state(watch.state())
    assert again == watch and PrivacyWatch.from_state(None) == PrivacyWatch()
    assert "was reset" in again.observe(7, _m(9, 2.5), private_run=True)


def test_the_strategy_rejects_a_reset_counts_rejected_epsilon_and_stops_sampling_it():
    import numpy as np
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )

    from fedpeft.strategies import STRATEGIES
    from tests.strategies.conftest import FakeGrid, global_adapter

    task = {"adapter": {"rank": 4, "alpha": 8.0}, "adapter_seed": 1, "dp": {"enabled": True}}
    strategy = STRATEGIES["fedavg"](
        global_adapter(), task, train_head=True, min_clients=1, norm_bound=1e3, seed=0
    )
    grid = FakeGrid([11, 12])

    def replies(server_round, ledgers, huge=()):
        sent = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        out = []
        for msg in sent:
            node = msg.metadata.dst_node_id
            tensors = {k: strategy.global_adapter[k].numpy() for k in strategy.up_keys()}
            if node in huge:
                tensors = {k: v * 1e6 for k, v in tensors.items()}
            steps, eps = ledgers[node]
            metrics = {"num-examples": 10, "steps": 3, "dp-steps": steps, "epsilon": eps}
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
            out.append(Message(content, reply_to=msg))
        strategy.aggregate_train(server_round, out)
        return strategy.stats

    stats = replies(1, {11: (3, 1.0), 12: (3, 1.1)}, huge={12})  # 12 is rejected by the norm
    assert set(stats.rejected) == {12} and stats.client_epsilon == {11: 1.0, 12: 1.1}
    assert stats.train_loss is None and stats.client_loss == {}  # private replies carry no loss
    stats = replies(2, {11: (3, 1.0), 12: (6, 2.0)})
    assert stats.rejected[11].startswith("privacy ledger of client 11 was reset")
    assert stats.client_epsilon == {11: 1.0, 12: 2.0} and stats.replied == 1
    assert 11 in strategy.roster.exhausted
    sent = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in sent] == [12]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in sent)
    _, meta = strategy.state_dict()
    assert meta["privacy"] == {"steps": [[11, 3], [12, 6]], "epsilon": [[11, 1.0], [12, 2.0]]}
