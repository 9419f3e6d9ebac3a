"""Rank self-pruning on a node, driven by round-config entries only (HetLoRA's: algorithms.md §10).

The config turns it on with `rank-min` (r_min) and sets `rank-prune-gamma` (gamma) and
`rank-prune-lambda` (lambda); `adapter-rank` is the rank of the factors the server sent. With
t = floor(gamma r), the tail of a rank-r LoRA is B[:, t:] and A[t:, :], and its score is
sum over adapted layers of ||B[:, t:]||_F ||A[t:, :]||_F.
- The node trains at r = min(sent rank, the rank it holds): it keeps its rank in `context.state`,
  and a rank only shrinks. A node holding less than it was sent (its last reply was lost) trains
  on the leading r rows of A and columns of B at alpha scaled by r / sent, so that its scaling,
  and therefore its model, is the truncation of what it was sent.
- Its local loss is the task loss + lambda * score, a differentiable penalty (`penalty`). Under
  DP-SGD the penalty's gradient is added after clipping and noise (privacy/dp_sgd.py): it does not
  depend on the data, so that is post-processing.
- After training, if the score fell below the received module's, r <- max(r_min, t) and the tail
  rows and columns are cut from the reply. The node keeps the new rank and reports it (reply
  metric `adapter-rank`); the rank is a function of the trained factors, which the reply's shapes
  show anyway, so a private reply may carry it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from flwr.app import ConfigRecord, RecordDict

from fedpeft import adapters
from fedpeft.adapters import AdapterSpec
from fedpeft.clients.round_feature import Round, RoundFeature, Tensors
from fedpeft.protocol import ADAPTER_RANK, RANK_MIN, RANK_PRUNE_GAMMA, RANK_PRUNE_LAMBDA

_STATE = "fedpeft.rank"


def truncate(tensors: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """LoRA factors cut to `rank`: A[:rank] and B[:, :rank]; other tensors unchanged."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A"):
            value = value[:rank].contiguous()
        elif key.endswith(".lora_B"):
            value = value[:, :rank].contiguous()
        out[key] = value
    return out


def tail_score(factors: Mapping[str, torch.Tensor], start: int) -> torch.Tensor:
    """The tail score: sum over layers of ||B[:, start:]||_F ||A[start:, :]||_F, differentiable.

    `factors` maps `<layer>.lora_A` (r x d_in) and `<layer>.lora_B` (d_out x r); other keys are
    ignored. Returns a float32 (float64 for float64 factors) scalar.
    """
    terms = [
        torch.linalg.matrix_norm(factors[f"{key.removesuffix('.lora_A')}.lora_B"][:, start:])
        * torch.linalg.matrix_norm(value[start:])
        for key, value in factors.items()
        if key.endswith(".lora_A")
    ]
    if not terms:
        raise ValueError("no LoRA factors (<layer>.lora_A and .lora_B) to score")
    return torch.stack(terms).sum()


@dataclass
class RankPruning(RoundFeature):
    """One node's pruning for one round: its rank, the settings, and the received tail score."""

    rank: int
    min_rank: int
    gamma: float
    lam: float
    state: RecordDict
    received: float | None = None

    @classmethod
    def for_round(cls, round_: Round) -> RankPruning | None:
        """Pruning when the round's config has `rank-min` (HetLoRA), else None."""
        return cls.start(round_.context.state, round_.config, round_.task.adapter)[0]

    def adapter(self, spec: AdapterSpec) -> AdapterSpec:
        """The node's adapter at its held rank (alpha lowered with it, keeping alpha / rank)."""
        if self.rank >= spec.rank:
            return spec
        return replace(spec, rank=self.rank, alpha=spec.alpha * self.rank / spec.rank)

    @classmethod
    def start(
        cls, state: RecordDict, config: Mapping, adapter: AdapterSpec
    ) -> tuple[RankPruning | None, AdapterSpec]:
        """(None, adapter) unless the config has `rank-min`; else pruning and the node's adapter.

        `adapter` has the rank and alpha the server sent; a node holding a smaller rank lowers
        both, keeping alpha / rank.
        """
        if RANK_MIN not in config:
            return None, adapter
        sent = adapter.rank
        held = state.config_records[_STATE]["rank"] if _STATE in state.config_records else sent
        rank = min(sent, int(held))
        if rank < sent:
            adapter = replace(adapter, rank=rank, alpha=adapter.alpha * rank / sent)
        gamma, lam = float(config[RANK_PRUNE_GAMMA]), float(config[RANK_PRUNE_LAMBDA])
        return cls(rank, int(config[RANK_MIN]), gamma, lam, state), adapter

    @property
    def tail_start(self) -> int:
        """The tail's start t = floor(gamma r): its first row of A (column of B)."""
        return math.floor(self.gamma * self.rank)

    def receive(self, payload: Mapping[str, torch.Tensor]) -> Tensors:
        """The payload at this node's rank; remembers the received module's tail score."""
        tensors = truncate(payload, self.rank)
        self.received = float(tail_score(tensors, self.tail_start))
        return tensors

    def penalty(self, model: torch.nn.Module) -> Callable[[], torch.Tensor] | None:
        """The loss term lambda * tail score of the model's live factors (None if lambda is 0)."""
        if self.lam == 0:
            return None
        tensors = adapters.adapter_tensors(model).items()
        live = {k: v for k, v in tensors if k.endswith((".lora_A", ".lora_B"))}
        return lambda: self.lam * tail_score(live, self.tail_start)

    def finish(self, reply: Tensors) -> Tensors:
        """Prune if the trained tail score fell below the received one; keep and cut to the rank."""
        if self.received is None:
            raise RuntimeError("RankPruning.finish before receive: no received tail score")
        if float(tail_score(reply, self.tail_start)) < self.received:
            self.rank = min(self.rank, max(self.min_rank, self.tail_start))
        self.state[_STATE] = ConfigRecord({"rank": self.rank})
        return truncate(reply, self.rank)

    def metrics(self) -> dict[str, int]:
        """The reply metric with the node's rank after this round."""
        return {ADAPTER_RANK: self.rank}
