"""The ClientApp a simulation runs: the deployed train handler plus what only a simulation needs.

- identity (a query message, the deployed handler): the node replies with its partition id, so
  that the server samples, orders and records clients by a name that is the same in every run
  (Flower draws simulated node ids at random in every process), and with its partition's size.
- seeded randomness: each local round runs under torch's global RNG seeded from (seed, round,
  partition id) and restored afterwards, so dropout masks do not depend on which nodes the same
  Ray actor served before. Deployed clients keep their own unseeded RNG: a seed the server knows
  must not drive anything private there (DP noise draws from the same RNG).
- fault injection (faults.py).
- secure aggregation (`secure_sum_mod`, outermost of the train mods; clients/secure_sum_mods.py),
  as deployed.
- pooled clients (`client_mod`, outermost of all; clients/pool_client.py): a node of a pooled
  simulation answers each message as the client it names, with that client's partition and
  state.
- where it ran: each local round logs the client, the round and the Ray node whose actor ran it
  (`ray_node_log`), in that worker's log on that node (and on the driver with verbose=true), so
  that a run on a Ray cluster shows which machine trained which client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import INFO

import ray
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedpeft.clients import faults
from fedpeft.clients.client_app import evaluate_round, identity_reply, train_round
from fedpeft.clients.client_store import ClientStore
from fedpeft.clients.pool_client import client_mod
from fedpeft.clients.secure_sum_mods import secure_sum_mod
from fedpeft.identity import member
from fedpeft.privacy.policy import NodePolicy
from fedpeft.protocol import CONFIG_KEY, IDENTITY_ACTION, SERVER_ROUND, TASK_KEY

#: the folder of a pooled simulation's client state, under the nodes' state dir (client_store.py)
CLIENT_STORE = "clients"


def round_seed(seed: int, server_round: int, partition: int) -> int:
    """The torch seed of one client's local round; distinct from the data sampler's seed."""
    return (seed * 1_000_033 + server_round * 7_919 + partition * 104_729 + 17) % 2**31


def seeded_rng(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Flower mod: run the train handler under a torch RNG seeded for this client and round."""
    config = msg.content.config_records[CONFIG_KEY]
    seed = int(json.loads(str(config[TASK_KEY]))["seed"])
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(round_seed(seed, int(config[SERVER_ROUND]), member(context)))
        return call_next(msg, context)


def ray_node() -> str:
    """The id of the Ray node this process runs on ("-" outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"


def ray_node_log(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Flower mod: log which Ray node ran this client's local round."""
    reply = call_next(msg, context)
    server_round = int(msg.content.config_records[CONFIG_KEY][SERVER_ROUND])
    log(INFO, "client %d round %d ran on Ray node %s", member(context), server_round, ray_node())
    return reply


def simulation_app(policy: NodePolicy) -> ClientApp:
    """A ClientApp with the deployed train handler, fault injection, seeding and identity.

    Every simulated node holds `policy` (the run's own `dp` group, NodePolicy.for_simulation):
    the same check a deployed node makes against the policy in its node config.
    """

    def train(msg: Message, context: Context) -> Message:
        return train_round(msg, context, policy)

    # client_mod first: every handler and mod below runs as the client the message names
    app = ClientApp(mods=[client_mod(ClientStore(policy.state_dir / CLIENT_STORE))])
    # secure_sum_mod first: SecAgg+'s own messages carry no round config for the others to read
    app.train(mods=[secure_sum_mod, ray_node_log, faults.fault_mod, seeded_rng])(train)

    def identity(msg: Message, context: Context) -> Message:
        return identity_reply(msg, context, policy)

    app.query(IDENTITY_ACTION)(identity)

    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_round(msg, context, policy)

    app.evaluate()(evaluate)
    return app
