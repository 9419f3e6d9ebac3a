"""LoRA-FAIR: average A and B, then correct B with a residual that restores the ideal update.

Implements ALGORITHMS.md §5, after Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with
Aggregation and Initialization Refinement" (ICCV 2025). Averaging A and B separately gives
B_bar A_bar, not the ideal dW* = sum p_k B_k A_k. The server finds dB minimising
1 - cos(dW*, (B_bar + dB) A_bar) + lambda ||dB||_F^2 (whole-matrix cosine, summed over layers, dB
starting at 0, plain SGD with early stopping) and sends B' = B_bar + dB with A_bar. Correcting B
only is the paper's choice and its best ablation. Everything runs on the factors (r x r Grams),
never on a d_out x d_in matrix.
"""

from __future__ import annotations

from logging import INFO

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
        Weight of the ||dB||_F^2 regulariser.
    lr : float (default: 0.01)
        Step size of the server's SGD on dB (the paper's setting).
    max_iter : int (default: 1000)
        Most SGD iterations per round.
    tol : float (default: 1e-6)
        Stop when the loss changes by less than this for `patience` iterations in a row.
    patience : int (default: 5)
        See `tol`.
    variant : str (default: "cosine")
        "cosine" is the paper's objective; "closed_form" solves the squared-error surrogate
        dB = (G - B_bar M)(M + lambda I)^-1 instead. The surrogate is not the paper's method.
    **kwargs
        See `LowRankStrategy`.

    Down: A_bar and B' (and the head when trained). Up: A_k and B_k (and the head), as in FedAvg,
    whose exchange this class inherits.
    """

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
        """Average everything, then replace B_bar by B_bar + dB for each group of layers."""
        super().aggregate_updates(updates, weights)
        for names in self.layer_groups():
            a_stack = torch.stack([self.stack_factor(names, "lora_A", u) for u in updates])
            b_stack = torch.stack([self.stack_factor(names, "lora_B", u) for u in updates])
            if self.variant == "closed_form":
                a_bar, b_new = lowrank.lora_fair_closed_form(a_stack, b_stack, weights, self.lam)
            else:
                a_bar, b_new, self.last_info = lowrank.lora_fair_residual(
                    a_stack,
                    b_stack,
                    weights,
                    self.lam,
                    self.lr,
                    self.max_iter,
                    self.tol,
                    self.patience,
                )
                log(INFO, "LoRA-FAIR round %d: %s", self.server_round, self.last_info)
            self.unstack_factor(names, "lora_A", a_bar)
            self.unstack_factor(names, "lora_B", b_new)
