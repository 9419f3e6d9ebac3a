"""The pool: sized to the cohort; a grid that addresses clients and routes them to pool nodes."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft.client_pool import PoolGrid, cohort_bound, pool_size
from fedpeft.errors import ConfigError
from fedpeft.protocol import POOL_CLIENT, POOL_KEY, POOL_POPULATION


def test_the_pool_is_sized_to_the_largest_cohort():
    assert cohort_bound(1_000_000, 1e-4, 1, poisson=False) == 100
    assert cohort_bound(1000, 0.001, 10, poisson=False) == 10  # min_clients
    assert cohort_bound(4, 1.0, 1, poisson=False) == 4  # everyone: one node per client
    poisson = cohort_bound(1_000_000, 1e-4, 1, poisson=True)
    assert 100 + 4 * 9.99 < poisson <= 100 + 4 * 10 + 2  # mean + 4 sd
    assert cohort_bound(10, 0.5, 1, poisson=True) == 10  # never above the population
    assert pool_size(None, 1000, 0.01, 1, False) == 10
    assert pool_size(64, 1000, 0.01, 1, False) == 64
    assert pool_size(5000, 1000, 0.01, 1, False) == 1000


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_a_bad_pool_size_is_refused(bad):
    with pytest.raises(ConfigError, match="federation.pool_size"):
        pool_size(bad, 100, 0.1, 1, False)


class _Link(Grid):
    """Registered nodes that answer each message with the pool record they were sent."""

    pull_interval = 0.0

    def __init__(self, nodes: list[int]) -> None:
        self.nodes, self.inbox, self.replies = nodes, [], []

    def set_run(self, run):  # noqa: ANN001
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001
        return Message(content, dst_node_id, message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.inbox.append(msg)
            pool = msg.content[POOL_KEY]
            reply = Message(RecordDict({"metrics": MetricRecord(dict(pool))}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            self.replies.append(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [r for r in self.replies if r.metadata.reply_to_message_id in wanted]
        self.replies = [r for r in self.replies if r not in out]
        return out

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        return self.pull_messages(self.push_messages(messages))


def _to(client: int) -> Message:
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    return Message(content, dst_node_id=client, message_type=MessageType.TRAIN)


@pytest.mark.usefixtures("flower_task_identity")
def test_messages_reach_pool_node_c_mod_p_and_replies_come_back_from_the_client():
    link = _Link([701, 702, 703])
    grid = PoolGrid(link, population=1_000_000, pool=3)
    assert len(grid.get_node_ids()) == 1_000_000 and 999_999 in grid.get_node_ids()
    sent = [_to(c) for c in (5, 999_999, 12)]
    replies = list(grid.send_and_receive(sent, timeout=5))
    assert [m.metadata.dst_node_id for m in link.inbox] == [703, 701, 701]  # 5%3, 999999%3, 12%3
    assert all(set(m.content) == {"config", POOL_KEY} for m in link.inbox)
    assert sorted(r.metadata.src_node_id for r in replies) == [5, 12, 999_999]
    for reply in replies:
        pool = reply.content.metric_records["metrics"]
        assert pool[POOL_CLIENT] == reply.metadata.src_node_id
        assert pool[POOL_POPULATION] == 1_000_000
    # the sender's messages keep addressing the client and take the ids their replies answer
    assert {m.metadata.message_id: m.metadata.dst_node_id for m in sent} == {
        r.metadata.reply_to_message_id: r.metadata.src_node_id for r in replies
    }
    assert "config" in sent[0].content and POOL_KEY not in sent[0].content


@pytest.mark.usefixtures("flower_task_identity")
def test_no_clients_until_the_whole_pool_has_registered_and_none_outside_the_population():
    link = _Link([701])
    grid = PoolGrid(link, population=50, pool=2)
    assert len(grid.get_node_ids()) == 0
    link.nodes.append(702)
    assert len(grid.get_node_ids()) == 50
    with pytest.raises(ValueError, match="outside the population"):
        grid.push_messages([_to(3), _to(50)])
    assert link.inbox == []  # nothing was sent
