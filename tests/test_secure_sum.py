"""Secure aggregation (fedpeft/secure_sum.py): real SecAggPlusWorkflow and secaggplus_mod.

The unit tests run Flower's own workflow and client mod over an in-process grid against a stub
train handler; the last ones run a real simulation and the config's refusals.
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.cli import main, simulate
from fedpeft.clients.secure_sum_mods import fitins_adapter, secure_sum_mod
from fedpeft.privacy.client_level import ClientDPSettings, ClientNoise
from fedpeft.privacy.policy import PolicyViolation
from fedpeft.records import from_record
from fedpeft.secure_sum import SecAggSettings, SecureSum
from fedpeft.strategies.client_dp import ClientLevelDP
from fedpeft.strategies.fedavg import FedAvgLoRA
from tests.conftest import FAST_RUN
from tests.strategies.conftest import FakeGrid, global_adapter, reply


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


NODES = list(range(101, 107))
#: each node's update norm; the bound is 1.0, so nodes 103 and 105 are clipped
NORMS = dict(zip(NODES, [0.05, 0.5, 2.0, 0.1, 3.0, 0.2], strict=True))


def update(node: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Node `node`'s update of norm NORMS[node] (all tensors together)."""
    g = torch.Generator().manual_seed(node)
    raw = {k: torch.randn(v.shape, generator=g) for k, v in like.items()}
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in raw.values()))
    return {k: (v.double() * NORMS[node] / norm).float() for k, v in raw.items()}


class InProcessGrid(FakeGrid):
    """Delivers each message to the node's ClientApp in this process (a serialising copy each)."""

    def __init__(
        self,
        nodes: list[int],
        fail_in_training: set[int] = frozenset(),
        node_config: dict | None = None,
        mods: tuple = (secure_sum_mod,),
    ) -> None:
        super().__init__(nodes)
        self.fail = fail_in_training
        self.contexts = {n: Context(1, n, dict(node_config or {}), RecordDict(), {}) for n in nodes}
        self.replies: list[Message] = []
        self.errors: list[Exception] = []
        self.app = ClientApp()
        self.app.train(mods=list(mods))(self.train)

    def train(self, msg: Message, context: Context) -> Message:
        """A stub local round: received + the node's fixed update, with metrics to withhold."""
        if context.node_id in self.fail:
            raise RuntimeError("dropped out while training")
        received = from_record(msg.content["arrays"])
        delta = update(context.node_id, received)
        trained = ArrayRecord({k: Array((v + delta[k]).numpy()) for k, v in received.items()})
        metrics = MetricRecord({"num-examples": 7, "train-loss": 0.25})
        return Message(RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            try:
                answer = self.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - a node that fails sends nothing
                self.errors.append(exc)
                continue
            self.replies.append(answer)
            out.append(answer)
        return out


def strategy(clipping: str) -> FedAvgLoRA:
    """FedAvg under client-level DP on six nodes, all sampled, with reproducible noise."""
    settings = ClientDPSettings(
        enabled=True,
        noise_multiplier=1.0,
        clipping=clipping,
        clip_norm=1.0,
        count_stddev=1.0,
        reproducible=True,
    )
    noise = ClientNoise.calibrate(settings, population=len(NODES), sample_rate=1.0, rounds=10)
    return FedAvgLoRA(global_adapter(), {}, client_dp=ClientLevelDP(settings, noise, seed=5))


def plain_round(nodes: list[int], replying: list[int], clipping: str) -> FedAvgLoRA:
    """The server-side path: every reply in the clear, clipped and noised on the server."""
    plain = strategy(clipping)
    messages = plain.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(nodes))
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        if node in replying:
            received = from_record(msg.content["arrays"])
            delta = update(node, received)
            replies.append(reply(node, {k: v + delta[k] for k, v in received.items()}, 7))
    plain.aggregate_train(1, replies)
    return plain


def secure_round(grid: InProcessGrid, clipping: str, **secagg) -> FedAvgLoRA:
    """The same round under SecAgg+: the server gets the clipped sum only."""
    secure = strategy(clipping)
    settings = SecAggSettings(enabled=True, **{"num_shares": 1.0, **secagg})
    shim = SecureSum(secure, settings, timeout=None)
    messages = secure.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    shim.run_round(grid, 1, messages)
    return secure


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_the_secure_sum_releases_what_the_plain_path_releases(clipping):
    grid = InProcessGrid(NODES)
    secure = secure_round(grid, clipping)
    plain = plain_round(NODES, NODES, clipping)
    # Quantisation: each coordinate of each update to 2C / 2^22; summed over 6 nodes, / q N = 6.
    for key, value in plain.global_adapter.items():
        torch.testing.assert_close(secure.global_adapter[key], value, rtol=0, atol=2e-6)
    assert secure.client_dp.clip_norm == pytest.approx(plain.client_dp.clip_norm, rel=1e-9)
    assert secure.client_dp.rounds == 1 and secure.stats.client_dp.clip_norm == 1.0
    stats = secure.stats
    assert (stats.sampled, stats.replied, stats.failed) == (6, 6, {})
    assert stats.bytes_down == plain.stats.bytes_down and stats.bytes_up > 0
    # What reached the server from the masked-vector stage: no metrics, weight 1, no tensors.
    collected = [m for m in grid.replies if "fitres.metrics" in m.content.config_records]
    assert len(collected) == 6
    for msg in collected:
        assert dict(msg.content.config_records["fitres.metrics"]) == {}
        assert msg.content.metric_records["fitres.num_examples"]["num_examples"] == 1
        assert "metrics" not in msg.content and "train-loss" not in str(msg.content)
        assert all(len(record) == 0 for record in msg.content.array_records.values())


def test_a_node_dropping_out_at_the_masked_vectors_leaves_the_others_sum():
    grid = InProcessGrid(NODES, fail_in_training={104})
    secure = secure_round(grid, "fixed")
    plain = plain_round(NODES, [n for n in NODES if n != 104], "fixed")
    for key, value in plain.global_adapter.items():
        torch.testing.assert_close(secure.global_adapter[key], value, rtol=0, atol=2e-6)
    assert secure.stats.replied == 5 and set(secure.stats.failed) == {104}
    assert secure.client_dp.rounds == 1


def test_a_halted_round_releases_noise_alone_and_counts():
    grid = InProcessGrid([101])  # one node sampled: SecAgg+ needs two
    secure = secure_round(grid, "fixed")
    plain = plain_round([101], [], "fixed")
    for key, value in plain.global_adapter.items():
        torch.testing.assert_close(secure.global_adapter[key], value, rtol=0, atol=1e-7)
    assert secure.client_dp.rounds == 1 and secure.stats.replied == 0
    assert set(secure.stats.failed) == {101} and "halted" in secure.stats.failed[101]
    assert not np.allclose(
        secure.global_adapter["head.classifier.bias"].numpy(),
        global_adapter()["head.classifier.bias"].numpy(),
    )


def test_a_node_refuses_a_reconstruction_threshold_below_its_floor():
    """Nodes whose policy says secagg-min-threshold=4 refuse the server's threshold of 3 (of 6
    shares: the server plus 2 colluding nodes could rebuild a node's keys) at the setup stage,
    before any key exists; the round halts with noise alone. A threshold of 5 they accept."""
    floor = {"secagg-min-threshold": 4}
    low = InProcessGrid(NODES, node_config=floor)
    secure = secure_round(low, "fixed", reconstruction_threshold=0.5)
    assert len(low.errors) == len(NODES) and low.replies == []
    assert all(isinstance(e, PolicyViolation) for e in low.errors)
    assert "secagg-min-threshold=4 refuses a SecAgg+ round whose reconstruction threshold is 3" in (
        str(low.errors[0])
    )
    assert secure.stats.replied == 0 and secure.client_dp.rounds == 1
    high = InProcessGrid(NODES, node_config=floor)
    secure = secure_round(high, "fixed", reconstruction_threshold=5)
    plain = plain_round(NODES, NODES, "fixed")
    assert high.errors == [] and secure.stats.replied == len(NODES)
    for key, value in plain.global_adapter.items():
        torch.testing.assert_close(secure.global_adapter[key], value, rtol=0, atol=2e-6)


class SplitViewGrid(InProcessGrid):
    """A hostile server's unmask stage: node 101, which sent its masked vector, is named both
    active (send the share of its mask seed) and dropped (send the share of its key). The server
    keeps what comes back (`stolen`) and its workflow sees no answer."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        configs = [m.content.config_records.get(RECORD_KEY_CONFIGS) for m in messages]
        if not any(c is not None and c.get(Key.STAGE) == Stage.UNMASK for c in configs):
            return super().send_and_receive(messages, timeout=timeout)
        for config in configs:
            config[Key.DEAD_NODE_ID_LIST] = [*config[Key.DEAD_NODE_ID_LIST], NODES[0]]
        self.stolen = super().send_and_receive(messages, timeout=timeout)
        return []


def test_a_split_view_unmask_is_refused_where_flowers_mod_would_answer_it():
    """With Flower's mod alone every node hands over both of node 101's shares (enough of them
    rebuild its mask seed and its key, and so its own update); fedpeft's nodes refuse."""
    bare = SplitViewGrid(NODES, mods=(secaggplus_mod, fitins_adapter))
    secure_round(bare, "fixed")
    assert len(bare.stolen) == len(NODES) and bare.errors == []
    for msg in bare.stolen:
        assert msg.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST].count(101) == 2
    guarded = SplitViewGrid(NODES)
    secure = secure_round(guarded, "fixed")
    assert guarded.stolen == [] and len(guarded.errors) == len(NODES)
    assert all("named both active and dropped" in str(e) for e in guarded.errors)
    assert secure.stats.replied == 0 and secure.client_dp.rounds == 1


def test_a_simulation_under_secure_aggregation_reports_its_epsilon(tmp_path, data_dir):
    summary = simulate(
        [*FAST_RUN, "federation.num_clients=3", "federation.rounds=1", "client_dp=eps3",
         "client_dp.clipping=fixed", "secagg.enabled=true", f"run_dir={tmp_path}"]
    )  # fmt: skip
    assert summary["rounds_completed"] == 1 and summary["client_level_rounds"] == 1
    assert 0 < summary["client_level_epsilon"] <= 3.0 * (1 + 1e-6)
    with open(tmp_path / "history.csv") as f:
        row = list(csv.DictReader(f))[1]
    # q = 1: every node is sampled, and all three masked vectors were summed
    assert (row["sampled"], row["replied"], row["failed"]) == ("3", "3", "0")
    assert int(row["bytes_up"]) > int(row["bytes_down"]) > 0  # int64 masked entries
    assert row["train_loss"] == "" and row["client_seconds"] == ""


BASE = [*FAST_RUN, "federation.num_clients=3", "client_dp=eps3", "client_dp.clipping=fixed"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ([*FAST_RUN, "secagg.enabled=true"], "needs client_dp.enabled=true"),
        ([*BASE, "secagg.enabled=true", "+secagg.shares=3"], "unknown key(s) shares"),
        ([*BASE, "secagg.enabled=true", "secagg.num_shares=2"], "secagg.num_shares=2 must be"),
        (
            [
                *BASE,
                "secagg.enabled=true",
                "secagg.num_shares=3",
                "secagg.reconstruction_threshold=3",
            ],
            "must be below secagg.num_shares=3",
        ),
        ([*BASE, "secagg.enabled=true", "strategy=rolora"], "secagg.enabled=true with strategy"),
        (
            [*BASE, "secagg.enabled=true", "secagg.quantization_range=1073741824"]
            + ["federation.num_clients=4"],  # 4 x 2^30 reaches 2^32
            "can wrap the quantised sum",
        ),
    ],
)
def test_what_secure_aggregation_cannot_run_exits_2(overrides, fragment, capsys):
    assert main(["simulate", *overrides]) == 2
    assert fragment in capsys.readouterr().err
