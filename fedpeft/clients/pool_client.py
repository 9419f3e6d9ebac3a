"""A pool node takes on the client a message is for: its partition, its state, its name.

In a pooled simulation (client_pool.py) the server's message for client c reaches one of a fixed
pool of nodes with the record `fedpeft.pool` = {client: c, population: N}. `client_mod`, the
outermost mod of the simulation's ClientApp, parses that record strictly, removes it, and runs
the rest of the app (identity, train, evaluate, every other mod) on a context of client c: node
config partition-id = c, num-partitions = N, and client c's own state (client_store.py), saved
back after the message. Everything below (the partition, the seeded RNG, the privacy ledger and
its fingerprint, local factors, every round feature's state) therefore sees client c, never the
node that happened to serve it. The node's own context is left untouched. A message without the
record (one node per client, or a deployment) passes through unchanged; a deployed ClientApp
does not have this mod, so a server cannot make a device pose as another client.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message

from fedpeft.clients.client_store import ClientStore
from fedpeft.clients.task_guard import TaskRefused
from fedpeft.protocol import (
    NUM_PARTITIONS,
    PARTITION_ID,
    POOL_CLIENT,
    POOL_KEY,
    POOL_POPULATION,
)
from fedpeft.schema import integer_in

#: largest population a pool record may name (a client id must fit Flower's int64 records)
MAX_POPULATION = 2**40

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def read_pool_record(record: object) -> tuple[int, int]:
    """(client, population) from a `fedpeft.pool` record; anything else is refused."""
    if not isinstance(record, ConfigRecord):
        raise TaskRefused(f"the {POOL_KEY} record must be a ConfigRecord")
    keys = set(record)
    if keys != {POOL_CLIENT, POOL_POPULATION}:
        raise TaskRefused(
            f"the {POOL_KEY} record must hold exactly {POOL_CLIENT!r} and {POOL_POPULATION!r}, "
            f"got {sorted(keys)}"
        )
    population, client = record[POOL_POPULATION], record[POOL_CLIENT]
    if not integer_in(population, 1, MAX_POPULATION):
        raise TaskRefused(
            f"{POOL_KEY}.{POOL_POPULATION}={population!r} must be an int in [1, 2^40]"
        )
    if not integer_in(client, 0, int(population) - 1):
        raise TaskRefused(
            f"{POOL_KEY}.{POOL_CLIENT}={client!r} must be an int in [0, {population})"
        )
    return int(client), int(population)


def client_mod(store: ClientStore) -> Mod:
    """The Flower mod that runs a pooled message as its client, with the client's state."""

    def as_client(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if POOL_KEY not in msg.content:
            return call_next(msg, context)
        client, population = read_pool_record(msg.content[POOL_KEY])
        del msg.content[POOL_KEY]
        node_config = {**context.node_config, PARTITION_ID: client, NUM_PARTITIONS: population}
        with store.held(client) as state:
            view = Context(
                run_id=context.run_id,
                node_id=context.node_id,
                node_config=node_config,
                state=state,
                run_config=context.run_config,
            )
            return call_next(msg, view)

    return as_client
