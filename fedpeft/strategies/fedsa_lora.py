"""FedSA-LoRA: only A is shared and averaged; each client keeps its own B and head.

Implements docs/algorithms.md §11, after Guo et al., "Selective Aggregation for Low-Rank Adaptation
in Federated Learning" (ICLR 2025; Pengxin-Guo/FedSA-LoRA@fc276b5). Clients train plain LoRA (kind
`lora`: A, B and the head, all under DP-SGD when the run is private, since B shapes later A
uploads). Every round the server sends A_bar, a client loads it over the B_k and head_k it kept from
its last round (B_k = 0 and the seeded head before its first), trains, and sends back A_k only; the
server sets A_bar = sum p_k A_k with p_k proportional to n_k. B_k and head_k never leave the node
(round config `local-factors`, clients/local_factors.py: Flower `Context.state` and an atomic file
in the node's state directory, so a restarted node resumes its own factors).

The server holds A_bar only: no B, no head, so no global model. Client k's model is
W0 + s B_k A_bar with its own head; the method is evaluated per client (`configure_evaluate`):
every connected node scores (A_bar, B_k, head_k) on a held-out slice of its own data (round config
`holdout-fraction`; the slice is never trained on) and the run reports the unweighted mean of
the clients' accuracies (the maintainer's form, issue #5), the example-weighted mean and the
minimum. These are personalised numbers and summary.json says so (`evaluation: personalised`);
they are not comparable with a global model's held-out accuracy. Under DP the clients refuse
to release them (accuracy on private data is unaccounted by the DP ledger), so a private run has
no accuracy at all: the server does not ask, and `final_accuracy` is null.

Export: there is no global adapter to save. `shared_tensors` gives A_bar, which the run folder
keeps as `adapter/shared_lora_A.safetensors` (canonical keys); no peft adapter is written.

Decisions where §11 leaves a choice: the optimizer is the run's (`train.optimizer`, a fresh one
every round as in the official code); the official code's shared model object (pitfall 1) is
not copied, every node keeps its own B_k and head_k; the held-out slice is a seeded split of the
node's own data, not the official Dirichlet re-split (pitfall 2); adapters stay fp32 (pitfall 3).
Classification only: the personalised evaluation scores labels. `resume=` is refused (config.py):
the clients' factors are keyed by the Flower run, which a resumed run does not keep. Docs:
docs/personalised.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedpeft.protocol import (
    ACCURACY,
    ARRAYS_KEY,
    CLIENT_ID,
    CONFIG_KEY,
    HOLDOUT_FRACTION,
    LOCAL_FACTORS,
    LOSS,
    METRICS_KEY,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TASK_KEY,
)
from fedpeft.records import record_bytes, short_reason, to_record
from fedpeft.strategies.base import LowRankStrategy

#: round-config entries the client acts on (clients/local_factors.py)


class FedSALoRA(LowRankStrategy):
    """FedSA-LoRA: A shared and averaged, B and the head personal.

    Parameters
    ----------
    holdout_fraction : float (default: 0.2)
        Share of each client's examples held out of training for its personalised evaluation,
        in (0, 0.5]. The slice is the first round(f n_k) (at least 1) of a permutation seeded by
        the run's seed and the node's name, so it is the same every round and restart.
    **kwargs
        See `LowRankStrategy`; `train_head` decides whether head_k is trained (and kept local).

    Down: A_bar (r d_in per layer). Up: A_k (r d_in per layer); a reply with lora_B or head keys
    is rejected (`up_specs` names A only). Evaluate (not under DP): A_bar to every connected node.
    """

    @classmethod
    def resume_refusal(cls) -> str | None:
        """Each client keeps its B and head per Flower run, which a resumed run is not."""
        return (
            "each client keeps its B and head per Flower run, and a resumed run is a new Flower "
            "run whose clients would start again from B = 0 under a trained A; rerun it from the "
            "start without resume="
        )

    drift_note = (
        "only A is global; B and the head stay on the clients, so a server step or control "
        "variate would cover part of each personal model (not composed yet)"
    )
    name = "fedsa_lora"
    sums_replies = True
    kind = "lora"
    evaluation: ClassVar[str] = "personalised"

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        holdout_fraction: float = 0.2,
        **kwargs,
    ) -> None:
        if not 0.0 < holdout_fraction <= 0.5:
            raise ValueError(
                f"strategy.params.holdout_fraction={holdout_fraction} must be in (0, 0.5], e.g. "
                "0.2: each client evaluates its personal model on that share of its own data"
            )
        if task.get("task", "classification") != "classification":
            raise ValueError(
                "strategy=fedsa_lora evaluates each client's personal model by its label accuracy "
                "and supports task=classification only: use another strategy for causal_lm"
            )
        shared = {k: v for k, v in global_adapter.items() if k.endswith(".lora_A")}
        super().__init__(shared, task, **kwargs)
        self.holdout_fraction = float(holdout_fraction)
        self.local = ["lora_B", *(["head"] if self.train_head else [])]
        self.eval_bytes_down = 0
        #: members that have trained (replied) at least once: the ones with a personal model
        self.trained: set[int] = set()

    @property
    def private(self) -> bool:
        """Whether the run is private, at either level (then no personalised metrics are released).

        Under client-level DP a client's accuracy on its own data would reach the history outside
        the noised sum.
        """
        return bool((self.task.get("dp") or {}).get("enabled")) or self.client_dp is not None

    def down_keys(self, node_id: int) -> list[str]:
        """A_bar: the only global tensor."""
        return self.up_keys()

    def up_keys(self) -> list[str]:
        """A_k only; a reply carrying lora_B or head keys is rejected."""
        return self.factor_keys("lora_A")

    def head_keys(self) -> list[str]:
        """None: the head stays on the clients."""
        return []

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """No extra tensors; the config names the factors the node keeps and its held-out share."""
        return {}, self.client_config()

    def client_config(self) -> dict[str, Any]:
        """The round-config entries every node acts on (clients/local_factors.py).

        Under DP nothing is evaluated, so no share of a client's data is held out.
        """
        config: dict[str, Any] = {LOCAL_FACTORS: ",".join(self.local)}
        if not self.private:
            config[HOLDOUT_FRACTION] = self.holdout_fraction
        return config

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """A_bar = sum p_k A_k; nothing else exists on the server."""
        self.average_into_global(updates, weights)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A_bar to the nodes with a personal model, to score it; none under DP.

        Before round 1 every connected node scores the common start; after it, only nodes that
        have trained at least once (a node never sampled would score B = 0 and the seeded head,
        and pull the mean towards chance). A pooled simulation asks only the clients this round
        trained (its cost follows the cohort, not the clients trained so far, nor the
        population), so round 0 has no score.
        """
        self.eval_bytes_down = 0
        if self.private:
            return []
        self.trained.update(self.stats.accepted, self.stats.rejected)
        payload = to_record(self.global_adapter)
        content = {
            **config,
            **self.client_config(),
            SERVER_ROUND: server_round,
            TASK_KEY: self.round_task_json(server_round),
        }
        messages = []
        if self.roster.population is not None:  # pooled: this round's cohort, by id
            nodes = sorted(set(self.stats.accepted))
        else:
            nodes = sorted(grid.get_node_ids(), key=self.roster.order)
        for node_id in nodes:
            if server_round > 0 and self.member(node_id) not in self.trained:
                continue
            record = RecordDict({ARRAYS_KEY: payload, CONFIG_KEY: ConfigRecord(content)})
            messages.append(Message(record, dst_node_id=node_id, message_type=MessageType.EVALUATE))
            self.eval_bytes_down += record_bytes(payload)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Unweighted mean, n-weighted mean and min of the clients' personalised accuracies."""
        scores: dict[int, tuple[int, float, float]] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(
                    WARNING,
                    "round %d: client %d did not evaluate: %s",
                    server_round,
                    self.member(node),
                    short_reason(msg.error.reason),
                )
                continue
            metrics = msg.content.metric_records.get(METRICS_KEY) or {}
            name, n = metrics.get(CLIENT_ID, self.member(node)), metrics.get(NUM_EXAMPLES)
            acc, loss = metrics.get(ACCURACY), metrics.get(LOSS)
            ok = (
                isinstance(n, int)
                and n >= 1
                and isinstance(acc, int | float)
                and 0.0 <= acc <= 1.0
                and isinstance(loss, int | float)
                and math.isfinite(loss)
                and int(name) not in scores
            )
            if not ok:
                log(WARNING, "round %d: evaluation reply from node %d ignored", server_round, node)
                continue
            scores[int(name)] = (int(n), float(acc), float(loss))
        if not scores:
            return None
        return MetricRecord(
            personalised_metrics(scores) | {"eval_bytes_down": self.eval_bytes_down}
        )


def personalised_metrics(scores: Mapping[int, tuple[int, float, float]]) -> dict[str, float]:
    """Per-client (n, accuracy, loss) -> mean, n-weighted mean and min accuracy, and mean loss."""
    values = list(scores.values())
    total = sum(n for n, _, _ in values)
    return {
        ACCURACY: sum(a for _, a, _ in values) / len(values),
        "accuracy_weighted": sum(n * a for n, a, _ in values) / total,
        "accuracy_min": min(a for _, a, _ in values),
        LOSS: sum(loss for _, _, loss in values) / len(values),
        "eval_clients": len(values),
    }
