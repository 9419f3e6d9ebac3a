"""FedAvg on LoRA (FedIT): clients train A and B, the server averages each factor.

Implements docs/algorithms.md §1, following Zhang et al., "Towards Building the Federated GPT:
Federated Instruction Tuning" (ICASSP 2024), which applies FedAvg (McMahan et al., AISTATS 2017)
to LoRA factors. Averaging A and B separately is inexact by design (the mean of B_k A_k is not
mean(B) mean(A)); it is the baseline the other methods improve on.

With `ranks` set, it is the zero-padding baseline of heterogeneous ranks that FLoRA (Wang et al.,
NeurIPS 2024) compares against (their code's `--zero_padding`): a client of rank r_k trains the
first r_k rows of A and columns of B, and the server averages the replies zero-padded to the global
rank (strategies/ranks.py, the path every method with per-client ranks shares).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft.records import TensorSpec
from fedpeft.strategies.base import LowRankStrategy
from fedpeft.strategies.ranks import RankPlan, check_scaling


class FedAvgLoRA(LowRankStrategy):
    """FedAvg on LoRA factors.

    Down: the global A and B (and the head when trained) every round, so each client warm-starts
    from the global pair. Up: A_k, B_k (and the head). Server: A = sum p_k A_k, B = sum p_k B_k,
    with p_k proportional to the client's num-examples.

    Parameters
    ----------
    ranks : list[int] or None (default: None)
        Heterogeneous client ranks, zero-padded: the i-th node the server samples gets
        ranks[i % len(ranks)] for the whole run (as FLoRA assigns them), each at most the global
        rank R (adapter.rank). Node k receives the rank-r_k truncation of the global adapter and
        replies with factors of rank r_k, which the server zero-pads to R before averaging
        (ranks.RankPlan: B is carried in the global frame, times s / s_k down and s_k / s up, so
        that s B_pad A_pad = s_k B_k A_k exactly). None (the default) is plain FedAvg.
    scaling : str (default: "per_rank")
        With `ranks`: "per_rank" trains client k at alpha_k = alpha / R * r_k, one scaling for
        every client, as the FLoRA code's zero-padding baseline does (alpha_k = 2 r_k, which is
        fedpeft's default alpha 16 / rank 8); "shared" trains every client at alpha, so
        s_k = alpha / r_k. Ignored without `ranks`.
    **kwargs
        See `LowRankStrategy`.
    """

    name = "fedavg"
    sums_replies = True
    kind = "lora"

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        ranks: Sequence[int] | None = None,
        scaling: str = "per_rank",
        **kwargs,
    ) -> None:
        super().__init__(global_adapter, task, **kwargs)
        a_keys = self.factor_keys("lora_A")
        self.global_rank = self.global_adapter[a_keys[0]].shape[0] if a_keys else 0
        self.scaling = check_scaling(scaling)
        alpha = float(self.task.get("adapter", {}).get("alpha", 16))
        self.plan = (
            None
            if ranks is None
            else RankPlan.build(ranks, self.global_rank, alpha, scaling, padded=True)
        )
        self.ranks = None if self.plan is None else list(self.plan.ranks)
        if self.drift.scaffold and ranks is not None:
            raise ValueError(
                f"client_opt.scaffold=true with {self.method()}: "
                + str(self.drift_refusal("scaffold", {"ranks": ranks}))
            )

    @classmethod
    def client_dp_refusal(cls, params: Mapping[str, Any]) -> str | None:
        """Client-level DP composes with one rank for all; per-client ranks are refused."""
        if params.get("ranks") is not None and cls.sums_replies:
            return (
                "strategy.params.ranks gives clients factors of different shapes in different "
                "frames, so their updates have no common sum to clip and noise: drop "
                "strategy.params.ranks"
            )
        return super().client_dp_refusal(params)

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Server optimisers compose (on A, B and the head); SCAFFOLD too, except with `ranks`.

        With `ranks` each client trains a truncation of its own shape, which c cannot match.
        """
        if option == "scaffold" and params.get("ranks") is not None:
            return (
                "with strategy.params.ranks each client trains factors of its own rank, so one "
                "control variate per global tensor cannot match them: drop strategy.params.ranks"
            )
        return None

    def rank_of(self, node_id: int) -> int:
        """This node's rank (the global rank without `ranks`), fixed when first sampled."""
        if self.plan is None:
            return self.global_rank
        return self.assign_rank(node_id, self.plan.ranks)

    def down_keys(self, node_id: int) -> list[str]:
        """Everything the clients train, from the current global (truncated in `node_payload`)."""
        return self.head_keys() if self.plan is not None else self.up_keys()

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """With `ranks`: the rank-r_k truncation of A and B, and the node's rank and alpha."""
        if self.plan is None:
            return super().node_payload(node_id)
        r = self.rank_of(node_id)
        factors = {k: self.global_adapter[k] for k in self.factor_keys("lora_A", "lora_B")}
        return self.plan.truncate(factors, r), self.plan.node_config(r)

    def up_specs(self, node_id: int) -> dict[str, TensorSpec]:
        """A_k (r_k x d_in), B_k (d_out x r_k) and the head."""
        specs = super().up_specs(node_id)
        if self.plan is None:
            return specs
        return self.plan.up_specs(specs, self.rank_of(node_id))

    def padded(self, updates: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The replies at the global rank (zero-padded with `ranks`, as they are without)."""
        if self.plan is None:
            return updates
        return [self.plan.pad(u) for u in updates]

    def up_keys(self) -> list[str]:
        """A, B and the head (when trained)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """A = sum p_k A_k, B = sum p_k B_k, head = sum p_k head_k (zero-padded with `ranks`)."""
        self.average_into_global(self.padded(updates), weights)
