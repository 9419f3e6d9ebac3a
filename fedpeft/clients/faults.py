"""Fault injection for simulations: a sampled client crashes or stalls past the round's deadline.

The task's `faults` entry (config block `faults:`) gives the probabilities. Whether a client fails
in a round is drawn from (faults.seed, round, partition id) alone, so the same clients fail in
every run of a config. A crash is a real exception in the ClientApp, which Flower turns into an
error reply; a slow client really sleeps, by default one second past the round timeout, then
trains and replies too late. It runs as a Flower mod around the train handler (see
clients/simulation.py), so deployed clients never carry it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message

from fedpeft.identity import member
from fedpeft.protocol import CONFIG_KEY, SERVER_ROUND, TASK_KEY

CRASH, SLOW = "crash", "slow"


class InjectedCrash(RuntimeError):
    """A crash the fault injection asked for."""


def draw(faults: Mapping[str, Any], server_round: int, member: int) -> str | None:
    """CRASH, SLOW or None for this client in this round, the same in every run."""
    crash, slow = float(faults.get("crash_prob", 0.0)), float(faults.get("slow_prob", 0.0))
    if crash == slow == 0.0:
        return None
    u = random.Random(f"fedpeft-faults:{faults.get('seed', 0)}:{server_round}:{member}").random()
    if u < crash:
        return CRASH
    if u < crash + slow:
        return SLOW
    return None


def stall_seconds(faults: Mapping[str, Any]) -> float:
    """How long a slow client sleeps: faults.slow_s, else one second past the round timeout."""
    if faults.get("slow_s") is not None:
        return float(faults["slow_s"])
    return float(faults["round_timeout"]) + 1.0


def inject(task: Mapping[str, Any], context: Context, server_round: int) -> None:
    """Crash (raise) or stall (sleep) if the draw says so for this node and round."""
    faults = task.get("faults") or {}
    name = member(context)
    fault = draw(faults, server_round, name)
    if fault == CRASH:
        raise InjectedCrash(
            f"injected crash of client {name} in round {server_round} "
            f"(faults.crash_prob={faults['crash_prob']})"
        )
    if fault == SLOW:
        time.sleep(stall_seconds(faults))


def fault_mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Flower mod: inject this round's fault, if any, before the train handler runs."""
    config = msg.content.config_records[CONFIG_KEY]
    inject(json.loads(str(config[TASK_KEY])), context, int(config[SERVER_ROUND]))
    return call_next(msg, context)
