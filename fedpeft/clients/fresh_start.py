"""A fresh LoRA each round: the config's `fresh-seed` restarts the factors from that seed (FLoRA).

FLoRA merges every round's stacked update into the base and starts the next round from a new
LoRA drawn from a seed the server sends, the same on every client.
"""

from __future__ import annotations

import torch

from fedpeft import adapters
from fedpeft.clients.round_feature import Round, RoundFeature
from fedpeft.protocol import FRESH_SEED


class FreshStart(RoundFeature):
    """The round feature: after loading, overwrite the LoRA with a fresh one from the seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @classmethod
    def for_round(cls, round_: Round) -> FreshStart | None:
        """When the config has `fresh-seed`, else None."""
        return cls(round_.config[FRESH_SEED]) if FRESH_SEED in round_.config else None

    def load(self, model: torch.nn.Module) -> None:
        """Write the fresh LoRA over the loaded one."""
        adapters.write_adapter(model, adapters.fresh_lora(model, self.seed))
