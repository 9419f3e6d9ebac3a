"""Reply screening: which of a round's replies may be aggregated, and why the others may not.

Every reply is checked before anything of it is used: one reply per node, the node's error or
timeout recorded as a failure, its privacy ledger watched (privacy_watch.py), its tensors held to
the shapes the method expects with finite values and an optional norm bound, its example count
to the cap and to what the node declared (declared.py). Replies are taken in the order of the
nodes' identities, not of their arrival, so that the floating-point sums are the same in every
run. The result is the accepted replies with their metrics; the method aggregates those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.app import Message
from flwr.supercore import log

from fedpeft.protocol import CLIENT_SECONDS, EPSILON, METRICS_KEY, TRAIN_LOSS
from fedpeft.records import (
    TensorSpec,
    UpdateRejected,
    addressees,
    answered_node,
    check_norms,
    short_reason,
    tensor_bytes,
    validate_update,
)
from fedpeft.strategies.declared import claim_refusal
from fedpeft.strategies.privacy_watch import PrivacyWatch
from fedpeft.strategies.roster import Roster
from fedpeft.strategies.round_stats import RoundStats

#: num-examples bound passed to reply validation when the server sets no cap.
NO_CAP = 2**63 - 1


@dataclass(frozen=True)
class ReplyRules:
    """The run's limits on a reply (federation.replies.* and the DP setting)."""

    #: largest num-examples a reply may claim (None: no cap)
    max_num_examples: int | None = 10_000_000
    #: without a cap, a claim may be at most this multiple of the median declared count
    median_multiple: float | None = None
    #: bound on each replied tensor's Frobenius norm (None: none)
    norm_bound: float | None = None
    #: whether every reply must report its privacy ledger
    private_run: bool = False


@dataclass
class Accepted:
    """One reply that passed screening."""

    node: int
    member: int
    #: the method's tensors, with the shapes `specs` gave
    tensors: dict[str, torch.Tensor]
    #: SCAFFOLD's delta c_k (empty without SCAFFOLD)
    controls: dict[str, torch.Tensor]
    weight: int
    metrics: Mapping[str, Any]


@dataclass
class RoundReplies:
    """What a round sent, to match its replies against (the nodes awaited and the messages)."""

    pending: Sequence[int] = ()
    sent: Sequence[Message] = ()

    def sender(self, msg: Message) -> int:
        """The node a reply answers for, matching SuperLink-made errors to their train message.

        The error the SuperLink sends for a node that became unavailable carries its own id.
        """
        node = msg.metadata.src_node_id
        if node in self.pending or not msg.has_error():
            return node
        return answered_node(msg, addressees(self.sent))


def record_failure(
    stats: RoundStats, roster: Roster, node: int, reason: str, server_round: int
) -> None:
    """A node failed or timed out: log it, count it, and let the roster forget its state."""
    roster.record_failure(node, reason)
    stats.failed[roster.member(node)] = reason
    log(WARNING, "round %d: client %d failed: %s", server_round, roster.member(node), reason)


def screen_replies(
    server_round: int,
    replies: Iterable[Message],
    awaited: RoundReplies,
    *,
    rules: ReplyRules,
    specs: Callable[[int, Mapping[str, Any]], dict[str, TensorSpec]],
    control_specs: Mapping[str, TensorSpec],
    roster: Roster,
    privacy: PrivacyWatch,
    stats: RoundStats,
    version_metric: str | None,
) -> list[Accepted]:
    """The replies that may be aggregated, in identity order; the rest go into `stats`.

    `specs(node, metrics)` gives the tensors, with shapes, the node's reply must hold (a method
    whose reply shapes follow what the reply reports reads `metrics`); `control_specs` the
    SCAFFOLD tensors every reply carries besides (not held to the norm bound).
    """
    by_node: dict[int, Message] = {}
    for msg in replies:
        node = awaited.sender(msg)
        if node in by_node:
            log(WARNING, "round %d: ignoring a second reply from node %d", server_round, node)
            continue
        by_node[node] = msg
    for node in awaited.pending:
        if node not in by_node:
            record_failure(stats, roster, node, "no reply before the round timeout", server_round)
    accepted = []
    for node in sorted(by_node, key=roster.order):
        msg, member = by_node[node], roster.member(node)
        if msg.has_error():
            record_failure(stats, roster, node, short_reason(msg.error.reason), server_round)
            continue
        metrics = msg.content.metric_records.get(METRICS_KEY) or {}
        if version_metric is not None:
            roster.record_version(node, metrics.get(version_metric))
        try:
            _watch_ledger(member, metrics, rules, roster, privacy, stats)
            expected = specs(node, metrics)
            cap = rules.max_num_examples or NO_CAP
            tensors, weight = validate_update(msg.content, {**expected, **control_specs}, cap)
            check_norms(tensors, expected, rules.norm_bound)
            refusal = claim_refusal(
                weight, roster.declared.get(node), roster.declared.values(), rules.median_multiple
            )
            if refusal is not None:
                raise UpdateRejected(refusal)
        except UpdateRejected as exc:
            stats.rejected[member] = str(exc)
            log(WARNING, "round %d: reply from client %d rejected: %s", server_round, member, exc)
            continue
        if TRAIN_LOSS in metrics:  # private replies carry none (privacy/release.py)
            stats.client_loss[member] = float(metrics[TRAIN_LOSS])
        if CLIENT_SECONDS in metrics:  # validated by validate_update
            stats.client_seconds = (stats.client_seconds or 0.0) + float(metrics[CLIENT_SECONDS])
        stats.bytes_up += tensor_bytes(tensors)
        controls = {k: tensors.pop(k) for k in control_specs}
        stats.accepted.append(member)
        accepted.append(Accepted(node, member, tensors, controls, weight, metrics))
    stats.replied = len(accepted)
    return accepted


def _watch_ledger(
    member: int,
    metrics: Mapping[str, Any],
    rules: ReplyRules,
    roster: Roster,
    privacy: PrivacyWatch,
    stats: RoundStats,
) -> None:
    """Record the reply's reported epsilon (rejected or not) and reject a ledger that reset.

    A client whose ledger went backwards is not sampled again: its true spending is unknown.
    """
    reason = privacy.observe(member, metrics, rules.private_run)
    if member in privacy.epsilon and EPSILON in metrics:
        stats.client_epsilon[member] = float(metrics[EPSILON])
    if reason is not None:
        if "was reset" in reason:
            roster.exhausted.add(member)
        raise UpdateRejected(reason)
