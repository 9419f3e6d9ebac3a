"""What a node keeps between rounds, in its Flower `context.state`, driven by the round's config.

Two channels carry tensors that are identical everywhere but not derivable from a seed, so that
they reach each node once and are remembered per node (not per process: in simulation one process
serves many nodes, and Flower persists `context.state` per node in simulation and deployment):

- stacked modules (FLoRA): an ordered, versioned list of modules merged into the base weights.
  Config `stack-from` = v0 and `stack-to` = t; payload keys `stack.<v>.<canonical key>` for
  v = v0+1..t. The node must hold at least version v0; it keeps every module and reports
  `base-version`.
- frozen factors (Fed-SB's A and B): config `frozen-version` = the version the node must hold;
  payload keys `frozen.<canonical key>` when the server (re)sends them. The node reports
  `frozen-version`. With config `frozen-from` = v > 0 the payload updates only some of the
  factors the node holds at version v (RoLoRA's global A and B, one of which changes per round);
  `frozen-from` = 0 (or absent) replaces them all.

A node that lacks what the payload assumes (it restarted, or its state was lost) raises
`StateMismatch`; Flower turns that into an error reply, and the server then resends everything.
No method is named here: the config says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, RecordDict

from fedpeft.adapters import FROZEN_PREFIX, STACK_PREFIX, write_adapter
from fedpeft.clients.round_feature import Round, RoundFeature, Tensors
from fedpeft.protocol import BASE_VERSION, FROZEN_FROM, FROZEN_VERSION, STACK_FROM, STACK_TO
from fedpeft.records import from_record, to_record

_VERSIONS = "fedpeft.versions"
_FROZEN = "fedpeft.frozen"
_STACK = "fedpeft.stack.{}"


class StateMismatch(RuntimeError):
    """The payload assumes state this node does not hold; the server must resend from scratch."""


def split_payload(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a payload into (adapter tensors, stacked modules by version, frozen factors)."""
    plain: dict[str, torch.Tensor] = {}
    stacks: dict[int, dict[str, torch.Tensor]] = {}
    frozen: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(STACK_PREFIX):
            version, name = key.removeprefix(STACK_PREFIX).split(".", 1)
            stacks.setdefault(int(version), {})[name] = value
        elif key.startswith(FROZEN_PREFIX):
            frozen[key.removeprefix(FROZEN_PREFIX)] = value
        else:
            plain[key] = value
    return plain, stacks, frozen


def _versions(state: RecordDict, keep: bool) -> ConfigRecord:
    """The versions `state` holds (0 and 0 when none), kept in it only when `keep`.

    A round whose method keeps no client state leaves the state empty, so that a pooled client
    of such a method has no state file (client_store.py).
    """
    if _VERSIONS in state.config_records:
        return state.config_records[_VERSIONS]
    versions = ConfigRecord({BASE_VERSION: 0, FROZEN_VERSION: 0})
    if keep:
        state[_VERSIONS] = versions
    return versions


def receive(
    state: RecordDict,
    config: Mapping,
    stacks: Mapping[int, Mapping[str, torch.Tensor]],
    frozen: Mapping[str, torch.Tensor],
) -> None:
    """Store the payload's stacked modules and frozen factors in `state`, checking versions."""
    versions = _versions(state, keep=STACK_TO in config or FROZEN_VERSION in config)
    if STACK_TO in config:
        held, start, end = (
            int(versions[BASE_VERSION]),
            int(config[STACK_FROM]),
            int(config[STACK_TO]),
        )
        if held < start or held > end:
            raise StateMismatch(
                f"base version mismatch: this node holds base version {held}, the payload carries "
                f"versions {start + 1}..{end}; resend from version 0"
            )
        if sorted(stacks) != list(range(start + 1, end + 1)):
            raise StateMismatch(f"payload stacks {sorted(stacks)} are not {start + 1}..{end}")
        for version in range(held + 1, end + 1):
            state[_STACK.format(version)] = to_record(stacks[version])
        versions[BASE_VERSION] = end
    if FROZEN_VERSION in config:
        want = int(config[FROZEN_VERSION])
        if frozen:
            since = int(config[FROZEN_FROM]) if FROZEN_FROM in config else 0
            kept = {}
            if since > 0:
                if int(versions[FROZEN_VERSION]) != since:
                    raise StateMismatch(
                        f"frozen-version mismatch: this node holds frozen factors version "
                        f"{int(versions['frozen-version'])}, the payload updates version {since}; "
                        "resend them all"
                    )
                kept = held_frozen(state)
            state[_FROZEN] = to_record({**kept, **frozen})
            versions[FROZEN_VERSION] = want
        held = int(versions[FROZEN_VERSION])
        if held != want:
            raise StateMismatch(
                f"frozen-version mismatch: this node holds frozen factors version {held}, the "
                f"round needs version {want}; resend them"
            )


def held_stacks(state: RecordDict) -> list[dict[str, torch.Tensor]]:
    """The stacked modules 1..v this node holds, in order."""
    version = int(_versions(state, keep=False)[BASE_VERSION])
    return [from_record(state.array_records[_STACK.format(v)]) for v in range(1, version + 1)]


def held_frozen(state: RecordDict) -> dict[str, torch.Tensor]:
    """The frozen factors this node holds (empty when none)."""
    if _FROZEN not in state.array_records:
        return {}
    return from_record(state.array_records[_FROZEN])


def version_metrics(state: RecordDict, config: Mapping) -> dict[str, int]:
    """The versions this node holds, for the channels the round's config uses."""
    versions = _versions(state, keep=False)
    metrics = {}
    if STACK_TO in config:
        metrics[BASE_VERSION] = int(versions[BASE_VERSION])
    if FROZEN_VERSION in config:
        metrics[FROZEN_VERSION] = int(versions[FROZEN_VERSION])
    return metrics


class ClientState(RoundFeature):
    """The round feature: take the channels' tensors from the payload, keep them, load them."""

    def __init__(self, state: RecordDict, config: Mapping) -> None:
        self.state, self.config = state, config

    @classmethod
    def for_round(cls, round_: Round) -> ClientState:
        """Every round: a payload's stack and frozen keys never reach the adapter."""
        return cls(round_.context.state, round_.config)

    def receive(self, tensors: Tensors) -> Tensors:
        """Store the payload's stacks and frozen factors; the adapter's tensors go on."""
        plain, stacks, frozen = split_payload(tensors)
        receive(self.state, self.config, stacks, frozen)
        return plain

    def stacks(self) -> list[Tensors]:
        """The stacked modules this node holds, merged into the base before loading."""
        return held_stacks(self.state)

    def load(self, model: torch.nn.Module) -> None:
        """Write the frozen factors this node holds into the model."""
        write_adapter(model, held_frozen(self.state))

    def metrics(self) -> dict[str, int]:
        """The versions this node holds."""
        return version_metrics(self.state, self.config)
