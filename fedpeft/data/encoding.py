"""Tokenisation of text splits into model inputs, and the collate function that pads batches."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import datasets
import torch
from torch.nn.utils.rnn import pad_sequence

_CACHE_SIZE = 16  # tokenised datasets kept per process

_TOKENIZED: OrderedDict[str, datasets.Dataset] = OrderedDict()


def tokenize(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenise the texts into input_ids and attention_mask (truncated, unpadded), keeping label.

    Cached per process on (dataset, tokenizer, max_length), so clients tokenise their data once.
    """
    key = repr(
        (
            ds._fingerprint,
            type(tokenizer).__name__,
            getattr(tokenizer, "name_or_path", ""),
            len(tokenizer),
            int(max_length),
        )
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    if fingerprint in _TOKENIZED:
        _TOKENIZED.move_to_end(fingerprint)
        return _TOKENIZED[fingerprint]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    out = ds.map(
        encode,
        batched=True,
        remove_columns=[c for c in ds.column_names if c != "label"],
        new_fingerprint=fingerprint,
        desc="Tokenising",
    )
    _TOKENIZED[fingerprint] = out
    while len(_TOKENIZED) > _CACHE_SIZE:
        _TOKENIZED.popitem(last=False)
    return out


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenised examples to the batch's longest sequence (dynamic padding)."""
    ids = [torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in batch]
    mask = [torch.as_tensor(ex["attention_mask"], dtype=torch.long) for ex in batch]
    labels = [int(ex["label"] if "label" in ex else ex["labels"]) for ex in batch]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence(mask, batch_first=True, padding_value=0),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
