"""FLoRA: clients train a fresh LoRA each round; the server stacks them; everyone merges the stack.

Implements docs/algorithms.md §3, after Wang et al., "FLoRA: Federated Fine-Tuning Large Language
Models with Heterogeneous Low-Rank Adaptations" (NeurIPS 2024). Client k trains a fresh LoRA of its
own rank r_k at its own alpha_k (strategies/ranks.py: by default alpha_k = 2 r_k as in the FLoRA
code, generally alpha / adapter.rank * r_k). The server stacks the replies into one module of
scaling 1, B_stack = [B_1 ... B_K], A_stack = [s_1 p_1 A_1; ...; s_K p_K A_K] (s_k = alpha_k / r_k
folded into A, lowrank.flora_stack), so that B_stack A_stack = sum_k p_k s_k B_k A_k exactly. Every
party merges it into its base weights, W0 <- W0 + B_stack A_stack (float32, in place), and starts a
fresh LoRA.

The global base is versioned: version t is the pristine base plus the stacked modules of rounds
1..t, merged in order. The server keeps every module; a node it knows at version v receives
v+1..t before training (catch-up), so clients that were not sampled, restarted or joined late all
end with the same base. A node reports the version it holds (`base-version`); a node whose state
does not match what the server sent replies with an error and is sent everything next time.
The few-local-steps weakness of the random restart (noted in the FedSVD paper) is reproduced, not
fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.adapters import STACK_PREFIX
from fedpeft.protocol import BASE_VERSION, FRESH_SEED, STACK_FROM, STACK_TO
from fedpeft.records import TensorSpec
from fedpeft.strategies.base import LowRankStrategy
from fedpeft.strategies.ranks import RankPlan


class VersionedBase(LowRankStrategy):
    """A versioned global base: modules of scaling 1 merged in order into every party's base.

    Version t is the pristine base plus modules 1..t. The server keeps every module; a node it
    knows at version v is sent v+1..t before training (`versioned_payload`), so nodes that were
    not sampled, restarted or joined late end with the same base; the node reports the version it
    holds (`base-version`). Used by FLoRA (each round's stack) and FedEx-LoRA (each round's
    residual). Subclasses append modules with `add_module`.
    """

    version_metric = BASE_VERSION

    @classmethod
    def base_refusal(cls, quantization: str, params: Mapping[str, Any]) -> str | None:
        """Each round's module is merged into the base, which a quantised base cannot take."""
        return (
            f"it merges each round's module into the base weights, which a {quantization} base "
            "cannot take exactly"
        )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stacks: list[dict[str, torch.Tensor]] = []

    def add_module(self, module: dict[str, torch.Tensor]) -> None:
        """Append the next version: `<layer>.lora_A` (R x d_in), `<layer>.lora_B` (d_out x R)."""
        self.stacks.append({k: v.contiguous() for k, v in module.items()})

    def versioned_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The modules this node lacks (`stack.<v>.<key>`) and the version range in the config."""
        known = min(self.known_version(node_id), len(self.stacks))
        tensors = {
            f"{STACK_PREFIX}{version}.{key}": value
            for version in range(known + 1, len(self.stacks) + 1)
            for key, value in self.stacks[version - 1].items()
        }
        return tensors, {STACK_FROM: known, STACK_TO: len(self.stacks)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The base's state (ranks handed out included) and every module."""
        tensors, meta = super().state_dict()
        for version, stack in enumerate(self.stacks, start=1):
            tensors.update({f"{STACK_PREFIX}{version}.{k}": v for k, v in stack.items()})
        return tensors, {**meta, "stack_versions": len(self.stacks)}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the modules (the base version); every node catches up from version 0."""
        super().load_state_dict(tensors, meta)
        self.stacks = [
            {
                k.removeprefix(f"{STACK_PREFIX}{v}."): t
                for k, t in tensors.items()
                if k.startswith(f"{STACK_PREFIX}{v}.")
            }
            for v in range(1, int(meta["stack_versions"]) + 1)
        ]

    def base_stacks(self) -> list[dict[str, torch.Tensor]]:
        """Every module, in order."""
        return list(self.stacks)

    def concatenated(
        self, layers: Sequence[str], extra: Sequence[Mapping[str, torch.Tensor]] = ()
    ) -> dict[str, torch.Tensor]:
        """All modules (then `extra` ones) joined along the rank: one LoRA of scaling 1."""
        modules = [*self.stacks, *extra]
        tensors = {}
        for name in layers:
            tensors[f"{name}.lora_A"] = torch.cat([s[f"{name}.lora_A"] for s in modules], 0)
            tensors[f"{name}.lora_B"] = torch.cat([s[f"{name}.lora_B"] for s in modules], 1)
        return tensors


class FLoRA(VersionedBase):
    """FLoRA stacking with per-client ranks and a versioned, merged base.

    Parameters
    ----------
    ranks : list[int] or None (default: None)
        LoRA ranks handed to clients in the order the server first samples them: the i-th node
        seen gets ranks[i % len(ranks)], and keeps it for the whole run. None gives every client
        the task's adapter rank. Any ranks and any sampling fraction work.
    scaling : str (default: "per_rank")
        The clients' alphas (ranks.RankPlan). "per_rank": alpha_k = alpha / R * r_k (R =
        adapter.rank), every client at the scaling alpha / R; with fedpeft's defaults (alpha 16,
        rank 8) that is the FLoRA code's alpha_k = 2 r_k, its published setting. "shared":
        alpha_k = alpha for every client, s_k = alpha / r_k. Each node is sent its rank and
        alpha in the round config, and its s_k is folded into its block of A_stack.
    **kwargs
        See `LowRankStrategy`. The head (when trained) is averaged as usual.

    Down: the stacked modules the node lacks (per adapted layer sum_j r_j (d_in + d_out) for each
    round it missed; in the steady state, the previous round's module), the head when trained, and
    in the config the node's rank and the seed of its fresh LoRA (from adapter seed, round, node).
    Up: A_k and B_k of rank r_k, and the head. The global adapter's LoRA factors stay at B = 0: the
    global model is the merged base with a zero LoRA on top, which is also what the server evaluates
    and what `export_lora` saves as one plain LoRA (all modules concatenated along the rank).
    """

    name = "flora"
    sums_replies = False
    client_dp_note = (
        "it stacks every client's factors into the next module, so each client's update is in "
        "the model itself, not in a sum the server could noise"
    )
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
        self.plan = RankPlan.unpadded(self.task, ranks, scaling)
        self.alpha = self.plan.alpha
        self.ranks = list(self.plan.ranks)
        self.adapter_seed = int(self.task.get("adapter_seed", 0))
        self.layers = [k.removesuffix(".lora_A") for k in self.factor_keys("lora_A")]

    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Neither composes: each round trains a fresh LoRA that is then merged into the base."""
        return (
            "every round each client trains a fresh LoRA that the server stacks and everyone "
            "merges into the base, so there is no persistent averaged global to step from or to "
            "keep control variates on"
        )

    def rank_of(self, node_id: int) -> int:
        """This node's rank, assigned to its identity the first time the node is sampled."""
        return self.assign_rank(node_id, self.plan.ranks)

    def down_keys(self, node_id: int) -> list[str]:
        """Only the head (when trained): the LoRA is fresh, the stacks come in `node_payload`."""
        return self.head_keys()

    def up_keys(self) -> list[str]:
        """A, B and the head (when trained); A and B have the node's rank (see `up_specs`)."""
        return self.factor_keys("lora_A", "lora_B") + self.head_keys()

    def up_specs(self, node_id: int) -> dict[str, TensorSpec]:
        """A_k (r_k x d_in) and B_k (d_out x r_k) of this node's rank, and the head."""
        r = self.rank_of(node_id)
        specs = {}
        for name in self.layers:
            d_in = self.global_adapter[f"{name}.lora_A"].shape[1]
            d_out = self.global_adapter[f"{name}.lora_B"].shape[0]
            specs[f"{name}.lora_A"] = TensorSpec((r, d_in))
            specs[f"{name}.lora_B"] = TensorSpec((d_out, r))
        for key in self.head_keys():
            specs[key] = TensorSpec(tuple(self.global_adapter[key].shape))
        return specs

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The stacked modules this node lacks, its rank and alpha, and its fresh LoRA's seed."""
        tensors, versions = self.versioned_payload(node_id)
        member = self.member(node_id)
        seed = (self.adapter_seed * 1_000_003 + self.server_round * 10_007 + member) % 2**31
        config = {
            **versions,
            **self.plan.node_config(self.rank_of(node_id)),
            FRESH_SEED: seed,
        }
        return tensors, config

    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Stack the clients' LoRAs (s_k p_k folded into A) as this round's module; average head."""
        stack: dict[str, torch.Tensor] = {}
        for name in self.layers:
            a_list = [u[f"{name}.lora_A"] for u in updates]
            b_list = [u[f"{name}.lora_B"] for u in updates]
            scalings = [self.plan.scaling_of(a.shape[0]) for a in a_list]
            a_stack, b_stack = lowrank.flora_stack(a_list, b_list, weights, scalings)
            stack[f"{name}.lora_A"] = a_stack
            stack[f"{name}.lora_B"] = b_stack
        self.add_module(stack)
        head = self.head_keys()
        if head:
            self.average_into_global([{k: u[k] for k in head} for u in updates], weights)

    def export_lora(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """All stacked modules concatenated along the rank: one LoRA of scaling 1, and the head."""
        if not self.stacks:
            return None
        tensors = self.concatenated(self.layers)
        rank = tensors[f"{self.layers[0]}.lora_A"].shape[0]
        head = {k: v for k, v in self.global_adapter.items() if k.startswith("head.")}
        return {**tensors, **head}, rank
