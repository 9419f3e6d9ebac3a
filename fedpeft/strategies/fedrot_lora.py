"""FedRot-LoRA: FedAvg on LoRA after rotating each reply towards the round's global pair.

Implements docs/algorithms.md ("FedRot-LoRA"), after Zhang, Kim, Cha and Vikalo, FedRot-LoRA
(ICML 2026, arXiv 2602.23638; official code haoran-zh/FedRot-LoRA). For any orthogonal r x r
matrix R, (B_k R)(R^T A_k) = B_k A_k, so a client's pair can be rotated without changing its
update. Clients that started from the same global pair drift into different bases, and averaging
the factors separately mixes those bases (FedAvg's cross terms); rotating every reply towards the
pair they started from (an orthogonal Procrustes fit, per layer) before averaging shrinks them.

The rotation is fitted on the server from what it already holds (the replies and the global
pair), so the clients, the protocol and the bytes are FedAvg's; the authors rotate on the client
after training and average on a plain FedAvg server, which gives the same numbers. Under DP the
rotation is post-processing of the private replies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.strategies.fedavg import FedAvgLoRA

ALIGN_FACTORS = ("alternate", "A", "B")


class FedRotLoRA(FedAvgLoRA):
    """FedRot-LoRA: rotational alignment of each reply, then FedAvg.

    Down: the global A and B (and the head). Up: A_k, B_k (and the head). Server, in round t:
    fit one R per layer and client on the factor of the round (`aligned_factor`), rotate
    A_k' = R^T A_k and B_k' = B_k R, then A = sum p_k A_k', B = sum p_k B_k', head = sum p_k
    head_k (never rotated). Not exact: B A is not sum p_k B_k A_k; it is when the clients differ
    only by rotations.

    Parameters
    ----------
    rotate_lambda : float (default: 0.5)
        Strength in [0, 1] of the soft fit R = polar((1 - lambda) I + lambda R*): 0 is FedAvg,
        1 the hard Procrustes fit R*. The paper reports the best of a sweep over
        {0.1, 0.3, 0.5, 0.7, 1.0}, with lambda = 1 below lambda in [0.2, 0.8]; 0.5 is the
        third-party re-implementation's default.
    align_factor : str (default: "alternate")
        The factor R is fitted on: "alternate" (A in even rounds, B in odd rounds from round 3),
        "A" or "B". Round 1 is never rotated: every client started from B = 0, so a fit on B is
        degenerate, as in the official code.
    allow_reflection : bool (default: False)
        Let R* be a reflection (det -1). By default R* is kept in SO(r) (Kabsch), so that the
        soft fit never passes through a singular (1 - lambda) I + lambda R*.
    **kwargs
        See `LowRankStrategy`; heterogeneous `ranks` are refused.
    """

    name = "fedrot_lora"
    sums_replies = False
    client_dp_note = (
        "it fits a rotation to each client's own factors before averaging; composing it needs "
        "that rotation inside the clipped update, which is not built"
    )
    kind = "lora"
    #: FedAvg's per-client ranks: one frame (one base) for every client here
    refused_options = frozenset({"ranks", "scaling"})

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        rotate_lambda: float = 0.5,
        align_factor: str = "alternate",
        allow_reflection: bool = False,
        **kwargs,
    ) -> None:
        options = {
            "rotate_lambda": rotate_lambda,
            "align_factor": align_factor,
            "allow_reflection": allow_reflection,
        }
        self.check_params({**options, "ranks": kwargs.get("ranks")}, {}, 0)
        super().__init__(global_adapter, task, **kwargs)
        self.rotate_lambda = float(rotate_lambda)
        self.align_factor = align_factor
        self.allow_reflection = allow_reflection

    @classmethod
    def check_params(
        cls, params: Mapping[str, Any], strategy: Mapping[str, Any], adapter_rank: int
    ) -> None:
        """One rank for every client; lambda in [0, 1]; a known factor; a boolean reflection."""
        super().check_params(params, strategy, adapter_rank)
        lam = params.get("rotate_lambda", 0.5)
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= 1:
            raise ValueError(
                f"strategy.params.rotate_lambda={lam} must be in [0, 1] (0: FedAvg, 1: the hard "
                "Procrustes fit), e.g. 0.5"
            )
        factor = params.get("align_factor", "alternate")
        if factor not in ALIGN_FACTORS:
            raise ValueError(
                f"strategy.params.align_factor={factor} is unknown: choose one of "
                f"{', '.join(ALIGN_FACTORS)}"
            )
        if not isinstance(params.get("allow_reflection", False), bool):
            raise ValueError(
                f"strategy.params.allow_reflection={params['allow_reflection']} must be true or "
                "false"
            )

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """A server optimiser composes; SCAFFOLD does not (c_k lives in the client's own frame).

        The server optimiser steps from the previous global, the frame the replies are rotated
        into.
        """
        if option == "scaffold":
            return (
                "each reply is rotated into the global frame before averaging, while a client's "
                "control variate is computed in its own frame, so the two would not add up"
            )
        return None

    def aligned_factor(self, server_round: int) -> str | None:
        """The factor this round's rotation is fitted on, or None (round 1: no rotation)."""
        if server_round <= 1 or self.rotate_lambda == 0:
            return None
        if self.align_factor != "alternate":
            return self.align_factor
        return "A" if server_round % 2 == 0 else "B"

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Rotate every reply towards the global pair (batched per layer shape), then FedAvg."""
        factor = self.aligned_factor(self.server_round)
        if factor is not None:
            updates = self.rotated(updates, factor)
        super().aggregate_updates(updates, weights)

    def rotated(
        self, updates: list[dict[str, torch.Tensor]], factor: str
    ) -> list[dict[str, torch.Tensor]]:
        """The replies with every layer's (A_k, B_k) replaced by (R^T A_k, B_k R)."""
        out = [dict(u) for u in updates]
        k = len(updates)
        for names in self.layer_groups():
            a = torch.stack([self.stack_factor(names, "lora_A", u) for u in updates])
            b = torch.stack([self.stack_factor(names, "lora_B", u) for u in updates])
            a_ref = self.stack_factor(names, "lora_A").expand_as(a)
            b_ref = self.stack_factor(names, "lora_B").expand_as(b)
            new_a, new_b = lowrank.fedrot_align(
                a.flatten(0, 1),
                b.flatten(0, 1),
                a_ref.flatten(0, 1),
                b_ref.flatten(0, 1),
                factor,
                self.rotate_lambda,
                self.allow_reflection,
            )
            new_a, new_b = new_a.unflatten(0, (k, len(names))), new_b.unflatten(0, (k, len(names)))
            for i, reply in enumerate(out):
                for j, name in enumerate(names):
                    reply[f"{name}.lora_A"] = new_a[i, j]
                    reply[f"{name}.lora_B"] = new_b[i, j]
        return out
