"""The two tasks, classification and causal_lm, and the per-task choice of encoding and batching.

The dataset decides the task (config key `task`, which defaults to the dataset group's `task`):
text/label sources train a classifier, prompt/response sources (gsm8k, jsonl) a causal LM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch

from fedpeft import data
from fedpeft.causal import encoding as causal_encoding

TASKS = ("classification", "causal_lm")


def encode(task: str, ds: datasets.Dataset, tokenizer: Any, max_length: int) -> list[dict]:
    """A split's examples as model inputs: tokenised texts with labels, or chat-formatted pairs."""
    if task == "causal_lm":
        return causal_encoding.encode(ds, tokenizer, max_length)
    return list(data.tokenize(ds, tokenizer, max_length))


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of either task's examples (causal ones carry a label per token)."""
    if isinstance(batch[0].get("labels"), list):
        return causal_encoding.collate(batch, pad_token_id)
    return data.collate(list(batch), pad_token_id)
