"""Heterogeneous client ranks: the one path every method with per-client LoRA ranks goes through.

A method that lets client k train a LoRA of its own rank r_k needs four things, all here:
- which rank a node gets: `LowRankStrategy.assign_rank(node, plan.ranks)`, ranks[i % n] for the
  i-th node first sampled, kept for the run and across resumes;
- which alpha it trains at (`alpha_of`), from `scaling`:
  * "per_rank": alpha_k = c r_k with c = alpha / R (R = adapter.rank, alpha = the method's
    alpha), so every client trains at the same scaling s_k = c. With fedpeft's defaults
    (alpha 16, rank 8) c = 2: the FLoRA code's alpha_k = 2 r_k (ATP-1010/FederatedLLM main.py,
    both for stacking and for its zero-padding baseline) and HetLoRA's fixed s (docs/algorithms.md
    §10).
  * "shared": alpha_k = alpha for every client, so s_k = alpha / r_k (FlexLoRA's alpha = 16,
    §9). Low-rank clients then train at a larger scaling.
- for zero padding, how a node's rank-r_k factors map to and from the global rank-R adapter, whose
  scaling is s = alpha / R (`truncate`, `pad`): the node gets A[:r_k] and B[:, :r_k] s / s_k, so its
  model s_k B_k A_k is exactly the rank-r_k truncation of the global s B A, and its reply comes back
  as [A_k; 0] and [B_k s_k / s, 0], whose product times s is exactly s_k B_k A_k. Every method that
  stacks or averages rank-R tensors pads first (`pad`), so mixed ranks never reach `torch.stack`;
- the reply shapes to validate (`up_specs`);
- for methods whose clients prune their own rank (HetLoRA), the pruning settings sent in the round
  config and the check of the rank a reply reports (`RankPruning`).
A method that cannot take per-client ranks has no `ranks` option; `fedpeft.config` refuses it
with a clear error (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.protocol import (
    ADAPTER_ALPHA,
    ADAPTER_RANK,
    RANK_MIN,
    RANK_PRUNE_GAMMA,
    RANK_PRUNE_LAMBDA,
)
from fedpeft.records import TensorSpec, UpdateRejected

SCALINGS = ("per_rank", "shared")


def check_scaling(scaling: str) -> str:
    """`scaling` if it is one of SCALINGS, else ValueError naming the option and the choices."""
    if scaling not in SCALINGS:
        raise ValueError(
            f"strategy.params.scaling={scaling} is unknown: choose per_rank (alpha_k = "
            "alpha / adapter.rank * r_k, every client at one scaling) or shared (alpha_k = alpha)"
        )
    return scaling


def check_ranks(ranks: Sequence[int], most: int | None = None) -> list[int]:
    """`ranks` as a list of positive ints, each at most `most` when given; else ValueError."""
    values = list(ranks)
    if not values or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in values):
        raise ValueError(
            f"strategy.params.ranks={values} must be a non-empty list of positive integers, "
            "e.g. [4,8,16]"
        )
    if most is not None and max(values) > most:
        raise ValueError(
            f"strategy.params.ranks={values} has ranks above adapter.rank={most}, the global "
            f"adapter they are zero-padded into: set adapter.rank={max(values)}"
        )
    return values


@dataclass(frozen=True)
class RankPlan:
    """Per-client ranks and alphas of one run, and the zero-padding maps to the global adapter.

    Parameters
    ----------
    ranks : tuple[int, ...]
        Ranks handed out in the order nodes are first sampled (i-th node: ranks[i % n]).
    global_rank : int
        R, the global adapter's rank (adapter.rank).
    alpha : float
        The method's alpha (adapter.alpha); the global scaling is alpha / R.
    scaling : str
        "per_rank" (alpha_k = alpha / R * r_k) or "shared" (alpha_k = alpha); see the module.
    """

    ranks: tuple[int, ...]
    global_rank: int
    alpha: float
    scaling: str

    @classmethod
    def build(
        cls,
        ranks: Sequence[int],
        global_rank: int,
        alpha: float,
        scaling: str,
        *,
        padded: bool,
    ) -> RankPlan:
        """A checked plan; `padded`: ranks are zero-padded into the global adapter (r_k <= R)."""
        values = check_ranks(ranks, global_rank if padded else None)
        if global_rank < 1 or alpha <= 0:
            raise ValueError(f"need adapter.rank >= 1 and alpha > 0, got {global_rank}, {alpha}")
        return cls(tuple(values), int(global_rank), float(alpha), check_scaling(scaling))

    @classmethod
    def unpadded(
        cls, task: Mapping[str, Any], ranks: Sequence[int] | None, scaling: str
    ) -> RankPlan:
        """The plan of a method whose clients' factors are not padded (FLoRA, FlexLoRA).

        The task's adapter rank and alpha; every client at that rank unless `ranks` are given.
        """
        adapter = task.get("adapter", {})
        rank = int(adapter.get("rank", 8))
        chosen = [rank] if ranks is None else ranks
        return cls.build(chosen, rank, float(adapter.get("alpha", 16)), scaling, padded=False)

    def alpha_of(self, rank: int) -> float:
        """alpha_k for a client of rank r_k."""
        if self.scaling == "shared":
            return self.alpha
        return self.alpha * rank / self.global_rank

    def scaling_of(self, rank: int) -> float:
        """s_k = alpha_k / r_k."""
        return self.alpha_of(rank) / rank

    def frame(self, rank: int) -> float:
        """s_k / s: a rank-r_k client's scaling over the global one's (exactly 1 under per_rank)."""
        if self.scaling == "per_rank":
            return 1.0
        return self.scaling_of(rank) * self.global_rank / self.alpha

    def node_config(self, rank: int) -> dict[str, int | float]:
        """The round-config entries that make a client train at rank r_k and alpha_k."""
        return {ADAPTER_RANK: int(rank), ADAPTER_ALPHA: float(self.alpha_of(rank))}

    def truncate(self, tensors: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        """Global rank-R factors -> the node's: A[:r_k], B[:, :r_k] s / s_k; others unchanged."""
        out = {}
        for key, value in tensors.items():
            if key.endswith(".lora_A"):
                value = value[:rank]
            elif key.endswith(".lora_B"):
                value = value[:, :rank] / self.frame(rank)
            out[key] = value.contiguous()
        return out

    def pad(self, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A reply -> rank R: [A_k; 0] and [B_k s_k / s, 0] (r_k read off B); others as is."""
        out = {}
        for key, value in update.items():
            if key.endswith(".lora_A"):
                value = torch.nn.functional.pad(value, (0, 0, 0, self.global_rank - value.shape[0]))
            elif key.endswith(".lora_B"):
                rank = value.shape[1]
                value = torch.nn.functional.pad(
                    value * self.frame(rank), (0, self.global_rank - rank)
                )
            out[key] = value
        return out

    def up_specs(self, specs: Mapping[str, TensorSpec], rank: int) -> dict[str, TensorSpec]:
        """Reply specs with every A as (r_k, d_in) and every B as (d_out, r_k)."""
        out = dict(specs)
        for key, spec in specs.items():
            if key.endswith(".lora_A"):
                out[key] = TensorSpec((rank, spec.shape[-1]))
            elif key.endswith(".lora_B"):
                out[key] = TensorSpec((spec.shape[0], rank))
        return out


@dataclass(frozen=True)
class RankPruning:
    """Rank self-pruning settings sent to clients (clients/rank_pruning.py does the pruning).

    Parameters
    ----------
    min_rank : int
        r_min: no client prunes below it (1 <= r_min <= every assigned rank).
    gamma : float
        In (0, 1): the tail of a rank-r LoRA starts at floor(gamma r), and pruning cuts it.
    lam : float
        >= 0: weight of the tail regulariser ||B[:, t:]||_F ||A[t:, :]||_F in the local loss.
    """

    min_rank: int
    gamma: float = 0.99
    lam: float = 1e-3

    @classmethod
    def build(
        cls, min_rank: int | None, gamma: float, lam: float, ranks: Sequence[int]
    ) -> RankPruning:
        """Checked settings; ValueError naming the strategy.params field and the fix."""
        if min_rank is None:
            raise ValueError(
                "strategy.params.min_rank is required: set the smallest rank client self-pruning "
                f"may reach, at most the smallest client rank {min(ranks)}, e.g. "
                f"strategy.params.min_rank={max(1, min(ranks) // 2)}"
            )
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
            raise ValueError(f"strategy.params.min_rank={min_rank} must be an integer >= 1")
        if min_rank > min(ranks):
            raise ValueError(
                f"strategy.params.min_rank={min_rank} exceeds the smallest client rank "
                f"{min(ranks)} (strategy.params.ranks={list(ranks)}): lower it"
            )
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma < 1:
            raise ValueError(f"strategy.params.prune_gamma={gamma} must be in (0, 1), e.g. 0.99")
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam >= 0:
            raise ValueError(f"strategy.params.prune_lambda={lam} must be >= 0, e.g. 1e-3")
        return cls(min_rank, float(gamma), float(lam))

    def node_config(self) -> dict[str, int | float]:
        """The round-config entries that turn pruning on at a client (records.RANK_*)."""
        return {RANK_MIN: self.min_rank, RANK_PRUNE_GAMMA: self.gamma, RANK_PRUNE_LAMBDA: self.lam}

    def check_report(self, value: Any, current: int) -> int:
        """A reply's reported rank, or UpdateRejected: an integer in [min_rank, current].

        `current` is the rank the node was sent (its last report, at most its assigned rank):
        a node's rank never grows.
        """
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)
        if not ok:
            raise UpdateRejected(f"{ADAPTER_RANK}={value} is not an integer rank")
        if not self.min_rank <= int(value) <= current:
            raise UpdateRejected(
                f"{ADAPTER_RANK}={value} is outside [{self.min_rank}, {current}]: a node's rank "
                f"never grows past the {current} it was sent, nor falls below rank-min"
            )
        return int(value)
