"""LoRA-FAIR: average A and B, then correct B with a residual that restores the ideal update.

Implements docs/algorithms.md §5, after Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with
Aggregation and Initialization Refinement" (ICCV 2025). Averaging A and B separately gives
B_bar A_bar, not the ideal dW* = sum p_k B_k A_k. The server finds dB minimising
1 - cos(dW*, (B_bar + dB) A_bar) + lambda ||dB||_F^2 / ||B_bar||_F^2 (whole-matrix cosine, dB
starting at 0, plain SGD, one early-stopping rule on the loss summed over every layer) and sends
B' = B_bar + dB with A_bar. The regulariser is the paper's measured in units of ||B_bar||, which
makes the solver scale-free (lowrank.lora_fair_residual_groups says why). Correcting B only is the
paper's choice and its best ablation. Everything runs on the factors (r x r Grams), never on a
d_out x d_in matrix. Heterogeneous ranks (`ranks`) take FedAvg's zero-padding path
(strategies/ranks.py): the replies are padded to the global rank first, and dW* is then the
clients' own sum p_k s_k B_k A_k expressed at the global scaling. A server optimiser
(`server_opt`, base.py) takes its pseudo-gradient from the method's result, (A_bar, B_bar + dB),
minus the previous global: the corrected pair is what this method proposes as the next global.
"""

from __future__ import annotations

from logging import INFO, WARNING

import torch
from flwr.supercore import log

from fedpeft import lowrank
from fedpeft.strategies.fedavg import FedAvgLoRA

VARIANTS = ("cosine", "closed_form")


class LoRAFAIR(FedAvgLoRA):
    """LoRA-FAIR residual correction of FedAvg on LoRA.

    Parameters
    ----------
    lam : float (default: 0.01)
        Weight of the ||dB||_F^2 / ||B_bar||_F^2 regulariser (the paper's lambda at unit scale).
    lr : float (default: 0.01)
        Step size of the server's SGD on dB / ||B_bar|| (the paper's setting).
    max_iter : int (default: 1000)
        Most SGD iterations per round.
    tol : float (default: 1e-6)
        Stop when the loss summed over all layers changes by less than this for `patience`
        iterations in a row.
    patience : int (default: 5)
        See `tol`.
    variant : str (default: "cosine")
        "cosine" is the paper's objective; "closed_form" solves the squared-error surrogate
        dB = (G - B_bar M)(M + lambda I)^-1 instead. The surrogate is not the paper's method.
    ranks, scaling
        Heterogeneous client ranks and their alphas, as in `FedAvgLoRA` (zero-padded).
    **kwargs
        See `LowRankStrategy`.

    Down: A_bar and B' (and the head when trained). Up: A_k and B_k (and the head), as in FedAvg,
    whose exchange this class inherits. Each round the solver's info (summed and per layer group)
    is logged and kept in `last_info`; every layer keeps its best iterate, and a layer no step
    improved keeps B_bar (logged as a fallback).
    """

    name = "lora_fair"
    sums_replies = False
    client_dp_note = (
        "its correction is fitted to each client's product B_k A_k, which needs every client's "
        "update in the clear beyond their noised sum"
    )

    def __init__(
        self,
        *args,
        lam: float = 0.01,
        lr: float = 0.01,
        max_iter: int = 1000,
        tol: float = 1e-6,
        patience: int = 5,
        variant: str = "cosine",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if variant not in VARIANTS:
            raise ValueError(
                f"strategy.variant={variant!r} is unknown: one of {', '.join(VARIANTS)}"
            )
        if lam < 0:
            raise ValueError(f"strategy.lam={lam} must be >= 0")
        self.lam, self.lr, self.max_iter = lam, lr, max_iter
        self.tol, self.patience, self.variant = tol, patience, variant
        self.last_info: dict = {}

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Average everything (zero-padded to the global rank), then B_bar -> B_bar + dB."""
        updates = self.padded(updates)
        self.average_into_global(updates, weights)
        groups = self.layer_groups()
        stacks = [
            (
                torch.stack([self.stack_factor(names, "lora_A", u) for u in updates]),
                torch.stack([self.stack_factor(names, "lora_B", u) for u in updates]),
            )
            for names in groups
        ]
        if self.variant == "closed_form":
            results = [lowrank.lora_fair_closed_form(a, b, weights, self.lam) for a, b in stacks]
        else:
            results, self.last_info = lowrank.lora_fair_residual_groups(
                stacks, weights, self.lam, self.lr, self.max_iter, self.tol, self.patience
            )
            log(INFO, "LoRA-FAIR round %d: %s", self.server_round, self.last_info)
            if self.last_info["fallback_layers"]:
                log(
                    WARNING,
                    "LoRA-FAIR round %d: no SGD step improved %d of %d layers; they keep B_bar",
                    self.server_round,
                    self.last_info["fallback_layers"],
                    self.last_info["layers"],
                )
        for names, (a_bar, b_new) in zip(groups, results, strict=True):
            self.unstack_factor(names, "lora_A", a_bar)
            self.unstack_factor(names, "lora_B", b_new)
