"""The simulation's ClientApp: stable identities, seeded client rounds, and reproducible runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import checkpoint
from fedpeft.cli import simulate
from fedpeft.clients.simulation import seeded_rng
from tests.conftest import FAST_RUN


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=987654321,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _train_message(server_round: int) -> Message:
    config = ConfigRecord({"server-round": server_round, "task": json.dumps({"seed": 5})})
    return Message(RecordDict({"config": config}), dst_node_id=1, message_type=MessageType.TRAIN)


def _draw(msg: Message, context: Context) -> Message:
    value = float(torch.rand(()))
    return Message(RecordDict({"metrics": MetricRecord({"u": value})}), reply_to=msg)


def test_client_round_randomness_does_not_depend_on_process_history():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def draw(server_round: int, partition: int) -> float:
        out = seeded_rng(_train_message(server_round), _context(partition), _draw)
        return out.content.metric_records["metrics"]["u"]

    torch.manual_seed(0)
    first = draw(2, 1)
    torch.rand(1000)  # whatever the process drew before, e.g. for other clients
    outer = torch.get_rng_state()
    assert draw(2, 1) == first
    assert torch.equal(torch.get_rng_state(), outer)  # the process's own stream is restored
    assert len({first, draw(3, 1), draw(2, 2)}) == 3


def _history(run_dir) -> list[dict]:
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    measured = ("time_s", "client_seconds")  # times differ between any two runs
    return [{k: v for k, v in r.items() if not k.endswith(measured)} for r in rows]


#: FLoRA with partial sampling: sampling, ranks, fresh seeds, dropout and per-node state all
#: depend on which client is which, though Flower draws new node ids in every run.
FLORA = [
    *FAST_RUN,
    "strategy=flora",
    "federation.num_clients=3",
    "federation.fraction=0.67",
    "federation.rounds=3",
]
ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def flora_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("flora")
    simulate([*FLORA, f"run_dir={run_dir}"])
    return run_dir


def test_same_config_and_seed_give_the_same_history_pooled_or_not(flora_run, tmp_path):
    """FLoRA's 3 clients, 2 a round, run twice: once served by a pool of 2 nodes (the default,
    sized to the cohort), once by a node each. Flower draws new node ids in every run, yet the
    same clients train on the same state to the same history and the same adapter bytes."""
    summary = simulate([*FLORA, "federation.pool_size=3", f"run_dir={tmp_path}"])
    pooled = json.loads((flora_run / "summary.json").read_text())
    assert (pooled["pool_size"], summary["pool_size"]) == (2, 3)
    first, second = _history(flora_run), _history(tmp_path)
    assert first == second and len(first) == 4
    assert json.loads(first[1]["client_train_loss"]).keys() <= {"0", "1", "2"}
    assert (flora_run / ADAPTER).read_bytes() == (tmp_path / ADAPTER).read_bytes()
    held = {int(p.stem) for p in (flora_run / "node_state" / "clients").rglob("*.state")}
    assert held == {0, 1, 2}  # each client's stacks and versions, kept under its own id
    assert not (tmp_path / "node_state" / "clients").exists()  # a node each: in its context


def test_resumed_simulation_resends_lost_client_state(flora_run, tmp_path):
    """A resumed run starts its clients without state, pooled or not (a pooled client's file from
    before is cleared, as a node's memory would be), and the server resends every stacked module
    (more bytes down in the first resumed round): the run ends exactly as if never stopped."""
    simulate([*FLORA, "federation.rounds=2", f"run_dir={tmp_path}"])
    assert checkpoint.load(tmp_path).server_round == 2
    store = tmp_path / "node_state" / "clients"
    assert len(list(store.rglob("*.state"))) == 3
    for state in store.rglob("*.state"):  # what a stale or crashed attempt could leave behind
        state.write_bytes(b"\xff not a client's state")
    summary = simulate([*FLORA, f"resume={tmp_path}"])  # clients start afresh, as nodes would
    assert (summary["resumed_from_round"], summary["rounds_completed"]) == (2, 3)
    whole, resumed = _history(flora_run), _history(tmp_path)
    assert int(resumed[3].pop("bytes_down")) > int(whole[3].pop("bytes_down"))
    assert resumed == whole
    assert (flora_run / ADAPTER).read_bytes() == (tmp_path / ADAPTER).read_bytes()


def test_a_million_clients_under_client_and_example_level_dp(tmp_path, data_dir):
    """10^6 clients with sampled data sets, about 5 Poisson-sampled a round, served by a pool
    sized to the cohort: the run costs its cohort, reports its client-level epsilon with
    q = 5e-6 over the population, and each sampled client keeps its own DP-SGD ledger."""
    n = 1_000_000
    summary = simulate(
        [
            *FAST_RUN,
            f"federation.num_clients={n}",
            "federation.fraction=0.000005",
            "federation.rounds=1",
            "federation.local_steps=1",
            "partition=sampled",
            "client_dp=eps3",
            "client_dp.clipping=fixed",
            "dp=eps3",
            "train.batch_size=8",
            f"run_dir={tmp_path}",
        ]
    )
    assert summary["pool_size"] == 15  # ceil(5 + 4 sd) + 1
    assert summary["partition_sizes"] is None
    assert summary["partition_size_summary"]["clients"] == n
    assert summary["client_level_sample_rate"] == 0.000005
    assert 2.0 < summary["client_level_epsilon"] <= 3.0
    rows = _history(tmp_path)[1:]
    assert float(rows[0]["client_level_epsilon"]) == summary["client_level_epsilon"]
    trained = {c for c in summary["declared_examples"]}
    assert 1 <= len(trained) <= 15 and all(0 <= int(c) < n for c in trained)
    assert int(rows[0]["sampled"]) == len(trained)
    assert 2.0 < summary["max_epsilon"] <= 3.0  # example level, each client's own ledger
    ledgers = list((tmp_path / "node_state" / "ledgers").glob("*.json"))
    assert len(ledgers) == len(trained)  # one per client sampled, none for the rest
    assert not list((tmp_path / "node_state").rglob("*.state"))  # FedAvg keeps no client state


def test_nodes_are_identified_when_first_sampled_and_sampled_as_if_all_were(tmp_path, data_dir):
    """20 clients, 2 sampled a round, a node each: only the sampled ones are asked who they
    are, and the sample is the one a server that had asked all 20 first would draw (by partition
    id)."""
    import random

    rounds, clients, per_round = 2, 20, 2
    summary = simulate(
        [
            *FAST_RUN,
            f"federation.num_clients={clients}",
            f"federation.fraction={per_round / clients}",
            f"federation.min_clients={per_round}",
            f"federation.rounds={rounds}",
            "federation.local_steps=1",
            f"federation.pool_size={clients}",
            f"run_dir={tmp_path}",
        ]
    )
    rows = _history(tmp_path)[1:]
    sampled = [sorted(int(c) for c in json.loads(r["client_train_loss"])) for r in rows]
    rng = random.Random(0)  # the strategy's sampler (seed=0) over clients sorted by identity
    assert sampled == [sorted(rng.sample(range(clients), per_round)) for _ in range(rounds)]
    asked = {int(c) for c in summary["declared_examples"]}
    assert asked == {c for s in sampled for c in s} and len(asked) < clients
    sizes = summary["partition_sizes"]
    assert all(summary["declared_examples"][str(c)] == sizes[c] for c in asked)
