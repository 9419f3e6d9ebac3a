"""Scores of a causal LM on held-out prompt/response pairs: exact match, loss, perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.causal.answers import final_number
from fedpeft.causal.encoding import collate
from fedpeft.causal.generation import greedy_generate
from fedpeft.causal.loss import token_losses


@torch.no_grad()
def response_loss(
    model: Any,
    examples: Sequence[dict],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> float:
    """Mean next-token loss over all response tokens of `examples`."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        loss, mask = token_losses(model(**batch).logits, labels)
        total += float(loss.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict],
    *,
    batch_size: int,
    device: torch.device,
    max_new_tokens: int,
) -> dict[str, float]:
    """Accuracy (= exact_match of the final number, greedy decoding), loss and perplexity."""
    loss = response_loss(
        model, examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, device=device
    )
    texts = greedy_generate(
        model,
        tokenizer,
        [ex["input_ids"][: ex["prompt_length"]] for ex in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )
    hits = sum(
        bool(ex["answer"]) and final_number(text) == ex["answer"]
        for ex, text in zip(examples, texts, strict=True)
    )
    exact = hits / max(len(examples), 1)
    return {
        "accuracy": exact,
        "exact_match": exact,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
    }
