"""A population of simulated clients served by a fixed pool of Flower nodes.

Flower's simulation registers one node per `num_supernodes` and polls every registered node ten
times a second, so a population of a million would cost a million polled nodes. A pooled
simulation registers P nodes, P sized to the cohort (`pool_size`), and addresses its messages to
clients instead: `PoolGrid` shows the server one node per client, with node id = client id
0..N-1, and routes the message for client c to pool node c mod P, with c and N in the message's
`fedpeft.pool` record. The node (clients/pool_client.py) takes on client c's partition and
state for that message and gives them back after it. The server's code is the same as with one
node per client: it samples, screens and records by client id, and the replies it receives
carry the client's id as their sender.

A deployment keeps one node per device; nothing here applies to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpeft import identity
from fedpeft.errors import ConfigError
from fedpeft.protocol import POOL_CLIENT, POOL_KEY, POOL_POPULATION

#: Standard deviations above its mean a Poisson-sampled cohort is sized for: a larger cohort
#: (probability about 3e-5 a round) only waits 0.1 s per extra message at its busiest node.
COHORT_MARGIN = 4.0


def cohort_bound(num_clients: int, fraction: float, min_clients: int, poisson: bool) -> int:
    """The most clients a round samples: max(min_clients, fraction x N), or Poisson mean + 4 sd."""
    if not poisson:
        return min(num_clients, max(min_clients, int(fraction * num_clients)))
    mean = fraction * num_clients
    spread = COHORT_MARGIN * math.sqrt(mean * (1.0 - fraction))
    return min(num_clients, math.ceil(mean + spread) + 1)


def pool_size(
    setting: int | None, num_clients: int, fraction: float, min_clients: int, poisson: bool
) -> int:
    """How many Flower nodes serve the clients (`federation.pool_size`; null: the cohort bound).

    Every client has its own node when the pool would be as large as the population.
    """
    if setting is None:
        return cohort_bound(num_clients, fraction, min_clients, poisson)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(
            f"federation.pool_size must be a positive integer or null (sized to the cohort), "
            f"got {setting!r}"
        )
    return min(setting, num_clients)


def federation_pool_size(federation: Mapping[str, Any], poisson: bool) -> int:
    """`pool_size` for a `federation` config group (a DictConfig or its plain dict)."""
    return pool_size(
        federation.get("pool_size"),
        federation["num_clients"],
        float(federation["fraction"]),
        federation["min_clients"],
        poisson,
    )


class PoolGrid(Grid):
    """A Grid whose nodes are the population's clients, served by the pool nodes of `grid`.

    Node ids are client ids 0..N-1; `get_node_ids` lists them only once the whole pool has
    registered. A message for client c goes to pool node c mod P (in Flower's registration
    order) carrying c and N; its reply comes back with c as its sender.
    """

    def __init__(self, grid: Grid, population: int, pool: int) -> None:
        self.grid = grid
        self.population = population
        self.pool = pool
        self._nodes: list[int] = []
        self._client_of: dict[str, int] = {}

    # -- Grid ------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run on the pool's own grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The pool's run."""
        return self.grid.run

    def create_message(  # noqa: PLR0913 (Flower's signature)
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to client `dst_node_id` (deprecated in Flower; kept for its interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Sequence[int]:
        """The clients 0..N-1 once all P pool nodes have registered, else none (O(1))."""
        return range(self.population) if self._pool_nodes() else range(0)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send each message to its client's pool node; the message takes the id Flower gives."""
        messages = list(messages)
        clients = [m.metadata.dst_node_id for m in messages]
        outside = [c for c in clients if not 0 <= c < self.population]
        if outside:  # refused before anything is sent
            raise ValueError(
                f"client {outside[0]} is outside the population [0, {self.population})"
            )
        ids = []
        for msg, client in zip(messages, clients, strict=True):
            out = Message(
                self._addressed(msg.content, client),
                dst_node_id=self.route(client),
                message_type=msg.metadata.message_type,
                ttl=msg.metadata.ttl,
                group_id=msg.metadata.group_id,
            )
            for message_id in self.grid.push_messages([out]):
                # the caller matches replies to what it sent by message id, as with any grid
                msg.metadata.__dict__["_message_id"] = message_id
                self._client_of[message_id] = client
                ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies so far, each showing the client it answers for as its sender."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            client = self._client_of.pop(reply.metadata.reply_to_message_id, None)
            if client is not None:
                reply.metadata.__dict__["_src_node_id"] = client
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every message has its reply or `timeout` seconds have passed."""
        pending = set(self.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if not pending:
                break
            time.sleep(getattr(self.grid, "pull_interval", 0.1))
        for message_id in pending:  # no reply: forget the route (the round counts a failure)
            self._client_of.pop(message_id, None)
        return replies

    # -- routing ---------------------------------------------------------------------------------
    def route(self, client: int) -> int:
        """The pool node that serves `client`: pool[client mod P], in registration order."""
        nodes = self._pool_nodes()
        if not nodes:
            raise RuntimeError(f"the pool's {self.pool} nodes have not all registered")
        return nodes[client % len(nodes)]

    def _pool_nodes(self) -> list[int]:
        """The pool's node ids in Flower's registration order, once all P have registered."""
        if not self._nodes:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= self.pool:
                order = identity.registration_names(self.grid)
                self._nodes = sorted(nodes, key=lambda n: (order.get(n, len(order)), n))
        return self._nodes

    def _addressed(self, content: RecordDict, client: int) -> RecordDict:
        """`content` plus the record that names the client it is for."""
        record = ConfigRecord({POOL_CLIENT: client, POOL_POPULATION: self.population})
        return RecordDict({**dict(content.items()), POOL_KEY: record})
