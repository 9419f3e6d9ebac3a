"""HetLoRA: heterogeneous ranks by truncation, sparsity-weighted padded averaging, self-pruning.

Implements docs/algorithms.md §10, after Cho et al., "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models" (EMNLP 2024). There is no official code; what §10 could read of the
paper is its Figure 2 caption and summaries. Client k trains a LoRA of its own rank r_k <= r_max
(kind `lora`). The server holds the global (B_g, A_g) at r_max = adapter.rank and sends client k the
truncation B_g[:, :r_k], A_g[:r_k, :]. It zero-pads each reply to r_max (B~_k = [B_k, 0], A~_k =
[A_k; 0], strategies/ranks.py), weighs client k by its sparsity S_k = ||B_k A_k||_F, w_k = S_k /
sum_j S_j, and sets B_g = sum w_k B~_k, A_g = sum w_k A~_k. Clients prune their own rank
(clients/rank_pruning.py): local loss + lambda ||B_k[:, t:]||_F ||A_k[t:, :]||_F with t =
floor(gamma r_k), and after training, if that tail score fell below the received module's, r_k <-
max(r_min, t) and the tail is cut from the reply.

From the paper (through its Figure 2 caption and summaries, §10's [2nd]): truncation down,
zero-padding up, w_k = S_k / sum S_j with S_k = ||B_k A_k||_F, and rank self-pruning with a tail
regulariser; the regulariser's and the rule's exact form are [unverified] (§10 fixes the product of
norms, as the FlexLoRA port has it, and t = floor(gamma r), where the port rounds). Chosen here,
where the paper could not be read or is silent:
- the global starts at r_max as the round-0 adapter (A Kaiming-uniform, B = 0): [unverified] in §10;
- one scaling s = alpha / r_max for every client (alpha_k = s r_k, ranks.RankPlan "per_rank"), so
  padded factors are comparable and the truncation s B_g[:, :r] A_g[:r] is a plain slice (§10's
  choice; the FlexLoRA port instead folds sqrt(s_k) into both factors);
- S_k is one number per client, the Frobenius norm of its whole adapter update, S_k^2 =
  sum over adapted layers l of ||B_kl A_kl||_F^2, each term by the trace formula
  tr((B^T B)(A A^T)) without forming B A (lowrank.lora_product_norms). The caption's w_k is per
  client, and one weight per client keeps each client's layers in the same proportion in the
  global model (per-layer weights would mix layer l of one client with layer l' of another in
  different shares); the whole-update norm is the caption's ||Delta W_k||_F with all layers as one
  update. The weights are not multiplied by n_k (the caption has none; whether the paper does is
  [unverified]). When every S_k is 0 (the formula is 0 / 0), the p_k are used;
- the head (when trained) is averaged with the p_k, as everywhere in fedpeft;
- gamma 0.99 and lambda 1e-3 are the FlexLoRA port's defaults; r_min has no default;
- the tail score summed over adapted layers decides pruning for the whole client, since r_k is one
  rank for every layer; pruning cannot fire in round 1 (the round-0 global has B = 0, so the
  received tail score is 0 and cannot drop);
- under DP-SGD the regulariser, which does not depend on the data, adds its gradient to the noisy
  one after clipping (privacy/dp_sgd.py); the pruned rank is then post-processing and a private
  reply may report it. Without DP the regulariser is part of the loss and so inside
  `train.max_grad_norm` clipping.

Cost: a client process builds its model once per (rank, alpha) it trains at (runtime.py caches
up to 8), so a client that prunes one rank at a time holds a base-model copy per rank it passed
through: on large bases prefer a gamma that prunes in fewer, larger steps.

Per-node state: the current r_k, which only shrinks. The node keeps it and reports it with every
reply (metric `adapter-rank`); the server's rank table follows the reports. A report must be an
integer in [r_min, the rank the node was sent] and the reply's factors must have that rank, or the
reply is rejected; a reply without the metric is read at the rank the node was sent. Not exact:
B_g A_g = sum_ij w_i w_j B~_i A~_j has cross terms; with equal ranks and w = p it is FedIT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.protocol import ADAPTER_RANK
from fedpeft.records import TensorSpec
from fedpeft.strategies.base import LowRankStrategy
from fedpeft.strategies.ranks import RankPlan, RankPruning
from fedpeft.strategies.screening import Accepted


class HetLoRA(LowRankStrategy):
    """HetLoRA: truncated global factors down, sparsity-weighted zero-padded average up.

    Parameters
    ----------
    ranks : list[int] or None (default: None)
        Assigned (largest) client ranks, each at most r_max = adapter.rank: the i-th node the
        server samples gets ranks[i % len(ranks)] (ranks.RankPlan), and self-pruning may lower
        it. None gives every client r_max.
    min_rank : int
        r_min, required: no client prunes below it; at most the smallest assigned rank.
    prune_gamma : float (default: 0.99)
        gamma in (0, 1): the tail of a rank-r client starts at floor(gamma r).
    prune_lambda : float (default: 1e-3)
        lambda >= 0, the weight of the tail regulariser in the clients' local loss.
    **kwargs
        See `LowRankStrategy`. The head (when trained) is averaged with the p_k weights.

    Down: B_g[:, :r_k] and A_g[:r_k, :] (per layer r_k (d_in + d_out), r_k the node's current
    rank), the head when trained, and in the config the node's rank and alpha_k = s r_k and the
    pruning settings (rank-min, rank-prune-gamma, rank-prune-lambda). Up: A_k and B_k at the rank
    the node reports (after pruning, r_k' (d_in + d_out) per layer), and the head. The global
    adapter is a plain LoRA at r_max with scaling alpha / r_max, saved as is.
    """

    @classmethod
    def check_params(
        cls, params: Mapping[str, Any], strategy: Mapping[str, Any], adapter_rank: int
    ) -> None:
        """The ranks and HetLoRA's pruning settings (min_rank required, gamma, lambda)."""
        super().check_params(params, strategy, adapter_rank)
        ranks = params.get("ranks") or [adapter_rank]
        RankPruning.build(
            params.get("min_rank"),
            params.get("prune_gamma", 0.99),
            params.get("prune_lambda", 1e-3),
            ranks if isinstance(ranks, list) else [ranks],
        )

    drift_note = (
        "its global is a sparsity-weighted average of zero-padded replies whose ranks shrink, "
        "not the p_k-weighted average a server optimiser or a control variate is defined on"
    )
    name = "hetlora"
    sums_replies = False
    client_dp_note = (
        "its aggregation weighs each client by its own update's norm (sparsity weights) and "
        "reads each client's self-pruned rank, both data-dependent choices outside the noised "
        "sum"
    )
    kind = "lora"

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        ranks: Sequence[int] | None = None,
        min_rank: int | None = None,
        prune_gamma: float = 0.99,
        prune_lambda: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(global_adapter, task, **kwargs)
        r_max = self.global_adapter[self.factor_keys("lora_A")[0]].shape[0]
        alpha = float(self.task.get("adapter", {}).get("alpha", 16))
        chosen = [r_max] if ranks is None else ranks
        self.plan = RankPlan.build(chosen, r_max, alpha, "per_rank", padded=True)
        self.ranks = list(self.plan.ranks)
        self.pruning = RankPruning.build(min_rank, prune_gamma, prune_lambda, self.ranks)
        self.current: dict[int, int] = {}
        self.sparsity: torch.Tensor | None = None

    def rank_of(self, node_id: int) -> int:
        """The node's current rank: its last accepted report, else its assigned rank."""
        assigned = self.assign_rank(node_id, self.plan.ranks)
        return min(assigned, self.current.get(self.member(node_id), assigned))

    def down_keys(self, node_id: int) -> list[str]:
        """The head (when trained); the factors come truncated in `node_payload`."""
        return self.head_keys()

    def up_keys(self) -> list[str]:
        """A, B and the head (when trained); A and B have the reported rank (see `up_specs`)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """B_g[:, :r_k], A_g[:r_k, :], the node's rank and alpha, and the pruning settings."""
        rank = self.rank_of(node_id)
        factors = {k: self.global_adapter[k] for k in self.factor_keys("lora_A", "lora_B")}
        config = {**self.plan.node_config(rank), **self.pruning.node_config()}
        return self.plan.truncate(factors, rank), config

    def reply_specs(self, node_id: int, metrics: Mapping[str, Any]) -> dict[str, TensorSpec]:
        """A_k, B_k at the rank the reply reports (else the current rank), and the head.

        Raises UpdateRejected when the reported rank is not in [min_rank, current rank].
        """
        rank = self.rank_of(node_id)
        if metrics.get(ADAPTER_RANK) is not None:
            rank = self.pruning.check_report(metrics[ADAPTER_RANK], rank)
        return self.plan.up_specs(super().up_specs(node_id), rank)

    def up_specs(self, node_id: int) -> dict[str, TensorSpec]:
        """A_k, B_k at the node's current rank, and the head (a reply may report a lower rank)."""
        return self.plan.up_specs(super().up_specs(node_id), self.rank_of(node_id))

    def accept(self, accepted: Sequence[Accepted]) -> None:
        """The rank table takes the ranks the accepted replies report."""
        for reply in accepted:
            if reply.metrics.get(ADAPTER_RANK) is not None:
                self.current[reply.member] = int(reply.metrics[ADAPTER_RANK])

    def sparsity_norms(self, updates: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """S_k (K,) float64, S_k^2 = sum over layers l of ||B_kl A_kl||_F^2, batched per shape."""
        squares = torch.zeros(len(updates), dtype=torch.float64)
        for names in self.layer_groups():
            a = torch.stack([self.stack_factor(names, "lora_A", u) for u in updates])
            b = torch.stack([self.stack_factor(names, "lora_B", u) for u in updates])
            squares += lowrank.lora_product_norms(a, b).square().sum(-1)
        return squares.sqrt()

    def combine(
        self,
        updates: list[dict[str, torch.Tensor]],
        factor_weights: torch.Tensor,
        head_weights: torch.Tensor,
    ) -> None:
        """B_g = sum w_k B~_k, A_g = sum w_k A~_k (padded replies); head = sum p_k head_k."""
        factors = self.factor_keys("lora_A", "lora_B")
        self.average_into_global([{k: u[k] for k in factors} for u in updates], factor_weights)
        head = self.head_keys()
        if head:
            self.average_into_global([{k: u[k] for k in head} for u in updates], head_weights)

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Zero-pad every reply to r_max, weigh the factors by sparsity, the head by p_k."""
        padded = [self.plan.pad(u) for u in updates]
        self.sparsity = lowrank.sparsity_weights(self.sparsity_norms(padded), weights)
        self.combine(padded, self.sparsity, weights)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The base's state and the rank table (node identity -> current rank)."""
        tensors, meta = super().state_dict()
        return tensors, {**meta, "hetlora_ranks": [[m, r] for m, r in self.current.items()]}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the base's state and the rank table."""
        super().load_state_dict(tensors, meta)
        self.current = {int(m): int(r) for m, r in meta.get("hetlora_ranks", [])}
