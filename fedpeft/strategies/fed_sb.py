"""Fed-SB: B and A frozen and shared, only the r x r matrix R trained and averaged.

Implements docs/algorithms.md §6, after Singhal et al., "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning" (2025), built on
LoRA-SB (Ponkshe et al., "Initialization using update approximation is a silver bullet for extreme
efficient low-rank fine-tuning", 2024). A layer's update is B R A with scaling 1; B and A are
frozen and identical everywhere, so averaging R is exact: B (sum p_k R_k) A = sum p_k B R_k A.

Initialisation, once before round 1 (the base weights are not compensated):
- `lora_sb`: from the full-weight gradient G of each adapted layer on a calibration set, one layer
  at a time, dW1 = -eta sign(G) ~ U S V^T (rank r, randomised SVD), B = U_r, R = diag(S_r),
  A = V_r^T (lowrank.lora_sb_init). eta is the first warm-up step of the run's schedule, as the
  Fed-SB code derives it (fed_sb/fed/CR/train_cr_fed.py: eff_lr = lr / (warmup_ratio *
  total_training_steps)): `calibration_step`, with the clients' lr and the optimizer steps the
  whole federation is planned to take; R starts at eta times the singular values. The
  calibration examples are server-held data, never client data: fedpeft takes the first
  `calibration_examples` examples of the server's shuffled held-out split and removes them from
  the server's evaluation set (federation.prepare), so the reported accuracy is measured on
  examples the initialisation never saw.
- `orthonormal`: the data-free variant, random orthonormal B and A from the adapter seed, R = 0
  (lowrank.orthonormal_init), one draw per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.adapters import FROZEN_PREFIX
from fedpeft.protocol import FROZEN_VERSION
from fedpeft.search_space import LEARNING_RATE, Choice
from fedpeft.strategies.base import LowRankStrategy

INITS = ("lora_sb", "orthonormal")


def calibration_step(lr: float, warmup_ratio: float, total_steps: int) -> float:
    """The step eta = lr / (warmup_ratio * total_steps): the first of a linear warm-up to lr.

    The Fed-SB code's eff_lr (train_cr_fed.py, train_it_fed.py); with its commonsense settings
    (lr 1e-4, warm-up 0.02, 170k examples at batch 10 for 2 epochs) about 1.5e-7.
    """
    if lr <= 0 or not 0 < warmup_ratio <= 1 or total_steps < 1:
        raise ValueError(
            f"need lr > 0, warmup_ratio in (0, 1] and total_steps >= 1, got {lr}, "
            f"{warmup_ratio}, {total_steps}"
        )
    return lr / (warmup_ratio * total_steps)


class FedSB(LowRankStrategy):
    """Fed-SB on LoRA-SB adapters (adapter kind `sb`).

    Parameters
    ----------
    init : str (default: "lora_sb")
        "lora_sb" (gradient-based, needs calibration data) or "orthonormal" (data-free).
    calibration_examples : int (default: 64)
        Server-held examples for the `lora_sb` gradient (the official runs use 50 to 550); taken
        from the server's held-out split and excluded from server evaluation. Ignored (0) for
        `orthonormal`.
    calibration_lr : float or None (default: None)
        eta of the simulated first Adam-like step dW1 = -eta sign(G); R starts at its singular
        values, so eta sets the initial update's size (the base is not compensated). None derives
        it as the Fed-SB code does: eta = lr / (warmup_ratio * total_steps), lr the clients'
        learning rate (task train.lr).
    warmup_ratio : float (default: 0.02)
        The warm-up fraction in that derivation (the Fed-SB scripts' --warmup_ratio 0.02).
    total_steps : int or None (default: None)
        Optimizer steps the federation is planned to take, all clients together (the code's
        len(train_loader) * epochs over the whole training set); the run fills it in
        (federation.strategy_params: rounds x clients per round x local steps).
    **kwargs
        See `LowRankStrategy`. The rank is the run's adapter rank (adapter.rank); the scaling is 1.

    Down: R every round (and the head when trained), plus B and A the first time a node is seen or
    after it lost them (r (d_in + d_out) per layer, once). Up: R_k (r^2 per layer) and the head.
    Server: R = sum p_k R_k. B, R and A all live in the global adapter, so the base's
    `state_dict` is the whole server state; on resume every node is sent B and A again.
    """

    name = "fed_sb"
    sums_replies = True
    #: the paper runs Fed-SB at r = 120-200 (R is r x r, so its bytes grow as r^2, not 2 d r)
    search_space = {**LEARNING_RATE, "adapter.rank": Choice((16, 32, 64, 128))}
    kind = "sb"
    version_metric = FROZEN_VERSION

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        init: str = "lora_sb",
        calibration_examples: int = 64,
        calibration_lr: float | None = None,
        warmup_ratio: float = 0.02,
        total_steps: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(global_adapter, task, **kwargs)
        if init not in INITS:
            raise ValueError(f"strategy.params.init={init!r} is unknown: one of {', '.join(INITS)}")
        if init == "lora_sb" and calibration_examples < 1:
            raise ValueError(
                f"strategy.params.calibration_examples={calibration_examples} must be >= 1 for "
                "init=lora_sb (or use init=orthonormal, which needs no data)"
            )
        if calibration_lr is not None and calibration_lr <= 0:
            raise ValueError(f"strategy.params.calibration_lr={calibration_lr} must be > 0")
        if not 0 < warmup_ratio <= 1:
            raise ValueError(f"strategy.params.warmup_ratio={warmup_ratio} must be in (0, 1]")
        self.init = init
        self.calibration_examples = calibration_examples if init == "lora_sb" else 0
        self.calibration_lr = calibration_lr
        if init == "lora_sb" and calibration_lr is None:
            lr = self.task.get("train", {}).get("lr")
            if lr is None or total_steps is None:
                raise ValueError(
                    "strategy.params.calibration_lr=null derives eta from the run's train.lr and "
                    "planned steps, which this strategy was not given: set calibration_lr"
                )
            self.calibration_lr = calibration_step(float(lr), warmup_ratio, int(total_steps))
        self.adapter_seed = int(self.task.get("adapter_seed", 0))
        self.layers = [k.removesuffix(".lora_R") for k in self.factor_keys("lora_R")]
        if not self.layers:
            raise ValueError("fed_sb needs an adapter of kind sb (lora_R factors)")
        if init == "orthonormal":
            self._orthonormal()

    @classmethod
    def check_params(
        cls, params: Mapping[str, Any], strategy: Mapping[str, Any], adapter_rank: int
    ) -> None:
        """The calibration step's rate (positive, or null to derive it) and warm-up ratio."""
        super().check_params(params, strategy, adapter_rank)
        eta = params.get("calibration_lr")
        if eta is not None and not (_number(eta) and eta > 0):
            raise ValueError(
                f"strategy.params.calibration_lr={eta} must be positive, or null to derive it "
                "from the run's lr, warm-up ratio and steps"
            )
        ratio = params.get("warmup_ratio", 0.02)
        if not (_number(ratio) and 0 < ratio <= 1):
            raise ValueError(f"strategy.params.warmup_ratio={ratio} must be in (0, 1], e.g. 0.02")

    @classmethod
    def base_refusal(cls, quantization: str, params: Mapping[str, Any]) -> str | None:
        """LoRA-SB's start needs base-weight gradients, which a quantised base does not have."""
        if params.get("init", "lora_sb") != "lora_sb":
            return None
        return (
            f"its LoRA-SB start needs gradients of the base weights, which a {quantization} base "
            "does not have: set strategy.params.init=orthonormal"
        )

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Both compose: R (and the head) is a plain weighted average with B and A fixed."""
        return None

    def _orthonormal(self) -> None:
        generator = torch.Generator().manual_seed(self.adapter_seed)
        for name in self.layers:
            d_out, r = self.global_adapter[f"{name}.lora_B"].shape
            d_in = self.global_adapter[f"{name}.lora_A"].shape[1]
            b, a, r_mat = lowrank.orthonormal_init(1, d_out, d_in, r, generator)
            self._set(name, b[0], r_mat[0], a[0])

    def _set(self, name: str, b: torch.Tensor, r: torch.Tensor, a: torch.Tensor) -> None:
        self.global_adapter[f"{name}.lora_B"] = b.float().contiguous()
        self.global_adapter[f"{name}.lora_R"] = r.float().contiguous()
        self.global_adapter[f"{name}.lora_A"] = a.float().contiguous()

    def calibrate(self, gradients: Iterable[tuple[str, torch.Tensor]]) -> None:
        """LoRA-SB init from each layer's full-weight gradient, consumed one layer at a time."""
        if self.init != "lora_sb":
            raise RuntimeError("calibrate is for init=lora_sb")
        generator = torch.Generator().manual_seed(self.adapter_seed)
        seen = set()
        for name, grad in gradients:
            rank = self.global_adapter[f"{name}.lora_R"].shape[0]
            b, r, a = lowrank.lora_sb_init(grad, rank, self.calibration_lr, generator)
            self._set(name, b, r, a)
            seen.add(name)
        if seen != set(self.layers):
            raise ValueError(f"calibration covered {len(seen)} of {len(self.layers)} layers")

    def down_keys(self, node_id: int) -> list[str]:
        """R and the head (when trained); B and A travel once, in `node_payload`."""
        return self.up_keys()

    def up_keys(self) -> list[str]:
        """R and the head (when trained)."""
        return self.factor_keys("lora_R") + self.head_keys()

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """B and A for a node that does not hold them yet; the version every node must hold."""
        tensors = {}
        if self.known_version(node_id) < 1:
            tensors = {
                f"{FROZEN_PREFIX}{k}": self.global_adapter[k]
                for k in self.factor_keys("lora_A", "lora_B")
            }
        return tensors, {FROZEN_VERSION: 1}

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """R = sum p_k R_k, head = sum p_k head_k; B and A unchanged."""
        self.average_into_global(updates, weights)

    def export_lora(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """One plain LoRA of scaling 1: A' = R A and B, so B A' = B R A exactly; and the head."""
        tensors = {}
        for name in self.layers:
            r = self.global_adapter[f"{name}.lora_R"].double()
            a = self.global_adapter[f"{name}.lora_A"].double()
            tensors[f"{name}.lora_A"] = (r @ a).float()
            tensors[f"{name}.lora_B"] = self.global_adapter[f"{name}.lora_B"]
        head = {k: v for k, v in self.global_adapter.items() if k.startswith("head.")}
        rank = self.global_adapter[f"{self.layers[0]}.lora_R"].shape[0]
        return {**tensors, **head}, rank


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
