"""The identity query: how a node names itself and declares its data size, and what it means.

Before a node's first round the server sends it a query of action `identity` carrying the task.
The node (clients/client_app.py `identity`) answers with
- `client-id`, its stable name: its partition id when it trains on a partition of the task's
  dataset (simulations, demos), else its Flower node id. Flower binds a SuperNode's node id to the
  public key the operator registered (`flwr supernode register`), so that id survives restarts of
  the SuperNode, and of the SuperLink when it keeps its state in a `--database` file; a SuperNode
  started without a registered key generates a new key, and gets a new id, at every start;
- `num-examples`, the number of training examples it holds: its replies may not claim more in
  this run (strategies/declared.py).
A name that two connected nodes claim goes to neither: both keep their node ids.

When it is asked: a deployment asks every node when it joins (strategies/roster.py `identify_new`),
a simulation asks a node when it is first sampled (`Roster.sample` with
`LowRankStrategy.identify_sampled_timeout`), so that a round costs the clients it samples, not the
clients that exist. Before it is asked, a simulated node is sampled under `registration_names`:
Flower's simulation registers node i with partition id i, in order, so a node's position in that
order is the name it will answer with and sampling is the same as if every node had been asked
first (a run repeats, seed for seed). The answer is still what counts; a node that answers
otherwise is logged. A pooled simulation (client_pool.py) addresses clients, not nodes: a
client's name is its id by construction, and the server counts its examples from its own
partitioning (it asks, through the pool, only when an audit's canaries change the counts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.superlink.grid import InMemoryGrid

from fedpeft.protocol import (
    CLIENT_ID,
    CONFIG_KEY,
    IDENTITY_ACTION,
    METRICS_KEY,
    NUM_EXAMPLES,
    PARTITION_ID,
    TASK_KEY,
)
from fedpeft.records import addressees, answered_node, short_reason


def member(context: Context) -> int:
    """A node's stable name: its partition id, else its Flower node id.

    A SuperNode that authenticates with a registered key keeps its node id across restarts.
    """
    return int(context.node_config.get(PARTITION_ID, context.node_id))


@dataclass(frozen=True)
class Answer:
    """What one node answered: its claimed name and declared example count (None: not given)."""

    client_id: int | None
    declared: int | None


def read_answer(msg: Message) -> Answer:
    """The name and example count in an identity reply; a missing or malformed field is None."""
    metrics = None if msg.has_error() else msg.content.metric_records.get(METRICS_KEY)
    if metrics is None:
        return Answer(None, None)
    name, count = metrics.get(CLIENT_ID), metrics.get(NUM_EXAMPLES)
    return Answer(
        name if isinstance(name, int) else None,
        count if isinstance(count, int) and count >= 1 else None,
    )


def resolve(claims: Mapping[int, int], held: Mapping[int, int]) -> dict[int, int]:
    """Node id -> name for the claims no other node makes (`held`: the connected nodes' names).

    A name claimed by two nodes, or by one while a connected node holds it, goes to neither.
    """
    owners: dict[int, set[int]] = {}
    for node, name in [*held.items(), *claims.items()]:
        owners.setdefault(name, set()).add(node)
    return {node: name for node, name in claims.items() if owners[name] == {node}}


def registration_names(grid: Grid) -> dict[int, int]:
    """Node id -> its position in the order Flower's simulation registered the nodes; {} elsewhere.

    flwr 1.39's simulation (`vce_api._register_nodes`) registers node i with partition id i into
    its in-memory link state, whose node table keeps that order; a deployment's grid has none.
    """
    state = grid.state if isinstance(grid, InMemoryGrid) else None
    if state is None:
        return {}
    return {info.node_id: i for i, info in enumerate(state.get_node_info())}


def ask(
    grid: Grid,
    nodes: Sequence[int],
    task: Mapping[str, Any],
    timeout: float,
    held: Mapping[int, int] | None = None,
) -> tuple[dict[int, int], dict[int, int]]:
    """Send `nodes` the identity query; (node id -> unique name, node id -> declared count).

    `held`: the names of connected nodes identified before. A node that does not answer within
    `timeout`, or claims a taken name, keeps its node id as its name; the run goes on.
    """
    query = f"{MessageType.QUERY}.{IDENTITY_ACTION}"
    messages = [
        Message(
            RecordDict({CONFIG_KEY: ConfigRecord({TASK_KEY: json.dumps(dict(task))})}),
            dst_node_id=node,
            message_type=query,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    asked = addressees(messages)
    answers = {}
    for msg in replies:
        node = answered_node(msg, asked)
        if msg.has_error():
            log(WARNING, "node %d gave no identity: %s", node, short_reason(msg.error.reason))
        answers[node] = read_answer(msg)
    claims = {n: a.client_id for n, a in answers.items() if a.client_id is not None}
    names = resolve(claims, held or {})
    declared = {n: a.declared for n, a in answers.items() if a.declared is not None}
    for found, what in (
        (names, "gave no unique name and are known by their node ids"),
        (declared, "declared no example count"),
    ):
        if len(found) < len(nodes):
            log(WARNING, "%d of %d nodes %s", len(nodes) - len(found), len(nodes), what)
    return names, declared
