"""How a BERT-style classifier turns token states into the vector its head reads.

`cls` is transformers' own BertForSequenceClassification: the pretrained pooler (a dense layer and
tanh) on the [CLS] token. `mean` replaces that pooler with the attention-masked mean of the last
hidden states, the sentence embedding all-MiniLM-L6-v2 was trained to produce. The mean-pooled
vectors of different texts are far less alike (mean cosine 0.09 on SpamAssassin, 0.16 on SST-2,
against 0.66 and 0.69 for the [CLS] pooler; docs/privacy.md), which matters under DP: per-example
clipping and isotropic noise spend most of a [CLS]-pooled gradient on the direction every example
shares. The module tree keeps its names (bert.*, classifier.*), so adapters save as before; a
model rebuilt elsewhere must pool the same way (`model.pooling` travels in the run's config).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedpeft.errors import ConfigError

POOLINGS = ("cls", "mean")


class MeanPooler(nn.Module):
    """Masked mean of (batch, seq, hidden) states -> (batch, hidden); the mask comes per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mean over the positions the attention mask keeps (all positions without a mask)."""
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Swap a BERT classifier's [CLS] pooler for `MeanPooler`, fed the mask of every forward."""
    encoder = getattr(model, "bert", None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ConfigError(
            f"model.pooling=mean needs a BERT-style classifier (model=minilm, tiny_bert or an hf "
            f"BERT model); {type(model).__name__} has no bert.pooler: use model.pooling=cls"
        )
    pooler = MeanPooler()
    encoder.pooler = pooler

    def take_mask(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        pooler.mask = mask if mask is not None or len(args) < 2 else args[1]

    encoder.register_forward_pre_hook(take_mask, with_kwargs=True)
    return model
